"""A picoGPT-style decoder-only transformer in NumPy, with a KV cache.

It loads Hugging Face checkpoints from a local folder (``config.json`` and safetensors):

* Llama-style models (``model_type`` llama, mistral, qwen2): RMSNorm, rotary position
  embeddings (HF's ``rotate_half`` convention, ``rope_theta``), grouped-query attention
  (``num_key_value_heads``), a SiLU-gated MLP, optional q/k/v biases (qwen2), optional
  sliding-window attention (mistral, qwen2) and tied embeddings.
* GPT-2: LayerNorm, learned positions, ``Conv1D`` weights stored [in, out], the fused
  ``c_attn`` projection, the tanh approximation of GELU and a tied LM head.

It exists so that the ONNX Runtime backend can be checked against it on identical weights,
and so the method can be read end to end without a framework. Everything is a small pure
function over arrays; shapes are written beside them: T tokens appended in this call,
S tokens in the cache after it, D model width, H query heads, Hkv key/value heads,
Dh head size, F MLP width, V vocabulary.

Only NumPy and the standard library are imported.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quickdraft.reference.safetensors_np import load_checkpoint

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "TransformerConfig",
    "NumpyTransformer",
    "TransformerState",
    "gelu",
    "gelu_tanh",
    "silu",
    "softmax",
    "layer_norm",
    "rms_norm",
    "linear",
    "rope_cos_sin",
    "rotate_half",
    "rope",
    "causal_mask",
    "attention",
    "gated_mlp",
    "mlp",
]

LLAMA_LIKE = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = (*LLAMA_LIKE, "gpt2")


# ---------------------------------------------------------------------------------------
# The pieces, as in the literature
# ---------------------------------------------------------------------------------------


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (GPT-2's ``gelu_new``; Hendrycks & Gimpel 2016)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU, exact: x * Phi(x) (slow: math.erf elementwise; NumPy has no erf)."""
    return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(x.dtype))).astype(x.dtype)


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU / swish: x * sigmoid(x), with sigmoid(x) = (1 + tanh(x / 2)) / 2 (no overflow)."""
    return x * (0.5 * (1.0 + np.tanh(0.5 * x)))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


ACTIVATIONS = {
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu": gelu,
    "silu": silu,
    "swish": silu,
    "relu": relu,
}


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax; rows that are entirely -inf are not expected."""
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis: x [T, D], w [D], b [D] -> [T, D]."""
    mean = np.mean(x, axis=-1, keepdims=True)  # [T, 1]
    var = np.mean((x - mean) ** 2, axis=-1, keepdims=True)  # [T, 1]
    return w * (x - mean) / np.sqrt(var + eps) + b


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm (Zhang & Sennrich 2019): x [T, D], w [D] -> [T, D]. No mean, no bias."""
    ms = np.mean(x * x, axis=-1, keepdims=True)  # [T, 1]
    return w * (x / np.sqrt(ms + eps))


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x [T, in] @ w [in, out] (+ b [out]) -> [T, out]."""
    y = x @ w
    return y if b is None else y + b


def rope_cos_sin(
    positions: np.ndarray, head_dim: int, theta: float, dtype=np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Rotary tables for ``positions`` [T]: cos, sin [T, Dh] (Su et al. 2021).

    HF layout: frequency i pairs dimension i with dimension i + Dh/2 (not 2i with 2i + 1),
    so the table is the half-size table repeated twice along the last axis.
    """
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [Dh/2]
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, Dh/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [T, Dh]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rotate_half(x: np.ndarray) -> np.ndarray:
    """[..., Dh] -> [..., Dh]: (x1, x2) -> (-x2, x1) on the two halves of the last axis."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate queries or keys x [heads, T, Dh] by their positions' angles (cos, sin [T, Dh])."""
    return x * cos + rotate_half(x) * sin


