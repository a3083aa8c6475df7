"""quickdraft serve at several numbers of concurrent streams, side by side in one run.

    python benchmarks/concurrency.py [--model-dir DIR] [--device auto|cpu|cuda] \\
        [--streams 1,4,16] [--requests-per-stream 4] [--max-tokens 128] [--gamma 4|auto] \\
        [--drafter model] [--temperature 0] [--json OUT.json] [--time-limit SECONDS] \\
        [--mode http,direct,direct-lanes,direct-lanes-verify,direct-ar]

No ``--model-dir``: the bundled pair (on the CPU with ``--device auto``), as ``quickdraft
serve`` does. Modes, each over one loaded pair:

- ``http``: the real server (``quickdraft serve`` in a subprocess on 127.0.0.1, a free port,
  ``--max-concurrency`` = the most streams); S asyncio clients (httpx), each sending its
  requests one after another as streamed ``/v1/completions``;
- ``direct``: the same requests as scheduler jobs (``Engine.load`` + ``Scheduler.submit``,
  the server minus HTTP, SSE and asyncio), every stream verified alone (``lanes=0``), so
  the difference is the HTTP overhead and the lanes;
- ``direct-lanes``: ``direct`` with the server's default lanes (a static export: the
  streams' proposals verified in one target call, ``score_lanes``, and the greedy ones
  drafted as one chain of the draft's lanes, ``chain_lanes``), as ``http`` runs;
- ``direct-lanes-verify``: ``direct-lanes`` with every proposal drafted alone
  (``--no-draft-lanes``): what drafting together adds;
- ``direct-ar``: ``direct`` with autoregressive jobs (gamma None), the baseline; the server
  itself has no autoregressive mode (a request's gamma is >= 1 or auto).

Per mode: a warm-up (the most streams at once: generators made, CUDA graphs captured),
a reference pass (every request alone, one after another), then one phase per stream
count. Every request has its own prompt (token-ish text: seeded ordinary token ids
decoded) and seed; its text must equal the reference's (greedy output, or a seeded draw,
does not depend on concurrency; "mismatches" counts the streams that got mixed up).
Per phase: aggregate tokens/s (all tokens / the phase's wall time), per-stream tokens/s,
p50/p99 of time to first token, inter-token latency (per request: (latency - TTFT) /
(tokens - 1); the gaps between streamed chunks, one per iteration, are in the JSON) and
latency, and the acceptance from the server's metrics. ``--time-limit`` bounds the whole
run: each phase gets a share of what is left by its number of requests; a request past
its phase's deadline is a timeout, one never started is skipped. The results JSON is
written after every phase; a failed phase is recorded and the run goes on. The Markdown
table is printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import dump_json, environment, error_record, log, worker_env  # noqa: E402

MODES = ("http", "direct", "direct-lanes", "direct-lanes-verify", "direct-ar")
BACKEND = {"http": "http", "direct": "direct", "direct-lanes": "direct-lanes",
           "direct-lanes-verify": "direct-lanes-verify", "direct-ar": "direct"}
PROMPT_SEED = 20240601
GRACE_S = 5.0  # past a phase's deadline: the scheduler's own timeout should have fired
POLL_S = 0.5

# The server in a child that asks for SIGTERM when this process dies (PR_SET_PDEATHSIG).
_LAUNCH = ("import ctypes, signal, sys\n"
           "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
           "except Exception:\n    pass\n"
           "from quickdraft.cli import main\n"
           "sys.exit(main(sys.argv[1:]))\n")


@dataclass(frozen=True)
class Settings:
    model_dir: str | None
    device: str
    streams: tuple[int, ...]
    requests_per_stream: int
    max_tokens: int
    gamma: int | str
    drafter: str
    temperature: float
    prompt_tokens: int
    time_limit: float

    @property
    def most(self) -> int:
        return max(self.streams)

    @property
    def deterministic(self) -> bool:
        """Whether a request's text must not depend on concurrency (docs/how-to/serve.md:
        sampled draws of gamma auto and of the bandit differ from run to run)."""
        return self.temperature == 0 or (self.gamma != "auto" and self.drafter != "bandit")


@dataclass(frozen=True)
class Request:
    index: int
    prompt: str
    seed: int


# ----------------------------------------------------------------------------- workload


def make_requests(tokenizer, n: int, length: int, offset: int = 0) -> list[Request]:
    """``n`` distinct prompts: seeded ordinary (not added/special) token ids, decoded."""
    import numpy as np

    special = set(tokenizer.get_added_tokens_decoder())
    ids = [i for i in range(tokenizer.get_vocab_size()) if i not in special]
    rng = np.random.default_rng([PROMPT_SEED, offset])
    out = []
    for k in range(n):
        text = tokenizer.decode(rng.choice(ids, length).tolist())
        out.append(Request(offset + k, text if text.strip() else f"x{offset + k}", 1000 + k))
    return out


def plan(requests: list[Request], streams: int, per_stream: int) -> list[list[Request]]:
    """Stream s sends requests s * per_stream .. (s + 1) * per_stream - 1 in turn."""
    return [requests[s * per_stream:(s + 1) * per_stream] for s in range(streams)]


def new_record(req: Request, stream: int, start_s: float) -> dict:
    return {"index": req.index, "stream": stream, "status": "running", "error": None,
            "start_s": start_s, "ttft_s": None, "latency_s": None, "chunks_s": [],
            "tokens": None, "finish_reason": None, "speculative": None, "text": ""}


def skipped(req: Request, stream: int, start_s: float) -> dict:
    rec = new_record(req, stream, start_s)
    rec.update(status="skipped", error="time limit reached before it started")
    return rec


class Budget:
    """``--time-limit``: each phase gets the time left times its share of the requests left."""

    def __init__(self, seconds: float, units: int):
        self.end = time.perf_counter() + seconds
        self.units = units

    def left(self) -> float:
        return self.end - time.perf_counter()

    def deadline(self, units: int) -> float:
        share = max(0.0, self.left()) * units / max(self.units, units, 1)
        self.units = max(0, self.units - units)
        return time.perf_counter() + share

    def release(self, units: int) -> None:
        self.units = max(0, self.units - units)


# ----------------------------------------------------------------------------- statistics


def pct(xs, q: float):
    import numpy as np

    xs = [x for x in xs if x is not None]
    return float(np.percentile(xs, q)) if xs else None


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(recs: list[dict], wall: float, streams: int) -> dict:
    ok = [r for r in recs if r["status"] == "ok"]
    tokens = sum(r["tokens"] or 0 for r in ok)
    per_stream = []
    for s in range(streams):
        mine = [r for r in ok if r["stream"] == s]
        if mine:
            span = max(r["start_s"] + r["latency_s"] for r in mine) - min(r["start_s"]
                                                                         for r in mine)
            per_stream.append(sum(r["tokens"] for r in mine) / span if span > 0 else None)
    itl = [(r["latency_s"] - r["ttft_s"]) / (r["tokens"] - 1) for r in ok
           if r["ttft_s"] is not None and (r["tokens"] or 0) > 1]
    gaps = [b - a for r in ok for a, b in zip(r["chunks_s"], r["chunks_s"][1:])]
    ttft = [r["ttft_s"] for r in ok]
    lat = [r["latency_s"] for r in ok]
    spec = [r["speculative"] or {} for r in ok]
    counts: dict[str, int] = {}
    for r in recs:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {
        "requests": len(recs), "status_counts": counts, "tokens": tokens, "wall_s": wall,
        "aggregate_tok_s": tokens / wall if wall > 0 and tokens else None,
        "per_stream_tok_s": mean(per_stream),
        "ttft_ms": {"p50": _ms(pct(ttft, 50)), "p99": _ms(pct(ttft, 99))},
        "itl_ms": {"p50": _ms(pct(itl, 50)), "p99": _ms(pct(itl, 99))},
        "chunk_gap_ms": {"p50": _ms(pct(gaps, 50)), "p99": _ms(pct(gaps, 99))},
        "latency_s": {"p50": pct(lat, 50), "p99": pct(lat, 99)},
        "alpha_mean": mean(d.get("alpha") for d in spec),
        "acceptance_rate_mean": mean(d.get("acceptance_rate") for d in spec),
        "tokens_per_target_call_mean": mean(d.get("tokens_per_target_call") for d in spec),
    }


def _ms(x):
    return None if x is None else 1e3 * x


def _difference(index, got: str, expected: str) -> dict:
    """Where two texts part: the character offset and 80 characters of each from just
    before it."""
    at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
              min(len(got), len(expected)))
    start = max(0, at - 20)
    return {"index": index, "first_difference": at, "lengths": [len(got), len(expected)],
            "got": got[start:start + 80], "expected": expected[start:start + 80]}


def check(recs: list[dict], reference: dict[int, str] | None, deterministic: bool) -> dict:
    """Texts against the same requests run alone; None where the check does not apply."""
    ok = [r for r in recs if r["status"] == "ok"]
    if not deterministic or reference is None:
        return {"mismatches": None, "checked": 0, "unchecked": len(ok), "examples": []}
    have = [r for r in ok if r["index"] in reference]
    bad = [r for r in have if r["text"] != reference[r["index"]]]
    examples = [_difference(r["index"], r["text"], reference[r["index"]]) for r in bad[:5]]
    return {"mismatches": len(bad), "checked": len(have), "unchecked": len(ok) - len(have),
            "mismatched_indices": [r["index"] for r in bad], "examples": examples}


def parse_metrics(text: str) -> dict[str, float]:
    """The unlabelled series of a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if "{" not in name:
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def metrics_delta(before: dict, after: dict) -> dict:
    def d(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    drafted = d("quickdraft_draft_tokens_total")
    return {"tokens_generated": d("quickdraft_tokens_generated_total"),
            "draft_tokens": drafted, "accepted_tokens": d("quickdraft_accepted_tokens_total"),
            "acceptance_rate": d("quickdraft_accepted_tokens_total") / drafted
            if drafted else None,
            "alpha_running": after.get("quickdraft_alpha"),
            "lane_calls": d("quickdraft_lane_calls_total"),
            "lane_streams": d("quickdraft_lane_streams_sum")}


# ----------------------------------------------------------------------------- http


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-chars:]
    return ""


