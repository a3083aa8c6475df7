"""Static-KV-cache export: GroupQueryAttention graphs from onnxruntime-genai's model builder.

The same folder layout as the dynamic export (``quickdraft.json`` says ``kv_cache:
"static"``), plus the builder's ``genai_config.json`` and a ``greedy_tokens`` output
(:mod:`quickdraft.export.greedy`). fp32 graphs run on the CPU, fp16 on CUDA; int4 graphs
(4-bit MatMulNBits weights, ``weights: "int4"`` in the manifest) on either, with fp32 (CPU)
or fp16 (CUDA) caches and logits, the manifest's ``dtype``. The builder runs in a child
process that adapts transformers 4.x to it (:func:`_patch_transformers`); inside a
:func:`builder_session` (every static export opens one) one child runs all the models.
docs/explanation/fast-path.md describes the graph and why.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import json
import numbers
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from quickdraft.export.checks import (
    ExportError,
    SourceInfo,
    UnsupportedModelError,
    resolve_source,
)
from quickdraft.export.common import (
    MODEL_FILE,
    ExportInto,
    ExportReport,
    ModelReport,
    Progress,
    context_length,
    emit,
    ensure_tokenizer,
    graph_io,
    manifest_facts,
    quiet,
)
from quickdraft.export.greedy import add_greedy_output
from quickdraft.export.output import run_model, run_pair
from quickdraft.export.transpose import transpose_matmul_weights
from quickdraft.manifest import ONNX_ELEMENT_TYPES, ModelManifest

__all__ = [
    "STATIC_ARCHITECTURES",
    "STATIC_DTYPES",
    "QUANTIZED_DTYPES",
    "builder_problem",
    "execution_provider",
    "check_options",
    "check_cuda_validation",
    "gqa_head_size_multiple",
    "check_head_sizes",
    "check_source",
    "cache_length",
    "export_into",
    "run_builder",
    "BuilderProcess",
    "builder_session",
    "STARTUP_VARIABLES",
    "export_static_model",
    "export_static_pair",
    "validate_static",
]

# model_type -> covered by the static path: the builder makes the same GroupQueryAttention
# interface (fused rotary, no position_ids) for these; llama and qwen2 are tested in CI,
# mistral and qwen3 share their builder code path
STATIC_ARCHITECTURES = ("llama", "qwen2", "mistral", "qwen3")
# dtype -> the execution provider the builder must target for GroupQueryAttention
STATIC_DTYPES = {"fp32": "cpu", "fp16": "cuda"}
# quantized weights -> the execution providers the builder may target (the first: default);
# the KV cache and logits are then fp32 on the CPU and fp16 on CUDA (read from the graph)
QUANTIZED_DTYPES = {"int4": ("cpu", "cuda")}
# the builder's MatMulNBits options: 32-weight blocks (its default, made explicit); on the
# CPU accuracy level 4 (activations quantized to int8, int8 dot products: the fastest on a
# 2-core CPU). onnxruntime-genai 0.18 reads "accuracy_level"; its old name
# "int4_accuracy_level" is ignored there without a word (measured: accuracy_level=1 in the
# graph with accuracy_level=1, 4 with int4_accuracy_level=1), so the graph is checked
INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = {"cpu": 4}
QUANTIZED_OP = "MatMulNBits"
BUILDER_TIMEOUT_S = 3600
# static exports fuse each gated MLP's gate and up projections into one MatMul by default
FUSE_GATE_UP = True
# static exports keep MatMul weights as the builder stores them ([K, N]) by default
TRANSPOSE_WEIGHTS = False
EXPORTER = "onnxruntime-genai model builder"
ATTENTION = "GroupQueryAttention"
# the module whose __main__ runs the builder in a child process
_MODULE = "quickdraft.export.builder"
BUILDER_PACKAGES = ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnx-ir")


def builder_problem() -> str | None:
    """Why the model builder cannot run here (None when it can)."""
    missing = [name for name in ("onnxruntime_genai", "onnx_ir", "torch", "transformers")
               if importlib.util.find_spec(name) is None]
    if missing:
        return (
            f"the static export needs onnxruntime-genai's model builder; missing "
            f"{', '.join(missing)} (pip install onnxruntime-genai onnx-ir, or "
            "onnxruntime-genai-cuda on a CUDA machine)"
        )
    return None


def execution_provider(dtype: str, device: str) -> str:
    """The execution provider the builder targets for ``dtype`` (checked by
    :func:`check_options`) on ``device``."""
    return device if dtype in QUANTIZED_DTYPES else STATIC_DTYPES[dtype]


def check_options(dtype: str, device: str) -> None:
    """Refuse a dtype/device pair the builder makes no GroupQueryAttention graph for."""
    if dtype in QUANTIZED_DTYPES:
        if device not in QUANTIZED_DTYPES[dtype]:
            raise ValueError(f"a static {dtype} graph runs on "
                             f"{' or '.join(QUANTIZED_DTYPES[dtype])}, not {device}")
        return
    if dtype not in STATIC_DTYPES:
        raise ValueError(
            f"static export supports dtype {', '.join([*STATIC_DTYPES, *QUANTIZED_DTYPES])}, "
            f"not {dtype!r} (bf16 logits cannot be read by NumPy; use fp16 on CUDA)"
        )
    want = STATIC_DTYPES[dtype]
    if device != want:
        raise ValueError(
            f"a static {dtype} graph runs on {want}, not {device}: the model builder uses "
            "GroupQueryAttention (the shared past/present cache) only for fp32 on the CPU "
            "and fp16/bf16 on CUDA; use --dtype fp32 --device cpu or --dtype fp16 --device cuda"
        )


# onnxruntime's CPU kernel of GroupQueryAttention with the fused rotary embedding (the
# builder's graphs) refuses head sizes that are not a multiple of 16 ("head_size shall be a
# multiple of 16"): measured with onnxruntime 1.31.0, 1.31.1 and 1.32.0 (head sizes 8, 24,
# 40, 56, 72 fail; 16, 32, ..., 256 run). CUDA's kernel is assumed not to have the limit.
_GQA_HEAD_SIZE_MULTIPLE = {"cpu": 16, "cuda": 1}


def gqa_head_size_multiple(provider: str) -> int:
    """The multiple that GroupQueryAttention (fused rotary) on ``provider`` needs the head
    size to be (1: any head size)."""
    return _GQA_HEAD_SIZE_MULTIPLE.get(provider, 1)


def _head_size(config: dict) -> int | None:
    """head_dim of a config.json (hidden_size / num_attention_heads unless it is set)."""
    if config.get("head_dim"):
        return int(config["head_dim"])
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if not hidden or not heads:
        return None
    return int(hidden) // int(heads)


def check_head_sizes(sources: Sequence[str | os.PathLike], provider: str) -> None:
    """Refuse, from their config.json alone, sources whose head size GroupQueryAttention on
    ``provider`` cannot run (before any weights are loaded)."""
    multiple = gqa_head_size_multiple(provider)
    if multiple == 1:
        return
    for source in sources:
        folder, _ = resolve_source(source)
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue  # the source checks that follow say what is wrong with it
        size = _head_size(config) if isinstance(config, dict) else None
        if size is not None and size % multiple:
            raise ExportError(
                f"{os.fspath(source)}: head size {size} is not a multiple of {multiple}, which "
                f"onnxruntime's GroupQueryAttention on the {provider.upper()} needs for a "
                f"static export; use --kv-cache dynamic, or a model whose head size is a "
                f"multiple of {multiple}"
            )


def run_builder(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str,
    device: str,
    cache_dir: str | os.PathLike,
    local: bool = True,
    extra_options: dict[str, str] | None = None,
    timeout: float | None = None,
) -> str:
    """Run onnxruntime-genai's model builder in a child process; return its output.

    ``source`` is a local Hugging Face folder (``local=True``) or a hub id; ``dtype`` the
    builder's precision (fp32, fp16 or int4), built for :func:`execution_provider`. Inside
    :func:`builder_session` the session's child runs it, else a child of its own.
    ``timeout``: seconds (None: :data:`BUILDER_TIMEOUT_S` as it is at the call).
    Raises ExportError with the builder's last lines when it fails.
    """
    problem = builder_problem()
    if problem is not None:
        raise ExportError(problem)
    provider = execution_provider(dtype, device)
    argv = _builder_argv(source, out_dir, dtype=dtype, provider=provider,
                        cache_dir=cache_dir, local=local, extra_options=extra_options)
    timeout = BUILDER_TIMEOUT_S if timeout is None else timeout
    session = _SESSION.get()
    try:
        if session is not None and not session.closed:
            returncode, output = session.run(argv, timeout)
        else:
            returncode, output = _run_once(argv, timeout)
    except subprocess.TimeoutExpired as e:
        raise ExportError(
            f"{source}: the model builder ran past its timeout of {timeout:.0f} s and was "
            f"stopped; for a model this large set quickdraft.export.builder."
            f"BUILDER_TIMEOUT_S higher before exporting"
        ) from e
    if returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-8:])
        how = (f"killed by {_signal_name(-returncode)}" if returncode < 0
               else f"exit status {returncode}")
        raise ExportError(
            f"{source}: onnxruntime-genai's model builder failed ({dtype}, "
            f"{provider}, {how}):\n{tail}"
        )
    return output


def _builder_argv(source, out_dir, *, dtype: str, provider: str, cache_dir, local: bool,
                 extra_options: dict[str, str] | None) -> list[str]:
    """The builder's command-line arguments (int4: quickdraft's MatMulNBits options first,
    ``extra_options`` over them)."""
    if dtype in QUANTIZED_DTYPES:
        extra_options = {"block_size": str(INT4_BLOCK_SIZE),
                         **({"accuracy_level": str(INT4_ACCURACY_LEVEL[provider])}
                            if provider in INT4_ACCURACY_LEVEL else {}),
                         **(extra_options or {})}
    argv = ["-i" if local else "-m", os.fspath(source), "-o", os.fspath(out_dir),
            "-p", dtype, "-e", provider, "-c", os.fspath(cache_dir)]
    if extra_options:
        argv += ["--extra_options", *[f"{k}={v}" for k, v in extra_options.items()]]
    return argv


def _child_env() -> dict[str, str]:
    """The environment of a builder child: this one, tokenizers' thread pool off."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# the variables that Python, its native libraries (OpenMP, CUDA, torch) or the hub
