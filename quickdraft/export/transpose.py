"""MatMul weights stored transposed: each ``MatMul(x, W)`` over a 2-D weight initializer
W [K, N] becomes ``com.microsoft.FusedMatMul(x, W^T, transB=1)`` over the weight stored as
[N, K], the same product, so a decode step's matrix-vector products read each output's
weights as one contiguous row. The weights are rewritten in place in the graph's external
data file (the same bytes, reordered; no second copy on disk). Why, and what it measured:
docs/explanation/fast-path.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["FUSED_MATMUL", "transpose_matmul_weights"]

FUSED_MATMUL = ("com.microsoft", "FusedMatMul")
# an element's size in bytes -> a NumPy type of that size (a transpose only moves elements)
_BY_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _transposable(graph) -> dict:
    """Initializer name -> its MatMul nodes, for each 2-D initializer whose every use is as
    the second input of a MatMul (a weight also read elsewhere, a tied embedding, stays)."""
    inits = {t.name: t for t in graph.initializer if len(t.dims) == 2}
    uses: dict[str, list] = {}
    shared = {o.name for o in graph.output} | {i.name for i in graph.input}
    shared |= _subgraph_names(graph.node)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and k == 1:
                uses.setdefault(name, []).append(node)
            else:
                shared.add(name)
    return {name: nodes for name, nodes in uses.items() if name not in shared}


def _subgraph_names(nodes) -> set[str]:
    """Every name that the subgraphs of ``nodes`` (If, Loop, Scan bodies) read."""
    names: set[str] = set()
    for node in nodes:
        for attr in node.attribute:
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= {i for n in g.node for i in n.input} | _subgraph_names(g.node)
    return names


def _transpose_bytes(tensor, folder: Path) -> None:
    """Reorder ``tensor``'s data [K, N] -> [N, K] where it lies (external file or inline)."""
    from onnx import TensorProto, helper

    size = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    elem = np.dtype(_BY_SIZE[size])
    k, n = (int(d) for d in tensor.dims)
    if tensor.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        path = folder / info["location"]
        offset = int(info.get("offset", 0))
        mm = np.memmap(path, dtype=elem, mode="r+", offset=offset, shape=(k * n,))
        mm[:] = np.ascontiguousarray(mm.reshape(k, n).T).ravel()  # [K, N] -> [N, K]
        mm.flush()
        del mm
    elif tensor.raw_data:
        w = np.frombuffer(tensor.raw_data, dtype=elem).reshape(k, n)  # [K, N]
        tensor.raw_data = np.ascontiguousarray(w.T).tobytes()  # [N, K]
    else:  # typed fields (float_data, ...): the helper reads and writes them
        from onnx import numpy_helper

        w = numpy_helper.to_array(tensor)  # [K, N]
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), tensor.name))
    del tensor.dims[:]
    tensor.dims.extend([n, k])


def transpose_matmul_weights(model_path: str | os.PathLike) -> int:
    """Store every MatMul weight of the ONNX file at ``model_path`` transposed, in place
    (the graph and its external data); return how many weights were rewritten."""
    import onnx
    from onnx import helper

    path = Path(model_path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    targets = _transposable(graph)
    domain, op = FUSED_MATMUL
    for tensor in graph.initializer:
        if tensor.name not in targets:
            continue
        _transpose_bytes(tensor, path.parent)
        for node in targets[tensor.name]:
            node.op_type, node.domain = op, domain
            node.attribute.append(helper.make_attribute("transB", 1))
    if targets and not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))  # the graph only: its weights stay in their files
    tmp.replace(path)
    return len(targets)
