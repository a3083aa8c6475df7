"""Export Hugging Face causal LMs to ONNX decoders with KV caches, one model or a
draft/target pair (optionally with the draft's own draft): dynamic caches with
optimum-onnx, or static caches with onnxruntime-genai's model builder
(:mod:`quickdraft.export.builder`).

The library is silent: progress goes to an optional ``progress(message)`` callback.
"""

from __future__ import annotations

import functools
import numbers
import os
import time
from collections.abc import Sequence
from pathlib import Path

from quickdraft.export.checks import (
    TASK,
    ExportError,
    SourceInfo,
    UnsupportedModelError,
    check_models,
)
from quickdraft.export.common import (
    CACHE_TEMPLATES,
    MODEL_FILE,
    ExportInto,
    ExportReport,
    GraphIO,
    ModelReport,
    Progress,
    context_length,
    emit,
    ensure_tokenizer,
    graph_io,
    manifest_facts,
    quiet,
)
from quickdraft.export.output import run_model, run_pair
from quickdraft.export.validate import VALIDATED_DTYPES, validate_export
from quickdraft.manifest import KV_CACHES, ONNX_ELEMENT_TYPES, ModelManifest

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
_ONNX_DTYPES = {elem: name for name, elem in ONNX_ELEMENT_TYPES.items()}
EXPORTER = "optimum-onnx"


# weights only the static path (onnxruntime-genai's model builder) quantizes
QUANTIZED_DTYPES = ("int4",)


def _check_options(dtype: str, device: str, validate: bool) -> None:
    if dtype in QUANTIZED_DTYPES:
        raise ValueError(
            f"--dtype {dtype} needs --kv-cache static (onnxruntime-genai's model builder "
            f"quantizes the weights); the dynamic cache (optimum-onnx) exports "
            f"{', '.join(DTYPES)}"
        )
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

    emit(progress, f"{label}: exporting {info.source} ({info.model_type}, {dtype}, {device})")
    t0 = time.perf_counter()
    src = str(info.folder) if info.is_local else info.source
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    with quiet():
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
    emit(progress, f"{label}: graph written in {time.perf_counter() - t0:.1f} s")
    ensure_tokenizer(info, folder)
    manifest = build_manifest(folder, info.config, dtype)
    if validate:
        emit(progress, f"{label}: validating against PyTorch ({steps} greedy steps)")
        with quiet():
            manifest.validation = validate_export(folder, manifest, src, device=device, steps=steps)
        v = manifest.validation
        emit(
            progress,
            f"{label}: max |logit diff| {v['max_abs_diff']:.2e} "
            f"(cached {v['max_abs_diff_cached']:.2e}), greedy equal "
            f"{min(v['greedy_equal_steps'])}/{steps} steps",
        )
    manifest.source = info.source
    manifest.save(folder)
    return manifest


def _prepare_dynamic(infos: Sequence[SourceInfo], *, dtype: str, device: str, validate: bool,
                     steps: int, progress: Progress | None) -> ExportInto:
    """The optimum-onnx export step (looked up when called, so tests can replace it)."""
    return functools.partial(_export_into, dtype=dtype, device=device, validate=validate,
                             steps=steps, progress=progress)


def _check_dynamic(kv_cache: str, dtype: str, device: str, validate: bool,
                   max_length: int | None) -> None:
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHES)}, not {kv_cache!r}")
    if max_length is not None:
        raise ValueError(
            "max_length sets the length of static caches; a dynamic cache grows up to the "
            "model's context (export with kv_cache static, or leave max_length out)"
        )
    _check_options(dtype, device, validate)


def _check_steps(steps) -> None:
    """The greedy steps a validation compares, checked before anything is exported."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (the greedy steps the validation "
                         f"compares with the source), got {steps!r}")


def _graph_options(**options: bool | None) -> dict:
    """The static export's keywords of its graph settings (None: left at its default)."""
    return {name: bool(value) for name, value in options.items() if value is not None}


