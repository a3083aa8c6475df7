"""GGUF sources for export: a ``.gguf`` file converted once (transformers' GGUF loader)
into a temporary Hugging Face folder that the normal export validates, with the tokenizer
checked against the file and rebuilt from it when transformers builds it wrongly.
docs/how-to/export-gguf.md says what is checked and why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from quickdraft.export.checks import (
    GGUF_MAGIC,
    ExportError,
    UnsupportedModelError,
    check_config,
    is_gguf_source,
)
from quickdraft.export.common import Progress, emit, quiet

__all__ = [
    "GGUF_MAGIC",
    "GGUF_REQUIREMENT",
    "GGUFMeta",
    "GGUFSource",
    "is_gguf_source",
    "supported_architectures",
    "read_gguf",
    "check_gguf",
    "tokenizer_problems",
    "build_tokenizer",
    "gguf_tokenizer",
    "convert_gguf",
    "converted_sources",
    "GGUF_REPORT_NAME",
]

GGUF_REQUIREMENT = "gguf>=0.17,<0.20"
# written into each exported model folder whose source was a GGUF file
GGUF_REPORT_NAME = "gguf.json"
# keys of transformers' GGUF mapping that are not architectures
_NOT_ARCHITECTURES = {"general", "tokenizer"}
# llama.cpp's token types (tokenizer.ggml.token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

ROUND_TRIP_SAMPLES = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # the sum\n",
    "Hello, world! (x) [y] {z}; 3.14 -- \"quoted\" 'single'?",
    "a naïve café",
)
# frequent words; those that are one token of the file ("Ġthe", "▁the") must encode to it
COMMON_WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "with", "as", "on", "was",
    "by", "this", "from", "are", "not", "be", "have", "return", "def", "import", "self",
    "if", "None", "class", "print",
)


@dataclass
class GGUFMeta:
    """What quickdraft reads from a GGUF file's metadata (no tensors)."""

    path: Path  # the file, resolved
    architecture: str  # general.architecture
    name: str | None  # general.name
    file_type: int | None  # general.file_type (llama.cpp's LLAMA_FTYPE)
    tensor_types: dict[str, int]  # GGML tensor type name -> number of tensors
    tokenizer_model: str | None  # tokenizer.ggml.model: "gpt2" (BPE), "llama" (SentencePiece)
    tokenizer_pre: str | None  # tokenizer.ggml.pre
    tokens: list[str] | None
    merges: list[str] | None
    scores: list[float] | None
    token_types: list[int] | None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    config: object = None  # the transformers config the GGUF loader makes (check_gguf)

    @property
    def sentencepiece(self) -> bool:
        return self.tokenizer_model == "llama"

    def token(self, i: int | None) -> str | None:
        if i is None or self.tokens is None or not 0 <= i < len(self.tokens):
            return None
        return self.tokens[i]

    def wants_bos(self) -> bool:
        """Whether a prompt starts with BOS (llama.cpp's default: SentencePiece files do)."""
        return self.add_bos if self.add_bos is not None else self.sentencepiece

    def wants_space_prefix(self) -> bool:
        return self.add_space_prefix if self.add_space_prefix is not None else self.sentencepiece


@dataclass
class GGUFSource:
    """A GGUF file converted to a Hugging Face folder for the export."""

    source: str  # the path as given
    path: Path  # resolved
    folder: Path  # the converted Hugging Face folder (temporary)
    report: dict = field(default_factory=dict)  # written to gguf.json in the export


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ExportError(
            f"reading GGUF files needs the gguf package: pip install 'quickdraft[export]' "
            f"(or pip install '{GGUF_REQUIREMENT}')"
        ) from e
    return gguf