class HttpBackend:
    """``quickdraft serve`` in a subprocess on 127.0.0.1, always terminated on exit."""

    def __init__(self, settings: Settings, log_path: Path, start_timeout: float):
        self.settings = settings
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = None
        self.info: dict = {}

    def command(self) -> list[str]:
        s = self.settings
        cmd = [sys.executable, "-c", _LAUNCH, "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--device", s.device, "--gamma", str(s.gamma),
               "--drafter", s.drafter, "--max-concurrency", str(s.most),
               "--max-queue", str(s.most * s.requests_per_stream + 16),
               "--timeout", f"{s.time_limit:g}", "--shutdown-timeout", "5",
               "--log-level", "warning"]
        return cmd + (["--model-dir", s.model_dir] if s.model_dir else [])

    def __enter__(self) -> HttpBackend:
        log_file = open(self.log_path, "w")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(self.command(), stdout=log_file,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=worker_env(), cwd=ROOT)
        finally:
            log_file.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        import httpx

        end = time.perf_counter() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n"
                                   f"{log_tail(self.log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200 and r.json().get("status") == "ok":
                    self.info = r.json()
                    models = httpx.get(self.url + "/v1/models", timeout=5).json()
                    self.model = models["data"][0]["id"]
                    return
            if time.perf_counter() > end:
                raise TimeoutError(f"the server was not healthy within "
                                   f"{self.start_timeout:.0f} s:\n{log_tail(self.log_path)}")
            time.sleep(POLL_S)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # uvicorn's graceful shutdown (--shutdown-timeout 5)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def metrics(self) -> dict:
        import httpx

        with contextlib.suppress(httpx.HTTPError):
            return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)
        return {}

    def run(self, streams: list[list[Request]], deadline: float, mode: str) -> tuple:
        if not self.alive:
            raise RuntimeError(f"the server is not running:\n{log_tail(self.log_path)}")
        return asyncio.run(self._phase(streams, deadline))

    def body(self, req: Request) -> dict:
        s = self.settings
        return {"model": self.model, "prompt": req.prompt, "max_tokens": s.max_tokens,
                "temperature": s.temperature, "seed": req.seed, "stream": True,
                "gamma": s.gamma, "drafter": s.drafter}

    async def _phase(self, streams, deadline) -> tuple[list[dict], float]:
        import httpx

        n = len(streams) + 4
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        timeout = httpx.Timeout(None, connect=10.0)  # the deadline bounds the rest
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=timeout) as c:
            t0 = time.perf_counter()
            out = await asyncio.gather(*(self._client(c, s, reqs, t0, deadline)
                                         for s, reqs in enumerate(streams)))
            wall = time.perf_counter() - t0
        return [r for recs in out for r in recs], wall

    async def _client(self, client, stream: int, reqs, t0: float, deadline: float):
        out = []
        for req in reqs:
            start = time.perf_counter()
            if deadline - start <= 0:
                out.append(skipped(req, stream, start - t0))
                continue
            rec = new_record(req, stream, start - t0)
            try:
                await asyncio.wait_for(self._one(client, req, rec, start), deadline - start)
            except asyncio.TimeoutError:
                rec.update(status="timeout", error="past the phase's deadline")
            except Exception as e:  # noqa: BLE001 - recorded, the next request goes on
                rec.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
            out.append(rec)
        return out

    async def _one(self, client, req: Request, rec: dict, start: float) -> None:
        parts = []
        async with client.stream("POST", "/v1/completions", json=self.body(req)) as resp:
            if resp.status_code != 200:
                raw = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {raw[:300]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):].strip()
                if data == "[DONE]":
                    break
                sse_event(json.loads(data), rec, parts, time.perf_counter() - start)
        rec["text"] = "".join(parts)
        if rec["status"] == "running":
            rec.update(status="error", error="the stream ended without its last chunk")


