"""One upload per call: an UploadBlock's arrays are read by a session at their addresses,
and each fixed-length call of the fast path (a chain, a verify step, a lanes step or
chain, the verification graph) copies its inputs with one upload. With every block's
bound buffer kept apart from its host arrays (as on a device), decoding gives the same
tokens as with the CPU's shared memory: a missing or late upload, or a wrong offset,
would change them."""

from __future__ import annotations

import numpy as np
import pytest

for _name in ("onnxruntime", "onnx", "tokenizers"):
    pytest.importorskip(_name)

import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from quickdraft.ort_backend import DecodeConfig, load_pair  # noqa: E402
from quickdraft.ort_backend.cli import default_model_dir  # noqa: E402
from quickdraft.ort_backend.device import Device  # noqa: E402
from quickdraft.ort_backend.static import StaticOrtModel  # noqa: E402
from quickdraft.ort_backend.uploads import ALIGN, UploadBlock  # noqa: E402
from quickdraft.ort_backend.verify_graph import DeviceVerifier  # noqa: E402
from quickdraft.sampling import SamplingConfig  # noqa: E402


def _identity_session():
    """y_i = x_i for an int64 [2, 3], a float32 [4] and a float16 [2] input."""
    types = [("a", TensorProto.INT64, [2, 3]), ("b", TensorProto.FLOAT, [4]),
             ("c", TensorProto.FLOAT16, [2])]
    graph = helper.make_graph(
        [helper.make_node("Identity", [n], [f"y{n}"]) for n, _, _ in types], "identity",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in types],
        [helper.make_tensor_value_info(f"y{n}", t, s) for n, t, s in types])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_a_session_reads_each_array_of_a_block_at_its_address():
    block = UploadBlock({"ids": ((2, 3), np.int64), "u": ((5,), np.float32),
                         "h": ((3,), np.float16)}, Device("cpu"))
    starts = sorted(block.address(n) - block.address("ids") for n in ("ids", "u", "h"))
    assert starts == [0, ALIGN, 2 * ALIGN] and block.nbytes == 3 * ALIGN
    session = _identity_session()
    io = session.io_binding()
    block.bind(io, "a", "ids")
    block.bind(io, "b", "u", (4,), index=1)  # elements 1..4 of u
    block.bind(io, "c", "h", (2,))
    for name in ("ya", "yb", "yc"):
        io.bind_output(name, "cpu")
    for round_ in range(2):  # later writes are read without binding again
        block["ids"][:] = np.arange(6).reshape(2, 3) + 10 * round_
        block["u"][:] = np.linspace(0, 1, 5) + round_
        block["h"][:] = [0.5 + round_, -2, 7]
        block.upload()
        session.run_with_iobinding(io)
        a, b, c = (v.numpy() for v in io.get_outputs())
        np.testing.assert_array_equal(a, block["ids"])
        np.testing.assert_array_equal(b, block["u"][1:])
        np.testing.assert_array_equal(c, block["h"][:2])


def test_a_block_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="at least one array"):
        UploadBlock({}, Device("cpu"))
    block = UploadBlock({"x": ((4,), np.int64)}, Device("cpu"))
    with pytest.raises(IndexError, match="x has 4 elements, not 5"):
        block.address("x", 4)
    io = _identity_session().io_binding()
    with pytest.raises(IndexError, match="3 elements from 2 overrun x's 4"):
        block.bind(io, "b", "x", (3,), index=2)


@pytest.fixture(scope="module")
def pair():
    return load_pair(default_model_dir(), device="cpu", max_gamma=4)


@pytest.fixture
def uploads(monkeypatch):
    """Counts of UploadBlock.upload and OrtValue.update_inplace calls (a dict)."""
    counts = {"block": 0, "single": 0}
    block_upload, single = UploadBlock.upload, ort.OrtValue.update_inplace

    def counted_block(self):
        counts["block"] += 1
        return block_upload(self)

    def counted_single(self, data):
        counts["single"] += 1
        return single(self, data)

    monkeypatch.setattr(UploadBlock, "upload", counted_block)
    monkeypatch.setattr(ort.OrtValue, "update_inplace", counted_single)
    return counts


def _one_upload(counts, call):
    counts["block"] = counts["single"] = 0
    out = call()
    assert (counts["block"], counts["single"]) == (1, 0)
    return out