def _check_graph_options(kind: str, **options: bool | None) -> None:
    """Refuse a static graph setting (fuse_gate_up, transpose_weights) set for ``kind``."""
    for name, value in options.items():
        if value:
            raise ValueError(f"{name} is a setting of the static export's graph builder, "
                             f"not of a {kind} export: use kv_cache='static' or leave it "
                             f"unset")


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
    fuse_gate_up: bool | None = None,
    transpose_weights: bool | None = None,
) -> ModelReport:
    """Export one causal LM to ``out_dir`` (model.onnx, tokenizer files, quickdraft.json).

    ``src`` is a Hugging Face folder, a hub id or a GGUF file (converted once through
    transformers' GGUF loader into a temporary folder, removed after; see
    :mod:`quickdraft.export.gguf`: the manifest's ``source`` is then the GGUF path and
    ``gguf.json`` says what was read and how the tokenizer was checked).

    ``kv_cache`` "dynamic" exports with optimum-onnx; "static" builds a GroupQueryAttention
    graph for preallocated caches of ``max_length`` tokens (default: the model's context;
    see :mod:`quickdraft.export.builder`), also with ``dtype`` "int4" (4-bit MatMulNBits
    weights, fp32 caches on the CPU, fp16 on CUDA). Written to a staging folder next to ``out_dir``
    and renamed into place, so a failed or interrupted export leaves nothing at ``out_dir``.
    ``overwrite`` replaces a previous export, never a folder of other files.
    ``fuse_gate_up`` (static only; None: the builder's default there,
    :data:`quickdraft.export.builder.FUSE_GATE_UP`): each gated MLP's gate and up
    projections as one MatMul. ``transpose_weights`` (static only; None: off,
    :data:`quickdraft.export.builder.TRANSPOSE_WEIGHTS`): every MatMul weight stored
    transposed and multiplied as ``FusedMatMul(transB=1)``, the same products.
    """
    graph = dict(fuse_gate_up=fuse_gate_up, transpose_weights=transpose_weights)
    _check_steps(steps)
    options = dict(validate=validate, steps=steps, overwrite=overwrite, progress=progress)
    if kv_cache == "static":
        from quickdraft.export.builder import export_static_model

        return export_static_model(src, out_dir, dtype, device, max_length, role=role,
                                   **options, **_graph_options(**graph))
    _check_graph_options(kv_cache, **graph)
    _check_dynamic(kv_cache, dtype, device, validate, max_length)
    prepare = functools.partial(_prepare_dynamic, dtype=dtype, device=device,
                                validate=validate, steps=steps, progress=progress)
    return run_model(src, out_dir, prepare=prepare, overwrite=overwrite, progress=progress,
                     role=role)


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
    draft_draft: str | os.PathLike | None = None,
    fuse_gate_up: bool | None = None,
    transpose_weights: bool | None = None,
) -> ExportReport:
    """Export a target and a draft model to ``out/target`` and ``out/draft``, and
    ``draft_draft`` (the draft's own draft, for hierarchical speculative decoding: the
    draft decoded speculatively by a smaller model), if given, to ``out/draft_draft``.
    Each may be a Hugging Face folder, a hub id or a GGUF file (as for
    :func:`export_model`; one file given twice is converted once).

    ``kv_cache`` and ``max_length`` as for :func:`export_model` (a static export shares one
    cache length, by default the smallest context). Checks first (before any export) that
    all are exportable causal LMs sharing one vocabulary. The whole of ``out`` appears at
    once when every export and its validation succeeded; on failure nothing is left
    behind. ``fuse_gate_up`` and ``transpose_weights`` as for :func:`export_model`.
    """
    graph = dict(fuse_gate_up=fuse_gate_up, transpose_weights=transpose_weights)
    _check_steps(steps)
    options = dict(validate=validate, steps=steps, overwrite=overwrite, progress=progress,
                   draft_draft=draft_draft)
    if kv_cache != "static" or dtype == "int8":
        _check_graph_options("dynamic" if kv_cache != "static" else "int8", **graph)
    if dtype == "int8":  # int8 storage of fp32 weights: quickdraft.export.int8
        return _export_pair_int8(target, draft, out, device=device, kv_cache=kv_cache,
                                 max_length=max_length, **options)
    if kv_cache == "static":
        from quickdraft.export.builder import export_static_pair

        return export_static_pair(target, draft, out, dtype, device, max_length, **options,
                                  **_graph_options(**graph))
    _check_dynamic(kv_cache, dtype, device, validate, max_length)
    prepare = functools.partial(_prepare_dynamic, dtype=dtype, device=device,
                                validate=validate, steps=steps, progress=progress)
    return run_pair(target, draft, out, prepare=prepare, overwrite=overwrite,
                    progress=progress, draft_draft=draft_draft)