def sse_event(obj: dict, rec: dict, parts: list[str], dt: float) -> None:
    """One server-sent event of a streamed completion into ``rec``."""
    if "error" in obj:
        err = obj["error"]
        rec.update(status="timeout" if err.get("type") == "timeout" else "error",
                   error=str(err.get("message"))[:500])
        return
    choice = obj["choices"][0]
    if choice.get("text"):
        if rec["ttft_s"] is None:
            rec["ttft_s"] = dt
        rec["chunks_s"].append(dt)
        parts.append(choice["text"])
    if obj.get("usage"):
        rec.update(status="ok", latency_s=dt, tokens=obj["usage"]["completion_tokens"],
                   finish_reason=choice.get("finish_reason"),
                   speculative=obj.get("speculative"))


# ----------------------------------------------------------------------------- direct


class DirectBackend:
    """The server's engine in this process (``Engine.load``: the same loading, scheduler
    and metrics as ``quickdraft serve``), driven through ``Scheduler.submit``."""

    def __init__(self, settings: Settings, lanes: int | None, draft_lanes: bool = True):
        self.settings = settings
        self.lanes = lanes  # None: the server's default
        self.draft_lanes = draft_lanes
        self.engine = None
        self.info: dict = {}

    def __enter__(self) -> DirectBackend:
        from quickdraft.serve.app import Engine
        from quickdraft.serve.settings import ServeSettings

        s = self.settings
        serve = ServeSettings(
            model_dir=s.model_dir, device=s.device, gamma=s.gamma, drafter=s.drafter,
            max_concurrency=s.most, max_queue=s.most * s.requests_per_stream + 16,
            lanes=self.lanes, draft_lanes=self.draft_lanes)
        self.engine = Engine.load(serve)
        pair = self.engine.pair
        self.info = {"device": str(pair.device), "device_note": pair.device_note,
                     "max_gamma": pair.max_draft, "model": self.engine.name,
                     "lanes": serve.resolved_lanes(), "draft_lanes": self.draft_lanes}
        return self

    def __exit__(self, *exc) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    @property
    def alive(self) -> bool:
        return self.engine is not None and self.engine.scheduler.alive

    def metrics(self) -> dict:
        return parse_metrics(self.engine.metrics.render().decode())

    def job(self, req: Request, emit, timeout: float, autoregressive: bool):
        from quickdraft.ort_backend.generator import DecodeConfig
        from quickdraft.sampling import SamplingConfig
        from quickdraft.serve.scheduler import Job

        s = self.settings
        ids = list(self.engine.pair.tokenizer.encode(req.prompt).ids)  # as the server does
        config = DecodeConfig(max_new_tokens=s.max_tokens,
                              sampling=SamplingConfig(temperature=float(s.temperature)),
                              seed=req.seed)
        gamma, drafter = (None, None) if autoregressive else (s.gamma, s.drafter)
        return Job(ids, config, gamma, drafter, emit, stream=True, timeout=timeout)

    def run(self, streams: list[list[Request]], deadline: float, mode: str) -> tuple:
        """Every stream's requests in turn as scheduler jobs; this thread only waits."""
        if not self.alive:
            raise RuntimeError("the scheduler is not running")
        events: queue.Queue = queue.Queue()
        done: list[list[dict]] = [[] for _ in streams]
        active: dict[int, tuple] = {}
        t0 = time.perf_counter()

        def advance(s: int) -> None:  # submit stream s's next request, if time is left
            while len(done[s]) < len(streams[s]):
                req, start = streams[s][len(done[s])], time.perf_counter()
                if deadline - start <= 0:
                    done[s].append(skipped(req, s, start - t0))
                    continue
                rec = new_record(req, s, start - t0)
                try:
                    emit = lambda ev, s=s: events.put((s, time.perf_counter(), ev))  # noqa: E731
                    job = self.job(req, emit, deadline - start, mode == "direct-ar")
                    self.engine.scheduler.submit(job)
                except Exception as e:  # noqa: BLE001 - recorded, the stream goes on
                    rec.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
                    done[s].append(rec)
                    continue
                active[s] = (rec, job, start, [])
                return

        for s in range(len(streams)):
            advance(s)
        while active:
            try:
                s, t, ev = events.get(timeout=POLL_S)
            except queue.Empty:
                late = time.perf_counter() > deadline + GRACE_S
                if late or not self.alive:
                    abandon(active, done, "timeout" if late else "error")
                continue
            rec, job, start, parts = active[s]
            if job_event(ev, rec, parts, t - start):
                del active[s]
                done[s].append(rec)
                advance(s)
        wall = time.perf_counter() - t0
        for s, reqs in enumerate(streams):  # never started: the scheduler was given up on
            done[s] += [skipped(q, s, wall) for q in reqs[len(done[s]):]]
        return [r for recs in done for r in recs], wall


