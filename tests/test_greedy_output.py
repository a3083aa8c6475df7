"""The greedy_tokens output (quickdraft.export.greedy) picks what quickdraft.sampling's
greedy_tokens picks, and marks every row holding a NaN or an infinity with the id V."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from quickdraft.export.greedy import GREEDY_OUTPUT, add_greedy_output, greedy_nodes  # noqa: E402
from quickdraft.sampling import greedy_tokens  # noqa: E402

VOCAB = 9
_SESSIONS: dict = {}


def identity_graph(elem_type):
    """An onnx.GraphProto: input x -> output logits [B, S, V] unchanged."""
    from onnx import helper

    return helper.make_graph(
        [helper.make_node("Identity", ["x"], ["logits"])], "logits_only",
        [helper.make_tensor_value_info("x", elem_type, ["batch", "seq", VOCAB])],
        [helper.make_tensor_value_info("logits", elem_type, ["batch", "seq", VOCAB])])


def session(np_type):
    """A CPU session of the identity graph with the greedy output added (one per dtype)."""
    from onnx import helper

    if np_type not in _SESSIONS:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(np_type))
        graph = greedy_nodes(identity_graph(elem), VOCAB)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                  ir_version=8)
        onnx.checker.check_model(model)
        _SESSIONS[np_type] = ort.InferenceSession(model.SerializeToString(),
                                                  providers=["CPUExecutionProvider"])
    return _SESSIONS[np_type]


@st.composite
def logit_rows(draw):
    """[1, S, V] logits with ties, huge values and (sometimes) NaN / +-inf entries."""
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    seq = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    z = rng.normal(scale=draw(st.sampled_from([1.0, 1e3, 3e4])), size=(1, seq, VOCAB))
    if draw(st.booleans()):  # ties: a few distinct values only
        z = np.round(z / max(1.0, np.abs(z).max()) * 2)
    with np.errstate(over="ignore"):  # beyond float16's range: inf, a non-finite row
        z = z.astype(dtype)
    for _ in range(draw(st.integers(0, 3))):
        s, v = int(rng.integers(seq)), int(rng.integers(VOCAB))
        z[0, s, v] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return z


@settings(max_examples=300, deadline=None)
@given(z=logit_rows())
def test_greedy_output_is_the_argmax_or_v_for_a_non_finite_row(z):
    logits, greedy = session(z.dtype.type).run(["logits", GREEDY_OUTPUT], {"x": z})
    assert greedy.dtype == np.int64 and greedy.shape == z.shape[:2]
    for row, got in zip(z[0], greedy[0]):
        if np.isfinite(row).all():
            assert got == greedy_tokens(row)  # the first maximum, as on the host
        else:
            assert got == VOCAB  # refused by the runtime (StaticDecodeState.append_greedy)
    np.testing.assert_array_equal(logits, z)  # the logits output is untouched


def test_add_greedy_output_in_place(tmp_path):
    from onnx import TensorProto, helper

    model = helper.make_model(identity_graph(TensorProto.FLOAT),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    add_greedy_output(path, VOCAB)
    names = [o.name for o in onnx.load(str(path)).graph.output]
    assert names == ["logits", GREEDY_OUTPUT]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="already has"):
        add_greedy_output(path, VOCAB)
    graph = identity_graph(TensorProto.FLOAT)
    graph.output[0].name = "scores"
    with pytest.raises(ValueError, match="no 'logits' output"):
        greedy_nodes(graph, VOCAB)
