"""Export Hugging Face causal LMs to ONNX decoders with KV caches, one model or a
draft/target pair: dynamic caches with optimum-onnx (task ``text-generation-with-past``),
or static caches with onnxruntime-genai's model builder (:mod:`quickdraft.export.static`,
which supplies only the graph-building step; checks, files, manifest facts and the atomic
output are shared here).

The library is silent: progress goes to an optional ``progress(message)`` callback, and
the warnings and logs of torch, transformers and optimum are muted while exporting.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from quickdraft.export.checks import (
    TASK,
    TOKENIZER_FILES,
    ExportError,
    SourceInfo,
    UnsupportedModelError,
    check_model,
    check_pair,
)
from quickdraft.export.validate import VALIDATED_DTYPES, validate_export
from quickdraft.manifest import (
    KV_CACHES,
    ONNX_ELEMENT_TYPES,
    ModelManifest,
    load_manifest,
)

__all__ = [
    "ModelReport",
    "ExportReport",
    "GraphIO",
    "export_model",
    "export_pair",
    "graph_io",
    "context_length",
    "DTYPES",
    "DEVICES",
]

DTYPES = ("fp32", "fp16", "bf16")
DEVICES = ("cpu", "cuda")
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
_ONNX_DTYPES = {elem: name for name, elem in ONNX_ELEMENT_TYPES.items()}
EXPORTER = "optimum-onnx"
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

    role: str  # "target", "draft" or "model"
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
    """An exported draft/target pair under ``out``."""

    out: Path
    target: ModelReport
    draft: ModelReport
    seconds: float

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "seconds": self.seconds,
            "target": self.target.to_dict(),
            "draft": self.draft.to_dict(),
        }


def versions(*extra: str) -> dict[str, str]:
    """Versions of the packages that took part in an export (and of ``extra`` ones)."""
    found = {"python": platform.python_version()}
    for name in (*_VERSIONED, *extra):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


@contextlib.contextmanager
def _quiet():
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


def _check_options(dtype: str, device: str, validate: bool) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype not in VALIDATED_DTYPES and validate:
        raise ExportError(
            f"{dtype} exports cannot be validated (ONNX Runtime's Python API and NumPy have no "
            f"{dtype} arrays); export fp16 or fp32, or skip validation (--no-validate) to "
            f"export {dtype} unchecked"
        )
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("device cuda was asked for but torch sees no CUDA device")


def _emit(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _new_temp(final: Path) -> Path:
    """An empty folder next to ``final`` (same file system, so the last rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    temp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    return temp


def _check_destination(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already exists and is not empty; remove it or overwrite")


def _move_into_place(temp: Path, out: Path) -> None:
    """Replace ``out`` with ``temp``; an existing ``out`` is removed only once ``temp`` is in."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(out, old)
    try:
        os.replace(temp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def build_manifest(folder: Path, config, dtype: str) -> ModelManifest:
    """Read the exported graph's inputs and outputs and describe them for the backend.

    Raises UnsupportedModelError when the graph is not a decoder with per-layer
    past/present key and value tensors in [batch, kv_heads, seq, head_dim] layout.
    """
    io_ = graph_io(folder / MODEL_FILE)
    inputs, outputs = io_.inputs, io_.outputs
    in_names, out_names = io_.input_names, io_.output_names
    arch = config.model_type
    templates = CACHE_TEMPLATES
    past = [n for n in in_names if n.startswith("past_key_values.")]
    num_layers = len(past) // 2
    expected_past = [
        t.format(i=i)
        for i in range(num_layers)
        for t in (templates["past_key_template"], templates["past_value_template"])
    ]
    expected_present = [
        t.format(i=i)
        for i in range(num_layers)
        for t in (templates["present_key_template"], templates["present_value_template"])
    ]
    if "input_ids" not in in_names or "logits" not in out_names or num_layers == 0:
        raise UnsupportedModelError(
            f"{arch}: the exported graph lacks input_ids, logits or past key values "
            f"(inputs {in_names}, outputs {out_names})"
        )
    if sorted(past) != sorted(expected_past) or not set(expected_present) <= set(out_names):
        raise UnsupportedModelError(
            f"{arch}: the exported KV cache is not one key and one value per layer "
            f"(inputs {past[:4]}..., outputs {out_names[:5]}...); quickdraft cannot run it"
        )
    kv = {n: (et, dims) for n, et, dims in inputs if n.startswith("past_key_values.")}
    elem, dims = kv[expected_past[0]]
    graph_dtype = _ONNX_DTYPES.get(elem)
    heads = config.num_attention_heads if hasattr(config, "num_attention_heads") else None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if (
        len(dims) != 4
        or not isinstance(dims[1], int)
        or not isinstance(dims[3], int)
        or not isinstance(dims[2], str)
    ):
        raise UnsupportedModelError(
            f"{arch}: past key shape {dims} is not [batch, kv_heads, past_sequence, head_dim]"
        )
    for name in expected_past:
        if kv[name] != (elem, dims):
            raise UnsupportedModelError(
                f"{arch}: past tensors differ in shape or type ({name}: {kv[name]}, "
                f"{expected_past[0]}: {(elem, dims)})"
            )
    if (dims[1], dims[3]) != (kv_heads, head_dim):
        # trust the graph, which is what the backend binds
        kv_heads, head_dim = dims[1], dims[3]
    if graph_dtype != dtype:
        raise UnsupportedModelError(
            f"{arch}: asked for {dtype} but the exported KV cache is "
            f"{graph_dtype or f'ONNX type {elem}'}"
        )
    logits_dims = dict((n, d) for n, _, d in outputs)["logits"]
    vocab = logits_dims[-1] if isinstance(logits_dims[-1], int) else int(config.vocab_size)
    return ModelManifest(
        architecture=arch,
        num_layers=num_layers,
        num_attention_heads=int(heads),
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        hidden_size=int(config.hidden_size),
        vocab_size=int(vocab),
        max_length=context_length(config),
        dtype=dtype,
        kv_layout="bnsh",
        kv_cache="dynamic",
        model_file=MODEL_FILE,
        input_names=in_names,
        output_names=out_names,
        has_position_ids="position_ids" in in_names,
        has_attention_mask="attention_mask" in in_names,
        exporter=EXPORTER,
        **manifest_facts(folder, config),
    )


def _ensure_tokenizer(info: SourceInfo, folder: Path) -> None:
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


def _export_into(
    info: SourceInfo,
    folder: Path,
    *,
    dtype: str,
    device: str,
    validate: bool,
    steps: int,
    progress: Progress | None,
    label: str,
) -> ModelManifest:
    """Export ``info`` into the existing empty ``folder``; write its manifest last."""
    from optimum.exporters.onnx import main_export

    _emit(progress, f"{label}: exporting {info.source} ({info.model_type}, {dtype}, {device})")
    t0 = time.perf_counter()
    src = str(info.folder) if info.is_local else info.source
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    with _quiet():
        try:
            main_export(
                model_name_or_path=src,
                output=folder,
                task=TASK,
                device=device,
                dtype=dtype,
                do_validation=False,
                library_name="transformers",
                local_files_only=info.is_local or offline,
            )
        except (ExportError, FileNotFoundError):
            raise
        except Exception as e:
            raise ExportError(
                f"{info.source}: optimum-onnx could not export it as {dtype} on {device}: "
                f"{type(e).__name__}: {e}"
            ) from e
    if not (folder / MODEL_FILE).is_file():
        raise ExportError(f"{info.source}: optimum-onnx wrote no {MODEL_FILE}")
    _emit(progress, f"{label}: graph written in {time.perf_counter() - t0:.1f} s")
    _ensure_tokenizer(info, folder)
    manifest = build_manifest(folder, info.config, dtype)
    if validate:
        _emit(progress, f"{label}: validating against PyTorch ({steps} greedy steps)")
        with _quiet():
            manifest.validation = validate_export(folder, manifest, src, device=device, steps=steps)
        v = manifest.validation
        _emit(
            progress,
            f"{label}: max |logit diff| {v['max_abs_diff']:.2e} "
            f"(cached {v['max_abs_diff_cached']:.2e}), greedy equal "
            f"{min(v['greedy_equal_steps'])}/{steps} steps",
        )
    manifest.source = info.source
    manifest.save(folder)
    return manifest


def write_model(info: SourceInfo, out: Path, export_into: ExportInto, role: str,
                start: float) -> ModelReport:
    """Run ``export_into`` in a temporary folder next to ``out`` and rename it into place:
    a failed or interrupted export leaves nothing at ``out``."""
    temp = _new_temp(out)
    try:
        export_into(info, temp, label=role)
        _move_into_place(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return ModelReport(role, info.source, out, load_manifest(out),
                       round(time.perf_counter() - start, 3))


def write_pair(infos: Mapping[str, SourceInfo], out_path: Path, export_into: ExportInto,
               progress: Progress | None, start: float) -> ExportReport:
    """Export ``infos["target"]`` and ``infos["draft"]`` into ``out_path/target`` and
    ``out_path/draft`` of a temporary folder, renamed into place once both succeeded."""
    temp = _new_temp(out_path)
    reports = {}
    try:
        for role in ("target", "draft"):
            info = infos[role]
            t0 = time.perf_counter()
            folder = temp / role
            folder.mkdir()
            manifest = export_into(info, folder, label=role)
            reports[role] = ModelReport(role, info.source, out_path / role, manifest,
                                        round(time.perf_counter() - t0, 3))
        _move_into_place(temp, out_path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _emit(progress, f"done: {out_path}")
    return ExportReport(out_path, reports["target"], reports["draft"],
                        round(time.perf_counter() - start, 3))


def _export_function(kv_cache: str, infos: list[SourceInfo], *, dtype: str, device: str,
                     max_length: int | None, validate: bool, steps: int,
                     progress: Progress | None) -> ExportInto:
    """``export_into`` for ``kv_cache``, once ``infos`` passed that kind's checks."""
    if kv_cache == "static":
        from quickdraft.export import static

        for info in infos:
            static.check_source(info)
        length = static.cache_length(infos, max_length)  # refused before the builder runs
        return functools.partial(static.export_into, dtype=dtype, device=device,
                                 cache_length=length, validate=validate, steps=steps,
                                 progress=progress)
    return functools.partial(_export_into, dtype=dtype, device=device, validate=validate,
                             steps=steps, progress=progress)


def _check_kind(kv_cache: str, dtype: str, device: str, validate: bool,
                max_length: int | None) -> None:
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHES)}, not {kv_cache!r}")
    if kv_cache == "static":
        from quickdraft.export.static import check_options

        check_options(dtype, device)
        return
    if max_length is not None:
        raise ValueError(
            "max_length sets the length of static caches; a dynamic cache grows up to the "
            "model's context (export with kv_cache static, or leave max_length out)"
        )
    _check_options(dtype, device, validate)