def abandon(active: dict, done: list[list[dict]], status: str) -> None:
    """Give up on the jobs still running (cancelled in the scheduler)."""
    for s, (rec, job, _, parts) in list(active.items()):
        job.cancel()
        rec.update(status=status, text="".join(parts),
                   error="no answer by the deadline" if status == "timeout"
                   else "the scheduler stopped")
        done[s].append(rec)
    active.clear()


def job_event(ev, rec: dict, parts: list[str], dt: float) -> bool:
    """One scheduler event into ``rec``; True when the job has ended."""
    from quickdraft.serve.scheduler import Delta, Done, Failed

    if isinstance(ev, Delta):
        if ev.text:
            if rec["ttft_s"] is None:
                rec["ttft_s"] = dt
            rec["chunks_s"].append(dt)
            parts.append(ev.text)
        return False
    rec["text"] = "".join(parts)
    if isinstance(ev, Done):
        rec.update(status="ok", latency_s=dt, tokens=ev.completion_tokens,
                   finish_reason=ev.finish_reason, speculative=ev.speculative)
    elif isinstance(ev, Failed):
        rec.update(status="timeout" if ev.type == "timeout" else "error",
                   error=f"{ev.status} {ev.type}: {ev.message}"[:500])
    else:
        rec.update(status="error", error=f"unexpected event {ev!r}"[:200])
    return True


