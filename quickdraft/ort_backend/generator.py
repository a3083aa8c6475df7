"""Generation over an exported draft/target pair on ONNX Runtime.

:class:`Generator` runs both kinds of export: dynamic caches (optimum graphs,
:class:`~quickdraft.ort_backend.model.OrtModel`) and static caches (GroupQueryAttention
graphs, :class:`~quickdraft.ort_backend.static.StaticOrtModel`, with CUDA graphs on CUDA);
:func:`load_model` picks the class from the manifest's ``kv_cache``. Verification runs on
the host (:func:`quickdraft.generation.host_verify`) or as an ONNX graph next to the
target's logits (:class:`~quickdraft.ort_backend.verify_graph.GraphVerifier`, the default
on static graphs when sampling; greedy generations on static graphs compare the target's
argmax ids, computed in its graph, on the host). Its lifecycle:

* ``load`` (:meth:`Generator.load`): sessions for the target and the draft on one device,
  the tokenizer, and the checks that they belong together;
* ``prefill`` (:meth:`Generator.prefill`): encode and check the prompt, fill both KV
  caches with all of it but its last token (the first iteration feeds that one, because
  it needs its logits);
* ``step`` (:meth:`Generator.step`): one iteration of the generic loop of
  :mod:`quickdraft.generation`: the draft proposes gamma tokens, the target scores gamma + 1
  positions in one call, :func:`quickdraft.verification.verify` decides, and both caches
  roll back to what was accepted (or one autoregressive token);
* ``rewind`` (:meth:`Generator.rewind`): cut the sequence back and roll the caches back
  on the device; ``step`` continues from there.

The acceptance rule and the loop are the NumPy ones; this module adds only the ORT models,
the verifier, the timing around their calls (:mod:`quickdraft.ort_backend.timing`) and text.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from quickdraft.generation import (
    GenerationStats,
    ModelDrafter,
    autoregressive_stream,
    check_pair,
    host_verify,
    speculative_stream,
)
from quickdraft.manifest import KV_CACHES, load_manifest
from quickdraft.ort_backend.device import (
    CudaUnavailableError,
    Device,
    resolve_device,
    session_options,
)
from quickdraft.ort_backend.model import ModelFolderError, OrtModel
from quickdraft.ort_backend.static import StaticOrtModel
from quickdraft.ort_backend.text import StreamDecoder, load_tokenizer, vocabulary
from quickdraft.ort_backend.timing import ModelTimes, TimedModel, TimedState
from quickdraft.ort_backend.verify_graph import GraphVerifier
from quickdraft.sampling import SamplingConfig

__all__ = [
    "DecodeConfig",
    "OrtStats",
    "Generation",
    "Piece",
    "Generator",
    "SpeculativeGenerator",
    "FastGenerator",
    "load_model",
    "VERIFY_MODES",
]

VERIFY_MODES = ("auto", "host", "device")  # where verification runs; auto: device on static
DEFAULT_MAX_GAMMA = 8  # Generator.load: step lengths 1 .. max_gamma + 1 get fixed bindings
DEFAULT_DRAFT_THREADS = 1  # Generator.load: intra-op threads of a draft on the CPU


def _check_verify(verify: str) -> None:
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")


def load_model(folder: str | os.PathLike, device: Device = Device("cpu"), *,
               graph_steps: Sequence[int] = (1,), cuda_graph: bool = False, options=None):
    """The model wrapper for an exported folder, chosen by its manifest's ``kv_cache``:
    :class:`OrtModel` for "dynamic", :class:`StaticOrtModel` for "static".

    ``graph_steps`` (the step lengths with fixed bindings) and ``cuda_graph`` (capture them
    as CUDA graphs; only on CUDA) apply to static caches; a dynamic graph has neither.
    ``options``: the ``onnxruntime.SessionOptions`` (default: ``session_options()``).
    """
    kind = load_manifest(folder).kv_cache
    if kind == "static":
        return StaticOrtModel(folder, device, graph_steps=graph_steps,
                              cuda_graph=bool(cuda_graph and device.kind == "cuda"),
                              options=options)
    if kind == "dynamic":
        return OrtModel(folder, device, options=options)
    raise ModelFolderError(
        f"{folder}: kv_cache {kind!r} in the manifest is none of {', '.join(KV_CACHES)}; "
        "re-export the model"
    )


@dataclass(frozen=True)
class DecodeConfig:
    """How one generation runs."""

    max_new_tokens: int = 64
    gamma: int = 5  # draft tokens per iteration (ignored when autoregressive)
    sampling: SamplingConfig = SamplingConfig()
    seed: int | None = None  # None: fresh entropy; an int: the same output every time
    autoregressive: bool = False  # the baseline: target only, one token per call

    def __post_init__(self) -> None:
        def is_int(x) -> bool:
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        if not is_int(self.gamma) or self.gamma < 1:
            raise ValueError(f"gamma must be an integer >= 1, got {self.gamma!r}")
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.sampling, SamplingConfig):
            raise TypeError("sampling must be a quickdraft.SamplingConfig")

    @property
    def mode(self) -> str:
        return "autoregressive" if self.autoregressive else "speculative"


@dataclass
class OrtStats:
    """Statistics of one generation: the loop's counts and the measured times."""

    mode: str  # "speculative" or "autoregressive"
    device: str  # where the models ran: "cpu" or "cuda:N"
    prompt_tokens: int  # length of the prompt in tokens
    kv_cache: str = "dynamic"  # the target's cache: "dynamic" or "static"
    verifier: str | None = None  # where verification ran: "host" or "device" (None: AR)
    generation: GenerationStats = field(default_factory=GenerationStats)  # the loop's counts
    target: ModelTimes = field(default_factory=ModelTimes)  # calls into the target
    draft: ModelTimes | None = None  # calls into the draft (None when autoregressive)
    prefill_s: float = 0.0  # filling the caches with the prompt (both models)
    decode_s: float = 0.0  # wall time of all steps
    # verification: time in the verifier less the target calls it made (sampling
    # adjustments of p, the rule and beta on the host, or the verification graph)
    verify_s: float = 0.0

    @property
    def new_tokens(self) -> int:
        return self.generation.new_tokens

    @property
    def target_calls(self) -> int:
        """Target forward calls, prefill included."""
        return self.target.prefill_calls + self.target.calls

    @property
    def draft_calls(self) -> int:
        """Draft forward calls, prefill included."""
        return 0 if self.draft is None else self.draft.prefill_calls + self.draft.calls

    @property
    def target_s(self) -> float:
        """Decode-phase time in the target: forward calls and cache roll-backs."""
        return self.target.decode_s

    @property
    def draft_s(self) -> float:
        return 0.0 if self.draft is None else self.draft.decode_s

    @property
    def host_s(self) -> float:
        """Decode-phase time outside the models and the verification: the draft's sampling,
        the autoregressive sampling and the loop's bookkeeping, on the host."""
        return max(0.0, self.decode_s - self.target_s - self.draft_s - self.verify_s)

    @property
    def cost_ratio(self) -> float:
        """Measured c: mean draft call time over mean target call time (decode phase)."""
        if self.draft is None or not self.draft.calls or not self.target.calls:
            return float("nan")
        return self.draft.mean_call_s / self.target.mean_call_s

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of decoding (prefill excluded)."""
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def as_dict(self) -> dict:
        g = self.generation
        out = {
            "mode": self.mode,
            "device": self.device,
            "kv_cache": self.kv_cache,
            "verifier": self.verifier,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "gamma": g.gamma,
            "iterations": g.iterations,
            "target_calls": self.target_calls,
            "draft_calls": self.draft_calls,
            "accepted_per_iteration": list(g.accepted_per_iteration),
            "acceptance_rate": g.acceptance_rate,
            "alpha": g.alpha,
            "tokens_per_iteration": g.tokens_per_iteration,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "target_s": self.target_s,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "host_s": self.host_s,
            "cost_ratio_c": self.cost_ratio,
            "tokens_per_s": self.tokens_per_s,
            "target": self.target.as_dict(),
        }
        if self.draft is not None:
            out["draft"] = self.draft.as_dict()
        return _no_nan(out)


def _no_nan(value):
    """NaN (an undefined rate) -> None, so the dict is valid JSON."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