def test_chains_and_verify_steps_upload_once(pair, uploads):
    ids = list(pair.tokenizer.encode("Once upon a time").ids)
    draft = pair.draft.new_state()
    draft.append(ids[:-1])
    _one_upload(uploads, lambda: draft.launch_chain(ids[-1], 4).wait())
    sampling = SamplingConfig(1.0)
    assert draft.prepare_sampled_chain(sampling)
    draft.rewind(len(ids) - 1)
    u = np.random.default_rng(0).random(4)
    _one_upload(uploads, lambda: draft.launch_sampled_chain(ids[-1], u, sampling).wait())
    target = pair.target.new_state()
    target.append(ids)
    _one_upload(uploads, lambda: target.append_greedy([3, 4, 5, 6, 7]))  # gamma + 1
    draft.close()
    target.close()


def test_the_verification_graph_uploads_once(pair, uploads):
    V = pair.target.vocab_size
    verifier = DeviceVerifier(4, V, SamplingConfig(1.0))
    q = np.full((4, V), 1.0 / V, np.float32)  # [gamma, V]
    logits = np.zeros((5, V), np.float32)  # [gamma + 1, V]
    verifier.run(logits, q, [1, 2, 3, 4], np.full(4, 0.5), 0.5)  # binds the rows
    uploads["block"] = uploads["single"] = 0
    n, token, _ = verifier.run(logits, q, [1, 2, 3, 4], np.full(4, 0.5), 0.5)
    # the small inputs in one block; q rows from the host have a buffer of their own
    assert uploads["block"] == 1 and 0 <= n <= 4 and 0 <= token < V


def test_lanes_steps_and_chains_upload_once(uploads):
    root = default_model_dir()
    lanes = StaticOrtModel(root / "draft", Device("cpu"), graph_steps=(1, 3),
                           chain_length=3, lanes=2)
    states = [lanes.new_state() for _ in range(2)]
    for s, prompt in zip(states, ([5, 6, 7], [8, 9])):
        s.append(prompt)
    scores = _one_upload(uploads, lambda: lanes.score_lanes(states, [[1, 2, 3], [4]],
                                                            [True, True]))
    assert [len(s.greedy) for s in scores] == [3, 1]
    chains = _one_upload(uploads, lambda: lanes.chain_lanes(states, [1, 2], [3, 2]))
    assert [len(c) for c in chains] == [3, 2]
    for s in states:
        s.close()


class _ApartBlock(UploadBlock):
    """A block whose bound buffer is a CPU buffer of its own, written only by upload()."""

    def __init__(self, fields, device):
        super().__init__(fields, device)
        self._value = ort.OrtValue.ortvalue_from_shape_and_type((self.nbytes,), np.uint8,
                                                                "cpu", 0)
        self.on_device = True


def _decodings(pair) -> list[list[int]]:
    prompts = ["Once upon a time", "The little dog"]
    out = []
    for mode in ({}, {"pipelined": True}):
        for sampling in (SamplingConfig(0.0), SamplingConfig(1.0)):
            config = DecodeConfig(max_new_tokens=24, sampling=sampling, seed=3)
            with pair.generator(config, gamma=4, **mode) as gen:
                out += [gen.generate(p).tokens for p in prompts]
    return out


def test_blocks_apart_from_their_host_arrays_decode_the_same(monkeypatch, pair):
    import quickdraft.ort_backend.uploads as uploads
    import quickdraft.ort_backend.verify_graph as verify_graph

    want = _decodings(pair)
    V = pair.target.vocab_size
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, V)).astype(np.float32)  # [gamma + 1, V]
    q = rng.dirichlet(np.ones(V), 4).astype(np.float32)  # [gamma, V]
    args = (logits, q, [1, 2, 3, 4], rng.random(4), 0.3)
    shared = DeviceVerifier(4, V, SamplingConfig(1.0)).run(*args)
    monkeypatch.setattr(uploads, "UploadBlock", _ApartBlock)
    monkeypatch.setattr(verify_graph, "UploadBlock", _ApartBlock)
    apart = load_pair(default_model_dir(), device="cpu", max_gamma=4)
    assert _decodings(apart) == want
    kept_apart = DeviceVerifier(4, V, SamplingConfig(1.0)).run(*args)
    assert shared[:2] == kept_apart[:2]
    np.testing.assert_array_equal(shared[2], kept_apart[2])