# ----------------------------------------------------------------------------- one mode


def slim(recs: list[dict]) -> list[dict]:
    """Records for the JSON: times rounded, texts left out (the check keeps mismatches)."""
    out = []
    for r in recs:
        r = {k: v for k, v in r.items() if k != "text"}
        r["chunks_s"] = [round(x, 6) for x in r["chunks_s"]]
        out.append(r)
    return out


def measure(backend, mode: str, streams: list[list[Request]], deadline: float,
            reference: dict[int, str] | None, settings: Settings) -> tuple[dict, list[dict]]:
    before = backend.metrics()
    recs, wall = backend.run(streams, deadline, mode)
    after = backend.metrics()
    result = {"summary": summarize(recs, wall, len(streams)),
              "check": check(recs, reference, settings.deterministic),
              "server_metrics": metrics_delta(before, after)}
    return result, recs


def mode_units(s: Settings) -> int:
    """Requests of one mode: warm-up, reference, phases."""
    n = s.most * s.requests_per_stream
    return s.most + n + sum(k * s.requests_per_stream for k in s.streams)


def run_mode(backend, mode: str, settings: Settings, requests, warmup, budget: Budget,
             results: dict, save) -> None:
    """Warm-up, reference pass and one row per stream count, saved after each."""
    r = settings.requests_per_stream
    entry = results["modes"].setdefault(mode, {})
    reference = None
    for name, streams in (("warmup", [[q] for q in warmup]), ("reference", [requests])):
        units = sum(len(x) for x in streams)
        log(f"{mode}: {name} ({units} requests)")
        try:
            res, recs = measure(backend, mode, streams, budget.deadline(units), None,
                                settings)
            entry[name] = res
            if name == "reference":
                reference = {x["index"]: x["text"] for x in recs if x["status"] == "ok"}
                entry["reference_texts"] = reference
        except Exception as e:  # noqa: BLE001 - recorded, the rows still run
            entry[name] = {"error": error_record(e)}
        save()
    for k in settings.streams:
        row = {"mode": mode, "streams": k, "requests_per_stream": r}
        log(f"{mode}: {k} streams x {r} requests")
        try:
            res, recs = measure(backend, mode, plan(requests, k, r),
                                budget.deadline(k * r), reference, settings)
            row.update(status="ok", **res, records=slim(recs))
        except Exception as e:  # noqa: BLE001 - recorded, the next row runs
            row.update(status="error", error=error_record(e))
        results["rows"].append(row)
        save()
        log(f"{mode}: {k} streams: {brief(row)}")


