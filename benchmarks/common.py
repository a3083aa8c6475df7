"""Small shared pieces of the benchmark harness: logging, JSON files written atomically,
timing, GPU memory, environment facts and errors recorded instead of raised.

Standard library only at import time (NumPy, torch and ONNX Runtime load where used).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCHEMA = 1
# a --shadow-keep-rates entry: the break-even rate for the hidden share the plain pipelined
# row measured at the same gamma (quickdraft.theory.shadow_break_even)
AUTO_RATE = "auto"

# The paper's Table 3 acceptance rates for its 97M target / 6M draft pair (LM1B).
PAPER_ALPHA = {"T0": 0.88, "T1": 0.89}


class Unavailable(RuntimeError):
    """A system or stage that cannot run here (API not written yet, no CUDA, ...):
    recorded as "unavailable", which a smoke run accepts, unlike an error."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- JSON


def _clean(value):
    """NaN / inf -> None, tuples -> lists, Paths -> str: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return _clean(value.item())  # NumPy scalars
    return value


def dump_json(path: str | os.PathLike, data) -> None:
    """Write ``data`` as JSON atomically (a kill mid-write leaves the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_clean(data), indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def dump_results(path: str | os.PathLike, **data) -> None:
    """A script's results as JSON: the command that made them (this script and its
    arguments), the machine's environment, then ``data``."""
    script = Path(sys.argv[0]).name
    dump_json(path, {"command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]),
                     "environment": environment(), **data})


def load_json(path: str | os.PathLike, default=None):
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return default


def error_record(exc: BaseException, **where) -> dict:
    kind = "unavailable" if isinstance(exc, Unavailable) else "error"
    return {
        **where,
        "kind": kind,
        "type": type(exc).__name__,
        "message": str(exc)[:2000],
        "traceback": "".join(traceback.format_exception(exc))[-4000:],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


class Record:
    """A result dict saved to ``path`` after every change, so that a process killed at its
    time limit still leaves what it measured."""

    def __init__(self, path: str | os.PathLike, initial: dict | None = None):
        self.path = Path(path)
        self.data: dict = dict(initial or {})
        self.data.setdefault("errors", [])
        self.save()

    def save(self) -> None:
        dump_json(self.path, self.data)

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def add_error(self, exc: BaseException, **where) -> dict:
        rec = error_record(exc, **where)
        self.data["errors"].append(rec)
        self.save()
        log(f"{rec['kind'].upper()} in {where}: {rec['type']}: {rec['message'][:500]}")
        return rec

    @contextlib.contextmanager
    def step(self, name: str, **where) -> Iterator[None]:
        """Run a block; an exception is recorded under ``name`` and swallowed."""
        t0 = time.perf_counter()
        log(f"-- {name}")
        try:
            yield
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
            self.add_error(e, step=name, **where)
        finally:
            self.data.setdefault("step_seconds", {})[name] = round(time.perf_counter() - t0, 3)
            self.save()


# ----------------------------------------------------------------------------- timing


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def timed_runs(fn: Callable[[], object], *, warmup: int, repeats: int,
               sync: Callable[[], None] | None = None) -> tuple[object, list[float]]:
    """Call ``fn`` warmup + repeats times; return the last output and the timed seconds."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        out = fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return out, times


def rate(new_tokens: int, times: list[float]) -> dict:
    """tokens/s and ms/token from the median of ``times`` (seconds for ``new_tokens``)."""
    m = median(times)
    if not m:
        return {"tokens_per_s": None, "ms_per_token": None, "median_s": m, "times_s": times}
    return {
        "tokens_per_s": new_tokens / m,
        "ms_per_token": 1e3 * m / new_tokens,
        "median_s": m,
        "times_s": [round(t, 6) for t in times],
        "new_tokens": new_tokens,
    }


# ----------------------------------------------------------------------------- GPU memory


def _nvml_device(index: int = 0):
    """NVML's handle of GPU ``index`` (pynvml, package nvidia-ml-py), or None without a GPU
    or the package."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # noqa: BLE001 - no package, no driver, no GPU: nothing to read
        return None


def gpu_memory_mib(index: int = 0) -> dict:
    """GPU memory in use (MiB): the whole device's and this process's (NVML). Empty on a
    machine without a GPU or nvidia-ml-py."""
    handle = _nvml_device(index)
    if handle is None:
        return {}
    import pynvml

    out = {"device_mib": pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20}
    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
            out["process_mib"] = proc.usedGpuMemory / 2**20
    return out


class GpuMemory:
    """Device memory in use (NVML ``memory.used``), read at each :meth:`mark`.

    ``baseline`` is read when the monitor starts (before this process touches CUDA), so
    ``peak - baseline`` is what this process added: its CUDA context, weights, caches and
    allocator pools (which keep what they took, so the largest reading at the marks is the
    peak). Nothing else may use the GPU meanwhile (the orchestrator never does). On a
    machine without a GPU every value is None.
    """

    def __init__(self):
        self.baseline = self.sample()
        self.peak = self.baseline
        self._marks: dict[str, float | None] = {}

    @staticmethod
    def sample() -> float | None:
        return gpu_memory_mib().get("device_mib")

    def mark(self, name: str) -> dict:
        """The peak so far (since the start) under ``name``."""
        used = self.sample()
        if used is not None and (self.peak is None or used > self.peak):
            self.peak = used
        self._marks[name] = self.peak
        base = self.baseline
        out = {"baseline_mib": base, "peak_mib": self.peak, "method": "NVML memory.used"}
        out["peak_delta_mib"] = None if base is None or self.peak is None else self.peak - base
        out["marks_delta_mib"] = {
            k: (None if v is None or base is None else v - base) for k, v in self._marks.items()
        }
        return out


# ----------------------------------------------------------------------------- environment


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Versions and machine facts (no CUDA initialisation: NVML only)."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "packages": {n: _version(n) for n in (
            "torch", "transformers", "tokenizers", "optimum", "optimum-onnx", "onnx",
            "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda",
            "numpy", "safetensors")},
    }
    handle = _nvml_device()
    if handle is not None:  # as nvidia-smi --query-gpu=name,memory.total,driver_version,...
        import pynvml

        clock = pynvml.nvmlDeviceGetMaxClockInfo
        env["gpu"] = (f"{pynvml.nvmlDeviceGetName(handle)}, "
                      f"{pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20} MiB, "
                      f"{pynvml.nvmlSystemGetDriverVersion()}, "
                      f"{clock(handle, pynvml.NVML_CLOCK_SM)} MHz, "
                      f"{clock(handle, pynvml.NVML_CLOCK_MEM)} MHz")
    if os.environ.get("QUICKDRAFT_COMMIT"):  # a copy without .git (the GPU machine's)
        env["git_commit"], env["git_dirty"] = os.environ["QUICKDRAFT_COMMIT"], None
        return env
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO,
            timeout=10).stdout.strip() or None
        env["git_dirty"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True, cwd=REPO, timeout=10).stdout.strip())
    except Exception:  # noqa: BLE001
        env["git_commit"] = None
    return env


