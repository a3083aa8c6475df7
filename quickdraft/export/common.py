"""Helpers shared by the dynamic (:mod:`quickdraft.export.api`) and static
(:mod:`quickdraft.export.builder`) exporters: progress, quiet libraries, graph interface,
manifest facts, tokenizer files and the reports."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import platform
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from quickdraft.export.checks import TOKENIZER_FILES, SourceInfo, UnsupportedModelError
from quickdraft.manifest import ModelManifest

__all__ = [
    "MODEL_FILE",
    "CACHE_TEMPLATES",
    "Progress",
    "ExportInto",
    "ModelReport",
    "ExportReport",
    "GraphIO",
    "emit",
    "quiet",
    "versions",
    "graph_io",
    "context_length",
    "manifest_facts",
    "ensure_tokenizer",
]

MODEL_FILE = "model.onnx"
_VERSIONED = (
    "quickdraft",
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "tokenizers",
    "numpy",
)
# graph names of the per-layer caches, the same for optimum's and the model builder's graphs
CACHE_TEMPLATES = {
    "past_key_template": "past_key_values.{i}.key",
    "past_value_template": "past_key_values.{i}.value",
    "present_key_template": "present.{i}.key",
    "present_value_template": "present.{i}.value",
}

Progress = Callable[[str], None]
# export_into(info, folder, label=...) -> manifest: one source into an existing empty folder
ExportInto = Callable[..., ModelManifest]


@dataclass
class ModelReport:
    """One exported model."""

    role: str  # "target", "draft", "draft_draft" or "model"
    source: str  # the folder or hub id it came from
    path: Path  # the exported folder (final location)
    manifest: ModelManifest
    seconds: float  # export and validation

    @property
    def validation(self) -> dict:
        return self.manifest.validation

    def to_dict(self) -> dict:
        return {
            "role": self.role,
            "source": self.source,
            "path": str(self.path),
            "seconds": self.seconds,
            "manifest": asdict(self.manifest),
        }


@dataclass
class ExportReport:
    """An exported draft/target pair under ``out``, and the draft's own draft (the
    ``draft_draft`` of hierarchical speculative decoding) when one was exported."""

    out: Path
    target: ModelReport
    draft: ModelReport
    seconds: float
    draft_draft: ModelReport | None = None

    @property
    def models(self) -> list[ModelReport]:
        """The exported models: target, draft and (if exported) draft_draft."""
        return [r for r in (self.target, self.draft, self.draft_draft) if r is not None]

    def to_dict(self) -> dict:
        result = {
            "out": str(self.out),
            "seconds": self.seconds,
            "target": self.target.to_dict(),
            "draft": self.draft.to_dict(),
        }
        if self.draft_draft is not None:
            result["draft_draft"] = self.draft_draft.to_dict()
        return result


def emit(progress: Progress | None, message: str) -> None:
    """Send ``message`` to the ``progress`` callback, if there is one."""
    if progress is not None:
        progress(message)


@contextlib.contextmanager
def quiet():
    """Mute Python warnings, library loggers and stray prints while exporting."""
    names = ["transformers", "optimum", "torch", "torch.onnx", "huggingface_hub", "accelerate"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def versions(*extra: str) -> dict[str, str]:
    """Versions of the packages that took part in an export (and of ``extra`` ones)."""
    found = {"python": platform.python_version()}
    for name in (*_VERSIONED, *extra):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


@dataclass
class GraphIO:
    """The interface of an ONNX graph, read without its weights."""

    inputs: list[tuple[str, int, list]]  # (name, ONNX element type, dims) of each input
    outputs: list[tuple[str, int, list]]  # the same for each output
    ops: dict[str, int] = field(default_factory=dict)  # op_type -> number of nodes

    @property
    def input_names(self) -> list[str]:
        return [name for name, _, _ in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [name for name, _, _ in self.outputs]


def graph_io(model_path: Path) -> GraphIO:
    """Inputs (initializers excluded), outputs and op counts of ``model_path``; a dim is an
    int, or its symbolic name."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}

    def info(values):
        out = []
        for v in values:
            if v.name in inits:
                continue
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append((v.name, t.elem_type, dims))
        return out

    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return GraphIO(info(graph.input), info(graph.output), ops)


def context_length(config) -> int:
    """The longest sequence the model was configured for (0 when the config does not say)."""
    return int(
        getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None)
        or getattr(config, "max_sequence_length", None)
        or 0
    )


def _int_or_first(value) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _eos_ids(config, folder: Path) -> list[int]:
    """EOS ids of the config, then any more that generation_config.json lists."""
    ids: list[int] = []
    sources = [getattr(config, "eos_token_id", None)]
    gen = folder / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for eos in sources:
        for e in eos if isinstance(eos, (list, tuple)) else [eos]:
            if e is not None and int(e) not in ids:
                ids.append(int(e))
    return ids


def manifest_facts(folder: Path, config, packages: tuple[str, ...] = ()) -> dict:
    """The manifest fields every exporter fills in the same way: special token ids, weight
    files, package versions (``packages`` besides the usual ones) and the cache names."""
    eos_ids = _eos_ids(config, folder)
    return dict(
        bos_token_id=_int_or_first(getattr(config, "bos_token_id", None)),
        eos_token_id=eos_ids[0] if eos_ids else None,
        eos_token_ids=eos_ids,
        external_data=sorted(
            p.name for p in folder.iterdir()
            if p.name.startswith(MODEL_FILE) and p.name != MODEL_FILE
        ),
        versions=versions(*packages),
        **CACHE_TEMPLATES,
    )


def ensure_tokenizer(info: SourceInfo, folder: Path) -> None:
    """Make sure ``folder`` holds the tokenizer files, with a tokenizer.json for the backend."""
    for name in TOKENIZER_FILES:
        if not (folder / name).exists() and (info.folder / name).is_file():
            shutil.copy2(info.folder / name, folder / name)
    if not (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(info.folder, use_fast=True, local_files_only=True)
            tok.save_pretrained(folder)
        except Exception as e:
            raise UnsupportedModelError(
                f"{info.source}: no fast tokenizer (tokenizer.json) can be made ({e})"
            ) from e
        if not (folder / "tokenizer.json").is_file():
            raise UnsupportedModelError(f"{info.source}: no fast tokenizer (tokenizer.json)")