def brief(row: dict) -> str:
    if row.get("status") != "ok":
        return f"failed: {row['error']['type']}: {row['error']['message'][:200]}"
    s = row["summary"]
    return (f"{fmt(s['aggregate_tok_s'], '.1f')} tok/s, {s['status_counts']}, "
            f"mismatches {row['check']['mismatches']}")


def open_backend(kind: str, settings: Settings, budget: Budget, log_path: Path):
    if kind == "http":
        return HttpBackend(settings, log_path, start_timeout=max(10.0, budget.left() / 2))
    return DirectBackend(settings, lanes=None if kind.startswith("direct-lanes") else 0,
                         draft_lanes=kind != "direct-lanes-verify")


# ----------------------------------------------------------------------------- report


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def cross_check(results: dict, settings: Settings) -> dict:
    """Reference texts of the modes against each other (greedy AR = greedy speculative)."""
    refs = {m: e.get("reference_texts") for m, e in results["modes"].items()
            if e.get("reference_texts")}
    if not settings.deterministic:
        return {}
    out = {}
    names = sorted(refs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if "direct-ar" in (a, b) and settings.temperature != 0:
                continue  # sampled AR and speculative draws differ by design
            common = set(refs[a]) & set(refs[b])
            out[f"{a} vs {b}"] = {"checked": len(common),
                                  "mismatches": sum(refs[a][i] != refs[b][i] for i in common)}
    return out


def finalize(results: dict) -> None:
    """Speedups over 1 stream (the 1-stream row; the reference pass: the largest phase's
    requests alone) per mode, and speculative over autoregressive per S."""
    agg = {(r["mode"], r["streams"]): r["summary"]["aggregate_tok_s"]
           for r in results["rows"] if r.get("status") == "ok"}
    alone = {m: (e.get("reference") or {}).get("summary", {}).get("aggregate_tok_s")
             for m, e in results["modes"].items()}
    for r in results["rows"]:
        if r.get("status") != "ok":
            continue
        mine, one, ref = agg.get((r["mode"], r["streams"])), agg.get((r["mode"], 1)), \
            alone.get(r["mode"])
        r["speedup_over_1_stream"] = mine / one if mine and one else None
        r["speedup_over_reference"] = mine / ref if mine and ref else None
        ar = agg.get(("direct-ar", r["streams"]))
        if r["mode"] != "direct-ar":
            r["speedup_over_direct_ar"] = mine / ar if mine and ar else None


def mismatch_cell(row: dict) -> str:
    if row.get("status") != "ok":
        return "error"
    m, n = row["check"]["mismatches"], row["check"]["checked"]
    cell = "n/a" if m is None else f"{m}/{n}"
    counts = row["summary"]["status_counts"]
    extra = [f"{counts[k]} {k}" for k in ("timeout", "error", "skipped") if counts.get(k)]
    return cell + (f" ({', '.join(extra)})" if extra else "")


def table(results: dict) -> str:
    from tabulate import tabulate

    headers = ["mode", "streams", "aggregate tok/s", "speedup over 1 stream",
               "per-stream tok/s", "TTFT p50/p99 ms", "ITL p50/p99 ms", "latency p50/p99 s",
               "mismatches", "alpha", "streams per target call"]
    rows = []
    for r in results["rows"]:
        s = r.get("summary") or {}
        get = s.get
        m = r.get("server_metrics") or {}
        per_call = (m["lane_streams"] / m["lane_calls"] if m.get("lane_calls") else
                    1.0 if r["mode"] != "direct-ar" and s else None)
        rows.append([
            r["mode"], r["streams"], fmt(get("aggregate_tok_s"), ".1f"),
            fmt(r.get("speedup_over_1_stream"), ".2f"), fmt(get("per_stream_tok_s"), ".1f"),
            "/".join(fmt((get("ttft_ms") or {}).get(q), ".1f") for q in ("p50", "p99")),
            "/".join(fmt((get("itl_ms") or {}).get(q), ".2f") for q in ("p50", "p99")),
            "/".join(fmt((get("latency_s") or {}).get(q), ".2f") for q in ("p50", "p99")),
            mismatch_cell(r), fmt(get("alpha_mean"), ".3f"), fmt(per_call, ".1f")])
    return tabulate(rows, headers=headers, tablefmt="github")


def report_lines(results: dict) -> list[str]:
    lines = [f"note: {n}" for n in results["notes"]]
    lines += [f"{e.get('step') or e.get('backend')}: {e['type']}: {e['message'][:300]}"
              for e in results["errors"]]
    for m, e in results["modes"].items():
        for name in ("warmup", "reference"):
            if "error" in e.get(name, {}):
                err = e[name]["error"]
                lines.append(f"{m} {name} failed: {err['type']}: {err['message'][:300]}")
    for r in results["rows"]:
        if r.get("status") != "ok":
            lines.append(f"{r['mode']} {r['streams']} streams failed: "
                         f"{r['error']['type']}: {r['error']['message'][:300]}")
    for pair, c in results.get("cross_check", {}).items():
        lines.append(f"reference texts {pair}: {c['mismatches']} mismatches of {c['checked']}")
    return lines


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=None, help="exported pair (default: bundled)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--streams", type=int_list, default=(1, 4, 16))
    ap.add_argument("--requests-per-stream", type=positive, default=4)
    ap.add_argument("--max-tokens", type=positive, default=128)
    ap.add_argument("--prompt-tokens", type=positive, default=32,
                    help="token ids per prompt before decoding to text (default 32)")
    ap.add_argument("--gamma", type=gamma_arg, default=4, metavar="N|auto")
    ap.add_argument("--drafter", default="model")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--time-limit", type=float, default=540.0,
                    help="seconds for the whole run (default 540)")
    ap.add_argument("--mode", type=mode_list, default=MODES,
                    help=f"comma-separated, of {','.join(MODES)} (default: all)")
    return ap.parse_args(argv)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    return tuple(dict.fromkeys(positive(x) for x in text.split(",") if x.strip()))