def causal_mask(
    q_positions: np.ndarray, k_length: int, window: int | None = None
) -> np.ndarray:
    """Which keys each query may attend to: [T, S] bool.

    Query at position i sees keys j <= i, and with a sliding window only j > i - window
    (Hugging Face's convention).
    """
    i = np.asarray(q_positions)[:, None]  # [T, 1]
    j = np.arange(k_length)[None, :]  # [1, S]
    allowed = j <= i  # [T, S]
    if window is not None:
        allowed &= j > i - window
    return allowed


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float
) -> np.ndarray:
    """Scaled dot-product attention with grouped queries.

    q [H, T, Dh], k [Hkv, S, Dh], v [Hkv, S, Dh], mask [T, S] bool -> [H, T, Dh].
    Query head h reads key/value head h // (H / Hkv) (HF's ``repeat_kv`` order).
    """
    heads, t, dh = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    qg = q.reshape(kv_heads, group, t, dh)  # [Hkv, G, T, Dh]
    scores = (qg @ k[:, None].swapaxes(-1, -2)) * scale  # [Hkv, G, T, S]
    scores = np.where(mask, scores, -np.inf)  # [Hkv, G, T, S]
    weights = softmax(scores, axis=-1)  # [Hkv, G, T, S]
    out = weights @ v[:, None]  # [Hkv, G, T, Dh]
    return out.reshape(heads, t, dh)


def gated_mlp(x: np.ndarray, gate: dict, up: dict, down: dict, act) -> np.ndarray:
    """Llama's MLP (Shazeer 2020): down(act(gate(x)) * up(x)); x [T, D] -> [T, D]."""
    h = act(linear(x, **gate)) * linear(x, **up)  # [T, F]
    return linear(h, **down)  # [T, D]


def mlp(x: np.ndarray, fc: dict, proj: dict, act) -> np.ndarray:
    """GPT-2's MLP: proj(act(fc(x))); x [T, D] -> [T, D]."""
    return linear(act(linear(x, **fc)), **proj)


