"""Generation on ONNX Runtime: a loaded pair, and one generator per sequence.

After onnxruntime-genai's split: :func:`load_pair` loads a ``quickdraft export`` folder
into a :class:`Pair` (target, draft, tokenizer, device note; loaded once, shared); a
:class:`Generator` is one sequence over a target and any
:class:`~quickdraft.protocols.Drafter`, with ``prefill`` / ``step`` / ``rewind``. The loop
and the acceptance rule are :mod:`quickdraft.generation`'s and
:mod:`quickdraft.verification`'s.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from quickdraft.drafters import DRAFTERS
from quickdraft.generation import (
    GenerationStats,
    ModelDrafter,
    autoregressive_stream,
    check_pair,
    check_uniforms,
    host_decide,
    host_verify,
    speculative_iterations,
    wants_greedy,
)
from quickdraft.manifest import GREEDY_OUTPUT, KV_CACHES, load_manifest
from quickdraft.ort_backend.device import (
    DEFAULT_ATTENTION,
    CudaUnavailableError,
    Device,
    check_attention,
    resolve_device,
    session_options,
)
from quickdraft.ort_backend.model import ExportedModel, ModelFolderError, OrtModel
from quickdraft.ort_backend.overlap import (
    GreedyHalves,
    OverlapTimes,
    SampledHalves,
    overlapped_stream,
)
from quickdraft.ort_backend.static import StaticDecodeState, StaticOrtModel
from quickdraft.ort_backend.text import StreamDecoder, load_tokenizer, vocabulary
from quickdraft.ort_backend.verify_graph import DEVICE_MIN_TEMPERATURE, GraphVerifier
from quickdraft.pipelined import PipelinedStats, ShadowRule
from quickdraft.protocols import (
    ChainPlan,
    ChainPlanner,
    ClosableState,
    CostAwareDrafter,
    Decider,
    DecodeState,
    DeviceState,
    Drafter,
    LaneModel,
    MeasuredState,
    SamplingDrafter,
    StatefulDrafter,
    rewind_to_common_prefix,
    supports,
)
from quickdraft.sampling import SamplingConfig
from quickdraft.timing import ModelTimes

__all__ = [
    "DecodeConfig",
    "OrtStats",
    "Generation",
    "Piece",
    "LaneRequest",
    "Pair",
    "Generator",
    "load_model",
    "load_pair",
    "VERIFY_MODES",
    "DRAFTERS",
]

VERIFY_MODES = ("auto", "host", "device")  # where sampled verification runs

DEFAULT_MAX_GAMMA = 8  # load_pair: target step lengths 1 .. max_gamma + 1 get fixed bindings
DEFAULT_DRAFT_THREADS = 1  # load_pair: intra-op threads of a draft on the CPU
DRAFT_DRAFT = "draft_draft"  # the optional third model of an export folder
GREEDY = SamplingConfig(temperature=0.0)


def _check_verify(verify: str) -> None:
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")


def load_model(folder: str | os.PathLike, device: Device = Device("cpu"), *,
               graph_steps: Sequence[int] = (1,), cuda_graph: bool = False,
               chain_length: int = 0, lanes: int = 0, options=None,
               attention: str = DEFAULT_ATTENTION):
    """The loaded model for an exported folder, by its manifest's ``kv_cache``:
    :class:`OrtModel` (dynamic) or :class:`StaticOrtModel` (static; ``graph_steps`` get
    fixed bindings, captured as CUDA graphs with ``cuda_graph`` on CUDA, its states can
    launch greedy chains of up to ``chain_length`` steps, and ``lanes`` of them are
    scored in one call; ``attention``: its GroupQueryAttention's CUDA kernel, one of
    :data:`~quickdraft.ort_backend.device.ATTENTION_KERNELS`). ``lanes`` needs a static
    export."""
    m = load_manifest(folder)
    kind = m.kv_cache
    if kind == "static":
        return StaticOrtModel(folder, device, graph_steps=graph_steps,
                              cuda_graph=bool(cuda_graph and device.kind == "cuda"),
                              chain_length=chain_length if GREEDY_OUTPUT in m.output_names
                              else 0, lanes=lanes, options=options, attention=attention)
    if lanes > 1:
        raise ValueError(f"{folder}: lanes (several sequences in one target call) need a "
                         "static export: export with --kv-cache static")
    if kind == "dynamic":
        return OrtModel(folder, device, options=options, attention=attention)
    raise ModelFolderError(
        f"{folder}: kv_cache {kind!r} in the manifest is none of {', '.join(KV_CACHES)}; "
        "re-export the model"
    )


# onnxruntime's fpA_intB kernel for MatMulNBits on CUDA (contrib_ops/cuda/quantization)
FPA_INTB_GEMM = "ep.cuda.fpa_intb_gemm"


def target_options(manifest, device: Device, *, speculative: bool):
    """Session options for the target, or None for quickdraft's defaults.

    An int4 target on CUDA that verifies drafts gets the fpA_intB MatMulNBits kernel: on
    the H200 at 7B its 5-token step costs 1.34x the fastest 1-token step, against 1.82x
    with the default kernel, which stays for autoregressive loading (faster at 1 token).
    """
    if device.kind != "cuda" or manifest.weights != "int4":
        return None
    options = session_options()
    options.add_session_config_entry(FPA_INTB_GEMM, "1" if speculative else "0")
    return options


def samples_on_device(model, sampling: SamplingConfig) -> bool:
    """Whether tokens sampled from ``model`` are drawn on its device by default: a static
    model (its logits stay there) on CUDA, at a temperature the device graphs take
    (``DEVICE_MIN_TEMPERATURE`` or more)."""
    return (sampling.temperature >= DEVICE_MIN_TEMPERATURE
            and isinstance(model, StaticOrtModel) and model.device.kind == "cuda")


def _check_pipelined(target, drafter, config: DecodeConfig, verify: str, compute: str) -> None:
    """Refuse, naming the fix, what the pipelined loop cannot run."""
    from quickdraft.ort_backend.device_draft import DeviceModelDrafter

    if config.lenience != 1.0:
        raise ValueError("pipelined decoding applies the exact rule: lenience must be 1")
    if not isinstance(drafter, ModelDrafter):
        raise ValueError("pipelined decoding drafts a fixed gamma with the draft model: give "
                         "gamma >= 1 (--gamma N) or a ModelDrafter, not another strategy or "
                         "gamma auto")
    if not isinstance(target, StaticOrtModel) or not isinstance(drafter.state,
                                                                 StaticDecodeState):
        raise ValueError("pipelined decoding needs a static pair (export with "
                         "--kv-cache static)")
    if not drafter.model.has_greedy:
        raise ValueError("pipelined decoding chains the draft's greedy_tokens output, which "
                         "this draft's graph lacks: re-export the pair with quickdraft export "
                         "--kv-cache static")
    if drafter.model.chain_length < drafter.gamma + 1:
        raise ValueError(
            f"pipelined decoding at gamma {drafter.gamma} drafts chains of {drafter.gamma + 1} "
            f"steps; load the draft with chain_length >= {drafter.gamma + 1} (load_pair "
            f"gives max_gamma + 1; this draft has {drafter.model.chain_length})")
    if config.sampling.greedy:
        return
    if not (isinstance(drafter, DeviceModelDrafter) and drafter.chained):
        raise ValueError(
            "pipelined sampling draws the draft's tokens inside its chains on the device: "
            "give a DeviceModelDrafter (Pair.generator(..., pipelined=True) makes one; "
            "device_sampling must not be False), within the model's sampled-chain settings")
    if verify != "device":
        raise ValueError(
            "pipelined sampling verifies with the verification graph next to the draft's "
            "rows: verify must be 'device' (or 'auto' where it resolves to the device: a "
            "static target, onnx installed, lenience 1 and a temperature of at least "
            f"{DEVICE_MIN_TEMPERATURE:g}); this generator would verify on the host")
    if drafter.compute != compute:
        raise ValueError(f"the drafter's rows are {drafter.compute} but the verification "
                         f"graph computes in {compute}: give both the same compute")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass(frozen=True)
class DecodeConfig:
    """How one generation runs (after onnxruntime-genai's GeneratorParams). Greedy by
    default, as ``quickdraft generate`` is."""

    max_new_tokens: int = 64  # stop after this many new tokens (or at EOS)
    sampling: SamplingConfig = GREEDY  # applied to p and q alike
    seed: int | None = None  # None: fresh entropy; an int: the same draws every time (the
    # same output where the kernels are deterministic: not cuDNN attention on CUDA)
    lenience: float = 1.0  # 1: exact; below 1 the lossy rule of appendix A.5

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.sampling, SamplingConfig):
            raise TypeError("sampling must be a quickdraft.SamplingConfig")
        if not isinstance(self.lenience, (int, float)) or not 0.0 < self.lenience <= 1.0:
            raise ValueError(f"lenience must be in (0, 1] (1 is exact), got {self.lenience!r}")


@dataclass
class OrtStats:
    """Statistics of one generation: the loop's counts and the measured times."""

    mode: str  # "speculative" or "autoregressive"
    device: str  # where the models ran: "cpu" or "cuda:N"
    prompt_tokens: int  # length of the prompt in tokens
    kv_cache: str = "dynamic"  # the target's cache: "dynamic" or "static"
    pipelined: bool = False  # the draft drafted beside the verification (mode "pipelined")
    verifier: str | None = None  # where verification ran: "host" or "device" (None: AR)
    lossy: bool = False  # lenience < 1: the output does not follow the target exactly
    # the loop's counts (PipelinedStats for a pipelined generation)
    generation: GenerationStats | PipelinedStats = field(default_factory=GenerationStats)
    overlap: OverlapTimes | None = None  # a pipelined generation's time split
    target: ModelTimes = field(default_factory=ModelTimes)  # target calls after the prefill
    draft: ModelTimes | None = None  # draft calls after the prefill (None: autoregressive)
    target_prefill: ModelTimes = field(default_factory=ModelTimes)  # the prompt, target
    draft_prefill: ModelTimes | None = None  # the prompt, draft states
    prefill_s: float = 0.0  # filling the caches with the prompt (all models)
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
        return self.target_prefill.calls + self.target.calls

    @property
    def draft_calls(self) -> int:
        """Draft forward calls, prefill included."""
        if self.draft is None:
            return 0
        return self.draft.calls + (self.draft_prefill.calls if self.draft_prefill else 0)

    @property
    def target_s(self) -> float:
        """Decode-phase time in the target: forward calls and cache roll-backs."""
        return self.target.decode_s

    @property
    def draft_s(self) -> float:
        return 0.0 if self.draft is None else self.draft.decode_s

    @property
    def host_s(self) -> float:
        """Decode-phase time outside the models and the verification: drafting without a
        model, sampling and the loop's bookkeeping, on the host."""
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
            "lossy": self.lossy,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "gamma": g.gamma,
            "iterations": g.iterations,
            "target_calls": self.target_calls,
            "draft_calls": self.draft_calls,
            "accepted_per_iteration": list(g.accepted_per_iteration),
            "drafted_per_iteration": list(g.drafted_per_iteration),
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
            "target_prefill": self.target_prefill.as_dict(),
        }
        if self.draft is not None:
            out["draft"] = self.draft.as_dict()
        if self.overlap is not None:
            out["pipeline"] = {**self.generation.as_dict(), **self.overlap.as_dict()}
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