def gamma_arg(text: str) -> int | str:
    return "auto" if text == "auto" else positive(text)


def mode_list(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}; got {text!r}")
    return modes


def runtime_facts() -> dict:
    try:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    except Exception as e:  # noqa: BLE001
        return {"onnxruntime": None, "error": str(e)}


def _terminate(signum, frame):  # SIGTERM: unwind, so that the server is stopped
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    settings = Settings(args.model_dir, args.device, args.streams, args.requests_per_stream,
                        args.max_tokens, args.gamma, args.drafter, args.temperature,
                        args.prompt_tokens, args.time_limit)
    out = args.json or Path(tempfile.gettempdir()) / f"qd-concurrency-{time.time():.0f}.json"
    log_path = out.with_suffix(".server.log")
    results = {"schema": 1, "benchmark": "concurrency", "command": [sys.executable, *sys.argv],
               "settings": asdict(settings), "environment": {**environment(),
                                                             **runtime_facts()},
               "backends": {}, "modes": {}, "rows": [], "errors": [], "notes": [],
               "server_log": str(log_path) if "http" in args.mode else None}
    if "http" in args.mode:
        results["notes"].append(
            "http has no autoregressive rows: the server has no autoregressive mode (a "
            "request's gamma and --gamma are >= 1 or auto); direct-ar runs autoregressive "
            "jobs (gamma None) through the same Scheduler")
    if not settings.deterministic:
        results["notes"].append("no mismatch check: sampled gamma auto / bandit draws "
                                "differ from run to run")

    def save() -> None:
        dump_json(out, results)

    reserve = min(30.0, 0.1 * args.time_limit)
    budget = Budget(args.time_limit - reserve, len(args.mode) * mode_units(settings))
    code = 0
    try:
        run_all(args.mode, settings, budget, results, save, log_path)
    except KeyboardInterrupt as e:
        results["errors"].append(error_record(e, step="interrupted"))
        code = 130
    finally:
        results["cross_check"] = cross_check(results, settings)
        finalize(results)
        save()
    print("\n".join([*report_lines(results), f"results: {out}", "", table(results)]))
    return code