def split_heads(x: np.ndarray, heads: int) -> np.ndarray:
    """[T, heads * Dh] -> [heads, T, Dh]."""
    t, width = x.shape
    return x.reshape(t, heads, width // heads).transpose(1, 0, 2)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """[heads, T, Dh] -> [T, heads * Dh]."""
    heads, t, dh = x.shape
    return x.transpose(1, 0, 2).reshape(t, heads * dh)


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerConfig:
    """What the forward pass needs to know, read from a Hugging Face ``config.json``."""

    model_type: str  # llama, mistral, qwen2 or gpt2
    vocab_size: int  # V
    hidden_size: int  # D
    num_layers: int
    num_heads: int  # H
    num_kv_heads: int  # Hkv (H for GPT-2)
    head_dim: int  # Dh
    intermediate_size: int  # F
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    rope_theta: float = 10000.0  # Llama-style only
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None is full attention
    attn_scales: tuple[float, ...] = ()  # per layer multiplier of q . k

    @property
    def llama_like(self) -> bool:
        return self.model_type in LLAMA_LIKE

    @classmethod
    def from_hf(cls, cfg: dict) -> TransformerConfig:
        """Interpret a Hugging Face config dict; refuse what this reference cannot run."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}: the NumPy transformer runs "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type == "gpt2":
            return cls._from_gpt2(cfg)
        return cls._from_llama(cfg, model_type)

    @classmethod
    def _from_llama(cls, cfg: dict, model_type: str) -> TransformerConfig:
        scaling = cfg.get("rope_scaling")
        if scaling:
            kind = (scaling.get("rope_type", scaling.get("type"))
                    if isinstance(scaling, dict) else None)
            if kind != "default":
                raise ValueError(
                    f"unsupported rope_scaling {scaling!r}: the NumPy transformer supports "
                    "only plain rotary embeddings (rope_scaling null or rope_type 'default')"
                )
        if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(
                "unsupported partial_rotary_factor: only 1.0 (full rotary) is supported"
            )
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        layers = int(cfg["num_hidden_layers"])
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {kv_heads}")
        act = cfg.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r}; supported: {', '.join(ACTIVATIONS)}")
        windows: list[int | None]
        if model_type == "mistral":
            w = cfg.get("sliding_window")
            windows = [int(w) if w else None] * layers
        elif model_type == "qwen2":
            w = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
            types = cfg.get("layer_types") or [
                "sliding_attention" if w is not None and i >= int(cfg.get("max_window_layers", 28))
                else "full_attention"
                for i in range(layers)
            ]
            windows = [int(w) if (w and t == "sliding_attention") else None for t in types]
        else:
            windows = [None] * layers
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(cfg["intermediate_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            hidden_act=act,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            sliding_windows=tuple(windows),
            attn_scales=(1.0 / math.sqrt(head_dim),) * layers,
        )

    @classmethod
    def _from_gpt2(cls, cfg: dict) -> TransformerConfig:
        hidden = int(cfg.get("n_embd", cfg.get("hidden_size", 768)))
        heads = int(cfg.get("n_head", cfg.get("num_attention_heads", 12)))
        layers = int(cfg.get("n_layer", cfg.get("num_hidden_layers", 12)))
        act = cfg.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation_function {act!r}; "
                             f"supported: {', '.join(ACTIVATIONS)}")
        if cfg.get("add_cross_attention"):
            raise ValueError("GPT-2 with cross-attention is not a decoder-only LM; unsupported")
        head_dim = hidden // heads
        base = 1.0 / math.sqrt(head_dim) if cfg.get("scale_attn_weights", True) else 1.0
        by_layer = cfg.get("scale_attn_by_inverse_layer_idx", False)
        scales = tuple(base / (i + 1) if by_layer else base for i in range(layers))
        return cls(
            model_type="gpt2",
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            intermediate_size=int(cfg.get("n_inner") or 4 * hidden),
            max_position_embeddings=int(cfg.get("n_positions", 1024)),
            norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
            hidden_act=act,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            sliding_windows=(None,) * layers,
            attn_scales=scales,
        )


# ---------------------------------------------------------------------------------------
# Weights: Hugging Face names -> a picoGPT-style nested dict, linear weights as [in, out]
# ---------------------------------------------------------------------------------------


class _Weights:
    """Look tensors up by name under a prefix, with shape checks and clear errors."""

    def __init__(self, tensors: dict[str, np.ndarray], prefix: str, dtype, folder: str):
        self.tensors, self.prefix, self.dtype, self.folder = tensors, prefix, dtype, folder

    def has(self, name: str) -> bool:
        return self.prefix + name in self.tensors or name in self.tensors

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        key = self.prefix + name if self.prefix + name in self.tensors else name
        if key not in self.tensors:
            raise ValueError(f"checkpoint in {self.folder} lacks tensor {self.prefix + name!r}")
        arr = self.tensors[key]
        if tuple(arr.shape) != shape:
            raise ValueError(f"tensor {key!r} has shape {list(arr.shape)}, config implies "
                             f"{list(shape)}")
        return np.ascontiguousarray(arr, dtype=self.dtype)

    def linear_t(self, name: str, n_in: int, n_out: int, bias: bool | None = None) -> dict:
        """An nn.Linear stored [out, in] -> {"w": [in, out], "b": [out] or None}."""
        w = np.ascontiguousarray(self.get(name + ".weight", (n_out, n_in)).T)
        has_b = self.has(name + ".bias") if bias is None else bias
        return {"w": w, "b": self.get(name + ".bias", (n_out,)) if has_b else None}

    def conv1d(self, name: str, n_in: int, n_out: int) -> dict:
        """GPT-2's Conv1D, already stored [in, out]."""
        return {"w": self.get(name + ".weight", (n_in, n_out)),
                "b": self.get(name + ".bias", (n_out,))}


def _prefix(tensors: dict[str, np.ndarray], anchor: str) -> str:
    """The prefix before ``anchor`` (e.g. 'model.' before 'embed_tokens.weight')."""
    for name in tensors:
        if name.endswith(anchor):
            return name[: -len(anchor)]
    return ""


def _llama_params(cfg: TransformerConfig, tensors: dict, dtype, folder: str) -> dict:
    w = _Weights(tensors, _prefix(tensors, "embed_tokens.weight"), dtype, folder)
    d, h, hkv, dh, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size)
    blocks = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        blocks.append({
            "attn_norm": w.get(p + "input_layernorm.weight", (d,)),
            "q": w.linear_t(p + "self_attn.q_proj", d, h * dh),
            "k": w.linear_t(p + "self_attn.k_proj", d, hkv * dh),
            "v": w.linear_t(p + "self_attn.v_proj", d, hkv * dh),
            "o": w.linear_t(p + "self_attn.o_proj", h * dh, d),
            "mlp_norm": w.get(p + "post_attention_layernorm.weight", (d,)),
            "gate": w.linear_t(p + "mlp.gate_proj", d, f),
            "up": w.linear_t(p + "mlp.up_proj", d, f),
            "down": w.linear_t(p + "mlp.down_proj", f, d),
        })
    embed = w.get("embed_tokens.weight", (cfg.vocab_size, d))  # [V, D]
    head = _lm_head(cfg, tensors, embed, dtype, folder)
    return {"embed": embed, "blocks": blocks, "final_norm": w.get("norm.weight", (d,)),
            "lm_head": head}