def supported_architectures() -> list[str]:
    """The GGUF ``general.architecture`` values transformers' GGUF loader covers."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in _NOT_ARCHITECTURES]


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:  # a malformed field: treat as absent
        return default


def read_gguf(source: str | os.PathLike) -> GGUFMeta:
    """Read the metadata of the GGUF file ``source`` (no tensors are loaded).

    Raises FileNotFoundError for a missing file, ExportError for a file that is not GGUF.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder, not a GGUF file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise FileNotFoundError(f"cannot read {path}: {e.strerror or e}") from e
    if magic != GGUF_MAGIC:
        raise ExportError(f"{path} is not a GGUF file (it does not start with the GGUF magic "
                          f"bytes, {magic!r} instead of {GGUF_MAGIC!r})")
    gguf = _import_gguf()
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise ExportError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ExportError(f"{path}: the GGUF file has no general.architecture")
    tensor_types: dict[str, int] = {}
    for t in reader.tensors:
        name = getattr(t.tensor_type, "name", str(t.tensor_type))
        tensor_types[name] = tensor_types.get(name, 0) + 1

    def opt_int(key):
        v = _field(reader, key)
        return None if v is None else int(v)

    def opt_bool(key):
        v = _field(reader, key)
        return None if v is None else bool(v)

    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    return GGUFMeta(
        path=path.resolve(),
        architecture=arch,
        name=_field(reader, "general.name"),
        file_type=opt_int("general.file_type"),
        tensor_types=tensor_types,
        tokenizer_model=_field(reader, "tokenizer.ggml.model"),
        tokenizer_pre=_field(reader, "tokenizer.ggml.pre"),
        tokens=_field(reader, "tokenizer.ggml.tokens"),
        merges=_field(reader, "tokenizer.ggml.merges"),
        scores=None if scores is None else [float(s) for s in scores],
        token_types=None if types is None else [int(t) for t in types],
        bos_id=opt_int("tokenizer.ggml.bos_token_id"),
        eos_id=opt_int("tokenizer.ggml.eos_token_id"),
        unk_id=opt_int("tokenizer.ggml.unknown_token_id"),
        pad_id=opt_int("tokenizer.ggml.padding_token_id"),
        add_bos=opt_bool("tokenizer.ggml.add_bos_token"),
        add_eos=opt_bool("tokenizer.ggml.add_eos_token"),
        add_space_prefix=opt_bool("tokenizer.ggml.add_space_prefix"),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )


def _loader_architecture(meta: GGUFMeta) -> str:
    """The name transformers' loader checks (it renames a few, as load_gguf_checkpoint)."""
    arch = meta.architecture
    if "llama" in arch and meta.name and "mistral" in meta.name.lower():
        return "mistral"
    return {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}.get(arch, arch)


def check_gguf(source: str | os.PathLike) -> GGUFMeta:
    """Light checks of a GGUF source (metadata only): a readable GGUF file whose
    architecture transformers' GGUF loader covers, describing a decoder-only causal LM
    that optimum-onnx exports with a KV cache. Returns its metadata with ``config`` set.

    Raises FileNotFoundError, ExportError or UnsupportedModelError (one line).
    """
    import transformers

    text = os.fspath(source)
    meta = read_gguf(text)
    archs = supported_architectures()
    if meta.architecture not in archs and _loader_architecture(meta) not in archs:
        raise UnsupportedModelError(
            f"{text}: GGUF architecture {meta.architecture!r} cannot be loaded by "
            f"transformers {transformers.__version__} (its GGUF loader covers "
            f"{', '.join(sorted(archs))})"
        )
    if not meta.tokens:
        raise UnsupportedModelError(f"{text}: the GGUF file has no tokenizer "
                                    "(tokenizer.ggml.tokens); quickdraft needs one")
    from transformers import AutoConfig

    try:
        with quiet():
            config = AutoConfig.from_pretrained(meta.path.parent, gguf_file=meta.path.name,
                                                local_files_only=True)
    except Exception as e:
        raise UnsupportedModelError(
            f"{text}: transformers cannot read the GGUF file's config "
            f"({type(e).__name__}: {e})"
        ) from e
    check_config(text, config)
    meta.config = config
    return meta


# -- the tokenizer ---------------------------------------------------------------------------


def _merge_text(m) -> str:
    return m if isinstance(m, str) else " ".join(m)


def _first_difference(a: Sequence, b: Sequence) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _word_text(meta: GGUFMeta, word: str) -> str:
    """The text that must encode to the single token of ``word`` after a space."""
    return word if (meta.sentencepiece and meta.wants_space_prefix()) else " " + word