def export_model(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "fp32",
    device: str = "cpu",
    kv_cache: str = "dynamic",
    max_length: int | None = None,
    validate: bool = True,
    steps: int = 24,
    overwrite: bool = False,
    progress: Progress | None = None,
    role: str = "model",
) -> ModelReport:
    """Export one causal LM to ``out_dir`` (model.onnx, tokenizer files, quickdraft.json).

    ``kv_cache`` "dynamic" exports with optimum-onnx; "static" builds a GroupQueryAttention
    graph for preallocated caches of ``max_length`` tokens (default: the model's context;
    see :mod:`quickdraft.export.static`). Written to a temporary folder next to ``out_dir``
    and renamed into place, so a failed or interrupted export leaves nothing at ``out_dir``.
    """
    start = time.perf_counter()
    _check_kind(kv_cache, dtype, device, validate, max_length)
    out = Path(out_dir).expanduser().resolve()
    _check_destination(out, overwrite)
    with _quiet():
        info = check_model(src)
    export_into = _export_function(kv_cache, [info], dtype=dtype, device=device,
                                   max_length=max_length, validate=validate, steps=steps,
                                   progress=progress)
    return write_model(info, out, export_into, role, start)


def export_pair(
    target: str | os.PathLike,
    draft: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "fp32",
    device: str = "cpu",
    *,
    kv_cache: str = "dynamic",
    max_length: int | None = None,
    validate: bool = True,
    steps: int = 24,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportReport:
    """Export a target and a draft model to ``out/target`` and ``out/draft``.

    ``kv_cache`` and ``max_length`` as for :func:`export_model` (a static pair shares one
    cache length, by default the smaller context). Checks first (before any export) that
    both are exportable causal LMs sharing one vocabulary. The whole of ``out`` appears at
    once when both exports and their validations succeeded; on failure nothing is left
    behind.
    """
    start = time.perf_counter()
    _check_kind(kv_cache, dtype, device, validate, max_length)
    out_path = Path(out).expanduser().resolve()
    _check_destination(out_path, overwrite)
    _emit(progress, "checking the pair")
    with _quiet():
        t_info, d_info = check_pair(target, draft)
    export_into = _export_function(kv_cache, [t_info, d_info], dtype=dtype, device=device,
                                   max_length=max_length, validate=validate, steps=steps,
                                   progress=progress)
    return write_pair({"target": t_info, "draft": d_info}, out_path, export_into, progress,
                      start)