# clients read once, when they start or are imported, by prefix: a builder child started
# with other values of these is replaced; every other variable is set per job
STARTUP_VARIABLES = (
    "PYTHON", "LD_", "OMP_", "MKL_", "KMP_", "CUDA_", "NVIDIA_", "PYTORCH_", "TORCH_",
    "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "ORT_", "XDG_", "TMPDIR",
)


def _startup_part(env: dict[str, str]) -> dict[str, str]:
    """The variables of ``env`` named with a :data:`STARTUP_VARIABLES` prefix."""
    return {k: v for k, v in env.items() if k.startswith(STARTUP_VARIABLES)}


def _run_once(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run one builder job in a child of its own: (its exit status, its output)."""
    done = subprocess.run([sys.executable, "-m", _MODULE, "--builder", *argv],
                          capture_output=True, text=True, timeout=timeout, env=_child_env())
    return done.returncode, (done.stdout or "") + (done.stderr or "")


# -- a builder child that serves several jobs ------------------------------------------------


class BuilderProcess:
    """One child process (``python -m quickdraft.export.builder --serve``) that runs
    builder jobs one after another, so torch, transformers and the builder are imported
    once, not once per model.

    Jobs go to the child's stdin and replies come from its stdout, one JSON line each; the
    child moved both away from fds 0-2 at start, and writes each job's output (Python and
    native) to a file named by the job, in a folder of its own that ends with it. Each job
    runs with this process's environment as it is then; a child that died, or was started
    with other values of the :data:`STARTUP_VARIABLES` than this process has now, is
    replaced by the next job; one past its timeout, or whose job was interrupted, is
    killed. Jobs from several threads run one at a time. Use it as a context manager, or
    call :meth:`close`; a closed one runs no more jobs.
    """

    def __init__(self) -> None:
        """No child yet: :meth:`start`, :meth:`preload` or the first :meth:`run` starts it."""
        self._proc: subprocess.Popen | None = None
        self._replies: queue.Queue | None = None
        self._folder: Path | None = None  # the child's log and its jobs' outputs
        self._log_read = 0
        self._env: dict[str, str] | None = None  # the environment the child started with
        self._jobs = 0
        self._lock = threading.Lock()
        self._closed = False
        self.starts = 0  # children started so far

    def __enter__(self) -> BuilderProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called: no more jobs."""
        return self._closed

    @property
    def pid(self) -> int | None:
        """The running child's process id (None when none runs)."""
        with self._lock:
            return self._proc.pid if self._alive() else None

    def _alive(self) -> bool:
        """Whether a child was started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start a child unless one runs (it imports the builder at its first job)."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        """:meth:`start`, the lock held."""
        if self._closed:
            raise RuntimeError("this BuilderProcess was closed: make a new one for more "
                               "builder jobs")
        env = _child_env()
        if self._alive() and _startup_part(env) == _startup_part(self._env or {}):
            return
        self._stop()
        folder = Path(tempfile.mkdtemp(prefix="quickdraft-builder-"))
        try:
            with open(folder / "child.log", "wb") as log:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", _MODULE, "--serve"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=log, env=env, text=True,
                    encoding="utf-8")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._folder, self._log_read, self._env = folder, 0, env
        self._replies = queue.Queue()
        threading.Thread(target=_pump, args=(self._proc.stdout, self._replies),
                         daemon=True).start()
        self.starts += 1

    def preload(self) -> None:
        """Start a child and have it import the builder now, while this process works on."""
        with self._lock:
            self._start()
            self._send({"preload": True})

    def run(self, argv: Sequence[str], timeout: float | None = None, *,
            script: str | os.PathLike | None = None) -> tuple[int, str]:
        """Run the builder with ``argv`` in the child: (its exit status, negative for a
        signal, and its output). ``script`` runs that Python file instead of the builder
        (the tests' stand-in). Raises subprocess.TimeoutExpired, with the child killed,
        past ``timeout`` seconds (None: :data:`BUILDER_TIMEOUT_S`); any other interruption
        kills the child too, so no job goes on writing after its caller gave up on it."""
        with self._lock:
            try:
                return self._run(list(argv), timeout, script)
            except BaseException:
                self._stop()
                raise

    def _run(self, argv: list[str], timeout: float | None, script) -> tuple[int, str]:
        """:meth:`run`, the lock held."""
        timeout = BUILDER_TIMEOUT_S if timeout is None else timeout
        deadline = time.monotonic() + timeout
        for attempt in range(2):
            self._start()
            self._jobs += 1
            output = self._folder / f"job-{self._jobs}.log"
            job = {"argv": argv, "output": os.fspath(output), "cwd": os.getcwd(),
                   "env": _child_env(),
                   "script": None if script is None else os.fspath(script)}
            if self._send(job) and self._reply(deadline, job, timeout) == "started":
                reply = self._reply(deadline, job, timeout)
                text = self._read_log() + _read_text(output)
                if reply is not None:
                    return int(reply), text
                code = self._reap()  # the child ended during the job
                return code or 1, text + f"\n(the model builder's process {_ended(code)})"
            if attempt == 0:
                self._reap()  # its log is dropped: the next child's says the same
        code = self._reap()
        return code or 1, self._read_log() + f"\n(the model builder's process {_ended(code)})"

    def _send(self, message: dict) -> bool:
        """Write one message to the child; False when its stdin is closed."""
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
            return True
        except (OSError, ValueError):
            return False

    def _reply(self, deadline: float, job: dict, timeout: float):
        """The child's next reply ("started" or a status; None at its end); past the
        deadline subprocess.TimeoutExpired is raised (and :meth:`run` kills the child)."""
        try:
            line = self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise subprocess.TimeoutExpired(job["argv"], timeout) from None
        if line is None:
            return None
        return json.loads(line)["reply"]

    def _read_log(self) -> str:
        """What the child wrote outside its jobs since the last call (startup errors)."""
        if self._folder is None:
            return ""
        try:
            with open(self._folder / "child.log", "rb") as f:
                f.seek(self._log_read)
                data = f.read()
        except OSError:
            return ""
        self._log_read += len(data)
        return data.decode(errors="replace")

    def _reap(self) -> int:
        """Wait for a child that ended (killing it if it did not); its exit status
        (negative: the signal that ended it; 1 when none was running)."""
        proc = self._proc
        if proc is None:
            return 1
        if proc.poll() is None:
            proc.kill()
        return proc.wait()

    def _stop(self) -> None:
        """Kill the child, if any, and remove its folder."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for stream in (self._proc.stdin, self._proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
        self._proc, self._folder, self._env = None, None, None

    def close(self) -> None:
        """End the child now, a running job with it (killed rather than waited for: between
        jobs it holds nothing, and it may still be importing the builder); no more jobs."""
        self._closed = True
        proc = self._proc  # killed before the lock: a job holding it then ends at once
        if proc is not None and proc.poll() is None:
            proc.kill()
        with self._lock:
            self._stop()


def _signal_name(number: int) -> str:
    """'signal 15 (SIGTERM)', for an error message."""
    try:
        return f"signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"signal {number}"


def _ended(status: int) -> str:
    """How a child ended, for an error message."""
    return (f"was killed by {_signal_name(-status)}" if status < 0
            else f"ended with status {status}")


def _read_text(path: Path) -> str:
    """A job's output file ('' when the job never opened it)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _pump(stream, replies: queue.Queue) -> None:
    """Move the child's reply lines into ``replies``; None when its stdout ends."""
    try:
        for line in stream:
            replies.put(line)
    except (OSError, ValueError):
        pass
    replies.put(None)


# the builder child of the builder_session open in this context (a thread's, or an asyncio
# task's, or one copied from them); None: each run_builder starts its own, and so it does
# where the session it names has closed
_SESSION: contextvars.ContextVar[BuilderProcess | None] = contextvars.ContextVar(
    "quickdraft_builder_session", default=None)


@contextlib.contextmanager
def builder_session(*, preload: bool = False,
                    process: BuilderProcess | None = None) -> Iterator[BuilderProcess]:
    """Run every :func:`run_builder` of the block (in this thread) in one builder child,
    started at the first job, or now with ``preload``; ``process`` runs them in that
    :class:`BuilderProcess` instead, left open at the end. A session inside another reuses
    the outer one's child. The child ends with the outermost block."""
    outer = _SESSION.get()
    if outer is not None and process is None:
        yield outer
        return
    owned = process is None
    process = BuilderProcess() if owned else process
    token = _SESSION.set(process)
    try:
        if preload and builder_problem() is None:
            process.preload()
        yield process
    finally:
        try:
            _SESSION.reset(token)
        finally:
            if owned:
                process.close()


# -- manifest ------------------------------------------------------------------------------


def _io_dtype(folder: Path, io_, past: list[str], arch: str) -> str:
    """The manifest dtype of a quantized graph: the element type of its caches and logits
    (the builder's genai_config.json does not say it), which must be one the runtime reads."""
    types = {name: et for name, et, _ in [*io_.inputs, *io_.outputs]}
    names = {*past, "logits"}
    found = {types[n] for n in names if n in types}
    by_type = {et: name for name, et in ONNX_ELEMENT_TYPES.items()}
    if len(found) != 1 or next(iter(found)) not in by_type:
        raise UnsupportedModelError(
            f"{arch}: the quantized graph's caches and logits have ONNX element types "
            f"{sorted(found)}, not one of {', '.join(ONNX_ELEMENT_TYPES)}"
        )
    return by_type[next(iter(found))]


def _check_quantized(folder: Path, arch: str, weights: str, provider: str) -> None:
    """Refuse a graph without the builder's 4-bit MatMulNBits nodes of the options asked."""
    import onnx

    graph = onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph
    nodes = [n for n in graph.node if n.op_type == QUANTIZED_OP]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    level = INT4_ACCURACY_LEVEL.get(provider)
    wrong = [n.name for n, a in zip(nodes, attrs)
             if a.get("bits") != 4 or a.get("block_size") != INT4_BLOCK_SIZE
             or (level is not None and a.get("accuracy_level") != level)]
    if not nodes or wrong:
        raise UnsupportedModelError(
            f"{arch}: asked for {weights} weights, the builder's graph has {len(nodes)} "
            f"{QUANTIZED_OP} nodes" + (f", {len(wrong)} not 4-bit blocks of "
                                       f"{INT4_BLOCK_SIZE} at accuracy level {level} "
                                       f"({wrong[0]}, ...)" if wrong else "")
        )


def static_manifest(folder: Path, config, dtype: str, cache_length: int,
                    device: str | None = None) -> ModelManifest:
    """Describe the builder's graph in ``folder``; refuse one that is not the static kind.

    ``cache_length`` is the static cache length the backend allocates by default. For a
    quantized ``dtype`` (int4) the manifest's dtype is that of the graph's caches and
    logits and ``weights`` says int4; ``device`` is then the builder's target."""
    arch = config.model_type
    genai = json.loads((folder / "genai_config.json").read_text())
    dec = genai["model"]["decoder"]
    layers = int(dec["num_hidden_layers"])
    io_ = graph_io(folder / MODEL_FILE)
    in_names, out_names, ops = io_.input_names, io_.output_names, io_.ops
    facts = manifest_facts(folder, config, BUILDER_PACKAGES)
    provider = execution_provider(dtype, device or QUANTIZED_DTYPES.get(dtype, ("",))[0])
    weights = ""
    if dtype in QUANTIZED_DTYPES:
        past_names = [t.format(i=i) for i in range(layers)
                      for t in (facts["past_key_template"], facts["past_value_template"])]
        weights, dtype = dtype, _io_dtype(folder, io_, past_names, arch)
        _check_quantized(folder, arch, weights, provider)
    manifest = ModelManifest(
        architecture=arch,
        num_layers=layers,
        num_attention_heads=int(dec["num_attention_heads"]),
        num_kv_heads=int(dec["num_key_value_heads"]),
        head_dim=int(dec["head_size"]),
        hidden_size=int(dec["hidden_size"]),
        vocab_size=int(genai["model"]["vocab_size"]),
        max_length=context_length(config),
        max_cache_length=int(cache_length),
        dtype=dtype,
        kv_layout="bnsh",
        kv_cache="static",
        model_file=MODEL_FILE,
        input_names=in_names,
        output_names=out_names,
        has_position_ids=False,
        has_attention_mask=True,
        exporter=EXPORTER,
        attention=ATTENTION,
        execution_provider=provider,
        weights=weights,
        **facts,
    )
    past, present = manifest.past_names(), manifest.present_names()
    if set(in_names) != {"input_ids", "attention_mask", *past}:
        raise UnsupportedModelError(
            f"{arch}: the builder's graph takes {in_names}, not input_ids, attention_mask and "
            "the past keys and values; the static path cannot run it"
        )
    if not {"logits", *present} <= set(out_names):
        raise UnsupportedModelError(f"{arch}: the builder's graph outputs {out_names}")
    if ops.get(ATTENTION, 0) != layers:
        raise UnsupportedModelError(
            f"{arch}: the builder did not use {ATTENTION} in every layer "
            f"({ops.get(ATTENTION, 0)} of {layers}); no shared static cache"
        )
    elem = dict((name, et) for name, et, _ in io_.inputs)[past[0]]
    if elem != ONNX_ELEMENT_TYPES[dtype]:
        raise UnsupportedModelError(
            f"{arch}: asked for {dtype}, the graph's cache has ONNX element type {elem}"
        )
    return manifest


# -- validation ----------------------------------------------------------------------------


def validate_static(folder: Path, manifest: ModelManifest, src, *, device: str = "cpu",
                    steps: int = 24) -> dict:
    """The generic checks against PyTorch (:func:`quickdraft.export.validate.validate_export`,
    growing caches) and the static path itself: the prompt fed in chunks into the shared
    buffers, then a rollback and the same tokens again, against PyTorch's logits.

    With quantized weights (``manifest.weights``) the static path is checked to the float
    tolerance against the graph's own full pass (a fresh state fed the whole prompt), and
    that pass against PyTorch to the weights' relative bound
    (:data:`quickdraft.export.validate.QUANTIZED_TOLERANCES`)."""
    import numpy as np
    from transformers import AutoTokenizer

    from quickdraft.export.validate import (
        PROMPTS,
        QUANTIZED_TOLERANCES,
        TOLERANCES,
        ExportValidationError,
        _torch_greedy,
        _torch_model,
        validate_export,
    )
    from quickdraft.ort_backend.device import Device
    from quickdraft.ort_backend.static import StaticOrtModel

    result = validate_export(folder, manifest, src, device=device, steps=steps)
    atol, rtol = TOLERANCES[manifest.dtype]
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    torch_model = _torch_model(src, manifest.dtype, device)
    model = StaticOrtModel(folder, Device(device),
                           cache_length=min(manifest.max_cache_length, 128), graph_steps=(1,))
    quantized = bool(manifest.weights)
    worst = worst_ratio = worst_rel = 0.0
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [0]
        ids = ids[: model.max_length // 2]
        full, _, _ = _torch_greedy(torch_model, ids, 1, device)
        if quantized:  # the reference: the graph's own full pass, in a fresh state
            fresh = model.new_state()
            own = fresh.append(ids).astype(np.float64)
            fresh.close()
            worst_rel = max(worst_rel, float(np.abs(own - full).max() / np.abs(full).max()))
            full = own
        tol = atol + rtol * float(np.abs(full).max())
        if quantized:  # int8 activations: a rounding flip moves a logit by ~1% of the largest
            tol = QUANTIZED_TOLERANCES[manifest.weights][2] * float(np.abs(full).max())
        state = model.new_state()
        cut = [0, max(1, len(ids) // 2), min(len(ids), len(ids) // 2 + 1), len(ids)]
        rows = [state.append(ids[a:b]) for a, b in zip(cut, cut[1:]) if b > a]
        chunked = np.concatenate(rows).astype(np.float64)
        back = max(1, len(ids) // 3)
        state.append([0, 1, 2][: model.max_length - len(ids)])  # junk past the rollback point
        state.rewind(back)
        again = state.append(ids[back:]).astype(np.float64)
        diff = max(float(np.abs(chunked - full).max()), float(np.abs(again - full[back:]).max()))
        worst = max(worst, diff)
        worst_ratio = max(worst_ratio, diff / tol)
    result["static_max_abs_diff"] = worst
    result["static_diff_over_tolerance"] = worst_ratio
    if quantized:
        bound = QUANTIZED_TOLERANCES[manifest.weights][0]
        result["static_max_rel_diff"] = worst_rel
        if worst_rel > bound:
            raise ExportValidationError(
                f"the static-cache path's {manifest.weights} logits differ from PyTorch by "
                f"{worst_rel:.3f} of max |logit|, above {bound}"
            )
    if worst_ratio > 1.0:
        against = "the graph's own full pass" if quantized else "PyTorch"
        raise ExportValidationError(
            f"the static-cache path differs from {against} by {worst:.3g} (over the "
            f"{'int4 cache' if quantized else manifest.dtype} tolerance by {worst_ratio:.2f}x)"
        )
    return result


# -- export --------------------------------------------------------------------------------


def check_cuda_validation(dtype: str) -> None:
    """Refuse, before anything is built, to validate a CUDA export where CUDA cannot run:
    the check runs the graph with ONNX Runtime's CUDA provider against PyTorch on CUDA."""
    from quickdraft.ort_backend.device import cuda_problem

    problem = cuda_problem()
    if problem is None:
        import torch

        if not torch.cuda.is_available():
            problem = "torch sees no CUDA device"
    if problem is not None:
        raise ExportError(
            f"validating a static {dtype} CUDA export needs a CUDA machine ({problem}); "
            "export there, or add --no-validate to build it here unchecked"
        )


def check_source(info: SourceInfo) -> None:
    """Refuse an architecture the static path does not cover."""
    if info.model_type not in STATIC_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{info.source}: architecture {info.model_type!r} is not covered by the static "
            f"path ({', '.join(STATIC_ARCHITECTURES)}); export it with the default dynamic "
            "cache (kv_cache dynamic, optimum-onnx)"
        )


# the shortest static cache: room for a validation prompt and a few proposals
MIN_CACHE_LENGTH = 8


def check_max_length(max_length) -> None:
    """A static cache length given by the caller: a whole number of at least
    ``MIN_CACHE_LENGTH`` (checked before any model is read; the contexts later)."""
    if max_length is None:
        return
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or \
            max_length < MIN_CACHE_LENGTH:
        raise ValueError(f"max_length must be a whole number of at least {MIN_CACHE_LENGTH} "
                         f"tokens (a static cache holds a prompt and its proposals), got "
                         f"{max_length!r}")


def cache_length(infos: Sequence[SourceInfo], max_length: int | None) -> int:
    """The static cache length of ``infos``: ``max_length``, which must fit every model's
    context (the rotary tables end there), or by default the smallest context
    (``max_length`` itself was checked with the options: :func:`check_max_length`)."""
    contexts = [context_length(info.config) for info in infos]
    length = min(contexts) if max_length is None else int(max_length)
    for info, context in zip(infos, contexts):
        if not MIN_CACHE_LENGTH <= length <= context:
            raise ValueError(
                f"{info.source}: max_length must be in [{MIN_CACHE_LENGTH}, {context}] (the "
                f"model's max_position_embeddings: the rotary tables end there), got "
                f"{length}"
            )
    return length


def export_into(info: SourceInfo, folder: Path, *, dtype: str, device: str,
                cache_length: int, validate: bool, steps: int, progress,
                label: str, fuse_gate_up: bool = False,
                transpose_weights: bool = False) -> ModelManifest:
    """Build, describe and validate the static graph of ``info`` in the empty ``folder``;
    ``fuse_gate_up``: each gated MLP's gate and up projections as one MatMul;
    ``transpose_weights``: MatMul weights stored [N, K], multiplied as FusedMatMul(transB)
    (:mod:`quickdraft.export.transpose`)."""
    length = cache_length
    emit(progress, f"{label}: building a static {dtype} graph of {info.source} "
                    f"({info.model_type}) with onnxruntime-genai's model builder")
    t0 = time.perf_counter()
    cache = Path(tempfile.mkdtemp(prefix="quickdraft-builder-cache-"))
    try:
        run_builder(info.folder if info.is_local else info.source, folder, dtype=dtype,
                    device=device, cache_dir=cache, local=info.is_local,
                    extra_options=builder_options(fuse_gate_up))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if not (folder / MODEL_FILE).is_file() or not (folder / "genai_config.json").is_file():
        raise ExportError(f"{info.source}: the model builder wrote no {MODEL_FILE}")
    emit(progress, f"{label}: graph written in {time.perf_counter() - t0:.1f} s")
    vocab = int(json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"])
    add_greedy_output(folder / MODEL_FILE, vocab)  # greedy decoding reads argmax ids only
    if transpose_weights:
        count = transpose_matmul_weights(folder / MODEL_FILE)
        emit(progress, f"{label}: {count} MatMul weights stored transposed")
    ensure_tokenizer(info, folder)
    manifest = static_manifest(folder, info.config, dtype, length, device)
    manifest.source = info.source
    manifest.save(folder)  # validation loads the folder
    if validate:
        emit(progress, f"{label}: validating against PyTorch ({steps} greedy steps)")
        src = str(info.folder) if info.is_local else info.source
        with quiet():
            manifest.validation = validate_static(folder, manifest, src, device=device,
                                                  steps=steps)
        v = manifest.validation
        if manifest.weights:
            bound = v["tolerance"]["max_rel_diff"]
            emit(progress, f"{label}: {manifest.weights} weights: max |logit diff| / max "
                            f"|logit| {v['max_rel_diff']:.3f} (bound {bound}),"
                            f" greedy agreement {v['greedy_agreement']:.0%}, static path "
                            f"{v['static_max_abs_diff']:.2e}")
        else:
            emit(progress, f"{label}: max |logit diff| {v['max_abs_diff']:.2e}, static path "
                            f"{v['static_max_abs_diff']:.2e}, greedy equal "
                            f"{min(v['greedy_equal_steps'])}/{steps} steps")
    manifest.save(folder)
    return manifest


def builder_options(fuse_gate_up: bool) -> dict[str, str]:
    """The builder's extra options for quickdraft's settings. The builder tests the option's
    presence, not its value, so an unset option is left out; an MLP without a gate (GPT-2's
    fc layers) ignores it."""
    return {"fuse_mlp_gate_up": "true"} if fuse_gate_up else {}


def _static_options(dtype: str, device: str, max_length: int | None, validate: bool,
                    steps: int, progress: Progress | None, fuse_gate_up: bool = False,
                    transpose_weights: bool = False):
    """Check the options; return ``precheck`` and ``prepare`` for :mod:`.output`."""
    check_options(dtype, device)
    check_max_length(max_length)
    provider = execution_provider(dtype, device)
    if validate and device == "cuda":
        check_cuda_validation(dtype)

    def precheck(sources: Sequence[str]) -> None:
        check_head_sizes(sources, provider)

    def prepare(infos: Sequence[SourceInfo]) -> ExportInto:
        for info in infos:
            check_source(info)
        length = cache_length(infos, max_length)  # refused before the builder runs
        return functools.partial(export_into, dtype=dtype, device=device, cache_length=length,
                                 validate=validate, steps=steps, progress=progress,
                                 fuse_gate_up=bool(fuse_gate_up),
                                 transpose_weights=bool(transpose_weights))

    return precheck, prepare


def export_static_model(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "fp32",
    device: str = "cpu",
    max_length: int | None = None,
    *,
    validate: bool = True,
    steps: int = 24,
    overwrite: bool = False,
    progress: Progress | None = None,
    role: str = "model",
    fuse_gate_up: bool = FUSE_GATE_UP,
    transpose_weights: bool = TRANSPOSE_WEIGHTS,
) -> ModelReport:
    """:func:`quickdraft.export.export_model` with ``kv_cache="static"``: one causal LM as
    a static-cache graph; ``max_length`` is its cache length (default: its context);
    ``fuse_gate_up``: gate and up projections as one MatMul (same weights, same math);
    ``transpose_weights``: every MatMul weight stored transposed (the same products)."""
    precheck, prepare = _static_options(dtype, device, max_length, validate, steps, progress,
                                        fuse_gate_up, transpose_weights)
    with builder_session(preload=True):
        return run_model(hf_dir, out_dir, prepare=prepare, precheck=precheck,
                         overwrite=overwrite, progress=progress, role=role)


def export_static_pair(
    target: str | os.PathLike,
    draft: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "fp32",
    device: str = "cpu",
    max_length: int | None = None,
    *,
    validate: bool = True,
    steps: int = 24,
    overwrite: bool = False,
    progress: Progress | None = None,
    draft_draft: str | os.PathLike | None = None,
    fuse_gate_up: bool = FUSE_GATE_UP,
    transpose_weights: bool = TRANSPOSE_WEIGHTS,
) -> ExportReport:
    """:func:`quickdraft.export.export_pair` with ``kv_cache="static"``: the models (with
    ``draft_draft``, if given) share one cache length ``max_length`` (default: the
    smallest context); ``fuse_gate_up`` and ``transpose_weights`` as for
    :func:`export_static_model`."""
    precheck, prepare = _static_options(dtype, device, max_length, validate, steps, progress,
                                        fuse_gate_up, transpose_weights)
    with builder_session(preload=True):  # one builder child for the two or three models
        return run_pair(target, draft, out, prepare=prepare, precheck=precheck,
                        overwrite=overwrite, progress=progress, draft_draft=draft_draft)

# -- the child process that runs the builder -----------------------------------------------


def _patch_transformers() -> list[str]:
    """Adapt transformers 4.x to what the builder of onnxruntime-genai 0.18 expects."""
    import transformers

    patched = []
    if int(transformers.__version__.split(".")[0]) >= 5:
        return patched
    auto_config = sys.modules["transformers"].AutoConfig
    original = auto_config.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        result = original(cls, *args, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        if not hasattr(config, "rope_parameters"):  # transformers 5 layout of the rope settings
            scaling = getattr(config, "rope_scaling", None)
            params = dict(scaling) if scaling else {}
            params.setdefault("rope_type", params.get("type", "default"))
            params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
            config.rope_parameters = params
            if hasattr(config, "rope_scaling"):
                del config.rope_scaling  # the builder would copy it over rope_parameters
        return result

    auto_config.from_pretrained = classmethod(from_pretrained)
    patched.append("AutoConfig.from_pretrained: rope_parameters")
    return patched


def _import_builder():
    """Import the builder's modules, giving transformers 4.x placeholders for the vision
    classes they import by name (never used for the text decoders exported here)."""
    import onnxruntime_genai.models as models  # puts the builder's folder on sys.path

    folder = os.path.dirname(models.__file__)
    if folder not in sys.path:
        sys.path.append(folder)
    for _ in range(32):
        try:
            import builders  # noqa: F401
            return folder
        except ImportError as e:
            name = getattr(e, "name", None)
            text = str(e)
            if "from 'transformers'" not in text or not text.startswith("cannot import name"):
                raise
            missing = text.split("'")[1]
            module = sys.modules["transformers"]
            setattr(module, missing, type(missing, (), {"__module__": "quickdraft.placeholder"}))
            del name
    raise ImportError("could not import the model builder")


@functools.cache
def _patched() -> list[str]:
    """:func:`_patch_transformers`, once per process."""
    return _patch_transformers()


@functools.cache
def _builder_folder() -> str:
    """Patch transformers and import the builder, once per process (again after a failed
    import); the builder's folder."""
    _patched()
    return _import_builder()


def _builder_main(argv: list[str]) -> None:
    """Run the builder once with ``argv`` (``--builder``: one job, then this process ends)."""
    import runpy

    folder = _builder_folder()
    sys.argv = ["builder.py", *argv]
    runpy.run_path(os.path.join(folder, "builder.py"), run_name="__main__")


def _exit_status(exit: SystemExit) -> int:
    """The exit status Python gives a ``sys.exit(code)``: an integer modulo 256 (None: 0; a
    message: printed, status 1)."""
    if exit.code is None or isinstance(exit.code, int):
        return int(exit.code or 0) & 0xFF
    print(exit.code, file=sys.stderr)
    return 1


def _run_script(argv: list[str], script: str | None, cwd: str) -> int:
    """Run the builder (or the Python file ``script``) with ``argv`` as its __main__, in
    the folder ``cwd``; its exit status (an exception: its traceback printed, status 1)."""
    import runpy
    import traceback

    try:
        os.chdir(cwd)  # the parent's, for relative paths
        path = script or os.path.join(_builder_folder(), "builder.py")
        sys.argv = [os.path.basename(path), *argv]
        runpy.run_path(path, run_name="__main__")
        return 0
    except SystemExit as e:
        return _exit_status(e)
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        _release_memory()


def _release_memory() -> None:
    """Free what the job's model and graph held before the next job (CUDA's cache too)."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:  # glibc keeps freed heap pages: give them back while the child waits
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _flush_native() -> None:
    """Flush C stdio buffers (native libraries' printf) before fds 1 and 2 move."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):
        pass  # no C library to ask (Windows): nothing buffered there to lose


@contextlib.contextmanager
def _output_to(path: str) -> Iterator[None]:
    """Point fds 1 and 2 (Python's and native writes alike) at the file ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    _flush_native()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        _flush_native()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for each in (fd, *saved):
            os.close(each)


def _serve() -> None:
    """``--serve``: run the jobs read from stdin one by one, replying on stdout (see
    :class:`BuilderProcess`); ends when stdin does."""
    jobs = os.fdopen(os.dup(0), "r", encoding="utf-8")
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)  # outside jobs, prints go to the parent's log of this child

    def reply(value) -> None:
        replies.write(json.dumps({"reply": value}) + "\n")
        replies.flush()

    for line in jobs:
        job = json.loads(line)
        if job.get("preload"):
            _preload()
            continue
        reply("started")
        _set_environment(job["env"])
        with _output_to(job["output"]):
            status = _run_script(job["argv"], job.get("script"), job["cwd"])
        reply(status)


def _set_environment(env: dict[str, str]) -> None:
    """Make ``os.environ`` equal ``env``, touching only the variables that differ."""
    for name in set(os.environ) - set(env):
        del os.environ[name]
    for name, value in env.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _preload() -> None:
    """Import the builder before the first job asks for it (a failure is printed to the
    log; the job that needs the builder then fails with it in its output)."""
    import traceback

    try:
        _builder_folder()
    except Exception:
        traceback.print_exc()


USAGE = ("usage: python -m quickdraft.export.builder --builder BUILDER_ARGS... | --serve\n"
         "(use quickdraft.export.builder.export_static_pair from Python)")

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--builder":
        _builder_main(sys.argv[2:])
    elif sys.argv[1:] == ["--serve"]:
        _serve()
    else:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