@dataclass
class Generation:
    """What one generation produced."""

    prompt_ids: list[int]
    tokens: list[int]  # the new token ids (an EOS token, if reached, included)
    text: str  # the new tokens decoded (special tokens skipped)
    finish_reason: str  # "eos" or "length"
    stats: OrtStats

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": list(self.tokens),
            "prompt_tokens": len(self.prompt_ids),
            "finish_reason": self.finish_reason,
            "stats": self.stats.as_dict(),
        }


class Piece(NamedTuple):
    """One step's output: its token ids and the text they completed (may be '')."""

    tokens: list[int]
    text: str


class Generator:
    """Autoregressive or speculative generation with an exported pair on ONNX Runtime.

    ``Generator.load(model_dir)`` for a ``quickdraft export`` folder (either cache kind);
    or build one from :class:`OrtModel` / :class:`StaticOrtModel` objects (``draft`` None:
    autoregressive only; ``tokenizer`` None: token ids only).

    ``verify``: "host" (logits to the host, :func:`quickdraft.generation.host_verify`),
    "device" (the verification graph on the target's device, computing in ``compute``) or
    "auto": for a static target, the device when sampling (the logits stay there) and the
    host when greedy (the rule then needs only the target's argmax ids, which a static
    graph computes on the device: gamma + 1 integers cross, and no verification graph
    runs; measured faster on the H100 for the 1.1B and trained pairs, within noise at 7B,
    docs/benchmarks.md); host otherwise. Either way the
    loop, the uniforms and so the tokens for a seed are those of
    :func:`quickdraft.generation.speculative_stream`. ``drafter_factory`` (optional) makes
    the :class:`~quickdraft.protocols.Drafter` from the (timed) draft model in place of
    :class:`~quickdraft.generation.ModelDrafter`.
    """

    def __init__(self, target, draft=None, tokenizer=None, *, verify: str = "auto",
                 compute: str = "float32"):
        _check_verify(verify)
        if draft is not None:
            check_pair(target, draft)
            if draft.device != target.device:
                raise ValueError(f"draft on {draft.device} but target on {target.device}")
            if draft is target and isinstance(target, StaticOrtModel):
                raise ValueError(
                    "a static model owns one cache, so it cannot be its own draft: load the "
                    "folder twice (one StaticOrtModel each)"
                )
        self.target = target
        self.draft = draft
        self.tokenizer = tokenizer
        m = target.manifest
        eos = list(m.eos_token_ids) or ([m.eos_token_id] if m.eos_token_id is not None else [])
        self.eos_ids: frozenset[int] = frozenset(int(e) for e in eos)
        has_onnx = importlib.util.find_spec("onnx") is not None
        # auto: greedy generations verify on the host (prefill picks per generation)
        self._greedy_on_host = verify == "auto"
        if verify == "auto":  # the device when the logits can stay there and onnx is here
            verify = "device" if m.kv_cache == "static" and has_onnx else "host"
        if verify == "device" and not has_onnx:
            raise ValueError(
                "verification on the device builds an ONNX graph and needs the onnx package "
                "(pip install onnx); or verify on the host"
            )
        self.verify = verify  # "host" or "device": where sampled generations verify
        self._verifier = (GraphVerifier.for_model(target, compute=compute)
                          if verify == "device" else host_verify)
        self._active_verifier = self._verifier  # this generation's (set by prefill)
        self.drafter_factory = None  # draft LanguageModel -> Drafter; None: ModelDrafter
        self.device_note: str | None = None  # set by load() when "auto" fell back to the CPU
        self.config: DecodeConfig | None = None
        self.prompt_ids: list[int] = []
        self.ids: list[int] = []  # prompt and generated tokens
        self.stats: OrtStats | None = None
        self.result: Generation | None = None  # of the last stream() / generate()
        self._engine: Iterator[list[int]] | None = None
        self._done = True

    # -- load ------------------------------------------------------------------------------

    @classmethod
    def load(cls, model_dir: str | os.PathLike, *, device: str = "auto", device_id: int = 0,
             draft: bool = True, verify: str = "auto", cuda_graph: bool = True,
             max_gamma: int = DEFAULT_MAX_GAMMA, compute: str = "float32",
             draft_threads: int | None = DEFAULT_DRAFT_THREADS) -> Generator:
        """Load ``model_dir/target`` (and ``model_dir/draft``) written by ``quickdraft export``,
        dynamic or static caches alike (:func:`load_model`).

        ``device`` "cuda" fails when CUDA cannot be used; "auto" falls back to the CPU and
        leaves the reason in ``device_note`` (also for a static fp32 export, which the model
        builder makes for the CPU execution provider). For static caches, step lengths 1 ..
        ``max_gamma`` + 1 of the target (1 and 2 of the draft) get fixed bindings, captured
        as CUDA graphs on CUDA unless ``cuda_graph`` is False. ``verify`` and ``compute``
        are the constructor's. ``draft_threads``: intra-op threads of the draft's session
        on the CPU (None: ONNX Runtime's default, one per core). One by default: a draft
        step is too small to split, and a session's idle worker threads spin for a while
        after each run, on the cores the target's next call needs.
        """
        _check_verify(verify)  # before anything loads
        if int(max_gamma) != max_gamma or max_gamma < 1:
            raise ValueError(f"max_gamma must be an integer >= 1, got {max_gamma!r}")
        root = Path(model_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"model folder {root} does not exist")
        roles = ["target", "draft"] if draft else ["target"]
        missing = [r for r in roles if not (root / r).is_dir()]
        if missing and (root / "quickdraft.json").is_file():
            raise FileNotFoundError(
                f"{root} is one exported model, not a pair: give the folder that holds "
                "target/ and draft/ (the --out of `quickdraft export`)"
            )
        if missing:
            raise FileNotFoundError(
                f"{root} has no {' or '.join(missing)} folder: not a quickdraft export of a "
                "pair (make one with `quickdraft export --target ... --draft ... --out ...`)"
            )
        target_steps = range(1, max_gamma + 2) if draft else (1,)

        draft_options = session_options(threads=draft_threads)  # checks draft_threads

        def load(role: str, where: Device, steps):
            options = draft_options if role == "draft" and where.kind == "cpu" else None
            return load_model(root / role, where, graph_steps=steps, cuda_graph=cuda_graph,
                              options=options)

        note = None
        manifest = load_manifest(root / "target")
        if device == "auto" and manifest.execution_provider == "cpu":
            device, note = "cpu", (
                f"this {manifest.kv_cache} {manifest.dtype} export is built for the CPU "
                "execution provider (export --dtype fp16 --device cuda for CUDA); running on "
                "the CPU")
        resolved, cuda_note = resolve_device(device, device_id)
        note = note or cuda_note
        try:
            target = load("target", resolved, target_steps)
        except CudaUnavailableError as e:
            if device != "auto":
                raise
            resolved, note = Device("cpu"), f"CUDA could not be used ({e}); running on the CPU"
            target = load("target", resolved, target_steps)
        tokenizer = load_tokenizer(root / "target")
        draft_model = None
        if draft:
            draft_model = load("draft", resolved, (1, 2))
            if draft_model.manifest.kv_cache != target.manifest.kv_cache:
                raise ModelFolderError(
                    f"{root}: the target's cache is {target.manifest.kv_cache} but the "
                    f"draft's is {draft_model.manifest.kv_cache}; export the pair together"
                )
            if vocabulary(load_tokenizer(root / "draft")) != vocabulary(tokenizer):
                raise ValueError(
                    f"{root}: the draft's tokenizer differs from the target's (token <-> id "
                    "mapping); speculative decoding needs one shared vocabulary"
                )
        generator = cls(target, draft_model, tokenizer, verify=verify, compute=compute)
        generator.device_note = note
        return generator

    @property
    def device(self) -> Device:
        return self.target.device

    def max_length(self, autoregressive: bool = False) -> int:
        """The longest sequence the models in use accept."""
        if autoregressive or self.draft is None:
            return self.target.max_length
        return min(self.target.max_length, self.draft.max_length)

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this generator has no tokenizer: pass token ids")
        if not prompt:
            raise ValueError("the prompt is empty: give some text to continue")
        return list(self.tokenizer.encode(prompt).ids)

    def decode(self, tokens: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # -- prefill, step, rewind -------------------------------------------------------------

    def prefill(self, prompt: str | Sequence[int], config: DecodeConfig = DecodeConfig()
                ) -> list[int]:
        """Start a generation: check the prompt, fill the caches; return the prompt's ids."""
        if not isinstance(config, DecodeConfig):
            raise TypeError("config must be a DecodeConfig")
        if not config.autoregressive and self.draft is None:
            raise ValueError("no draft model is loaded: use autoregressive decoding")
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        limit = self.max_length(config.autoregressive)
        if len(ids) >= limit:
            raise ValueError(
                f"the prompt is {len(ids)} tokens but the model's context is {limit}: "
                "no room to generate; shorten the prompt"
            )
        if len(ids) + config.max_new_tokens > limit:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds "
                f"the model's context of {limit} tokens; use max_new_tokens <= {limit - len(ids)}"
            )
        vocab = self.target.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        self._close_engine()
        self.config = config
        speculative = not config.autoregressive
        self._active_verifier = (host_verify if self._greedy_on_host and config.sampling.greedy
                                 else self._verifier)
        if speculative and isinstance(self._active_verifier, GraphVerifier):
            self._active_verifier.prepare(config.gamma, config.sampling)  # sessions up front
        where = "device" if isinstance(self._active_verifier, GraphVerifier) else "host"
        stats = OrtStats(mode=config.mode, device=str(self.device), prompt_tokens=len(ids),
                         kv_cache=self.target.manifest.kv_cache,
                         verifier=where if speculative else None,
                         draft=ModelTimes() if speculative else None)
        stats.generation.gamma = config.gamma if speculative else 0
        self._target = TimedModel(self.target, stats.target)
        self._target_state = self._target.new_state()
        self._drafter = None
        t0 = time.perf_counter()
        self._target_state.prefill(ids[:-1])
        if speculative:
            draft = TimedModel(self.draft, stats.draft)
            self._drafter = (ModelDrafter(draft, config.sampling) if self.drafter_factory is None
                             else self.drafter_factory(draft))
            state = getattr(self._drafter, "state", None)
            if isinstance(state, TimedState):
                state.prefill(ids[:-1])
        stats.prefill_s = time.perf_counter() - t0
        self.stats = stats
        self._rng = np.random.default_rng(config.seed)
        self.prompt_ids = list(ids)
        self.ids = list(ids)
        self._done = False
        return list(ids)

    @property
    def done(self) -> bool:
        """True once EOS or max_new_tokens ended the generation (or before any prefill)."""
        return self._done

    @property
    def new_tokens(self) -> list[int]:
        return self.ids[len(self.prompt_ids) :]

    def step(self) -> list[int]:
        """One iteration: the tokens it added ([] once the generation is done)."""
        if self._done:
            return []
        if self._engine is None:
            self._engine = self._start_engine()
        t0 = time.perf_counter()
        piece = next(self._engine, None)
        self.stats.decode_s += time.perf_counter() - t0
        if piece is None:  # cannot happen before the stop conditions below; kept safe
            self._finish()
            return []
        self.ids.extend(piece)
        produced = len(self.ids) - len(self.prompt_ids)  # no copy of the new tokens
        self.stats.generation.new_tokens = produced
        if produced >= self.config.max_new_tokens or piece[-1] in self.eos_ids:
            self._finish()
        return piece

    def rewind(self, length: int) -> None:
        """Cut the sequence (prompt and generated tokens) to its first ``length`` tokens and
        roll both caches back on the device; ``step`` continues from there."""
        if self.config is None:
            raise ValueError("nothing to rewind: call prefill first")
        if not 1 <= length <= len(self.ids):
            raise ValueError(f"cannot rewind to {length}: the sequence has {len(self.ids)} tokens")
        self._close_engine()
        self.ids = self.ids[:length]
        self.prompt_ids = self.prompt_ids[:length]
        t0 = time.perf_counter()
        states = [self._target_state, getattr(self._drafter, "state", None)]
        for state in filter(None, states):  # at most length - 1: the next call needs the last
            state.rewind(min(len(state.tokens), length - 1))
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.generation.new_tokens = len(self.new_tokens)
        self._done = len(self.new_tokens) >= self.config.max_new_tokens

    def _start_engine(self) -> Iterator[list[int]]:
        c = self.config
        remaining = c.max_new_tokens - len(self.new_tokens)
        common = dict(max_new_tokens=remaining, sampling=c.sampling, rng=self._rng,
                      eos_id=self.eos_ids, stats=self.stats.generation,
                      state=self._target_state)
        if c.autoregressive:
            return autoregressive_stream(self._target, self.ids, **common)
        return speculative_stream(self._target, None, self.ids, gamma=c.gamma,
                                  drafter=self._drafter, verifier=self._timed_verifier(),
                                  **common)

    def _timed_verifier(self):
        """The verifier, adding its time less the target calls inside it to ``verify_s``."""
        verifier, stats = self._active_verifier, self.stats

        def timed(*args, **kwargs):
            target_before = stats.target.decode_s
            t0 = time.perf_counter()
            try:
                return verifier(*args, **kwargs)
            finally:
                inside = stats.target.decode_s - target_before
                stats.verify_s += time.perf_counter() - t0 - inside

        return timed

    def _finish(self) -> None:
        self._done = True
        self._close_engine()

    def _close_engine(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    # -- whole generations -----------------------------------------------------------------

    def pieces(self, prompt: str | Sequence[int], config: DecodeConfig = DecodeConfig()
               ) -> Iterator[Piece]:
        """Prefill, then one :class:`Piece` per step until EOS or max_new_tokens; the last
        piece carries any text held back. ``result`` holds the :class:`Generation` after."""
        self.result = None
        self.prefill(prompt, config)
        decoder = StreamDecoder(self.tokenizer, self.prompt_ids) if self.tokenizer else None
        text = []
        while not self._done:
            tokens = self.step()
            piece = decoder.push(tokens) if decoder else ""
            if self._done and decoder:
                piece += decoder.flush()
            text.append(piece)
            yield Piece(tokens, piece)
        last = self.new_tokens[-1:]
        self.result = Generation(
            prompt_ids=list(self.prompt_ids),
            tokens=list(self.new_tokens),
            text="".join(text),
            finish_reason="eos" if last and last[0] in self.eos_ids else "length",
            stats=self.stats,
        )

    def stream(self, prompt: str | Sequence[int], config: DecodeConfig = DecodeConfig()
               ) -> Iterator[str]:
        """Yield text pieces as tokens are accepted (``result`` holds the Generation after)."""
        if self.tokenizer is None:
            raise ValueError("this generator has no tokenizer: use pieces() or generate()")
        for piece in self.pieces(prompt, config):
            if piece.text:
                yield piece.text

    def generate(self, prompt: str | Sequence[int], config: DecodeConfig = DecodeConfig()
                 ) -> Generation:
        """Generate to EOS or max_new_tokens; the tokens, text and statistics."""
        for _ in self.pieces(prompt, config):
            pass
        return self.result


SpeculativeGenerator = Generator  # the same object: speculative unless asked otherwise


class FastGenerator(Generator):
    """A :class:`Generator` with whole-generation calls that take token ids and return
    ``(tokens, statistics dict)``: for measurements.

    ``FastGenerator(target, draft, sampling=...)`` fixes the sampling settings;
    :meth:`autoregressive` and :meth:`speculative` run :meth:`Generator.generate` and
    flatten its :class:`OrtStats` into the dict (see :meth:`speculative` for its keys).
    ``verify`` is the :class:`Generator`'s ("auto": the verification graph when sampling,
    the host rule on the target's argmax ids when greedy); "device" or "host" forces one,
    to measure one against the other.
    """

    def __init__(self, target, draft=None, *, sampling: SamplingConfig | None = None,
                 compute: str = "float32", tokenizer=None, verify: str = "auto"):
        super().__init__(target, draft, tokenizer, verify=verify, compute=compute)
        self.sampling = sampling if sampling is not None else SamplingConfig()

    def autoregressive(self, prompt_ids: Sequence[int], max_new_tokens: int, *,
                       seed: int | None = None) -> tuple[list[int], dict]:
        """One target call per token. Returns (tokens, stats): the keys of
        :meth:`speculative` that apply, and ``target_ms_per_step``."""
        res = self.generate(list(prompt_ids), DecodeConfig(
            max_new_tokens=max_new_tokens, sampling=self.sampling, seed=seed,
            autoregressive=True))
        s = res.stats
        return list(res.tokens), {
            **self._common(res),
            "target_calls": s.target_calls,
            "target_ms_per_step": 1e3 * s.target.mean_call_s,
        }

    def speculative(self, prompt_ids: Sequence[int], max_new_tokens: int, gamma: int, *,
                    seed: int | None = None, drafter_factory=None) -> tuple[list[int], dict]:
        """Speculative sampling, verified as ``verify`` says. Returns (tokens, stats).

        stats: ``mode``, ``gamma``, ``new_tokens``, ``iterations``, ``target_calls`` and
        ``draft_calls`` (decode phase: one target call per iteration), the accepted and
        drafted counts per iteration, ``acceptance_rate``, ``alpha``,
        ``tokens_per_iteration``, and seconds: ``prefill_s``, ``draft_s``, ``target_s``,
        ``verify_s``, ``host_s`` (the rest of decoding), ``total_s`` (prefill included),
        with ``host_ms_per_iteration`` and ``tokens_per_s`` (over ``total_s``).
        ``drafter_factory`` replaces the draft's own proposals for this call.
        """
        self.drafter_factory = drafter_factory
        try:
            res = self.generate(list(prompt_ids), DecodeConfig(
                max_new_tokens=max_new_tokens, gamma=gamma, sampling=self.sampling, seed=seed))
        finally:
            self.drafter_factory = None
        s, g = res.stats, res.stats.generation
        return list(res.tokens), {
            **self._common(res),
            "gamma": gamma,
            "iterations": g.iterations,
            "target_calls": s.target.calls,
            "draft_calls": s.draft.calls,
            "accepted_per_iteration": list(g.accepted_per_iteration),
            "drafted_per_iteration": list(g.drafted_per_iteration),
            "acceptance_rate": g.acceptance_rate,
            "alpha": g.alpha,
            "tokens_per_iteration": g.tokens_per_iteration,
            "draft_s": s.draft_s,
            "verify_s": s.verify_s,
            "host_ms_per_iteration": 1e3 * s.host_s / max(1, g.iterations),
            "cost_ratio_c": s.cost_ratio,
        }

    @staticmethod
    def _common(res: Generation) -> dict:
        s = res.stats
        total = s.prefill_s + s.decode_s
        return {
            "mode": s.mode, "new_tokens": s.new_tokens, "prefill_s": s.prefill_s,
            "target_s": s.target_s, "host_s": s.host_s, "total_s": total,
            "tokens_per_s": s.new_tokens / total if total > 0 else float("nan"),
        }
