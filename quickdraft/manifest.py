"""The manifest: the contract between export and the runtime.

Written by the exporter next to each ONNX model as ``quickdraft.json``; read by the
runtime instead of guessing from input names. A model folder is untrusted input:
:func:`load_manifest` checks every field's type and value, :meth:`ModelManifest.check_files`
that every file it names (and the graph's external data) lies inside the folder.
"""

from __future__ import annotations

import json
import stat
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath, PureWindowsPath

__all__ = [
    "folder_file",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "ONNX_ELEMENT_TYPES",
    "KV_CACHES",
    "KV_LAYOUTS",
    "GREEDY_OUTPUT",
    "EXECUTION_PROVIDERS",
    "WEIGHTS",
    "ModelFolderError",
    "ModelManifest",
    "load_manifest",
    "onnx_external_locations",
]

MANIFEST_NAME = "quickdraft.json"
# 2: max_cache_length, exporter and attention fields; max_length is the model's context
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)
# manifest dtype -> ONNX TensorProto element type of the KV cache and logits
ONNX_ELEMENT_TYPES = {"fp32": 1, "fp16": 10, "bf16": 16}
# kv_cache values: how the exported graph keeps its KV cache
KV_CACHES = ("dynamic", "static")
# kv_layout values: "bnsh" = past/present are [batch, kv_heads, seq, head_dim]
KV_LAYOUTS = ("bnsh",)
# the optional graph output with the argmax id of each position's logits [B, S] int64
# (plus V for a row that is not finite); written by export, read by the runtime
GREEDY_OUTPUT = "greedy_tokens"
# execution_provider values: "" runs anywhere; "cpu" / "cuda": the graph was built for one
EXECUTION_PROVIDERS = ("", "cpu", "cuda")
# weights values: "" the weights are stored in dtype; "int4": 4-bit blocks (MatMulNBits);
# "int8": 8-bit per output channel (DequantizeLinear), folded to dtype when loaded
WEIGHTS = ("", "int4", "int8")
# the ONNX Runtime session option that folds DequantizeLinear of constant int8 weights into
# fp32 when a session is created (instead of fusing them into 8-bit MatMulNBits)
INT8_FOLD_OPTION = "session.disable_quant_qdq"
# config.json keys of the model's context, in the order they are looked up
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")
_REEXPORT = "re-export the model with `quickdraft export`"


class ModelFolderError(ValueError):
    """An exported model folder whose manifest, files or graph do not fit together."""


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
    weights: str = ""  # the weights' storage when it differs from dtype: 'int4' or 'int8'
    # tokens the LM head scores (the rest get a logit of -1e9, probability 0): a draft with a
    # frequency-ranked head (quickdraft.export.vocab); 0: every token of the vocabulary
    head_tokens: int = 0
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

    # -- the files it names -----------------------------------------------------------------

    def model_path(self, folder: str | Path, *, error: type[ValueError] = ModelFolderError
                   ) -> Path:
        """``model_file``, resolved and checked to be a regular file inside ``folder``."""
        return _inside(folder, [("model_file", self.model_file)], error)[0]

    def external_paths(self, folder: str | Path, *,
                       error: type[ValueError] = ModelFolderError) -> list[Path]:
        """The ``external_data`` files, resolved and checked like :meth:`model_path`."""
        return _inside(folder, [("external_data", n) for n in self.external_data], error)

    def check_files(self, folder: str | Path, *,
                    error: type[ValueError] = ModelFolderError) -> Path:
        """Check every file the folder's model reads; return the model path to load.

        ``model_file`` and each ``external_data`` entry, and each external-data location
        in the ONNX graph itself (which ONNX Runtime opens relative to the model file),
        must resolve (symlinks followed) to a regular file inside ``folder``. Raises
        ``error`` naming the field and path when one does not, FileNotFoundError when
        files are missing. Pass the returned (resolved) path to ONNX Runtime, so the
        external data it opens is the data checked here.
        """
        entries = [("model_file", self.model_file),
                   *(("external_data", n) for n in self.external_data)]
        model = _inside(folder, entries, error)[0]
        locations = onnx_external_locations(model)
        if locations:
            root = Path(folder).resolve(strict=True)
            where = model.parent.relative_to(root)
            _inside(folder, [(f"external data of {self.model_file}", str(where / loc))
                             for loc in locations], error, named=locations)
        return model


def onnx_external_locations(path: str | Path) -> list[str]:
    """The external-data ``location`` of every tensor in the ONNX file at ``path``, in
    order, without duplicates; read from the protobuf alone, without the weights.

    Empty when onnx is not installed or the file is not a readable model (ONNX Runtime
    then reports that itself).
    """
    try:
        import onnx
    except ImportError:
        return []
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model: the session reports it
        return []
    found: dict[str, None] = {}
    for tensor in _tensors(model):
        entries = {e.key: e.value for e in tensor.external_data}
        if entries or tensor.data_location == onnx.TensorProto.EXTERNAL:
            found[entries.get("location", "")] = None
    return list(found)


