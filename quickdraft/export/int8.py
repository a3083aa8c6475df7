"""8-bit weight storage for exported graphs that compute in fp32.

A weight matrix is stored as int8 with one fp32 scale per output channel and read through
ONNX's ``DequantizeLinear``; ONNX Runtime folds that back into the fp32 matrix when the
session is created (``session.disable_quant_qdq``, set by the backend for manifests with
``weights: "int8"``), so the graph computes exactly what the fp32 graph of the same values
computes, at a quarter of the file size. (Left to its own handling of QDQ graphs, ONNX
Runtime 1.32 runs the bundled target 1.85x slower per 1-token step on a 2-core CPU:
``benchmarks/int8_cpu_steps.py``.)

Storage is exact only for weights that already lie on the int8 grid: :func:`snap_to_int8`
puts a PyTorch model's weights there before the export (the model the export validates
against is then the stored one), and :func:`store_int8` refuses a graph whose weights are
not on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from quickdraft.manifest import INT8_FOLD_OPTION, load_manifest

__all__ = ["INT8_FOLD_OPTION", "snap_to_int8", "int8_grid", "store_int8", "snapped_copy"]

MIN_ELEMENTS = 4096  # smaller matrices are stored in fp32
# consumers of a stored matrix: (op_type, input index) -> the channel axis of its scales
_CONSUMERS = {("MatMul", 1): 1, ("Transpose", 0): 1, ("Gather", 0): 0}
# |q * scale - w| / scale (in grid steps) at most this: w is on the grid, up to the
# rounding of an fp32 product q * scale (relative 6e-8 of at most 127 steps)
_GRID_STEPS = 1.3e-4


def int8_grid(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8: (q int8 like ``w``, scale fp32 [w.shape[axis]]) with
    ``q * scale`` the closest grid value to ``w``; channels of zeros get scale 1."""
    w = np.asarray(w, dtype=np.float32)
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    peak = np.abs(w).max(axis=reduce)  # [channels]
    scale = np.where(peak > 0, peak / np.float32(127), np.float32(1)).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def snap_to_int8(model) -> int:
    """Round every Linear and Embedding weight of a PyTorch ``model`` in place to the int8
    grid of its output channels (rows); returns how many matrices changed. A tied
    embedding and LM head are one matrix and are snapped once."""
    import torch

    seen, count = set(), 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                continue
            w = module.weight
            if id(w) in seen:  # small ones too: an exporter may fuse them into a large one
                continue
            seen.add(id(w))
            q, scale = int8_grid(w.detach().float().cpu().numpy(), axis=0)
            snapped = q.astype(np.float32) * scale[:, None]
            w.copy_(torch.from_numpy(snapped).to(w.dtype))
            count += 1
    return count


def _channel_axis(uses: list[tuple[str, int]]) -> int | None:
    """The channel axis of a matrix's scales from its consumers, None if they disagree or
    one is not a MatMul weight, a Transpose (tied embedding) or a Gather table."""
    axes = {_CONSUMERS.get(u) for u in uses}
    if not uses or None in axes or len(axes) != 1:
        return None
    return axes.pop()


def store_int8(folder: str | os.PathLike) -> dict:
    """Rewrite an exported fp32 model folder's graph to store its weight matrices as int8
    (``DequantizeLinear`` per output channel), as one ``model.onnx`` without external
    data, and mark the manifest ``weights: "int8"``. Every stored matrix must already lie
    on its int8 grid (export a model passed through :func:`snap_to_int8`); otherwise
    nothing is written and ValueError names the matrix. Returns what was stored."""
    import onnx
    from onnx import helper, numpy_helper

    folder = Path(folder)
    manifest = load_manifest(folder)
    if manifest.dtype != "fp32" or manifest.weights:
        raise ValueError(
            f"{folder}: int8 storage needs an fp32 export with plain weights (this one is "
            f"{manifest.dtype}{', weights ' + manifest.weights if manifest.weights else ''});"
            " export it with --dtype fp32")
    path = folder / manifest.model_file
    model = onnx.load(str(path))  # with its external data
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                default=0)
    if opset < 13:
        raise ValueError(f"{folder}: per-channel DequantizeLinear needs opset 13 or later; "
                         f"this graph has {opset}: export it again with a newer opset")
    graph = model.graph
    uses: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((node.op_type, i))
    kept, nodes, stored, before, after = [], [], [], 0, 0
    for init in graph.initializer:
        w = numpy_helper.to_array(init)
        before += w.nbytes
        axis = _channel_axis(uses.get(init.name, []))
        if w.dtype != np.float32 or w.ndim != 2 or w.size < MIN_ELEMENTS or axis is None:
            kept.append(init)
            after += w.nbytes
            continue
        q, scale = int8_grid(w, axis)
        shape = [1, 1]
        shape[axis] = -1
        err = np.abs(q.astype(np.float32) * scale.reshape(shape) - w) / scale.reshape(shape)
        if err.max() > _GRID_STEPS:
            raise ValueError(
                f"{folder}: weight {init.name} is not on an int8 grid (off by up to "
                f"{err.max():.3g} steps); snap the source model's weights first "
                "(quickdraft.export.int8.snap_to_int8) and export it again")
        kept += [numpy_helper.from_array(q, f"{init.name}.int8"),
                 numpy_helper.from_array(scale, f"{init.name}.scale")]
        nodes.append(helper.make_node("DequantizeLinear",
                                      [f"{init.name}.int8", f"{init.name}.scale"],
                                      [init.name], name=f"{init.name}.dequantize", axis=axis))
        stored.append(init.name)
        after += q.nbytes + scale.nbytes
    if not stored:
        raise ValueError(f"{folder}: no weight matrix to store as int8")
    del graph.initializer[:]
    graph.initializer.extend(kept)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    tmp = path.with_suffix(".int8.tmp")
    onnx.save(model, str(tmp))
    for name in manifest.external_data:
        (folder / name).unlink(missing_ok=True)
    os.replace(tmp, path)
    manifest.weights = "int8"
    manifest.external_data = []
    manifest.save(folder)
    return {"matrices": len(stored), "bytes_before": before, "bytes_after": after}


def check_int8_source(source: str | os.PathLike) -> None:
    """Refuse a source int8 storage cannot read: a GGUF file."""
    if str(source).lower().endswith(".gguf"):
        raise ValueError(
            f"{source}: --dtype int8 reads Hugging Face folders; export the GGUF with --dtype "
            "fp32, or convert it to a folder first (transformers' from_pretrained(..., "
            "gguf_file=...) and save_pretrained)")


def snapped_copy(source: str | os.PathLike, dest: Path) -> Path:
    """A Hugging Face folder at ``dest``: ``source`` (a folder or hub id) in fp32 with its
    weights snapped to the int8 grid, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_int8_source(source)
    model = AutoModelForCausalLM.from_pretrained(source).float()
    snap_to_int8(model)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    return dest
