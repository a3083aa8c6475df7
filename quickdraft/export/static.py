"""Static-KV-cache export: GroupQueryAttention graphs from onnxruntime-genai's model builder.

``export_static_model`` / ``export_static_pair`` write the same layout as the generic
exporter (``OUT/target`` and ``OUT/draft``, each with ``model.onnx`` and its external data,
the tokenizer files and a ``quickdraft.json`` manifest with ``kv_cache: "static"``), plus
the builder's ``genai_config.json``, so the same folder also loads in onnxruntime-genai.

The graph (see :mod:`quickdraft.ort_backend.static` for how it is run): inputs
``input_ids`` [B, S] int64, ``attention_mask`` [B, T] int64 and ``past_key_values.{i}.key``
/ ``.value`` [B, kv_heads, P, head_dim]; outputs ``logits`` [B, S, V] and
``present.{i}.key`` / ``.value``. GroupQueryAttention reads ``seqlens_k = sum(mask) - 1``
and ``total_sequence_length = T`` and applies the rotary embedding inside, so one buffer of
[1, kv_heads, max_length, head_dim] per cache tensor can be both past and present.

The builder makes GroupQueryAttention only for fp32 on the CPU execution provider and for
fp16 / bf16 on CUDA, so ``dtype`` and ``device`` go together: fp32 + cpu or fp16 + cuda.

The builder of onnxruntime-genai 0.18 is written against transformers 5, while the export
extra pins transformers 4.57 for optimum-onnx. It runs in a child process
(``python -m quickdraft.export.static --builder ...``) that first adapts transformers 4.x
(:func:`_patch_transformers`: placeholders for vision classes the builder imports but never
uses for a text model, and the transformers-5 ``rope_parameters`` view of the config);
under transformers 5 nothing is patched.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from quickdraft.export.checks import ExportError, SourceInfo, UnsupportedModelError
from quickdraft.export.manifest import MANIFEST_NAME, ModelManifest, load_manifest

__all__ = [
    "STATIC_ARCHITECTURES",
    "TESTED_ARCHITECTURES",
    "STATIC_DTYPES",
    "builder_problem",
    "run_builder",
    "export_static_model",
    "export_static_pair",
    "validate_static",
]

# model_type -> covered by the static path. The builder supports these with the same
# GroupQueryAttention interface (fused rotary, no position_ids); llama and qwen2 are tested
# in CI, the others share their builder code path (Mistral and Qwen3 are Llama-like
# decoders in the builder). Anything else falls back to the generic optimum export.
STATIC_ARCHITECTURES = ("llama", "qwen2", "mistral", "qwen3")
TESTED_ARCHITECTURES = ("llama", "qwen2")
# dtype -> the execution provider the builder must target for GroupQueryAttention
STATIC_DTYPES = {"fp32": "cpu", "fp16": "cuda"}
MODEL_FILE = "model.onnx"
BUILDER_TIMEOUT_S = 3600


def builder_problem() -> str | None:
    """Why the model builder cannot run here (None when it can)."""
    missing = [name for name in ("onnxruntime_genai", "onnx_ir", "torch", "transformers")
               if importlib.util.find_spec(name) is None]
    if missing:
        return (
            f"the static export needs onnxruntime-genai's model builder; missing "
            f"{', '.join(missing)} (pip install onnxruntime-genai onnx-ir, or "
            "onnxruntime-genai-cuda on a CUDA machine)"
        )
    return None


def _check_options(dtype: str, device: str) -> None:
    if dtype not in STATIC_DTYPES:
        raise ValueError(
            f"static export supports dtype {' or '.join(STATIC_DTYPES)}, not {dtype!r} "
            "(bf16 logits cannot be read by NumPy; use fp16 on CUDA)"
        )
    want = STATIC_DTYPES[dtype]
    if device != want:
        raise ValueError(
            f"a static {dtype} graph runs on {want}, not {device}: the model builder uses "
            "GroupQueryAttention (the shared past/present cache) only for fp32 on the CPU "
            "and fp16/bf16 on CUDA; use --dtype fp32 --device cpu or --dtype fp16 --device cuda"
        )


def run_builder(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str,
    device: str,
    cache_dir: str | os.PathLike,
    local: bool = True,
    extra_options: dict[str, str] | None = None,
    timeout: float = BUILDER_TIMEOUT_S,
) -> str:
    """Run onnxruntime-genai's model builder in a child process; return its output.

    ``source`` is a local Hugging Face folder (``local=True``) or a hub id. Raises
    ExportError with the builder's last lines when it fails.
    """
    problem = builder_problem()
    if problem is not None:
        raise ExportError(problem)
    args = [sys.executable, "-m", "quickdraft.export.static", "--builder",
            "-i" if local else "-m", os.fspath(source), "-o", os.fspath(out_dir),
            "-p", dtype, "-e", STATIC_DTYPES[dtype], "-c", os.fspath(cache_dir)]
    if extra_options:
        args += ["--extra_options", *[f"{k}={v}" for k, v in extra_options.items()]]
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise ExportError(f"{source}: the model builder ran past {timeout:.0f} s") from e
    output = (done.stdout or "") + (done.stderr or "")
    if done.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-8:])
        raise ExportError(
            f"{source}: onnxruntime-genai's model builder failed ({dtype}, "
            f"{STATIC_DTYPES[dtype]}):\n{tail}"
        )
    return output


# -- manifest ------------------------------------------------------------------------------


def _graph_facts(path: Path) -> tuple[list[str], list[str], dict, dict]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    ins = [v for v in graph.input if v.name not in inits]

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    in_types = {v.name: (v.type.tensor_type.elem_type, dims(v)) for v in ins}
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return [v.name for v in ins], [v.name for v in graph.output], in_types, ops


def static_manifest(folder: Path, config, dtype: str, max_length: int) -> ModelManifest:
    """Describe the builder's graph in ``folder``; refuse one that is not the static kind."""
    from quickdraft.export.api import _int_or_first, versions

    arch = config.model_type
    genai = json.loads((folder / "genai_config.json").read_text())
    dec = genai["model"]["decoder"]
    layers = int(dec["num_hidden_layers"])
    in_names, out_names, in_types, ops = _graph_facts(folder / MODEL_FILE)
    templates = {
        "past_key_template": "past_key_values.{i}.key",
        "past_value_template": "past_key_values.{i}.value",
        "present_key_template": "present.{i}.key",
        "present_value_template": "present.{i}.value",
    }
    past = [templates[t].format(i=i) for i in range(layers)
            for t in ("past_key_template", "past_value_template")]
    present = [templates[t].format(i=i) for i in range(layers)
               for t in ("present_key_template", "present_value_template")]
    if set(in_names) != {"input_ids", "attention_mask", *past}:
        raise UnsupportedModelError(
            f"{arch}: the builder's graph takes {in_names}, not input_ids, attention_mask and "
            "the past keys and values; the static path cannot run it"
        )
    if not {"logits", *present} <= set(out_names):
        raise UnsupportedModelError(f"{arch}: the builder's graph outputs {out_names}")
    if ops.get("GroupQueryAttention", 0) != layers:
        raise UnsupportedModelError(
            f"{arch}: the builder did not use GroupQueryAttention in every layer "
            f"({ops.get('GroupQueryAttention', 0)} of {layers}); no shared static cache"
        )
    elem = {1: "fp32", 10: "fp16", 16: "bf16"}.get(in_types[past[0]][0])
    if elem != dtype:
        raise UnsupportedModelError(f"{arch}: asked for {dtype}, the graph's cache is {elem}")
    eos = getattr(config, "eos_token_id", None)
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    found = versions()
    for name in ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnx-ir"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return ModelManifest(
        architecture=arch,
        num_layers=layers,
        num_attention_heads=int(dec["num_attention_heads"]),
        num_kv_heads=int(dec["num_key_value_heads"]),
        head_dim=int(dec["head_size"]),
        hidden_size=int(dec["hidden_size"]),
        vocab_size=int(genai["model"]["vocab_size"]),
        max_length=int(max_length),
        dtype=dtype,
        kv_layout="bnsh",
        kv_cache="static",
        model_file=MODEL_FILE,
        input_names=in_names,
        output_names=out_names,
        has_position_ids=False,
        has_attention_mask=True,
        bos_token_id=_int_or_first(getattr(config, "bos_token_id", None)),
        eos_token_id=eos_ids[0] if eos_ids else None,
        eos_token_ids=eos_ids,
        external_data=sorted(p.name for p in folder.iterdir()
                             if p.name.startswith(MODEL_FILE) and p.name != MODEL_FILE),
        versions=found,
        **templates,
    )