def _gpt2_params(cfg: TransformerConfig, tensors: dict, dtype, folder: str) -> dict:
    w = _Weights(tensors, _prefix(tensors, "wte.weight"), dtype, folder)
    d, f = cfg.hidden_size, cfg.intermediate_size
    blocks = []
    for i in range(cfg.num_layers):
        p = f"h.{i}."
        blocks.append({
            "ln_1": {"w": w.get(p + "ln_1.weight", (d,)), "b": w.get(p + "ln_1.bias", (d,))},
            "c_attn": w.conv1d(p + "attn.c_attn", d, 3 * d),
            "c_proj": w.conv1d(p + "attn.c_proj", d, d),
            "ln_2": {"w": w.get(p + "ln_2.weight", (d,)), "b": w.get(p + "ln_2.bias", (d,))},
            "fc": w.conv1d(p + "mlp.c_fc", d, f),
            "proj": w.conv1d(p + "mlp.c_proj", f, d),
        })
    embed = w.get("wte.weight", (cfg.vocab_size, d))  # [V, D]
    return {
        "embed": embed,
        "pos_embed": w.get("wpe.weight", (cfg.max_position_embeddings, d)),  # [P, D]
        "blocks": blocks,
        "ln_f": {"w": w.get("ln_f.weight", (d,)), "b": w.get("ln_f.bias", (d,))},
        "lm_head": _lm_head(cfg, tensors, embed, dtype, folder),
    }


def _lm_head(cfg: TransformerConfig, tensors: dict, embed: np.ndarray, dtype, folder) -> np.ndarray:
    """The output projection [V, D]: the embedding when tied, else ``lm_head.weight``."""
    if cfg.tie_word_embeddings:
        return embed
    if "lm_head.weight" not in tensors:
        raise ValueError(f"checkpoint in {folder} has no lm_head.weight and config.json says "
                         "tie_word_embeddings is false")
    head = tensors["lm_head.weight"]
    if head.shape != embed.shape:
        raise ValueError(f"lm_head.weight has shape {list(head.shape)}, expected "
                         f"{list(embed.shape)}")
    return np.ascontiguousarray(head, dtype=dtype)


# ---------------------------------------------------------------------------------------
# The model and its cache
# ---------------------------------------------------------------------------------------


