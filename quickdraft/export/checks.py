"""Checks made before any heavy work: the sources exist, are causal LMs that optimum can
export with a KV cache, and (for a pair, or a pair with a draft of the draft) share one
vocabulary."""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ExportError",
    "UnsupportedModelError",
    "VocabularyMismatchError",
    "SourceInfo",
    "resolve_source",
    "check_model",
    "check_config",
    "check_weights",
    "is_gguf_source",
    "check_models",
    "check_pair",
    "check_three",
]

TASK = "text-generation-with-past"

# the tokenizer's files (and generation_config.json), copied into every export
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)
# small files that hold the config and the tokenizer (fetched alone for a hub id)
_LIGHT_FILES = ["config.json", *TOKENIZER_FILES, "vocab.txt", "*.tiktoken"]


GGUF_MAGIC = b"GGUF"  # the first bytes of a GGUF file
# config.json fields that must be whole numbers >= 1 where they are given (not null): the
# shapes the export reads, under the names of Llama-like and GPT-2-like configs
POSITIVE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "intermediate_size", "max_position_embeddings",
                   "head_dim", "n_embd", "n_layer", "n_head", "n_positions", "n_inner")
SAFETENSORS_MAX_HEADER = 100_000_000  # bytes: the largest header safetensors reads


def is_gguf_source(source: str | os.PathLike | None) -> bool:
    """Whether ``source`` names a GGUF file: a path ending in .gguf, or an existing file
    that starts with the GGUF magic bytes."""
    if source is None:
        return False
    text = os.fspath(source)
    if text.lower().endswith(".gguf"):
        return True
    path = Path(text).expanduser()
    if path.is_file():
        try:
            with open(path, "rb") as fh:
                return fh.read(4) == GGUF_MAGIC
        except OSError:
            return False
    return False



class ExportError(ValueError):
    """A source that cannot be exported, with the reason."""


class UnsupportedModelError(ExportError):
    """Not a decoder-only causal LM that quickdraft can export and run."""


class VocabularyMismatchError(ExportError):
    """Draft and target (or the draft and its draft) do not share one vocabulary."""


@dataclass
class SourceInfo:
    """A model source resolved to a local folder holding (at least) its config and tokenizer."""

    source: str  # what the user gave: a folder, a hub id or a GGUF file
    folder: Path  # local folder with config.json and the tokenizer files
    is_local: bool  # the source is a local folder (False: a hub id, weights fetched later)
    config: object  # transformers PretrainedConfig
    # for a GGUF source (folder: its converted Hugging Face folder): what was read, for gguf.json
    gguf: dict | None = None

    @property
    def model_type(self) -> str:
        return self.config.model_type