def run_all(modes, settings: Settings, budget: Budget, results: dict, save,
            log_path: Path) -> None:
    """One backend at a time (the server process ends before the pair loads here)."""
    requests = warmup = None
    for kind in dict.fromkeys(BACKEND[m] for m in modes):
        mine = [m for m in modes if BACKEND[m] == kind]
        log(f"backend {kind}: modes {', '.join(mine)}")
        try:
            if requests is None:
                tok = prompt_tokenizer(settings)
                requests = make_requests(tok, settings.most * settings.requests_per_stream,
                                         settings.prompt_tokens)
                warmup = make_requests(tok, settings.most, settings.prompt_tokens,
                                       offset=10**6)
            with open_backend(kind, settings, budget, log_path) as backend:
                results["backends"][kind] = backend.info
                save()
                for mode in mine:
                    run_mode(backend, mode, settings, requests, warmup, budget, results, save)
        except Exception as e:  # noqa: BLE001 - the other backend still runs
            results["errors"].append(error_record(e, backend=kind))
            budget.release(len(mine) * mode_units(settings))
            for mode in mine:
                done = {r["streams"] for r in results["rows"] if r["mode"] == mode}
                results["rows"] += [{"mode": mode, "streams": k, "status": "error",
                                     "error": error_record(e, backend=kind)}
                                    for k in settings.streams if k not in done]
            save()
            log(f"backend {kind} failed: {type(e).__name__}: {str(e)[:300]}")


def prompt_tokenizer(settings: Settings):
    from quickdraft.ort_backend.text import load_tokenizer
    from quickdraft.serve.settings import ServeSettings

    folder = ServeSettings(model_dir=settings.model_dir).resolved_model_dir()
    return load_tokenizer(folder / "target")


if __name__ == "__main__":
    sys.exit(main())