def _save(manifest: ModelManifest, folder: Path, context_length: int) -> None:
    data = asdict(manifest)
    # extra facts (load_manifest ignores keys it does not know)
    data["static"] = {
        "builder": "onnxruntime-genai model builder",
        "attention": "GroupQueryAttention, shared past/present buffer",
        "max_cache_length": manifest.max_length,
        "max_position_embeddings": context_length,
        "seqlens_k": "sum(attention_mask) - 1",
        "total_sequence_length": "attention_mask.shape[1]",
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# -- validation ----------------------------------------------------------------------------


def validate_static(folder: Path, manifest: ModelManifest, src, *, device: str = "cpu",
                    steps: int = 24) -> dict:
    """The generic checks against PyTorch (:func:`quickdraft.export.validate.validate_export`,
    growing caches) and the static path itself: the prompt fed in chunks into the shared
    buffers, then a rollback and the same tokens again, against PyTorch's logits."""
    import numpy as np
    from transformers import AutoTokenizer

    from quickdraft.export.validate import (
        PROMPTS,
        TOLERANCES,
        ExportValidationError,
        _torch_greedy,
        _torch_model,
        validate_export,
    )
    from quickdraft.ort_backend.device import Device
    from quickdraft.ort_backend.static import StaticOrtModel

    result = validate_export(folder, manifest, src, device=device, steps=steps)
    atol, rtol = TOLERANCES[manifest.dtype]
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    torch_model = _torch_model(src, manifest.dtype, device)
    model = StaticOrtModel(folder, Device(device), max_length=min(manifest.max_length, 128),
                           graph_steps=(1,))
    worst = worst_ratio = 0.0
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [0]
        ids = ids[: model.max_length // 2]
        full, _, _ = _torch_greedy(torch_model, ids, 1, device)
        tol = atol + rtol * float(np.abs(full).max())
        state = model.new_state()
        cut = [0, max(1, len(ids) // 2), min(len(ids), len(ids) // 2 + 1), len(ids)]
        rows = [state.append(ids[a:b]) for a, b in zip(cut, cut[1:]) if b > a]
        chunked = np.concatenate(rows).astype(np.float64)
        back = max(1, len(ids) // 3)
        state.append([0, 1, 2][: model.max_length - len(ids)])  # junk past the rollback point
        state.rewind(back)
        again = state.append(ids[back:]).astype(np.float64)
        diff = max(float(np.abs(chunked - full).max()), float(np.abs(again - full[back:]).max()))
        worst = max(worst, diff)
        worst_ratio = max(worst_ratio, diff / tol)
    result["static_max_abs_diff"] = worst
    result["static_diff_over_tolerance"] = worst_ratio
    if worst_ratio > 1.0:
        raise ExportValidationError(
            f"the static-cache path differs from PyTorch by {worst:.3g} (over the {manifest.dtype} "
            f"tolerance by {worst_ratio:.2f}x)"
        )
    return result


# -- export --------------------------------------------------------------------------------


def _check_source(source) -> SourceInfo:
    from quickdraft.export.checks import check_model

    info = check_model(source)
    if info.model_type not in STATIC_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{info.source}: architecture {info.model_type!r} is not covered by the static "
            f"path ({', '.join(STATIC_ARCHITECTURES)}); export it with the default dynamic "
            "cache (kv_cache dynamic, optimum-onnx)"
        )
    return info


def _context_length(config) -> int:
    return int(getattr(config, "max_position_embeddings", 0) or 0)


def _export_into(info: SourceInfo, folder: Path, *, dtype: str, device: str,
                 max_length: int | None, validate: bool, steps: int, progress,
                 label: str) -> ModelManifest:
    from quickdraft.export.api import _emit, _ensure_tokenizer

    context = _context_length(info.config)
    length = context if max_length is None else int(max_length)
    if not 1 <= length <= context:
        raise ValueError(
            f"{info.source}: max_length must be in [1, {context}] (the model's "
            f"max_position_embeddings: the rotary tables end there), got {max_length}"
        )
    _emit(progress, f"{label}: building a static {dtype} graph of {info.source} "
                    f"({info.model_type}) with onnxruntime-genai's model builder")
    t0 = time.perf_counter()
    cache = Path(tempfile.mkdtemp(prefix="quickdraft-builder-"))
    try:
        run_builder(info.folder if info.is_local else info.source, folder, dtype=dtype,
                    device=device, cache_dir=cache, local=info.is_local)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if not (folder / MODEL_FILE).is_file() or not (folder / "genai_config.json").is_file():
        raise ExportError(f"{info.source}: the model builder wrote no {MODEL_FILE}")
    _emit(progress, f"{label}: graph written in {time.perf_counter() - t0:.1f} s")
    _ensure_tokenizer(info, folder)
    manifest = static_manifest(folder, info.config, dtype, length)
    manifest.source = info.source
    _save(manifest, folder, context)  # validation loads the folder
    if validate:
        _emit(progress, f"{label}: validating against PyTorch ({steps} greedy steps)")
        from quickdraft.export.api import _quiet

        src = str(info.folder) if info.is_local else info.source
        with _quiet():
            manifest.validation = validate_static(folder, manifest, src, device=device,
                                                  steps=steps)
        v = manifest.validation
        _emit(progress, f"{label}: max |logit diff| {v['max_abs_diff']:.2e}, static path "
                        f"{v['static_max_abs_diff']:.2e}, greedy equal "
                        f"{min(v['greedy_equal_steps'])}/{steps} steps")
    _save(manifest, folder, context)
    return manifest


def export_static_model(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "fp32",
    device: str = "cpu",
    max_length: int | None = None,
    *,
    validate: bool = True,
    steps: int = 24,
    overwrite: bool = False,
    progress=None,
    role: str = "model",
):
    """Export one causal LM as a static-cache graph to ``out_dir``; return a ModelReport.

    ``max_length`` is the cache length written to the manifest (default: the model's
    max_position_embeddings). Written to a temporary folder and renamed into place.
    """
    from quickdraft.export.api import (
        ModelReport,
        _check_destination,
        _move_into_place,
        _new_temp,
        _quiet,
    )

    start = time.perf_counter()
    _check_options(dtype, device)
    out = Path(out_dir).expanduser().resolve()
    _check_destination(out, overwrite)
    with _quiet():
        info = _check_source(hf_dir)
    temp = _new_temp(out)
    try:
        _export_into(info, temp, dtype=dtype, device=device, max_length=max_length,
                     validate=validate, steps=steps, progress=progress, label=role)
        _move_into_place(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return ModelReport(role, info.source, out, load_manifest(out),
                       round(time.perf_counter() - start, 3))


def export_static_pair(
    target: str | os.PathLike,
    draft: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "fp32",
    device: str = "cpu",
    max_length: int | None = None,
    *,
    validate: bool = True,
    steps: int = 24,
    overwrite: bool = False,
    progress=None,
):
    """Export a target and a draft as static-cache graphs to ``out/target`` and
    ``out/draft``; return an ExportReport. Both share one ``max_length`` (default: the
    smaller max_position_embeddings). The pair is checked first (one vocabulary), and
    ``out`` appears whole or not at all."""
    from quickdraft.export.api import (
        ExportReport,
        ModelReport,
        _check_destination,
        _emit,
        _move_into_place,
        _new_temp,
        _quiet,
    )
    from quickdraft.export.checks import check_pair

    start = time.perf_counter()
    _check_options(dtype, device)
    out_path = Path(out).expanduser().resolve()
    _check_destination(out_path, overwrite)
    _emit(progress, "checking the pair")
    with _quiet():
        t_info, d_info = check_pair(target, draft)
        for info in (t_info, d_info):
            _check_source(info.source)
    if max_length is None:
        max_length = min(_context_length(t_info.config), _context_length(d_info.config))
    temp = _new_temp(out_path)
    reports = {}
    try:
        for role, info in (("target", t_info), ("draft", d_info)):
            t0 = time.perf_counter()
            folder = temp / role
            folder.mkdir()
            manifest = _export_into(info, folder, dtype=dtype, device=device,
                                    max_length=max_length, validate=validate, steps=steps,
                                    progress=progress, label=role)
            reports[role] = ModelReport(role, info.source, out_path / role, manifest,
                                        round(time.perf_counter() - t0, 3))
        _move_into_place(temp, out_path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _emit(progress, f"done: {out_path}")
    return ExportReport(out_path, reports["target"], reports["draft"],
                        round(time.perf_counter() - start, 3))


# -- the child process that runs the builder -----------------------------------------------


def _patch_transformers() -> list[str]:
    """Adapt transformers 4.x to what the builder of onnxruntime-genai 0.18 expects."""
    import transformers

    patched = []
    if int(transformers.__version__.split(".")[0]) >= 5:
        return patched
    auto_config = sys.modules["transformers"].AutoConfig
    original = auto_config.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        result = original(cls, *args, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        if not hasattr(config, "rope_parameters"):  # transformers 5 layout of the rope settings
            scaling = getattr(config, "rope_scaling", None)
            params = dict(scaling) if scaling else {}
            params.setdefault("rope_type", params.get("type", "default"))
            params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
            config.rope_parameters = params
            if hasattr(config, "rope_scaling"):
                del config.rope_scaling  # the builder would copy it over rope_parameters
        return result

    auto_config.from_pretrained = classmethod(from_pretrained)
    patched.append("AutoConfig.from_pretrained: rope_parameters")
    return patched


def _import_builder():
    """Import the builder's modules, giving transformers 4.x placeholders for the vision
    classes they import by name (never used for the text decoders exported here)."""
    import onnxruntime_genai.models as models  # puts the builder's folder on sys.path

    folder = os.path.dirname(models.__file__)
    if folder not in sys.path:
        sys.path.append(folder)
    for _ in range(32):
        try:
            import builders  # noqa: F401
            return folder
        except ImportError as e:
            name = getattr(e, "name", None)
            text = str(e)
            if "from 'transformers'" not in text or not text.startswith("cannot import name"):
                raise
            missing = text.split("'")[1]
            module = sys.modules["transformers"]
            setattr(module, missing, type(missing, (), {"__module__": "quickdraft.placeholder"}))
            del name
    raise ImportError("could not import the model builder")


def _builder_main(argv: list[str]) -> None:
    import runpy

    _patch_transformers()
    folder = _import_builder()
    sys.argv = ["builder.py", *argv]
    runpy.run_path(os.path.join(folder, "builder.py"), run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--builder":
        _builder_main(sys.argv[2:])
    else:
        print("usage: python -m quickdraft.export.static --builder BUILDER_ARGS...\n"
              "(use quickdraft.export.static.export_static_pair from Python)", file=sys.stderr)
        sys.exit(2)
