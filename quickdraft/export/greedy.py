"""A ``greedy_tokens`` output [B, S] int64 added to an exported decoder graph: the argmax of
each position's logits (the first on ties), or V for a row with a NaN or an infinity
(``ReduceSum(logits * 0)`` is NaN exactly then), so greedy decoding copies one int64 per
position instead of a row of logits. docs/explanation/fast-path.md explains its use.
"""

from __future__ import annotations

from pathlib import Path

from quickdraft.manifest import GREEDY_OUTPUT

__all__ = ["GREEDY_OUTPUT", "add_greedy_output", "greedy_nodes"]

_LOGITS = "logits"


def greedy_nodes(graph, vocab_size: int, logits: str = _LOGITS, prefix: str = "qd_greedy"):
    """Append the nodes, constants and output of ``greedy_tokens`` to ``graph`` (an
    ``onnx.GraphProto`` with output ``logits`` [B, S, V]); returns the graph."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    outputs = {o.name: o for o in graph.output}
    if logits not in outputs:
        raise ValueError(f"the graph has no {logits!r} output to take the argmax of")
    if GREEDY_OUTPUT in outputs:
        raise ValueError(f"the graph already has a {GREEDY_OUTPUT!r} output")
    elem = outputs[logits].type.tensor_type.elem_type
    np_type = helper.tensor_dtype_to_np_dtype(elem)
    zero, axes, vocab = f"{prefix}_zero", f"{prefix}_axes", f"{prefix}_vocab"
    graph.initializer.extend([
        numpy_helper.from_array(np.zeros((), dtype=np_type), zero),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), axes),
        numpy_helper.from_array(np.array(vocab_size, dtype=np.int64), vocab),
    ])
    t = {name: f"{prefix}_{name}" for name in ("argmax", "zeroed", "sum", "bad")}
    graph.node.extend([
        helper.make_node("ArgMax", [logits], [t["argmax"]], name=f"{prefix}_ArgMax",
                         axis=-1, keepdims=0, select_last_index=0),  # [B, S]
        helper.make_node("Mul", [logits, zero], [t["zeroed"]], name=f"{prefix}_Mul0"),
        helper.make_node("ReduceSum", [t["zeroed"], axes], [t["sum"]],
                         name=f"{prefix}_ReduceSum", keepdims=0),  # [B, S]: 0 or NaN
        helper.make_node("IsNaN", [t["sum"]], [t["bad"]], name=f"{prefix}_IsNaN"),
        helper.make_node("Where", [t["bad"], vocab, t["argmax"]], [GREEDY_OUTPUT],
                         name=f"{prefix}_Where"),  # [B, S]: V where the row is not finite
    ])
    dims = outputs[logits].type.tensor_type.shape.dim
    shape = ([d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
              for d in list(dims)[:2]] if len(dims) >= 2 else None)
    graph.output.append(helper.make_tensor_value_info(GREEDY_OUTPUT, TensorProto.INT64, shape))
    return graph


def add_greedy_output(model_path: str | Path, vocab_size: int) -> None:
    """Add ``greedy_tokens`` to the ONNX file at ``model_path`` in place. Weights in external
    data files stay where they are (only the graph is rewritten)."""
    import onnx

    path = Path(model_path)
    model = onnx.load(str(path), load_external_data=False)
    greedy_nodes(model.graph, vocab_size)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)