class _KVCache:
    """Keys and values of one layer: [Hkv, capacity, Dh] buffers, the first ``length`` used."""

    def __init__(self, kv_heads: int, head_dim: int, dtype):
        self.k = np.zeros((kv_heads, 16, head_dim), dtype=dtype)  # [Hkv, cap, Dh]
        self.v = np.zeros_like(self.k)  # [Hkv, cap, Dh]
        self.length = 0

    def extend(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add k, v [Hkv, T, Dh]; return all cached keys and values [Hkv, S, Dh]."""
        end = self.length + k.shape[1]
        if end > self.k.shape[1]:  # grow by doubling
            cap = max(end, 2 * self.k.shape[1])
            for name in ("k", "v"):
                old = getattr(self, name)
                new = np.zeros((old.shape[0], cap, old.shape[2]), dtype=old.dtype)
                new[:, : self.length] = old[:, : self.length]
                setattr(self, name, new)
        self.k[:, self.length : end] = k
        self.v[:, self.length : end] = v
        self.length = end
        return self.k[:, :end], self.v[:, :end]


class TransformerState:
    """A :class:`~quickdraft.protocols.DecodeState` over a :class:`NumpyTransformer`.

    ``append`` runs only the new tokens through the model, attending to the cached keys
    and values; ``rewind`` truncates the cache.
    """

    def __init__(self, model: NumpyTransformer):
        self.model = model
        self._tokens: list[int] = []
        self._caches = [
            _KVCache(model.config.num_kv_heads, model.config.head_dim, model.dtype)
            for _ in range(model.config.num_layers)
        ]

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def append(self, tokens: Sequence[int]) -> np.ndarray:
        """Consume ``tokens``; return logits [len(tokens), V], row t predicting token t + 1."""
        ids = np.asarray(list(tokens), dtype=np.int64).reshape(-1)  # [T]
        cfg = self.model.config
        start = len(self._tokens)
        if start + len(ids) > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence of {start + len(ids)} tokens exceeds the model's context of "
                f"{cfg.max_position_embeddings} (max_position_embeddings); shorten the prompt "
                "or max_new_tokens"
            )
        if len(ids) and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
        if len(ids) == 0:
            return np.zeros((0, cfg.vocab_size), dtype=self.model.dtype)
        logits = self.model.forward(ids, start, self._caches)  # [T, V]
        self._tokens.extend(int(t) for t in ids)
        return logits

    def rewind(self, length: int) -> None:
        """Forget everything after the first ``length`` consumed tokens."""
        if not 0 <= length <= len(self._tokens):
            raise ValueError(f"cannot rewind to {length}: state holds {len(self._tokens)} tokens")
        del self._tokens[length:]
        for cache in self._caches:
            cache.length = length


class NumpyTransformer:
    """A decoder-only transformer implementing :class:`~quickdraft.protocols.LanguageModel`.

    Build it with :meth:`from_pretrained` (a local Hugging Face folder) or directly from a
    :class:`TransformerConfig` and a dict of Hugging Face tensor names to arrays.
    Computation is in ``dtype`` (float32 by default; float64 for tighter references).
    """

    def __init__(self, config: TransformerConfig, tensors: dict[str, np.ndarray], *,
                 dtype=np.float32, source: str = "<tensors>"):
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.config = config
        self.dtype = dtype
        self.source = source
        build = _llama_params if config.llama_like else _gpt2_params
        self.params = build(config, tensors, dtype, source)
        self._act = ACTIVATIONS[config.hidden_act]

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, dtype=np.float32) -> NumpyTransformer:
        """Load ``config.json`` and safetensors weights (sharded or not) from ``folder``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder not found: {folder}")
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"no config.json in {folder}: not a Hugging Face model folder")
        config = TransformerConfig.from_hf(json.loads(cfg_path.read_text(encoding="utf-8")))
        return cls(config, load_checkpoint(folder), dtype=dtype, source=str(folder))

    def __repr__(self) -> str:
        c = self.config
        return (f"NumpyTransformer({c.model_type}, layers={c.num_layers}, d={c.hidden_size}, "
                f"heads={c.num_heads}/{c.num_kv_heads}, V={c.vocab_size}, {self.dtype}, "
                f"from {self.source})")

    # LanguageModel protocol -----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    def new_state(self) -> TransformerState:
        return TransformerState(self)

    # The forward pass -----------------------------------------------------------------

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """A fresh full forward pass without a kept cache: tokens [T] -> logits [T, V]."""
        return self.new_state().append(tokens)

    def forward(self, ids: np.ndarray, start: int, caches: list[_KVCache]) -> np.ndarray:
        """Run tokens ids [T] at positions start .. start + T - 1, extending ``caches``.

        Returns logits [T, V]. The caches must hold exactly ``start`` positions.
        """
        positions = np.arange(start, start + len(ids))  # [T]
        if self.config.llama_like:
            return self._forward_llama(ids, positions, caches)
        return self._forward_gpt2(ids, positions, caches)

    def _forward_llama(self, ids, positions, caches) -> np.ndarray:
        cfg, p = self.config, self.params
        x = p["embed"][ids]  # [T, D]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, self.dtype)  # [T, Dh]
        for block, cache, window, scale in zip(p["blocks"], caches, cfg.sliding_windows,
                                               cfg.attn_scales):
            h = rms_norm(x, block["attn_norm"], cfg.norm_eps)  # [T, D]
            q = split_heads(linear(h, **block["q"]), cfg.num_heads)  # [H, T, Dh]
            k = split_heads(linear(h, **block["k"]), cfg.num_kv_heads)  # [Hkv, T, Dh]
            v = split_heads(linear(h, **block["v"]), cfg.num_kv_heads)  # [Hkv, T, Dh]
            q, k = rope(q, cos, sin), rope(k, cos, sin)  # positions enter here only
            k_all, v_all = cache.extend(k, v)  # [Hkv, S, Dh]
            mask = causal_mask(positions, k_all.shape[1], window)  # [T, S]
            a = merge_heads(attention(q, k_all, v_all, mask, scale))  # [T, H * Dh]
            x = x + linear(a, **block["o"])  # [T, D]
            h = rms_norm(x, block["mlp_norm"], cfg.norm_eps)  # [T, D]
            x = x + gated_mlp(h, block["gate"], block["up"], block["down"], self._act)  # [T, D]
        x = rms_norm(x, p["final_norm"], cfg.norm_eps)  # [T, D]
        return x @ p["lm_head"].T  # [T, V]

    def _forward_gpt2(self, ids, positions, caches) -> np.ndarray:
        cfg, p = self.config, self.params
        x = p["embed"][ids] + p["pos_embed"][positions]  # [T, D]
        for block, cache, scale in zip(p["blocks"], caches, cfg.attn_scales):
            h = layer_norm(x, **block["ln_1"], eps=cfg.norm_eps)  # [T, D]
            qkv = linear(h, **block["c_attn"])  # [T, 3 D]
            q, k, v = (split_heads(z, cfg.num_heads)  # each [H, T, Dh]
                       for z in np.split(qkv, 3, axis=-1))
            k_all, v_all = cache.extend(k, v)  # [H, S, Dh]
            mask = causal_mask(positions, k_all.shape[1])  # [T, S]
            a = merge_heads(attention(q, k_all, v_all, mask, scale))  # [T, D]
            x = x + linear(a, **block["c_proj"])  # [T, D]
            h = layer_norm(x, **block["ln_2"], eps=cfg.norm_eps)  # [T, D]
            x = x + mlp(h, block["fc"], block["proj"], self._act)  # [T, D]
        x = layer_norm(x, **p["ln_f"], eps=cfg.norm_eps)  # [T, D]
        return x @ p["lm_head"].T  # [T, V]
