"""Iteration-level scheduling: one thread owns every Generator and advances the active
streams one step each, in turn.

A :class:`~quickdraft.ort_backend.generator.Generator` and its states belong to the thread
that made it, so all of them live on the scheduler's thread. Each round it admits waiting
jobs up to ``max_concurrency`` active streams, then gives every active stream one unit of
work (its prefill, or one speculative iteration) in round-robin order: a long request
never blocks short ones for more than one iteration per round. When the target has lanes
(:class:`~quickdraft.protocols.LaneModel`), the speculative streams whose states hold one
are verified together: each drafts (``begin_step``), one target call scores every
proposal (``score_lanes``), each decides and takes its tokens (``end_step``). When the draft
has lanes too (:class:`~quickdraft.protocols.LaneChainModel`), the greedy proposals are
drafted together first: each plans its chain (``plan_draft``), the lagging tokens go in one
draft call, every chain runs as one (``chain_lanes``). Events go back to the
caller through ``job.emit`` (the server passes ``loop.call_soon_threadsafe`` onto an
``asyncio.Queue``). Generators of finished jobs are pooled and reused when the next job's
settings allow it (their caches reset, so a reused one gives exactly what a fresh one
would); the others are closed, and the pool never holds more than ``max_concurrency``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from quickdraft.ort_backend.generator import DecodeConfig
from quickdraft.ort_backend.text import StreamDecoder
from quickdraft.protocols import LaneChainModel, LaneModel, fill, supports

__all__ = ["Job", "Delta", "Done", "Failed", "Scheduler", "QueueFull", "ShuttingDown",
           "stop_holdback"]

# a chain of the draft's lanes runs every lane: drafted together only when at least this
# share of them is busy (H200, 1.1B pair, 16 lanes: 16 streams gained 26%, 4 lost 11%)
DRAFT_TOGETHER_MIN_SHARE = 0.5


def draft_together_pays(streams: int, lanes: int) -> bool:
    """Whether ``streams`` planned proposals are drafted as one chain of ``lanes`` lanes."""
    return streams >= max(2, DRAFT_TOGETHER_MIN_SHARE * lanes)


class QueueFull(Exception):
    """The waiting queue is full: answer 429."""


class ShuttingDown(Exception):
    """The scheduler no longer takes jobs: answer 503."""


@dataclass(frozen=True)
class Delta:
    """New text of a streamed job (never past a stop string)."""

    text: str


@dataclass(frozen=True)
class Done:
    text: str  # the whole completion, cut at the first stop string
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    speculative: dict | None  # gamma, acceptance_rate, alpha, tokens_per_target_call
    stats: dict = field(default_factory=dict)  # OrtStats.as_dict()


@dataclass(frozen=True)
class Failed:
    status: int  # the HTTP status it maps to
    message: str
    type: str = "invalid_request_error"
    param: str | None = None


_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One request for the scheduler: prompt ids and the settings of its Generator."""

    prompt_ids: list[int]
    config: DecodeConfig
    gamma: int | str | None  # None: autoregressive
    drafter: str | None  # a DRAFTERS kind, or None with gamma None
    emit: Callable[[object], None]  # called on the scheduler thread with Delta/Done/Failed
    stop: Sequence[str] = ()
    stream: bool = False
    timeout: float | None = None
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set from any thread (the client went away)
    # the scheduler's
    gen: object = None
    decoder: StreamDecoder | None = None
    text: str = ""
    emitted: int = 0
    first_token_at: float | None = None
    last_step_at: float | None = None
    finished: bool = False

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def deadline(self) -> float | None:
        return None if self.timeout is None else self.arrived + self.timeout

    def pool_key(self):
        """Settings under which a finished Generator can serve this job (None: never)."""
        reusable = self.gamma is None or (self.drafter == "model" and self.gamma != "auto")
        if not reusable:  # adaptive, n-gram, bandit, hierarchical: they learn or draw
            return None
        c = self.config
        return (c.sampling, c.lenience, self.gamma, self.drafter)


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could begin a stop string (held back)."""
    longest = max((len(s) for s in stops), default=0)
    for k in range(min(len(text), longest - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


def _speculative(stats) -> dict | None:
    if stats is None or stats.mode != "speculative":
        return None
    g = stats.generation
    d = stats.as_dict()
    return {
        "gamma": g.gamma,
        "acceptance_rate": d.get("acceptance_rate"),
        "alpha": d.get("alpha"),
        "tokens_per_target_call": (g.new_tokens / stats.target.calls
                                   if stats.target.calls else None),
        "iterations": g.iterations,
        "target_calls": stats.target_calls,
        "draft_calls": stats.draft_calls,
    }


class Scheduler:
    """The thread that owns all Generators of one server over one loaded Pair."""

    def __init__(self, pair, *, max_concurrency: int = 8, max_queue: int = 64,
                 metrics=None, idle_wait_s: float = 0.5):
        self.pair = pair
        self.max_concurrency = int(max_concurrency)
        self.max_queue = int(max_queue)
        self.metrics = metrics
        self.idle_wait_s = idle_wait_s
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._pool: list[tuple[object, object]] = []  # (key, Generator), oldest first
        self._stopping = False
        self._drain_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self.generators_made = 0
        self.generators_closed = 0
        self.generators_reused = 0
        self.lane_calls = 0  # target calls that verified two or more streams at once
        self.draft_lane_calls = 0  # draft chains that drafted two or more streams at once
        self.draft_lane_errors = 0  # such chains that failed (their streams drafted alone)
        self.last_draft_lane_error: str | None = None
        self.error: BaseException | None = None  # what ended the thread, if not a stop
        target, draft = pair.target, pair.draft
        self._lanes = target if supports(target, LaneModel) and target.lane_tokens else None
        self._draft_lanes = (draft if self._lanes is not None and draft is not None
                             and supports(draft, LaneChainModel) and draft.lane_chain_length
                             else None)

    # -- any thread ------------------------------------------------------------------------

    def start(self) -> Scheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="quickdraft-scheduler",
                                            daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping or not self.alive:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue and \
                    len(self._active) + len(self._waiting) >= self.max_concurrency:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already "
                                f"(--max-queue {self.max_queue}); retry later")
            self._waiting.append(job)
            self._gauges()
            self._cv.notify()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def snapshot(self) -> dict:
        with self._cv:
            return {"active": len(self._active), "queued": len(self._waiting),
                    "pooled": len(self._pool), "generators_made": self.generators_made,
                    "generators_closed": self.generators_closed,
                    "generators_reused": self.generators_reused,
                    "lane_calls": self.lane_calls,
                    "draft_lane_calls": self.draft_lane_calls,
                    "draft_lane_errors": self.draft_lane_errors,
                    "max_concurrency": self.max_concurrency, "max_queue": self.max_queue}

    def retry_after_s(self) -> int:
        return 1

    def stop(self, drain_s: float = 0.0, join_s: float | None = 30.0) -> None:
        """Take no new jobs; finish the in-flight ones for up to ``drain_s`` seconds, cancel
        the rest, close every Generator, and join the thread."""
        with self._cv:
            self._stopping = True
            self._drain_deadline = time.monotonic() + max(0.0, drain_s)
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(join_s)

    # -- the scheduler thread --------------------------------------------------------------

    def _gauges(self) -> None:
        m = self.metrics
        if m is not None:
            m.queue_depth.set(len(self._waiting))
            m.active.set(len(self._active))
            m.generators.set(self.generators_made - self.generators_closed)

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._waiting or self._active or self._stopping):
                        self._cv.wait(self.idle_wait_s)
                        if self.metrics is not None:
                            self.metrics.update_throughput()
                    if self._stopping and (
                            not (self._waiting or self._active)
                            or time.monotonic() >= self._drain_deadline):
                        break
                    while self._waiting and len(self._active) < self.max_concurrency:
                        self._active.append(self._waiting.popleft())
                    round_ = list(self._active)
                    self._gauges()
                # queued jobs can be cancelled or time out without waiting for a stream
                self._sweep_waiting()
                together = [j for j in round_ if self._lanes is not None
                            and j.gen is not None and j.gen.lane_ready]
                if len(together) > 1:
                    self._advance_together(together)
                else:
                    together = []
                for job in round_:
                    if job not in together:
                        self._advance(job)
                with self._cv:
                    self._active = [j for j in self._active if not j.finished]
                    self._gauges()
        except BaseException as e:  # keep the reason; the server answers 503 from now on
            self.error = e
        finally:
            self._shutdown()

    def _sweep_waiting(self) -> None:
        now = time.monotonic()
        with self._cv:
            gone = [j for j in self._waiting
                    if j.cancelled or (j.deadline is not None and now >= j.deadline)]
            for j in gone:
                self._waiting.remove(j)
        for j in gone:
            if j.cancelled:
                self._end(j, None, "cancelled")
            else:
                self._end(j, _timeout(j), "timeout")

    def _shutdown(self) -> None:
        with self._cv:
            left = list(self._active) + list(self._waiting)
            self._active.clear()
            self._waiting.clear()
            self._stopping = True
        for job in left:
            self._end(job, Failed(503, "the server shut down before this request finished",
                                  "server_shutdown"), "cancelled")
        for _, gen in self._pool:
            self._close(gen)
        self._pool.clear()
        with self._cv:
            self._gauges()

    def _emit(self, job: Job, event) -> None:
        try:
            job.emit(event)
        except Exception:  # the caller's loop is gone: nobody is listening
            job.cancelled = True

    def _close(self, gen) -> None:
        try:
            gen.close()
        finally:
            self.generators_closed += 1

    def _acquire(self, job: Job):
        key = job.pool_key()
        if key is not None:
            for i, (k, gen) in enumerate(self._pool):
                if k == key:
                    del self._pool[i]
                    gen.rewind(1)  # empty caches: the same floats as a fresh Generator
                    gen.config = job.config  # same sampling and lenience (the key)
                    self.generators_reused += 1
                    return gen
        busy = sum(1 for j in self._active if j.gen is not None)
        while self._pool and busy + len(self._pool) >= self.max_concurrency:
            self._close(self._pool.pop(0)[1])  # the oldest idle one makes room
        gen = self.pair.generator(job.config, gamma=job.gamma, drafter=job.drafter)
        self.generators_made += 1
        return gen

    def _release(self, job: Job, reuse: bool) -> None:
        gen, job.gen = job.gen, None
        if gen is None:
            return
        key = job.pool_key()
        if reuse and key is not None and gen.stats is not None:
            self._pool.append((key, gen))
            while len(self._pool) > self.max_concurrency:
                self._close(self._pool.pop(0)[1])
        else:
            self._close(gen)

    def _end(self, job: Job, event, reason: str) -> None:
        """Finish ``job`` (once): give its Generator back or close it, tell the caller."""
        if job.finished:
            return
        job.finished = True
        try:
            self._release(job, reuse=reason in ("stop", "length"))
        except Exception:  # a Generator that fails to close is dropped, not fatal
            pass
        if self.metrics is not None:
            self.metrics.finished.labels(reason).inc()
        if event is not None:
            self._emit(job, event)

    def _live(self, job: Job) -> bool:
        """False (and the job ended) when it was cancelled or ran out of time."""
        if job.finished:
            return False
        if job.cancelled:
            self._end(job, None, "cancelled")
            return False
        if job.deadline is not None and time.monotonic() >= job.deadline:
            self._end(job, _timeout(job), "timeout")
            return False
        return True

    def _advance(self, job: Job) -> None:
        """One unit of work for ``job``: its prefill, or one iteration."""
        if not self._live(job):
            return

        def unit() -> None:
            if job.gen is None:
                job.gen = self._acquire(job)
                job.gen.prefill(job.prompt_ids)
                job.decoder = StreamDecoder(self.pair.tokenizer, job.gen.prompt_ids)
                job.last_step_at = time.monotonic()
                if self.metrics is not None:
                    self.metrics.prompt_tokens.inc(len(job.prompt_ids))
                return
            self._took(job, job.gen.step())

        self._guarded(job, unit)

    def _advance_together(self, jobs: list[Job]) -> None:
        """One iteration of each job, their proposals verified in one target call (each
        lane takes at most ``lane_tokens``; a longer one is verified alone)."""
        asked = []  # (job, its LaneRequest)
        if self._draft_lanes is not None:
            self._draft_together(jobs)
        for job in jobs:
            if self._live(job):
                self._guarded(job, lambda j=job: asked.append((j, j.gen.begin_step())))
        lanes = self._lanes
        fits = [(j, r) for j, r in asked if len(r.tokens) <= lanes.lane_tokens]
        if len(fits) < 2:  # a call over every lane pays for all of them: verify alone
            fits = []
        scores: list = []
        if fits:
            try:
                scores = lanes.score_lanes([r.state for _, r in fits],
                                           [r.tokens for _, r in fits],
                                           [r.greedy for _, r in fits])
            except Exception as e:  # every stream of the call fails alike: not theirs
                for job, _ in fits:
                    self._end(job, Failed(500, f"generation failed: {type(e).__name__}: {e}",
                                          "server_error"), "error")
                fits = []
            else:
                self.lane_calls += 1
                if self.metrics is not None:
                    self.metrics.lane_calls.inc()
                    self.metrics.lane_streams.observe(len(fits))
        done = {id(j) for j, _ in fits}
        for (job, _), sc in zip(fits, scores):
            self._guarded(job, lambda j=job, sc=sc: self._took(j, j.gen.end_step(sc)))
        for job, _ in asked:
            if id(job) not in done and not job.finished:
                self._guarded(job, lambda j=job: self._took(j, j.gen.end_step(None)))

    def _draft_together(self, jobs: list[Job]) -> None:
        """The greedy proposals of ``jobs`` drafted together: each plans its chain, the
        tokens their draft states lack go in one draft call (longer lags alone), and every
        chain runs as one. A failure leaves the plans unfilled: each job then drafts alone
        in ``begin_step``, where its own error, if any, is its own."""
        draft, planned = self._draft_lanes, []

        def plan(job: Job) -> None:
            p = job.gen.plan_draft()
            if p is not None and draft.in_lane(p.state) and p.length <= draft.lane_chain_length:
                planned.append(p)

        for job in jobs:
            if self._live(job):
                self._guarded(job, lambda j=job: plan(j))
        if not draft_together_pays(len(planned), draft.lanes):
            return
        try:
            lagging = [p for p in planned if p.lag]
            together = [p for p in lagging if len(p.lag) <= draft.lane_tokens]
            if len(together) > 1:  # their lags in one call, the others alone
                draft.score_lanes([p.state for p in together], [p.lag for p in together],
                                  [True] * len(together))
            else:
                together = []
            for p in lagging:
                if p not in together:
                    fill(p.state, p.lag)
                p.lag = []
            outs = draft.chain_lanes([p.state for p in planned], [p.token for p in planned],
                                     [p.length for p in planned])
        except Exception as e:  # noqa: BLE001 - each drafts alone, and fails alone if it must
            self.draft_lane_errors += 1
            self.last_draft_lane_error = f"{type(e).__name__}: {e}"
            return
        for p, tokens in zip(planned, outs):
            p.tokens = tokens
        self.draft_lane_calls += 1
        if self.metrics is not None:
            self.metrics.draft_lane_calls.inc()

    def _guarded(self, job: Job, work) -> bool:
        """Run ``work()``; a failure ends ``job`` with a 400 (settings the request gave,
        checked before) or a 500, never the thread. True when it ran."""
        try:
            work()
            return True
        except Exception as e:
            self._fail(job, e)
            return False

    def _fail(self, job: Job, e: Exception) -> None:
        if isinstance(e, (ValueError, TypeError)):
            self._end(job, Failed(400, str(e)), "error")
        else:
            self._end(job, Failed(500, f"generation failed: {type(e).__name__}: {e}",
                                  "server_error"), "error")

    def _took(self, job: Job, tokens: list[int]) -> None:
        """A step of ``job`` gave ``tokens``: metrics, text, stop strings, events."""
        gen = job.gen
        now = time.monotonic()
        m = self.metrics
        if tokens:
            if job.first_token_at is None:
                job.first_token_at = now
                if m is not None:
                    m.ttft.observe(now - job.arrived)
            elif m is not None:
                per = (now - job.last_step_at) / len(tokens)
                for _ in tokens:
                    m.itl.observe(per)
            if m is not None:
                m.observe_tokens(len(tokens), now)
        job.last_step_at = now
        piece = job.decoder.push(tokens)
        if gen.done:
            piece += job.decoder.flush()
        job.text += piece
        finish = None
        if job.stop and piece:
            longest = max(len(s) for s in job.stop)
            start = max(0, job.emitted - longest)
            hits = [i for i in (job.text.find(s, start) for s in job.stop) if i >= 0]
            if hits:
                job.text = job.text[: min(hits)]
                finish = "stop"
        if finish is None and gen.done:
            last = gen.new_tokens[-1:]
            finish = "stop" if last and last[0] in gen.eos_ids else "length"
        if job.stream:
            end = len(job.text) if finish else len(job.text) - stop_holdback(job.text, job.stop)
            if end > job.emitted:
                self._emit(job, Delta(job.text[job.emitted:end]))
                job.emitted = end
        if finish is not None:
            stats = gen.stats
            if m is not None:
                m.latency.observe(now - job.arrived)
                if stats is not None:
                    m.observe_generation(stats.generation)
            done = Done(job.text, finish, len(gen.prompt_ids), len(gen.new_tokens),
                        _speculative(stats), stats.as_dict() if stats is not None else {})
            self._end(job, done, finish)


def _timeout(job: Job) -> Failed:
    return Failed(504, f"the request took longer than the server's timeout of "
                  f"{job.timeout:g} s (quickdraft serve --timeout)", "timeout")