def tokenizer_problems(tokenizer, meta: GGUFMeta) -> list[str]:
    """What is wrong with ``tokenizer`` (a ``tokenizers.Tokenizer``) as the tokenizer of the
    GGUF file ``meta``: one line per failed check, naming it (round-trip, vocabulary,
    merges, segmentation). Empty when all pass."""
    problems = []
    # (1) round trip
    for text in ROUND_TRIP_SAMPLES:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        back = tokenizer.decode(ids, skip_special_tokens=False)
        if back != text:
            problems.append(f"round-trip check failed: {text!r} decodes back as {back!r}")
            break
    # (2) vocabulary (every tokenizer type) and merges (gpt2-style files)
    tokens = meta.tokens or []
    expected = {t: i for i, t in enumerate(tokens)}
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if vocab != expected:
        wrong = sorted((i, t) for t, i in expected.items() if vocab.get(t) != i)
        extra = sorted(set(vocab) - set(expected))
        shown = ", ".join(f"{t!r}={i}" for i, t in wrong[:3])
        problems.append(
            f"vocabulary check failed: {len(wrong)} of the GGUF's {len(expected)} tokens "
            f"map to other ids or are missing ({shown}), {len(extra)} tokens are not the GGUF's"
        )
    if meta.merges is not None:
        model = json.loads(tokenizer.to_str()).get("model") or {}
        if model.get("type") != "BPE":
            problems.append(f"merges check failed: the GGUF has BPE merges but the tokenizer "
                            f"is a {model.get('type')} model")
        else:
            built = [_merge_text(m) for m in model.get("merges") or []]
            if built != list(meta.merges):
                i = _first_difference(built, meta.merges)
                problems.append(
                    f"merges check failed: the tokenizer's {len(built)} merges differ from "
                    f"the GGUF's {len(meta.merges)} (first at rank {i})"
                )
    # (3) segmentation of whole words that are single tokens of the file
    prefix = "▁" if meta.sentencepiece else "Ġ"
    split = []
    tried = 0
    for word in COMMON_WORDS:
        form = prefix + word
        if form not in expected:
            continue
        tried += 1
        enc = tokenizer.encode(_word_text(meta, word), add_special_tokens=False)
        if enc.ids != [expected[form]]:
            split.append((word, enc.tokens))
    if split:
        word, pieces = split[0]
        problems.append(
            f"segmentation check failed: {len(split)} of {tried} whole words that are single "
            f"GGUF tokens encode to other tokens (e.g. {word!r} -> {pieces})"
        )
    return problems


def _merges_from_scores(meta: GGUFMeta) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece-BPE vocabulary: every split of a token into two
    tokens, ranked by the token's score (higher first), as llama.cpp's SentencePiece
    tokenizer merges the adjacent pair whose concatenation scores highest."""
    tokens, scores = meta.tokens or [], meta.scores
    if scores is None or len(scores) != len(tokens):
        raise ExportError(f"{meta.path}: a SentencePiece GGUF needs tokenizer.ggml.scores "
                          "(one per token) to rebuild its tokenizer")
    types = meta.token_types or [_NORMAL] * len(tokens)
    skip = {_CONTROL, _BYTE, _UNKNOWN, _UNUSED}
    vocab = {t: i for i, t in enumerate(tokens) if types[i] not in skip}
    found = []
    for tok, i in vocab.items():
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in vocab and right in vocab:
                found.append((-scores[i], -scores[vocab[left]], -scores[vocab[right]], i,
                              left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _post_processor(meta: GGUFMeta):
    """BOS/EOS around a prompt as the GGUF's add_bos_token / add_eos_token say (llama.cpp's
    defaults when absent); None when neither is added."""
    from tokenizers import processors

    single, specials = [], []
    bos, eos = meta.token(meta.bos_id), meta.token(meta.eos_id)
    if meta.wants_bos() and bos is not None:
        single.append(bos)
        specials.append((bos, meta.bos_id))
    single.append("$A")
    if meta.add_eos and eos is not None:
        single.append(eos)
        if eos != bos:
            specials.append((eos, meta.eos_id))
    if len(single) == 1:
        return None
    pair = single + [s if s != "$A" else "$B:1" for s in single]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def build_tokenizer(meta: GGUFMeta):
    """A ``tokenizers.Tokenizer`` built from the GGUF's tokens, merges and scores: a
    byte-level BPE from the merges for gpt2-style files; for SentencePiece files a BPE
    whose merges come from the scores (or the file's merges), with a Metaspace
    pre-tokenizer and decoder and byte fallback. Raises ExportError for other types."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = meta.tokens or []
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ExportError(f"{meta.path}: tokenizer.ggml.tokens repeats tokens; cannot build "
                          "a tokenizer from it")
    types = meta.token_types or [_NORMAL] * len(tokens)
    kind = meta.tokenizer_model
    if kind == "gpt2" and meta.merges:
        merges = []
        for m in meta.merges:
            parts = m.split(" ")
            if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab:
                raise ExportError(f"{meta.path}: GGUF merge {m!r} is not two of its tokens")
            merges.append((parts[0], parts[1]))
        tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                                     use_regex=True)
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        if meta.merges:
            merges = [tuple(m.split(" ", 1)) for m in meta.merges]
        else:
            merges = _merges_from_scores(meta)
        byte_fallback = any(t == _BYTE for t in types) or "<0x41>" in vocab
        unk = meta.token(meta.unk_id)
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True,
                                   byte_fallback=byte_fallback))
        scheme = "first" if meta.wants_space_prefix() else "never"
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme,
                                                     split=False)
        tok.decoder = decoders.Sequence([
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=False),
        ])
    else:
        raise ExportError(f"{meta.path}: quickdraft cannot rebuild a {kind!r} GGUF tokenizer "
                          "(it rebuilds gpt2-style BPE and llama-style SentencePiece ones)")
    control = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == _CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == _USER_DEFINED]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    tok.post_processor = _post_processor(meta)
    return tok