def _tensors(model):
    """Every TensorProto of a ModelProto: initializers, sparse ones, constants in attributes,
    in subgraphs, functions and training info."""
    graphs = [model.graph, *(g for ti in model.training_info
                             for g in (ti.initialization, ti.algorithm))]
    nodes = [n for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            yield from g.initializer
            for s in g.sparse_initializer:
                yield from (s.values, s.indices)
            nodes.extend(g.node)
            continue
        for a in nodes.pop().attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for s in [*([a.sparse_tensor] if a.HasField("sparse_tensor") else []),
                      *a.sparse_tensors]:
                yield from (s.values, s.indices)
            if a.HasField("g"):
                graphs.append(a.g)
            graphs.extend(a.graphs)


def folder_file(folder: str | Path, name: str, *,
                error: type[ValueError] = ModelFolderError) -> Path:
    """``folder/name``, resolved (symlinks followed) and checked to be a regular file inside
    the folder: for the files read at fixed names (the manifest, config.json,
    tokenizer.json)."""
    return _inside(folder, [(name, name)], error)[0]


def _plain_name(name) -> bool:
    """Whether ``name`` is a plain relative path: not empty, not absolute, no '..'."""
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        return False
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        return False
    return ".." not in posix.parts and ".." not in windows.parts


def _inside(folder: str | Path, entries: list[tuple[str, str]], error,
            named: list[str] | None = None) -> list[Path]:
    """Resolve ``(field, name)`` entries relative to ``folder``; each must be a plain name
    of a regular file inside it. ``named``: the names to report instead of ``name``."""
    folder = Path(folder)
    shown = named if named is not None else [n for _, n in entries]
    for (what, name), show in zip(entries, shown):
        if not _plain_name(name) or not _plain_name(show):
            raise error(
                f"{folder}: {what} {show!r} is not a plain relative path inside the folder "
                f"(absolute, empty or with '..'); refusing to load it. {_REEXPORT}"
            )
    root = folder.resolve(strict=True)
    paths, missing = [], []
    for (what, name), show in zip(entries, shown):
        try:
            path = (root / name).resolve(strict=True)
        except FileNotFoundError:
            missing.append(show)
            continue
        except (OSError, RuntimeError) as e:  # a symlink loop, a name too long, ...
            raise error(f"{folder}: {what} {show!r} cannot be resolved ({e})") from e
        if not path.is_relative_to(root):
            raise error(
                f"{folder}: {what} {show!r} resolves to {path}, outside the model folder; "
                f"refusing to load it. {_REEXPORT}"
            )
        if not stat.S_ISREG(path.stat().st_mode):
            raise error(f"{folder}: {what} {show!r} is not a regular file. {_REEXPORT}")
        paths.append(path)
    if missing:
        raise FileNotFoundError(
            f"{folder} is incomplete: {', '.join(missing)} missing; re-export the model"
        )
    return paths


# -- field checks ---------------------------------------------------------------------------

# fields that must be >= 1 and >= 0 (an int | None field when it is set)
_POSITIVE = ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "hidden_size",
             "vocab_size", "max_length")
_NON_NEGATIVE = ("max_cache_length", "bos_token_id", "eos_token_id", "head_tokens")
# fields whose value is one of a few
_CHOICES = {"dtype": tuple(ONNX_ELEMENT_TYPES), "kv_cache": KV_CACHES,
            "kv_layout": KV_LAYOUTS, "execution_provider": EXECUTION_PROVIDERS,
            "weights": WEIGHTS}
_TEMPLATES = ("past_key_template", "past_value_template", "present_key_template",
              "present_value_template")


def _fits(value, tp) -> bool:
    """Whether the JSON ``value`` is of the annotated type ``tp`` (bool is not an int)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (str, dict, list):
        return isinstance(value, tp)
    if tp is type(None):
        return value is None
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    raise TypeError(f"no check for the manifest type {tp}")


def _describe(tp) -> str:
    """The JSON type ``tp`` reads, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    names = {bool: "true or false", int: "an integer", str: "a string", dict: "an object",
             list: "a list", type(None): "null"}
    if tp in names:
        return names[tp]
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return f"an object of {_describe(args[1]).removeprefix('a ').removeprefix('an ')}s"
    return str(tp)


def _shown(value) -> str:
    text = json.dumps(value)
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), "null")
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({kind})"