def _check_int8_sources(sources: dict, kv_cache: str, validate: bool, max_length) -> None:
    """What an int8 export checks before it snaps any weights: the options, and the
    sources as the other exports check them (Hugging Face folders of one vocabulary)."""
    from quickdraft.export.builder import check_max_length
    from quickdraft.export.int8 import check_int8_source

    if kv_cache == "static":
        check_max_length(max_length)
    else:
        _check_dynamic(kv_cache, "fp32", "cpu", validate, max_length)
    for s in sources.values():
        check_int8_source(s)
    with quiet():
        check_models(sources)


def _export_pair_int8(target, draft, out, *, device: str = "cpu", draft_draft=None,
                      overwrite: bool = False, progress=None, **options) -> ExportReport:
    """``export_pair`` with int8 weight storage (``--dtype int8``): each source snapped to
    the int8 grid (``quickdraft.export.int8.snapped_copy``), exported in fp32 and validated
    against the snapped weights, then stored (``store_int8``). The manifests name the
    original sources; ``out`` appears only when every model was exported, validated and
    stored. ``options`` go to ``export_pair`` (``kv_cache``, ``max_length``, ``validate``,
    ``steps``)."""
    import shutil
    import tempfile

    from quickdraft.export.int8 import snapped_copy, store_int8
    from quickdraft.export.output import (
        check_destination,
        removing_new_parents,
        resolve_out,
        write_marker,
    )
    from quickdraft.manifest import load_manifest

    if device != "cpu":
        raise ValueError("--dtype int8 stores fp32 arithmetic for ONNX Runtime's CPU provider; "
                         "use --device cpu (or --dtype fp16 --device cuda for CUDA)")
    sources = {"target": target, "draft": draft}
    if draft_draft is not None:
        sources["draft_draft"] = draft_draft
    out = resolve_out(out)
    check_destination(out, list(sources.values()), overwrite)
    _check_int8_sources(sources, options.get("kv_cache", "dynamic"),
                        options.get("validate", True), options.get("max_length"))
    with removing_new_parents(out):  # a failure leaves no folder it made
        out.parent.mkdir(parents=True, exist_ok=True)  # as the other exports make it
        with tempfile.TemporaryDirectory(prefix=".quickdraft-int8-", dir=out.parent) as tmp:
            snapped = {role: snapped_copy(src, Path(tmp) / "sources" / role)
                       for role, src in sources.items()}
            staged = Path(tmp) / "pair"
            report = export_pair(snapped["target"], snapped["draft"], staged, "fp32", "cpu",
                                 draft_draft=snapped.get("draft_draft"), progress=progress,
                                 **options)
            for r in report.models:
                store_int8(r.path)
                r.manifest = load_manifest(r.path)
                r.manifest.source = r.source = str(sources[r.role])
                r.manifest.save(r.path)
            write_marker(staged, "pair", {r.role: r for r in report.models})
            if out.exists():  # an earlier export that check_destination lets --overwrite replace
                shutil.rmtree(out)
            os.replace(staged, out)
    for r in report.models:
        r.path = out / r.role
    report.out = out
    return report