class LaneRequest(NamedTuple):
    """What :meth:`Generator.begin_step` asks a call over several sequences to score."""

    state: DecodeState  # the target state, in a lane of its model
    tokens: list[int]  # to append to it
    greedy: bool  # the verdict needs the greedy ids alone (else the logits rows)


class Piece(NamedTuple):
    """One step's output: its token ids and the text they completed (may be '')."""

    tokens: list[int]
    text: str


@dataclass(frozen=True)
class Pair:
    """An exported pair, loaded once and shared by any number of :class:`Generator` s."""

    target: OrtModel | StaticOrtModel  # the target model p
    draft: OrtModel | StaticOrtModel | None  # the draft model q (None: loaded without it)
    tokenizer: object  # a ``tokenizers.Tokenizer``
    eos_ids: frozenset[int] = frozenset()  # end-of-sequence ids of the target's config
    max_draft: int | None = None  # the most draft tokens the target's steps were built for
    device_note: str | None = None  # why "auto" fell back to the CPU, if it did
    draft_draft: OrtModel | StaticOrtModel | None = None  # a draft of the draft, if exported
    # the bandit's measured rewards, per drafting configuration, shared by its sequences
    bandit_stats: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def device(self) -> Device:
        return self.target.device

    def drafter(self, sampling: SamplingConfig, gamma: int | str = 4, kind: str = "model",
                seed: int | None = None, device_sampling: bool | None = None) -> Drafter:
        """A drafting strategy over this pair (:data:`DRAFTERS`), shaped by ``sampling``.

        ``gamma``: draft tokens per iteration, or "auto" (chosen per iteration from the
        running alpha and the measured c, Theorem 3.8). ``seed`` seeds what a strategy draws
        itself (the hierarchical drafter's inner level). ``device_sampling``: sample the
        draft model's tokens on its device (:class:`DeviceModelDrafter`; only ids reach the
        host); None: :func:`samples_on_device`."""
        from quickdraft import drafters
        from quickdraft.ort_backend.device_draft import DeviceModelDrafter

        if kind not in DRAFTERS:
            raise ValueError(f"--drafter must be one of {', '.join(DRAFTERS)}, got {kind!r}")
        adaptive = gamma == "auto"
        if not adaptive and (not _is_int(gamma) or gamma < 1):
            raise ValueError(f"--gamma must be an integer >= 1 or auto, got {gamma!r}")
        most = self.max_draft or DEFAULT_MAX_GAMMA
        if not adaptive and gamma > most:
            raise ValueError(
                f"--gamma {gamma} is more than the {most} draft tokens the target's steps "
                f"were built for; use --gamma <= {most} or load with max_gamma >= {gamma}")
        g = most if adaptive else int(gamma)
        vocab = self.target.vocab_size
        needs_model = kind != "ngram"
        if needs_model and self.draft is None:
            raise ValueError("this pair was loaded without its draft model (draft=False)")
        # not the loop's stream; None: fresh entropy, as for the loop
        rng = np.random.default_rng(None if seed is None else [seed, 1])

        # one state per model, shared by every strategy that drafts with it: the bandit's
        # arms switch without replaying the sequence into a second cache of the same model
        states: dict[int, object] = {}

        def state(m):
            return states.setdefault(id(m), m.new_state())

        on_device = (samples_on_device(self.draft, sampling) if device_sampling is None
                     else device_sampling)

        def model(m) -> Drafter:
            base = (DeviceModelDrafter(m, sampling, g, state=state(m)) if on_device
                    else ModelDrafter(m, sampling, g, state=state(m)))
            return drafters.AdaptiveGammaDrafter(base, max_gamma=g) if adaptive else base

        def lookup() -> drafters.NgramDrafter:
            return drafters.NgramDrafter(vocab, max_tokens=g)

        def hierarchical() -> Drafter:
            dd = self.draft_draft
            inner = (ModelDrafter(dd, sampling, max(1, g // 2), state=state(dd))
                     if dd is not None else lookup())
            return drafters.HierarchicalDrafter(self.draft, inner, sampling, g, rng,
                                                state=state(self.draft))

        if kind == "model":
            return model(self.draft)
        if kind == "ngram":
            return lookup()
        if kind == "hierarchical":
            return hierarchical()
        draft = model(self.draft)
        arms = {"ngram+draft": drafters.FallbackDrafter(lookup(), draft)}
        if kind == "auto" and self.draft_draft is None:
            return arms["ngram+draft"]
        arms["draft"] = draft
        arms["ngram"] = lookup()
        arms["hierarchical"] = hierarchical()
        if self.draft_draft is not None:
            arms["draft_draft"] = drafters.FallbackDrafter(lookup(), model(self.draft_draft))
        # one set of statistics per configuration: a new sequence starts from what the
        # earlier ones measured (a server's requests, a benchmark's prompts)
        key = (kind, str(gamma), sampling)
        stats = self.bandit_stats.setdefault(key, drafters.BanditStats(arms))
        return drafters.BanditDrafter(arms, stats=stats)

    def generator(self, config: DecodeConfig = DecodeConfig(), *,
                  gamma: int | str | None = None, drafter: Drafter | str | None = None,
                  verify: str = "auto", compute: str = "float32",
                  device_sampling: bool | None = None, pipelined: bool = False,
                  capture_helpers: bool | None = None,
                  shadow_rule: ShadowRule = ShadowRule()) -> Generator:
        """A :class:`Generator` for one sequence: speculative with ``drafter`` (a Drafter,
        or one of :data:`DRAFTERS` by name, proposing ``gamma`` tokens, default 4), or the
        draft model proposing ``gamma`` tokens; autoregressive with neither.
        ``device_sampling``: as :meth:`drafter`'s, for a drafter made here, and for
        autoregressive sampling (the target's tokens drawn next to its logits).
        ``pipelined``: the draft model drafts while the target verifies (a static pair;
        sampled tokens are then drawn on the device unless ``device_sampling`` is False;
        see :class:`Generator`). ``capture_helpers``, ``shadow_rule``: as
        :class:`Generator`'s."""
        if pipelined and device_sampling is None and not config.sampling.greedy:
            device_sampling = True  # the continuation's draws happen inside its chain
        if isinstance(drafter, str):
            drafter = self.drafter(config.sampling, 4 if gamma is None else gamma, drafter,
                                   seed=config.seed, device_sampling=device_sampling)
        elif gamma is not None:
            if drafter is not None:
                raise ValueError("give a drafter or gamma, not both")
            drafter = self.drafter(config.sampling, gamma, seed=config.seed,
                                   device_sampling=device_sampling)
        return Generator(self.target, drafter, config, tokenizer=self.tokenizer,
                         eos_ids=self.eos_ids, verify=verify, compute=compute,
                         max_draft=self.max_draft, device_sampling=device_sampling,
                         pipelined=pipelined, capture_helpers=capture_helpers,
                         shadow_rule=shadow_rule)


def _eos_ids(manifest) -> frozenset[int]:
    eos = list(manifest.eos_token_ids) or (
        [manifest.eos_token_id] if manifest.eos_token_id is not None else [])
    return frozenset(int(e) for e in eos)


def load_pair(model_dir: str | os.PathLike, *, device: str = "auto", device_id: int = 0,
              draft: bool = True, cuda_graph: bool = True, max_gamma: int = DEFAULT_MAX_GAMMA,
              draft_threads: int | None = DEFAULT_DRAFT_THREADS, lanes: int = 0,
              draft_lanes: bool = True, attention: str = DEFAULT_ATTENTION) -> Pair:
    """Load ``model_dir/target`` (and ``model_dir/draft``) written by ``quickdraft export``,
    dynamic or static caches alike (:func:`load_model`), with the tokenizer.

    ``device`` "cuda" fails when CUDA cannot be used; "auto" falls back to the CPU and
    leaves the reason in ``device_note`` (also for a static export built for the CPU
    execution provider). For static caches, step lengths 1 .. ``max_gamma`` + 1 of the
    target (1 and 2 of the draft) get fixed bindings, captured as CUDA graphs on CUDA
    unless ``cuda_graph`` is False. ``draft_threads``: intra-op threads of the draft's
    session on the CPU (None: ONNX Runtime's default). One by default: a draft step is
    too small to split, and idle worker threads spin on the cores the target needs.
    ``lanes`` >= 2: the target scores that many sequences' proposals in one call
    (:meth:`StaticOrtModel.score_lanes`; a static export), and, with ``draft_lanes``, the
    draft runs that many sequences' greedy proposals as one chain
    (:meth:`StaticOrtModel.chain_lanes`); the server batches with them. ``attention``: the
    CUDA kernel of every model's GroupQueryAttention
    (:data:`~quickdraft.ort_backend.device.ATTENTION_KERNELS`).
    """
    check_attention(attention)
    if not _is_int(lanes) or lanes < 0:
        raise ValueError(f"lanes must be an integer >= 0, got {lanes!r}")
    if not _is_int(max_gamma) or max_gamma < 1:
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
    manifest = load_manifest(root / "target")
    if draft and manifest.kv_cache == "static" and max_gamma + 2 > manifest.max_cache_length:
        # target steps of gamma + 1 tokens, draft chains of gamma + 1 steps past a token
        raise ValueError(
            f"--gamma {max_gamma} needs target steps and draft chains of {max_gamma + 1} "
            f"tokens after at least one cached token, more than this export's static cache "
            f"of {manifest.max_cache_length} holds; use --gamma <= "
            f"{manifest.max_cache_length - 2}")
    target_steps = range(1, max_gamma + 2) if draft else (1,)
    draft_options = session_options(threads=draft_threads)  # checks draft_threads

    def load(role: str, where: Device, steps):
        options = draft_options if role == "draft" and where.kind == "cpu" else None
        if role == "target":
            options = target_options(manifest, where, speculative=draft)
        # a draft's continuations beside the verification (pipelined): stand-in + gamma
        chain = max_gamma + 1 if role == "draft" else 0
        # the draft's lanes run the streams' greedy proposals as one chain
        return load_model(root / role, where, graph_steps=steps, cuda_graph=cuda_graph,
                          chain_length=chain, lanes=lanes if role == "target" or (
                              role == "draft" and draft_lanes) else 0,
                          options=options, attention=attention)

    note = None
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
        # the hierarchical drafter verifies its inner proposals with the draft: short steps
        draft_steps = range(1, 6) if (root / DRAFT_DRAFT).is_dir() else (1, 2)
        draft_model = load("draft", resolved, draft_steps)
        check_pair(target, draft_model)
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
    draft_draft = None
    if draft and (root / DRAFT_DRAFT).is_dir():  # the hierarchical drafter's smallest model
        draft_draft = load(DRAFT_DRAFT, resolved, (1, 2))
        check_pair(target, draft_draft)
        if vocabulary(load_tokenizer(root / DRAFT_DRAFT)) != vocabulary(tokenizer):
            raise ValueError(f"{root}: the draft_draft tokenizer differs from the target's")
    return Pair(target, draft_model, tokenizer, eos_ids=_eos_ids(target.manifest),
                max_draft=max_gamma if draft else None, device_note=note,
                draft_draft=draft_draft)


def _prefill(state: DecodeState, ids: Sequence[int]) -> None:
    """Bring ``state`` to ``ids[:-1]``, keeping the prefix it already holds (the first step
    needs the last token's logits). A :class:`DeviceState` leaves the logits there."""
    common = rewind_to_common_prefix(state, ids, min_new=1)
    rest = list(ids[common:-1])
    if rest:
        (state.append_device if supports(state, DeviceState) else state.append)(rest)


def _times(state: DecodeState) -> ModelTimes:
    return state.times.copy() if supports(state, MeasuredState) else ModelTimes()


def _model_s(state: DecodeState) -> float:
    """Seconds the state has spent in its model so far (0 for a state that does not time)."""
    return state.times.decode_s if supports(state, MeasuredState) else 0.0


class _FromPlan:
    """The drafter for one step whose proposal is a chain already run (a filled
    :class:`~quickdraft.protocols.ChainPlan`)."""

    def __init__(self, drafter: Drafter, plan: ChainPlan):
        self.drafter, self.plan = drafter, plan

    def get_candidates(self, ids: Sequence[int], max_tokens: int, uniforms: np.ndarray):
        check_uniforms(uniforms)
        if self.plan.length > max_tokens:
            raise ValueError(f"the plan drafts {self.plan.length} tokens, more than the "
                             f"{max_tokens} this step allows")
        return self.drafter.from_chain(self.plan)

    def update_candidate_strategy(self, ids: Sequence[int], n_accepted: int) -> None:
        self.drafter.update_candidate_strategy(ids, n_accepted)


class Generator:
    """One sequence, autoregressive or speculative, on a loaded target and any drafter.

    Args:
        target: a loaded model (:class:`OrtModel`, :class:`StaticOrtModel`, or any
            ``LanguageModel``).
        drafter: any :class:`~quickdraft.protocols.Drafter` (a :class:`ModelDrafter` over
            a draft model, a drafter without a model, ...); None: autoregressive.
        config: the :class:`DecodeConfig` of every generation of this sequence.
        tokenizer: a ``tokenizers.Tokenizer`` (None: token ids only).
        eos_ids: end-of-sequence ids that stop a generation.
        verify: where sampled proposals are verified: "host" (NumPy), "device" (the
            verification graph next to the target's logits, computing in ``compute``) or
            "auto" (the device for a static target, else the host, and the host for
            temperatures below ``DEVICE_MIN_TEMPERATURE``). Greedy proposals are
            decided on the target's argmax ids wherever they are verified.
        max_draft: the most draft tokens per iteration (the target's compiled steps).
        pipelined: while the target verifies a proposal, the draft already drafts the next
            one, as if every token were kept (:mod:`quickdraft.pipelined`); on CUDA both
            calls are in flight at once (:mod:`quickdraft.ort_backend.overlap`). A
            :class:`ModelDrafter` over a static draft loaded with ``chain_length >= gamma
            + 1`` (``load_pair`` does) and a static target; sampled, a chained
            :class:`~quickdraft.ort_backend.device_draft.DeviceModelDrafter` and the
            verification graph (``verify`` "device" or "auto").
        shadow_rule: which pipelined iterations draft the next proposal beside the verify
            call (:class:`~quickdraft.pipelined.ShadowRule`; the default: all of them);
            the others verify their proposal with the bonus, as sequential decoding does.
        capture_helpers: run the verification graph and the target's sampling graph
            (autoregressive sampling on the device) as CUDA graphs (None: when the target
            is a static model loaded with CUDA graphs).

    ``prefill`` starts a generation (again and again: the prefix the caches share with
    the new prompt is kept), ``step`` runs one iteration, ``rewind`` cuts the sequence.
    A generator and its states belong to the thread that made it; ``close`` (or a
    ``with`` block) gives the cache buffers back to the models.
    """

    def __init__(self, target, drafter: Drafter | None = None,
                 config: DecodeConfig = DecodeConfig(), *, tokenizer=None,
                 eos_ids: Sequence[int] = (), verify: str = "auto", compute: str = "float32",
                 max_draft: int | None = None, device_sampling: bool | None = None,
                 pipelined: bool = False, capture_helpers: bool | None = None,
                 shadow_rule: ShadowRule = ShadowRule()):
        _check_verify(verify)
        if not isinstance(shadow_rule, ShadowRule):
            raise TypeError("shadow_rule must be a quickdraft.pipelined.ShadowRule")
        self.shadow_rule = shadow_rule
        if not isinstance(config, DecodeConfig):
            raise TypeError("config must be a DecodeConfig")
        self.pipelined = bool(pipelined)
        if drafter is not None and supports(drafter, SamplingDrafter) and \
                drafter.sampling not in (None, config.sampling):
            raise ValueError(
                f"the drafter shapes q with {drafter.sampling} but the config samples the "
                f"target with {config.sampling}; both need the same settings")
        exported = isinstance(target, ExportedModel)
        static = exported and target.manifest.kv_cache == "static"
        if verify == "auto":
            has_onnx = importlib.util.find_spec("onnx") is not None
            # below DEVICE_MIN_TEMPERATURE z / T overflows float32 in the graph; the host
            # rule takes such temperatures (its softmax subtracts the row maximum first)
            tiny = 0 < config.sampling.temperature < DEVICE_MIN_TEMPERATURE
            verify = ("device" if static and has_onnx and config.lenience == 1.0 and not tiny
                      else "host")
        if verify == "device" and not exported:
            raise ValueError(
                f"verify='device' runs the verification graph in ONNX Runtime beside an "
                f"exported model's logits; {type(target).__name__} is not an exported model: "
                "pass verify='host' (or 'auto')")
        if verify == "device" and config.lenience != 1.0:
            raise ValueError("the verification graph applies the exact rule: verify the "
                             "lossy rule (lenience < 1) on the host")
        if pipelined:
            _check_pipelined(target, drafter, config, verify, compute)
        self.target = target
        self.drafter = drafter
        self.config = config
        self.tokenizer = tokenizer
        self.eos_ids: frozenset[int] = frozenset(int(e) for e in eos_ids)
        self.max_draft = max_draft
        self.verify = verify  # "host" or "device": where sampled proposals are verified
        self._compute = compute  # the verification graph's arithmetic
        self._verifier = (GraphVerifier.for_model(target, compute=compute,
                                                  cuda_graph=capture_helpers)
                          if verify == "device" else host_verify)
        # the verifier's decision alone, on scores from a call over several sequences
        self._decide: Decider = (self._verifier.decide if verify == "device"
                                 else host_decide)
        self._thread = threading.get_ident()
        self._kv_cache = target.manifest.kv_cache if exported else "dynamic"
        self._device = str(target.device) if exported else "cpu"
        # a lane only for what can use one: a sequential speculative generation
        self._state = (target.new_state(lane=drafter is not None and not pipelined)
                       if supports(target, LaneModel) else target.new_state())
        # autoregressive sampling next to the target's logits, as Pair.drafter for a draft
        if device_sampling is None:
            device_sampling = samples_on_device(target, config.sampling)
        self._draw = None
        if device_sampling and drafter is None and not config.sampling.greedy:
            from quickdraft.ort_backend.device_draft import DeviceDraw

            if not supports(self._state, DeviceState):
                raise ValueError("device sampling needs a target whose logits stay on the "
                                 "device (a static export, --kv-cache static)")
            self._draw = DeviceDraw(target, config.sampling, compute=compute,
                                    cuda_graph=capture_helpers)
        self._draft_states: list[DecodeState] = (
            list(drafter.states) if drafter is not None and supports(drafter, StatefulDrafter)
            else [])
        self._cost_aware = drafter is not None and supports(drafter, CostAwareDrafter)
        self.prompt_ids: list[int] = []
        self.ids: list[int] = []  # prompt and generated tokens
        self.stats: OrtStats | None = None
        self.result: Generation | None = None  # of the last pieces() / generate()
        self._engine: Iterator[list[int]] | None = None
        self._loop = None  # the sequential speculative loop (SpeculativeIterations)
        self._proposal = None  # begin_step's, until end_step
        self._plan: ChainPlan | None = None  # plan_draft's, until begin_step
        self._draft_mark = 0.0  # the draft states' model seconds at plan_draft
        self._model_mark = 0.0  # the target state's model seconds at begin_step
        self._done = True
        self._closed = False
        self._marks: tuple[ModelTimes, ModelTimes] | None = None  # times after the prefill

    @property
    def speculative(self) -> bool:
        return self.drafter is not None

    def max_length(self) -> int | None:
        """The longest sequence the models in use accept (None: unbounded)."""
        limits = [self.target.max_length]
        if self.drafter is not None and supports(self.drafter, StatefulDrafter):
            limits.append(self.drafter.max_length)
        known = [limit for limit in limits if limit is not None]
        return min(known) if known else None

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

    def _check_thread(self) -> None:
        if self._closed:
            raise RuntimeError("this generator is closed: make a new one")
        if threading.get_ident() != self._thread:
            raise RuntimeError(
                "a Generator was used from a thread other than the one that made it; it is "
                "one sequence with its own cache buffers: make one Generator per thread "
                "(they can share one loaded Pair)")

    # -- prefill, step, rewind -------------------------------------------------------------

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt)
        if isinstance(prompt, (bytes, bytearray)):
            raise TypeError("the prompt is bytes: decode it to str (text) or give token ids")
        ids = []
        for t in prompt:
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
                raise TypeError(f"token ids must be integers, got {t!r}")
            ids.append(int(t))
        return ids

    def prefill(self, prompt: str | Sequence[int]) -> list[int]:
        """Start a generation: check the prompt, fill the caches; return the prompt's ids."""
        self._check_thread()
        ids = self._prompt_ids(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        config = self.config
        limit = self.max_length()
        if limit is not None and len(ids) >= limit:
            raise ValueError(
                f"the prompt is {len(ids)} tokens but the model's context is {limit}: "
                "no room to generate; shorten the prompt"
            )
        if limit is not None and len(ids) + config.max_new_tokens > limit:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds "
                f"the model's context of {limit} tokens; use max_new_tokens <= {limit - len(ids)}"
            )
        vocab = self.target.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        self._close_engine()
        speculative = self.speculative
        greedy = config.sampling.greedy
        if speculative and self.verify == "device" and not greedy:  # sessions up front
            if self.pipelined:
                self._verifier.prepare(self.drafter.gamma, config.sampling, stand_in=True)
            else:
                self._verifier.prepare(self.max_draft or 1, config.sampling)
        where = "device" if self.verify == "device" and not greedy else "host"
        mode = "speculative" if speculative else "autoregressive"
        stats = OrtStats(mode="pipelined" if self.pipelined else mode,
                         device=self._device, prompt_tokens=len(ids),
                         kv_cache=self._kv_cache, pipelined=self.pipelined,
                         verifier=where if speculative else None,
                         lossy=speculative and config.lenience != 1.0,
                         draft=ModelTimes() if speculative else None,
                         draft_prefill=ModelTimes() if speculative else None)
        before = (_times(self._state), self._draft_times())
        t0 = time.perf_counter()
        for state in [self._state, *self._draft_states]:
            _prefill(state, ids)
        stats.prefill_s = time.perf_counter() - t0
        self._marks = (_times(self._state), self._draft_times())
        stats.target_prefill = self._marks[0].since(before[0])
        if speculative:
            stats.draft_prefill = self._marks[1].since(before[1])
        if self.pipelined:
            stats.generation = PipelinedStats(gamma=self.drafter.gamma)
            stats.overlap = OverlapTimes()
        self.stats = stats
        self._rng = np.random.default_rng(config.seed)
        self.prompt_ids = list(ids)
        self.ids = list(ids)
        self._done = False
        return list(ids)

    def _draft_times(self) -> ModelTimes:
        total = ModelTimes()
        for state in self._draft_states:
            total = total + _times(state)
        return total

    def _update_times(self) -> None:
        if self._marks is None or self.stats is None:
            return
        self.stats.target = _times(self._state).since(self._marks[0])
        if self.speculative:
            self.stats.draft = self._draft_times().since(self._marks[1])

    @property
    def done(self) -> bool:
        """True once EOS or max_new_tokens ended the generation (or before any prefill)."""
        return self._done

    @property
    def new_tokens(self) -> list[int]:
        return self.ids[len(self.prompt_ids) :]

    def step(self) -> list[int]:
        """One iteration: the tokens it added ([] once the generation is done)."""
        self._check_stepping()
        if self._done:
            return []
        if self._engine is None:
            self._engine = self._start_engine()
        self._plan = None  # drafted alone
        t0 = time.perf_counter()
        piece = next(self._engine, None)
        return self._took(piece, t0)

    @property
    def lane_ready(self) -> bool:
        """Whether :meth:`begin_step` can hand this generator's next target call to a call
        over several sequences: a sequential speculative generation in progress, its target
        state in a lane of its model (:class:`~quickdraft.protocols.LaneModel`)."""
        return (self.speculative and not self.pipelined and not self._done
                and self.stats is not None and self._proposal is None
                and supports(self.target, LaneModel) and self.target.in_lane(self._state))

    def plan_draft(self) -> ChainPlan | None:
        """Before :meth:`begin_step` (where :attr:`lane_ready`): this step's proposal as a
        greedy chain of the drafter's state (:class:`~quickdraft.protocols.ChainPlanner`)
        that a caller may run together with other generators' (the draft model's
        ``chain_lanes``) and fill; :meth:`begin_step` then proposes its tokens. None when
        the drafter plans no chain (sampling, another strategy): it drafts in begin_step.
        An unfilled plan is drafted alone. Nothing random is drawn here."""
        self._check_stepping()
        if not self.lane_ready or not supports(self.drafter, ChainPlanner):
            return None
        if self._engine is None:
            self._engine = self._start_engine()
        t0 = time.perf_counter()
        self._plan = self.drafter.plan_chain(self._loop.ids, self._loop.budget())
        self.stats.decode_s += time.perf_counter() - t0
        self._draft_mark = self._draft_times().decode_s  # the shared draft calls count too
        return self._plan

    def begin_step(self) -> LaneRequest:
        """The first half of :meth:`step` (where :attr:`lane_ready`): the drafter proposes
        (or the filled plan of :meth:`plan_draft` is the proposal), the target state is
        rewound to what it shares with the proposal; returns what the target must score.
        :meth:`end_step` finishes the step with the scores."""
        self._check_stepping()
        if not self.lane_ready:
            raise ValueError("begin_step needs a speculative generation in progress whose "
                             "target state holds a lane (load the target with lanes >= 2)")
        if self._engine is None:
            self._engine = self._start_engine()
        t0 = time.perf_counter()
        plan, self._plan = self._plan, None
        if plan is not None:  # the draft calls made for it since plan_draft
            self.stats.decode_s += self._draft_times().decode_s - self._draft_mark
        planned = plan is not None and plan.tokens is not None
        p = self._loop.propose(_FromPlan(self.drafter, plan) if planned else None)
        k = len(p.candidates.tokens) + 1  # the last gamma + 1 tokens are (re-)scored
        common = rewind_to_common_prefix(self._state, p.scored, k)
        self._proposal = p
        self._model_mark = _model_s(self._state)  # the shared call counts in decode_s
        self.stats.decode_s += time.perf_counter() - t0
        return LaneRequest(self._state, p.scored[common:],
                           wants_greedy(p.candidates, self.config.sampling))

    def end_step(self, scores=None) -> list[int]:
        """The second half of :meth:`step`: decide on ``scores`` (the
        :class:`~quickdraft.protocols.Scores` of :meth:`begin_step`'s tokens, appended to
        its state) with this generator's verifier; None: score them alone first (also the
        way on after a call over several sequences failed). Returns the tokens the step
        added."""
        self._check_thread()
        p, c, loop = self._proposal, self.config, self._loop
        if p is None:
            raise ValueError("end_step needs a begin_step first")
        if scores is not None:  # refused scores leave the proposal waiting
            if scores.error is not None:
                raise RuntimeError(f"the target call failed for this sequence: {scores.error}"
                                   " (end_step(None) verifies the proposal alone)")
            if self._state.tokens != p.scored:
                raise ValueError("end_step's scores are not of this generator's proposal: "
                                 "its state does not hold the tokens begin_step asked for")
            greedy = wants_greedy(p.candidates, c.sampling)
            if (scores.greedy if greedy else scores.logits) is None:
                what = "greedy ids" if greedy else "logits"
                raise ValueError(f"end_step needs the target's {what} for this proposal "
                                 "(LaneRequest.greedy says which)")
        self._proposal = None
        t0 = time.perf_counter()
        if scores is None:
            verdict = loop.verifier(self._state, p.scored, p.candidates, c.sampling,
                                    p.accept_uniforms, p.sample_uniform, lenience=c.lenience)
        else:
            self.stats.decode_s += _model_s(self._state) - self._model_mark
            t1 = time.perf_counter()
            verdict = self._decide(scores, p.candidates, c.sampling, p.accept_uniforms,
                                   p.sample_uniform, lenience=c.lenience)
            self.stats.verify_s += time.perf_counter() - t1
        return self._took(loop.commit(p, verdict), t0)

    def _check_stepping(self) -> None:
        self._check_thread()
        if self.stats is None:
            raise ValueError("nothing to step: call prefill(prompt) first")
        if self._proposal is not None:
            raise ValueError("begin_step's proposal waits for end_step")

    def _took(self, piece: list[int] | None, t0: float) -> list[int]:
        """Bookkeeping after an iteration that started at ``t0`` gave ``piece``."""
        self.stats.decode_s += time.perf_counter() - t0
        self._update_times()
        if self._cost_aware and self.stats.draft.calls and self.stats.target.calls:
            self.drafter.observe_cost(self.stats.cost_ratio)  # the measured c so far
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
        roll the caches back; ``step`` continues from there."""
        self._check_thread()
        if self.stats is None:
            raise ValueError("nothing to rewind: call prefill first")
        if not _is_int(length) or not 1 <= length <= len(self.ids):
            raise ValueError(f"cannot rewind to {length}: the sequence has {len(self.ids)} tokens")
        self._close_engine()
        self.ids = self.ids[:length]
        self.prompt_ids = self.prompt_ids[:length]
        t0 = time.perf_counter()
        for state in [self._state, *self._draft_states]:  # keep length - 1: the next call
            state.rewind(min(len(state.tokens), length - 1))  # needs the last token's logits
        self.stats.decode_s += time.perf_counter() - t0
        self._update_times()
        self.stats.generation.new_tokens = len(self.new_tokens)
        self._done = len(self.new_tokens) >= self.config.max_new_tokens

    def _start_engine(self) -> Iterator[list[int]]:
        c = self.config
        remaining = c.max_new_tokens - len(self.new_tokens)
        common = dict(max_new_tokens=remaining, sampling=c.sampling, rng=self._rng,
                      eos_id=self.eos_ids, stats=self.stats.generation, state=self._state)
        if not self.speculative:
            return autoregressive_stream(self.target, self.ids, draw=self._draw, **common)
        if self.pipelined:
            halves = (GreedyHalves(self.drafter) if c.sampling.greedy else
                      SampledHalves(self.drafter, self._verifier, c.sampling, self._compute))
            return overlapped_stream(
                self._state, halves, self.ids, gamma=self.drafter.gamma,
                max_new_tokens=remaining, rng=self._rng, eos_id=self.eos_ids,
                stats=self.stats.generation, times=self.stats.overlap, rule=self.shadow_rule)
        self._loop = speculative_iterations(
            self.target, None, self.ids, drafter=self.drafter, verifier=self._timed_verifier(),
            lenience=c.lenience, max_draft=self.max_draft, **common)
        return iter(self._loop)

    def _timed_verifier(self):
        """The verifier, adding its time less the target calls inside it to ``verify_s``."""
        verifier, stats, state = self._verifier, self.stats, self._state

        def timed(*args, **kwargs):
            before = _model_s(state)
            t0 = time.perf_counter()
            try:
                return verifier(*args, **kwargs)
            finally:
                inside = _model_s(state) - before
                stats.verify_s += time.perf_counter() - t0 - inside

        return timed

    def _finish(self) -> None:
        self._done = True
        self._close_engine()

    def _close_engine(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self._loop = self._proposal = self._plan = None

    def close(self) -> None:
        """End the sequence: its cache buffers go back to the models (idempotent)."""
        if self._closed:
            return
        self._check_thread()
        self._close_engine()
        for state in [self._state, *self._draft_states]:
            if supports(state, ClosableState):
                state.close()
        if self.verify == "device":
            self._verifier.close()
        if self._draw is not None:
            self._draw.close()
        self._closed = True
        self._done = True

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- whole generations -----------------------------------------------------------------

    def pieces(self, prompt: str | Sequence[int]) -> Iterator[Piece]:
        """Prefill, then one :class:`Piece` per step until EOS or max_new_tokens; the last
        piece carries any text held back. ``result`` holds the :class:`Generation` after."""
        self.result = None
        self.prefill(prompt)
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

    def stream(self, prompt: str | Sequence[int]) -> Iterator[str]:
        """Yield text pieces as tokens are accepted (``result`` holds the Generation after)."""
        if self.tokenizer is None:
            raise ValueError("this generator has no tokenizer: use pieces() or generate()")
        for piece in self.pieces(prompt):
            if piece.text:
                yield piece.text

    def generate(self, prompt: str | Sequence[int]) -> Generation:
        """Generate to EOS or max_new_tokens; the tokens, text and statistics."""
        for _ in self.pieces(prompt):
            pass
        return self.result