def _field_problems(data: dict) -> list[str]:
    """What is wrong with the fields of ``data`` (manifest keys -> JSON values)."""
    hints = typing.get_type_hints(ModelManifest)
    wrong = [f"{name} is {_shown(data[name])}, expected {_describe(hints[name])}"
             for name in hints if name in data and not _fits(data[name], hints[name])]
    if wrong:
        return wrong
    problems = []
    for name in _POSITIVE + _NON_NEGATIVE:
        low = 1 if name in _POSITIVE else 0
        if data.get(name) is not None and data[name] < low:
            problems.append(f"{name} is {data[name]}, expected an integer >= {low}")
    if any(e < 0 for e in data.get("eos_token_ids", [])):
        problems.append(f"eos_token_ids {data['eos_token_ids']} has a negative id")
    for name, allowed in _CHOICES.items():
        if name in data and data[name] not in allowed:
            problems.append(f"{name} is {data[name]!r}, expected one of "
                            f"{', '.join(map(repr, allowed))}")
    for name in _TEMPLATES:
        t = data.get(name, "{i}")
        try:
            ok = t.format(i=0) != t.format(i=1)
        except (KeyError, IndexError, ValueError, AttributeError):
            ok = False
        if not ok:
            problems.append(f"{name} {t!r} is not a name with one '{{i}}' for the layer")
    if "model_file" in data and not _plain_name(data["model_file"]):
        problems.append(f"model_file {data['model_file']!r} is not a plain relative path "
                        "inside the folder (absolute, empty or with '..')")
    for name in data.get("external_data", []):
        if not _plain_name(name):
            problems.append(f"external_data {name!r} is not a plain relative path inside "
                            "the folder (absolute, empty or with '..')")
    return problems


def _context(folder: Path, error) -> tuple[int, str] | None:
    """The context length ``config.json`` in ``folder`` gives, and the key it is under."""
    if not (folder / "config.json").is_file():
        return None
    path = folder_file(folder, "config.json", error=error)
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); {_REEXPORT}") from e
    if not isinstance(config, dict):
        raise error(f"{path} is not a JSON object; {_REEXPORT}")
    for key in CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def load_manifest(folder: str | Path, *,
                  error: type[ValueError] = ModelFolderError) -> ModelManifest:
    """Read ``folder/quickdraft.json``, with clear errors for missing or foreign files.

    Every field is checked against its annotation and its allowed values, and
    ``max_length`` against the context of ``config.json`` when the folder has one; a
    manifest that fails raises ``error`` naming the fields. The files it names are checked
    by :meth:`ModelManifest.check_files`.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {folder} is not a quickdraft export. "
            "Create one with `quickdraft export --target ... --draft ... --out ...`"
        )
    path = folder_file(folder, MANIFEST_NAME, error=error)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); {_REEXPORT}") from e
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object; {_REEXPORT}")
    version = data.get("manifest_version")
    if version is not None and not _fits(version, int):
        raise error(f"{path}: manifest_version is {_shown(version)}, expected an integer; "
                    f"the file was not written by quickdraft export: {_REEXPORT}")
    if version not in READABLE_VERSIONS:
        raise error(
            f"{path} has manifest_version {version}, this quickdraft reads "
            f"{' and '.join(map(str, READABLE_VERSIONS))}; {_REEXPORT}"
        )
    static = data.pop("static", None)
    if version == 1 and isinstance(static, dict):  # version 1 kept these facts in a block
        data["max_cache_length"] = static.get("max_cache_length", data.get("max_length"))
        data["max_length"] = static.get("max_position_embeddings", data.get("max_length"))
        data["attention"] = "GroupQueryAttention"
    dtype = data.get("dtype")
    if data.get("kv_cache") == "static" and not data.get("execution_provider"):
        # before the field existed the builder's target followed the dtype
        data["execution_provider"] = (
            {"fp32": "cpu", "fp16": "cuda"}.get(dtype, "") if isinstance(dtype, str) else "")
    data["manifest_version"] = MANIFEST_VERSION
    known = {f.name for f in fields(ModelManifest)}
    missing = [
        f.name
        for f in fields(ModelManifest)
        if f.name not in data and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise error(f"{path} lacks {', '.join(missing)}; {_REEXPORT}")
    data = {k: v for k, v in data.items() if k in known}
    problems = _field_problems(data)
    if problems:
        raise error(f"{path} is not a valid manifest: {'; '.join(problems)}. "
                    f"The file is damaged or was not written by this quickdraft: {_REEXPORT}")
    manifest = ModelManifest(**data)
    if manifest.max_cache_length > manifest.max_length:
        raise error(
            f"{path}: max_cache_length {manifest.max_cache_length} is larger than max_length "
            f"{manifest.max_length}; {_REEXPORT}"
        )
    context = _context(folder, error)
    if context is not None and manifest.max_length > context[0]:
        raise error(
            f"{path}: max_length {manifest.max_length} is larger than the model's context, "
            f"{context[1]} {context[0]} in {folder / 'config.json'}; {_REEXPORT}"
        )
    return manifest