def _fast_tokenizer(backend, meta: GGUFMeta):
    """A plain PreTrainedTokenizerFast around ``backend`` (no class-specific logic that
    would re-add BOS on reload), with the GGUF's special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {}
    for name, i in (("bos_token", meta.bos_id), ("eos_token", meta.eos_id),
                    ("unk_token", meta.unk_id), ("pad_token", meta.pad_id)):
        tok = meta.token(i)
        if tok is not None:
            kwargs[name] = tok
    if meta.chat_template:
        kwargs["chat_template"] = meta.chat_template
    length = getattr(meta.config, "max_position_embeddings", None)
    if length:
        kwargs["model_max_length"] = int(length)
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                   **kwargs)


def gguf_tokenizer(meta: GGUFMeta):
    """The checked tokenizer of the GGUF file ``meta`` and a report of the checks.

    The tokenizer transformers builds, if it passes :func:`tokenizer_problems`; else one
    rebuilt from the file (:func:`build_tokenizer`), if that passes. BOS/EOS are added to
    prompts as the file's add_bos_token / add_eos_token say. Raises ExportError naming the
    check that failed.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    try:
        with quiet(), _no_progress_bars():
            built = AutoTokenizer.from_pretrained(meta.path.parent, gguf_file=meta.path.name,
                                                  local_files_only=True)
        backend = Tokenizer.from_str(built.backend_tokenizer.to_str())
        backend.post_processor = _post_processor(meta)
        problems = tokenizer_problems(backend, meta)
    except Exception as e:  # transformers cannot build it at all
        backend, problems = None, [f"transformers cannot build it ({type(e).__name__}: {e})"]
    report = {
        "tokenizer_model": meta.tokenizer_model,
        "tokenizer_pre": meta.tokenizer_pre,
        "checks": ["round-trip", "vocabulary", "merges" if meta.merges is not None else None,
                   "segmentation"],
        "transformers_problems": problems,
        "built_by": "transformers",
        "add_bos_token": meta.wants_bos(),
        "add_eos_token": bool(meta.add_eos),
        # set from the file whichever builds the tokenizer (transformers gets them wrong)
        "from_gguf": ["BOS/EOS added to prompts (add_bos_token, add_eos_token)",
                      "bos/eos/unk/pad tokens (their ids)", "chat template"],
    }
    report["checks"] = [c for c in report["checks"] if c]
    if problems:
        try:
            backend = build_tokenizer(meta)
        except ExportError as e:
            raise ExportError(f"{meta.path}: the tokenizer transformers builds fails the "
                              f"{problems[0]}; and it cannot be rebuilt: {e}") from e
        again = tokenizer_problems(backend, meta)
        if again:
            raise ExportError(f"{meta.path}: the GGUF's tokenizer fails the {again[0]} "
                              f"(transformers' build: {problems[0]})")
        report["built_by"] = "quickdraft (rebuilt from the GGUF's tokenizer metadata)"
    report["passed"] = True
    return _fast_tokenizer(backend, meta), report


# -- weights and the converted folder --------------------------------------------------------