def _looks_like_hub_id(text: str) -> bool:
    """"name" or "owner/name" (what the hub accepts), not a path like ./x, /x, ~/x or a/b/c."""
    return re.fullmatch(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*(/[A-Za-z0-9_.\-]+)?", text) is not None


def resolve_source(source: str | os.PathLike) -> tuple[Path, bool]:
    """A local folder, or the snapshot folder of a hub id with its small files fetched.

    Raises FileNotFoundError for a missing folder, or a hub id that cannot be fetched
    (offline and not cached, or no such repository).
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            hint = ""
            if any(path.glob("*.gguf")):
                hint = " (to export a GGUF file, give the path of the .gguf file itself)"
            raise FileNotFoundError(
                f"{path} has no config.json: not a Hugging Face model folder{hint}"
            )
        return path.resolve(), True
    if path.exists():
        if is_gguf_source(path):
            raise FileNotFoundError(
                f"{path} is a GGUF file, not a Hugging Face folder: export_pair, export_model "
                "and `quickdraft export` convert it (quickdraft.export.gguf.converted_sources)"
            )
        raise FileNotFoundError(f"{path} is a file, neither a model folder nor a GGUF file")
    if text.lower().endswith(".gguf"):
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    if not _looks_like_hub_id(text):
        raise FileNotFoundError(f"model folder {path} does not exist")
    # a hub id "owner/name": fetch only the small files now; the weights come with the export
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(text, allow_patterns=_LIGHT_FILES)
    except Exception as e:  # offline, unknown repository, gated, network
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        raise FileNotFoundError(
            f"{text!r} is neither a local folder nor a reachable hub model{hint}: "
            f"{type(e).__name__}: {e}"
        ) from e
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"hub model {text!r} has no config.json")
    return folder, False


def _load_config(folder: Path, source: str):
    from transformers import AutoConfig

    path = folder / "config.json"
    if path.is_file():  # a hub cache or a folder: read before transformers guesses
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UnsupportedModelError(f"{source}: {path} is not valid JSON ({e})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
            # transformers would guess the architecture from the folder's name
            raise UnsupportedModelError(
                f"{source}: {path} names no model_type (e.g. \"llama\"); save the model "
                "again with save_pretrained, or add the field")
        _check_config_values(raw, path, source)
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except ValueError as e:
        # unknown model_type: only loadable with remote code, which quickdraft does not run
        raise UnsupportedModelError(
            f"{source}: transformers cannot read its config ({e}); models that need "
            "trust_remote_code are not supported"
        ) from e
    except OSError as e:
        raise FileNotFoundError(f"{source}: cannot read config.json ({e})") from e


def _check_config_values(raw: dict, path: Path, source: str) -> None:
    """Refuse a config.json whose shape fields are not whole numbers >= 1, or whose heads
    do not divide into key-value groups, naming the file and the field (transformers
    would fail later, deep inside the model's construction)."""
    for field in POSITIVE_FIELDS:
        value = raw.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise UnsupportedModelError(
                f"{source}: {path} sets {field} to {value!r}; it must be a whole number "
                ">= 1 (fix the field, or save the model again with save_pretrained)")
    heads, groups = raw.get("num_attention_heads"), raw.get("num_key_value_heads")
    if heads is not None and groups is not None and heads % groups:
        raise UnsupportedModelError(
            f"{source}: {path} sets num_attention_heads {heads}, which num_key_value_heads "
            f"{groups} does not divide; each key-value head serves a whole group of heads "
            "(set num_key_value_heads to a divisor of num_attention_heads)")


def _safetensors_problem(path: Path) -> str | None:
    """What makes ``path`` unreadable as a whole safetensors file (None: nothing); reads
    its header only."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"has {size} bytes, fewer than a safetensors header's 8"
        n = int.from_bytes(head, "little")
        if n > min(size - 8, SAFETENSORS_MAX_HEADER):
            return f"declares a {n}-byte header in a file of {size} bytes"
        try:
            header = json.loads(fh.read(n))
            ends = [int(t["data_offsets"][1]) for name, t in header.items()
                    if name != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError,
                UnicodeDecodeError):
            return "has a header that is not a safetensors table of tensors"
    data = size - 8 - n
    if max(ends, default=0) > data:
        return (f"holds {max(ends)} bytes of tensors by its header, but only {data} follow "
                "it (a truncated download or copy?)")
    return None


# the weights transformers loads from a folder, in the order it looks for them: a file, or
# an index of shards
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
LFS_POINTER = b"version https://git-lfs"  # what a clone without git-lfs holds instead


def _torch_problem(path: Path) -> str | None:
    """What makes ``path`` unreadable as a torch checkpoint (None: nothing)."""
    with open(path, "rb") as fh:
        pickled = fh.read(1) == b"\x80"  # a pickle's protocol opcode (torch < 1.6)
    if pickled or zipfile.is_zipfile(path):
        return None
    return "is neither a zip archive (torch.save's format) nor a pickle"


def _weight_problem(path: Path) -> str | None:
    with open(path, "rb") as fh:
        if fh.read(len(LFS_POINTER)) == LFS_POINTER:
            return ("is a git-lfs pointer, not the weights: run `git lfs pull` in the "
                    "model's clone (or download it again)")
    if path.name.endswith(".safetensors"):
        return _safetensors_problem(path)
    return _torch_problem(path)


def check_weights(folder: Path, source: str) -> None:
    """Refuse (UnsupportedModelError) the weights transformers would load from a local
    folder (the first of :data:`WEIGHT_FILES` present, and an index's shards) when they
    cannot be read whole, naming the file: a git-lfs pointer, a safetensors file whose
    header does not parse or whose tensors run past its end, a shard that the index names
    but the folder lacks, a torch checkpoint that is neither a zip archive nor a pickle.
    Headers only: a check made before any export starts, not a read of the weights. Other
    files (an unused index, adapters) are not looked at."""
    def refuse(path: Path, problem: str):
        return UnsupportedModelError(f"{source}: {path} {problem}; download or save the "
                                     "weights again")

    first = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if first is None:
        return  # no weights to check here: the export says what it misses
    files = [first]
    if first.name.endswith(".index.json"):
        try:
            shards = json.loads(first.read_text(encoding="utf-8"))["weight_map"].values()
            shards = sorted({str(x) for x in shards})
        except (OSError, ValueError, TypeError, KeyError, AttributeError,
                UnicodeDecodeError):
            raise refuse(first, "is not an index of weight shards (no weight_map)") from None
        missing = [x for x in shards if not (folder / x).is_file()]
        if missing:
            raise refuse(first, f"names shards the folder does not hold: {', '.join(missing)}")
        files = [folder / x for x in shards]
    for path in files:
        problem = _weight_problem(path)
        if problem is not None:
            raise refuse(path, problem)


def check_model(source: str | os.PathLike) -> SourceInfo:
    """Resolve ``source`` and check it is a decoder-only causal LM exportable with a KV cache.

    Raises FileNotFoundError or UnsupportedModelError with the reason.
    """
    text = os.fspath(source)
    folder, is_local = resolve_source(text)
    check_saved_format(folder, text)
    config = _load_config(folder, text)
    check_config(text, config)
    if is_local:
        check_weights(folder, text)
    return SourceInfo(source=text, folder=folder, is_local=is_local, config=config)


def check_saved_format(folder: Path, text: str) -> None:
    """Refuse (UnsupportedModelError) files the pinned transformers (4.57) would misread:
    a config.json written by transformers 5 keeps the rotary base in ``rope_parameters``,
    which 4.57 ignores for its default base (the export would validate against the same
    wrong model), and its tokenizer_config.json names the class ``TokenizersBackend``,
    which 4.57 cannot load."""
    import json

    def read(name: str) -> dict:
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # missing or unreadable: the loaders name that themselves
        return data if isinstance(data, dict) else {}

    config = read("config.json")
    if "rope_parameters" in config and "rope_theta" not in config:
        rope = config["rope_parameters"]
        raise UnsupportedModelError(
            f"{text}: config.json was saved by transformers "
            f"{config.get('transformers_version', '5')}: its rotary settings are in "
            f"'rope_parameters' ({rope}), which transformers 4.57 (quickdraft's export "
            "stack) does not read; write them as 'rope_theta' (and 'rope_scaling': null for "
            "the default rope type) in config.json, or save the model with transformers 4.57"
        )
    if read("tokenizer_config.json").get("tokenizer_class") == "TokenizersBackend":
        raise UnsupportedModelError(
            f"{text}: tokenizer_config.json names the tokenizer class 'TokenizersBackend' "
            "(transformers 5), which transformers 4.57 cannot load; set \"tokenizer_class\": "
            "\"PreTrainedTokenizerFast\" (the tokenizer.json beside it is unchanged)"
        )


def check_config(text: str, config) -> None:
    """Refuse (UnsupportedModelError) a ``config`` that is not of a decoder-only causal LM
    that optimum-onnx exports with a KV cache; ``text`` names the source in the error."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{text}: {model_type} is an encoder-decoder model; quickdraft exports "
            "decoder-only causal LMs"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"{text}: {model_type} is not a causal language model (transformers has no "
            f"ForCausalLM class for it); quickdraft needs a decoder-only causal LM"
        )
    archs = getattr(config, "architectures", None) or []
    heads = [a for a in archs if not a.endswith(("ForCausalLM", "LMHeadModel"))]
    if archs and len(heads) == len(archs):
        raise UnsupportedModelError(
            f"{text}: its weights are for {', '.join(archs)}, not a causal LM head"
        )
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(
            model_type, "onnx", library_name="transformers"
        )
    except KeyError:
        tasks = {}
    if TASK not in tasks:
        raise UnsupportedModelError(
            f"{text}: architecture {model_type!r} is not supported by optimum-onnx for "
            f"{TASK} (ONNX export with a KV cache)"
        )


def logits_width(config) -> int:
    """Columns of the logits: the config's vocabulary size."""
    return int(config.vocab_size)


def _tokenizer_json_vocab(data) -> dict[str, int] | None:
    """token -> id of a parsed tokenizer.json (None: a model without a vocabulary table);
    malformed data raises ValueError, TypeError, KeyError, IndexError or AttributeError."""
    if not isinstance(data, dict):
        raise ValueError("the file holds no JSON object")
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        mapping = dict(vocab)
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        mapping = {entry[0]: i for i, entry in enumerate(vocab)}
    else:
        return None
    for tok in data.get("added_tokens") or []:
        mapping[tok["content"]] = tok["id"]
    return mapping


def _tokenizer_vocab(folder: Path, source: str) -> dict[str, int]:
    """token -> id over the whole tokenizer (base vocabulary and added tokens)."""
    tj = folder / "tokenizer.json"
    if tj.is_file():
        try:
            mapping = _tokenizer_json_vocab(json.loads(tj.read_text(encoding="utf-8")))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise UnsupportedModelError(
                f"{source}: {tj} is not a tokenizers JSON file quickdraft can read "
                f"({type(e).__name__}: {e}); save the tokenizer again with "
                "tokenizer.save_pretrained") from None
        if mapping is not None:
            return mapping
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise FileNotFoundError(f"{source}: no usable tokenizer files ({e})") from e
    return dict(tok.get_vocab())


def _check_vocabulary(a_role: str, a: SourceInfo, b_role: str, b: SourceInfo,
                      a_vocab: dict[str, int]) -> dict[str, int]:
    """Refuse ``b`` unless it has ``a``'s logits width and token <-> id mapping (``a_vocab``);
    the error names both roles. Returns ``b``'s mapping."""
    aw, bw = logits_width(a.config), logits_width(b.config)
    if aw != bw:
        raise VocabularyMismatchError(
            f"vocabulary sizes differ ({a_role} vs {b_role}): {a_role} {a.source} has {aw} "
            f"logits, {b_role} {b.source} has {bw}; speculative decoding needs one vocabulary"
        )
    av, bv = a_vocab, _tokenizer_vocab(b.folder, b.source)
    if av != bv:
        if len(av) != len(bv):
            detail = f"{a_role} tokenizer has {len(av)} tokens, {b_role} has {len(bv)}"
        else:
            diff = sorted((i, tok) for tok, i in av.items() if bv.get(tok) != i)
            shown = ", ".join(f"{tok!r}={i}" for i, tok in diff[:3])
            detail = f"{len(diff)} tokens map to different ids ({a_role}: {shown}, ...)"
        raise VocabularyMismatchError(
            f"{b_role} and {a_role} tokenizers differ: {detail}; speculative decoding needs "
            "the same token <-> id mapping"
        )
    return bv


def check_models(sources: Mapping[str, str | os.PathLike]) -> dict[str, SourceInfo]:
    """Check every source (role -> source, in order) and that all share one vocabulary:
    the same logits width and the same token <-> id mapping, read from their tokenizer
    files. Each model is compared with the one before it (target vs draft, draft vs
    draft_draft), so the error names the pair that differs."""
    infos = {role: check_model(source) for role, source in sources.items()}
    roles = list(infos)
    if not roles:
        raise ValueError("no models to check")
    first = infos[roles[0]]
    vocab = _tokenizer_vocab(first.folder, first.source)
    for a_role, b_role in zip(roles, roles[1:]):
        vocab = _check_vocabulary(a_role, infos[a_role], b_role, infos[b_role], vocab)
    width = logits_width(first.config)
    if len(vocab) > width:
        raise VocabularyMismatchError(
            f"the tokenizer has {len(vocab)} tokens but the models have only {width} logits"
        )
    return infos


def check_pair(
    target: str | os.PathLike, draft: str | os.PathLike
) -> tuple[SourceInfo, SourceInfo]:
    """Check both sources and that they share a vocabulary (:func:`check_models`)."""
    infos = check_models({"target": target, "draft": draft})
    return infos["target"], infos["draft"]


def check_three(
    target: str | os.PathLike, draft: str | os.PathLike, draft_draft: str | os.PathLike
) -> tuple[SourceInfo, SourceInfo, SourceInfo]:
    """Check a target, its draft and the draft's draft (hierarchical speculative decoding)
    and that all three share one vocabulary (:func:`check_models`)."""
    infos = check_models({"target": target, "draft": draft, "draft_draft": draft_draft})
    return infos["target"], infos["draft"], infos["draft_draft"]
