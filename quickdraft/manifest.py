"""The manifest: the contract between export and the runtime.

Written by the exporter next to each ONNX model as ``quickdraft.json``; read by the
runtime instead of guessing from input names, so the runtime never imports export code.
Standard library only.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ONNX_ELEMENT_TYPES",
    "KV_CACHES",
    "GREEDY_OUTPUT",
    "EXECUTION_PROVIDERS",
    "ModelManifest",
    "load_manifest",
]

MANIFEST_NAME = "quickdraft.json"
# 2: max_cache_length, exporter and attention fields; max_length is the model's context
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)
# manifest dtype -> ONNX TensorProto element type of the KV cache and logits
ONNX_ELEMENT_TYPES = {"fp32": 1, "fp16": 10, "bf16": 16}
# kv_cache values: how the exported graph keeps its KV cache
KV_CACHES = ("dynamic", "static")
# the optional graph output with the argmax id of each position's logits [B, S] int64
# (plus V for a row that is not finite); written by export, read by the runtime
GREEDY_OUTPUT = "greedy_tokens"
# execution_provider values: "" runs anywhere; "cpu" / "cuda": the graph was built for one
EXECUTION_PROVIDERS = ("", "cpu", "cuda")


@dataclass
class ModelManifest:
    """Facts about one exported decoder graph."""

    architecture: str  # Hugging Face model_type, e.g. "llama", "qwen2", "gpt2"
    num_layers: int  # decoder layers (one past key and value per layer)
    num_attention_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when fewer than num_attention_heads)
    head_dim: int  # size of one attention head
    hidden_size: int  # model width
    vocab_size: int  # rows of the LM head = columns of the logits
    max_length: int  # longest sequence the model was configured for (max positions)
    dtype: str  # "fp32", "fp16" or "bf16": the dtype of the KV cache and logits
    kv_layout: str  # "bnsh": past/present are [batch, kv_heads, seq, head_dim]
    kv_cache: str  # "dynamic" (optimum: present grows) or "static" (preallocated buffer)
    model_file: str  # the ONNX file inside the folder, e.g. "model.onnx"
    input_names: list[str]  # graph inputs in order
    output_names: list[str]  # graph outputs in order
    past_key_template: str  # input name of layer i's past key, with "{i}"
    past_value_template: str  # input name of layer i's past value, with "{i}"
    present_key_template: str  # output name of layer i's present key, with "{i}"
    present_value_template: str  # output name of layer i's present value, with "{i}"
    has_position_ids: bool  # whether position_ids is a graph input
    has_attention_mask: bool  # whether attention_mask is a graph input
    bos_token_id: int | None = None  # from the model config, if any
    eos_token_id: int | None = None  # from the model config, if any
    eos_token_ids: list[int] = field(default_factory=list)  # every EOS id of the config
    external_data: list[str] = field(default_factory=list)  # files next to model_file with weights
    source: str = ""  # the folder or hub id the model was exported from
    versions: dict[str, str] = field(default_factory=dict)  # packages used to export
    validation: dict = field(default_factory=dict)  # max |logit diff| etc. measured at export
    # tokens the KV cache holds. static: the length of the preallocated buffers the backend
    # makes by default (at most max_length); dynamic: max_length (0 when written means that)
    max_cache_length: int = 0
    exporter: str = ""  # what wrote the graph: "optimum-onnx" or "onnxruntime-genai builder"
    # the attention operator the cache is used through. "GroupQueryAttention" (static): the
    # valid cache length is sum(attention_mask) (the op's seqlens_k = sum - 1) and the mask's
    # width is the total length, so one buffer serves as both past and present; "" when the
    # graph uses the model's own attention ops (dynamic: present = concat(past, new))
    attention: str = ""
    # the execution provider the graph was built for: "cpu" or "cuda" (static exports, whose
    # builder specialises the graph to one), "" when it runs on either (dynamic exports)
    execution_provider: str = ""
    manifest_version: int = MANIFEST_VERSION  # format version of this file

    def __post_init__(self) -> None:
        if not self.max_cache_length:
            self.max_cache_length = self.max_length

    def past_names(self) -> list[str]:
        """Graph inputs of the past caches: layer 0 key, layer 0 value, layer 1 key, ..."""
        return [t.format(i=i) for i in range(self.num_layers)
                for t in (self.past_key_template, self.past_value_template)]

    def present_names(self) -> list[str]:
        """Graph outputs of the present caches, in the order of :meth:`past_names`."""
        return [t.format(i=i) for i in range(self.num_layers)
                for t in (self.present_key_template, self.present_value_template)]

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path


def load_manifest(folder: str | Path) -> ModelManifest:
    """Read ``folder/quickdraft.json``, with clear errors for missing or foreign files."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {folder} is not a quickdraft export. "
            "Create one with `quickdraft export --target ... --draft ... --out ...`"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-export the model") from e
    version = data.get("manifest_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{path} has manifest_version {version}, this quickdraft reads "
            f"{' and '.join(map(str, READABLE_VERSIONS))}; re-export the model with this version"
        )
    static = data.pop("static", None)
    if version == 1 and isinstance(static, dict):  # version 1 kept these facts in a block
        data["max_cache_length"] = static.get("max_cache_length", data.get("max_length"))
        data["max_length"] = static.get("max_position_embeddings", data.get("max_length"))
        data["attention"] = "GroupQueryAttention"
    if data.get("kv_cache") == "static" and not data.get("execution_provider"):
        # before the field existed the builder's target followed the dtype
        data["execution_provider"] = {"fp32": "cpu", "fp16": "cuda"}.get(data.get("dtype"), "")
    data["manifest_version"] = MANIFEST_VERSION
    known = {f.name for f in fields(ModelManifest)}
    missing = [
        f.name
        for f in fields(ModelManifest)
        if f.name not in data and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; re-export the model")
    return ModelManifest(**{k: v for k, v in data.items() if k in known})