@contextlib.contextmanager
def _no_progress_bars():
    """Silence the tqdm bars of transformers' GGUF loader while converting."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    old = gguf_utils.tqdm
    gguf_utils.tqdm = lambda it=None, *a, **k: it
    try:
        yield
    finally:
        gguf_utils.tqdm = old
        if was_enabled:
            hf_logging.enable_progress_bar()


def convert_gguf(meta: GGUFMeta, folder: Path, progress: Progress | None = None,
                 label: str = "gguf") -> dict:
    """Write the model of the checked GGUF file ``meta`` (:func:`check_gguf`) to the new
    folder ``folder`` as a Hugging Face folder (config.json, model.safetensors in float32,
    generation_config.json, the checked tokenizer); return the report for gguf.json.

    The weights are those transformers' GGUF loader makes (dequantized, the q/k
    permutation of llama-style files undone), loaded as ``from_pretrained(..., gguf_file=)``
    does. Raises ExportError when the file lacks weights the model needs.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    config = meta.config
    if config is None:
        raise ValueError("convert_gguf needs the metadata of check_gguf (with its config)")
    tokenizer, tok_report = gguf_tokenizer(meta)
    if tok_report["transformers_problems"]:
        emit(progress, f"{label}: transformers' tokenizer failed the "
                       f"{tok_report['transformers_problems'][0]}; rebuilt it, checks pass")
    else:
        emit(progress, f"{label}: tokenizer checks pass ({', '.join(tok_report['checks'])})")
    emit(progress, f"{label}: dequantizing {meta.path.name} ({meta.architecture}, "
                   f"{_types_text(meta.tensor_types)}) with transformers' GGUF loader")
    with quiet(), _no_progress_bars():
        with torch.device("meta"):
            dummy = AutoModelForCausalLM.from_config(config)
        mapping = get_gguf_hf_weights_map(dummy)
        try:
            tensors = load_gguf_checkpoint(str(meta.path), return_tensors=True,
                                           model_to_load=dummy)["tensors"]
        except Exception as e:
            raise ExportError(f"{meta.path}: transformers cannot load its tensors "
                              f"({type(e).__name__}: {e})") from e
        model_class = type(dummy)
        del dummy
        tensors = {k: (v.to(torch.float32) if v.is_floating_point() else v)
                   for k, v in tensors.items()}
        model, info = model_class.from_pretrained(
            None, config=config, state_dict=tensors, dtype=torch.float32,
            output_loading_info=True,
        )
        del tensors
        missing = list(info.get("missing_keys") or [])
        if missing:
            raise ExportError(f"{meta.path}: the GGUF file has no weights for "
                              f"{len(missing)} parameters of the model ({', '.join(missing[:3])}"
                              f"{', ...' if len(missing) > 3 else ''})")
        model.eval()
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    gguf = _import_gguf()
    names = [t.name for t in gguf.GGUFReader(meta.path).tensors]
    return {
        "source": str(meta.path),
        "architecture": meta.architecture,
        "model_type": config.model_type,
        "name": meta.name,
        "file_type": meta.file_type,
        "tensor_types": meta.tensor_types,
        "ignored_tensors": sorted(n for n in names if n not in mapping),
        "dequantized_to": "float32",
        "tokenizer": tok_report,
    }


def _types_text(types: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(types.items(), key=lambda kv: -kv[1]))


@contextlib.contextmanager
def converted_sources(sources: Sequence[str | os.PathLike], new_temp: Callable[[], Path],
                      progress: Progress | None = None
                      ) -> Iterator[tuple[list[str], dict[int, GGUFSource]]]:
    """Replace the GGUF files among ``sources`` by converted Hugging Face folders.

    Checks every GGUF source first (:func:`check_gguf`), then converts each distinct file
    once into a folder under ``new_temp()`` (made only when there is a GGUF source, and
    always removed when the block ends). Yields the sources with the GGUF ones replaced,
    and {index: GGUFSource} for the replaced ones.
    """
    texts = [os.fspath(s) for s in sources]
    picked = [i for i, s in enumerate(texts) if is_gguf_source(s)]
    if not picked:
        yield texts, {}
        return
    metas: dict[Path, GGUFMeta] = {}
    for i in picked:
        path = Path(texts[i]).expanduser().resolve()
        if path not in metas:
            metas[path] = check_gguf(texts[i])
    temp = new_temp()
    try:
        folders: dict[Path, tuple[Path, dict]] = {}
        for n, (path, meta) in enumerate(metas.items()):
            folder = temp / f"gguf-{n}"
            report = convert_gguf(meta, folder, progress, label=path.name)
            folders[path] = (folder, report)
        out = list(texts)
        converted = {}
        for i in picked:
            path = Path(texts[i]).expanduser().resolve()
            folder, report = folders[path]
            out[i] = str(folder)
            converted[i] = GGUFSource(texts[i], path, folder, report)
        yield out, converted
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def write_report(folder: Path, report: dict) -> None:
    """Write ``gguf.json`` (what was read from the GGUF source and how) into ``folder``."""
    (folder / GGUF_REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