def worker_env(extra: dict | None = None, *, pythonpath: str | None = None) -> dict:
    """The environment for a worker subprocess: unbuffered, offline, the repo importable.

    ``pythonpath`` None keeps the current PYTHONPATH (e.g. /tmp/site first on the GPU
    machine) with the repository appended; a string replaces it (the repository is
    still appended).
    """
    env = dict(os.environ)
    base = env.get("PYTHONPATH", "") if pythonpath is None else pythonpath
    parts = [p for p in base.split(os.pathsep) if p]
    if str(REPO) not in parts:
        parts.append(str(REPO))
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if extra:
        env.update(extra)
    return env


def run_logged(cmd: list[str], *, timeout: float, env: dict | None = None, prefix: str = "",
               cwd: str | os.PathLike | None = None) -> int:
    """Run ``cmd`` with its output streamed into our stdout, each line prefixed; kill its
    whole process group at ``timeout`` seconds. Returns the exit code (124 on timeout)."""
    import signal

    log(f"$ {' '.join(str(c) for c in cmd)}  (timeout {timeout:.0f}s)")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            cwd=cwd, text=True, errors="replace", bufsize=1,
                            start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:  # the whole process group: SIGTERM, then SIGKILL after 5 s
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(max(1.0, timeout), kill)
    timer.daemon = True
    timer.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(f"{prefix}{line}" if prefix else line)
        sys.stdout.flush()
    proc.wait()
    timer.cancel()
    if timed_out.is_set():
        log(f"{prefix.strip()} killed at its time limit ({timeout:.0f}s)")
        return 124
    return proc.returncode


def run_worker(task: str, key: str, spec: dict, tasks: Path, *, timeout: float,
               env: dict | None = None, pythonpath: str | None = None) -> dict:
    """Run one ``benchmarks.worker`` task in its own process (``key`` names its spec and
    result files in ``tasks``); its result dict, with ``status`` "timeout" or "crashed"
    and an error added when the process did not finish, and ``wall_seconds``."""
    tasks.mkdir(parents=True, exist_ok=True)
    safe = key.replace("/", "_")
    spec_path, result_path = tasks / f"{safe}.spec.json", tasks / f"{safe}.result.json"
    dump_json(spec_path, spec)
    if result_path.exists():
        result_path.unlink()
    t0 = time.monotonic()
    rc = run_logged([sys.executable, "-m", "benchmarks.worker", task, str(spec_path),
                     str(result_path)], timeout=timeout,
                    env=worker_env(env, pythonpath=pythonpath), prefix=f"[{key}] ", cwd=REPO)
    res = load_json(result_path) or {"status": "crashed", "errors": []}
    if rc == 124:
        res["status"] = "timeout"
        res["errors"].append({"kind": "error", "type": "Timeout",
                              "message": f"killed at the time limit ({timeout:.0f}s)"})
    elif rc != 0 or res.get("status") == "running":
        res["status"] = f"crashed (exit {rc})"
        res["errors"].append({"kind": "error", "type": "Crash",
                              "message": f"worker exited with {rc} before finishing"})
    res["wall_seconds"] = round(time.monotonic() - t0, 2)
    return res
