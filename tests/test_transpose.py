"""transpose_matmul_weights: MatMul weights stored [N, K] under FusedMatMul(transB=1) give
the same outputs, in place, and weights read by anything else are left alone."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quickdraft.export.transpose import transpose_matmul_weights

K, N, V = 6, 5, 7


def build(tmp_path, dtype=np.float32):
    """y = (x @ W1) @ W2, W1 in the external data file and W2 inline; E [V, N] is read by a
    Gather and by a MatMul, so it must stay as it is."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(K, N)).astype(dtype)  # [K, N]
    w2 = rng.normal(size=(N, N)).astype(dtype)  # [N, N]
    e = rng.normal(size=(V, N)).astype(dtype)  # [V, N]: Gather rows, and a MatMul weight
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["y"]),
        helper.make_node("Gather", ["e", "ids"], ["g"]),  # [S, N]
        helper.make_node("Transpose", ["g"], ["gt"], perm=[1, 0]),  # [N, S]
        helper.make_node("MatMul", ["ex", "e"], ["z"]),  # [S, V] @ [V, N]
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", et, ["S", K]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["S"]),
         helper.make_tensor_value_info("ex", et, ["S", V])],
        [helper.make_tensor_value_info(n, et, None) for n in ("y", "gt", "z")],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(e, "e")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data",
              size_threshold=N * N * np.dtype(dtype).itemsize + 1)  # w1, e external; w2 inline
    return path


def run(path, feeds):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_transposed_weights_give_the_same_outputs_in_place(tmp_path, dtype):
    path = build(tmp_path, dtype)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.normal(size=(3, K)).astype(dtype), "ids": np.array([0, 6, 2]),
             "ex": rng.normal(size=(3, V)).astype(dtype)}
    before = run(path, feeds)
    size = (tmp_path / "model.onnx.data").stat().st_size
    assert transpose_matmul_weights(path) == 2  # w1 and w2; e is also a Gather's table
    model = onnx.load(str(path), load_external_data=False)
    ops = [(n.op_type, n.input[1]) for n in model.graph.node if "MatMul" in n.op_type]
    assert ops == [("FusedMatMul", "w1"), ("FusedMatMul", "w2"), ("MatMul", "e")]
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    assert dims == {"w1": [N, K], "w2": [N, N], "e": [V, N]}
    assert (tmp_path / "model.onnx.data").stat().st_size == size  # rewritten where it lay
    assert not list(tmp_path.glob("*.tmp"))
    after = run(path, feeds)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-3 if dtype == np.float16 else 1e-6,
                                   atol=1e-3 if dtype == np.float16 else 1e-6)
