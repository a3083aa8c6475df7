"""The cache slicing graph (``ort_backend.slicer``) and streaming detokenisation
(``ort_backend.text.StreamDecoder``), with tokenizers trained here on a few lines (no network)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
tokenizers = pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from tokenizers.decoders import DecodeStream  # noqa: E402

from quickdraft.ort_backend.device import Device  # noqa: E402
from quickdraft.ort_backend.slicer import CacheSlicer, slice_model_bytes  # noqa: E402
from quickdraft.ort_backend.text import StreamDecoder  # noqa: E402

# -- the cache slicer ---------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 4])
def test_slice_graph_is_one_slice_node_per_tensor(count):
    for elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        model = onnx.load_from_string(slice_model_bytes(count, elem))
        onnx.checker.check_model(model, full_check=True)
        g = model.graph
        assert [n.op_type for n in g.node] == ["Slice"] * count
        assert [list(n.input) for n in g.node] == [[f"x{j}", "starts", "ends", "axes"]
                                                   for j in range(count)]
        assert [i.name for i in g.input] == ["ends"] + [f"x{j}" for j in range(count)]
        assert [o.name for o in g.output] == [f"y{j}" for j in range(count)]
        assert {o.type.tensor_type.elem_type for o in g.output} == {elem}
        consts = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in g.initializer}
        assert consts == {"starts": [0], "axes": [2]}
        assert model.ir_version == 8 and [(o.domain, o.version) for o in model.opset_import] \
            == [("", 13)]


def test_slice_graph_needs_a_tensor():
    with pytest.raises(ValueError, match="at least one"):
        slice_model_bytes(0, onnx.TensorProto.FLOAT)


def test_importing_the_slicer_does_not_import_onnx():
    code = ("import sys, quickdraft.ort_backend.slicer as s; "
            "assert 'onnx' not in sys.modules; s.slice_model_bytes(1, 1); "
            "assert 'onnx' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cache_slicer_cuts_axis_2_on_the_device(dtype):
    elem = {np.float32: onnx.TensorProto.FLOAT, np.float16: onnx.TensorProto.FLOAT16}[dtype]
    slicer = CacheSlicer(4, elem, Device("cpu"))
    assert slicer.session.get_session_options().intra_op_num_threads == 1
    assert slicer.session.get_providers()[0] == "CPUExecutionProvider"
    rng = np.random.default_rng(0)
    xs = [rng.random((1, 3, 9, 8)).astype(dtype) for _ in range(4)]
    values = [ort.OrtValue.ortvalue_from_numpy(x) for x in xs]
    kept = []
    for length in (9, 5, 1, 0, 7):
        out = slicer(values, length)
        assert len(out) == 4
        for o, x in zip(out, xs):
            assert o.shape() == [1, 3, length, 8]
            np.testing.assert_array_equal(o.numpy(), x[:, :, :length])
        kept.append((length, out))
    for length, out in kept:  # every call's outputs are fresh tensors, never overwritten
        for o, x in zip(out, xs):
            np.testing.assert_array_equal(o.numpy(), x[:, :, :length])
    for v, x in zip(values, xs):  # the inputs are left as they were
        np.testing.assert_array_equal(v.numpy(), x)


def test_cache_slicer_checks_the_tensor_count():
    slicer = CacheSlicer(2, onnx.TensorProto.FLOAT, Device("cpu"))
    x = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, 3, 2), np.float32))
    with pytest.raises(ValueError, match="expected 2 cache tensors, got 1"):
        slicer([x], 1)


def test_cache_slicer_takes_session_options():
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    slicer = CacheSlicer(1, onnx.TensorProto.FLOAT, Device("cpu"), options)
    assert slicer.session.get_session_options().intra_op_num_threads == 2


def test_rewinding_an_exported_model_equals_a_fresh_forward(exported_llama_pair):
    """The slicer inside OrtModel: cut the caches back, append, compare with a fresh run."""
    pytest.importorskip("torch")
    from quickdraft.ort_backend.model import OrtModel

    model = OrtModel(exported_llama_pair / "target")
    rng = np.random.default_rng(0)
    state = model.new_state()
    state.append(rng.integers(0, model.vocab_size, size=6).tolist())
    for _ in range(6):
        state.append(rng.integers(0, model.vocab_size, size=int(rng.integers(1, 5))).tolist())
        keep = int(rng.integers(0, len(state.tokens) + 1))
        state.rewind(keep)
        assert all(c.shape()[2] == keep for c in state.cache)
        new = rng.integers(0, model.vocab_size, size=3).tolist()
        got = state.append(new)
        fresh = model.new_state().append(state.tokens)[-len(new):]
        assert np.abs(got - fresh).max() < 1e-4


# -- streaming detokenisation -----------------------------------------------------------

LINES = [
    "héllo wörld, café → naïve résumé",
    "中文 文本 测试 中文字符",
    "emoji 😀 🎉 👍🏽 party",
    "the quick brown fox jumps over the lazy dog",
    "arrows → ← ↑ ↓ and math ∑ ∫ ≠",
    "Ünïcödé everywhere: ñ ç ø å ß",
] * 3
TEXTS = ["héllo → 中文 😀 café", "emoji 🎉👍🏽 and 中文字符", " leading space → end",
         "plain ascii words here"]
PROMPT = "The prompt: naïve "


def _byte_level(add_prefix_space: bool = False) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LINES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _metaspace() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(LINES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    return tok


def _byte_fallback() -> Tokenizer:
    """SentencePiece-style (Llama): Metaspace, byte tokens <0xNN> for rare characters."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(LINES, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        limit_alphabet=30))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok


@pytest.fixture(scope="module")
def toks() -> dict[str, Tokenizer]:
    return {"byte-level": _byte_level(), "byte-level, prefix space": _byte_level(True),
            "metaspace": _metaspace(), "byte fallback": _byte_fallback()}


def _stream(tok, context, ids, batch=1):
    dec = StreamDecoder(tok, context)
    return [dec.push(ids[i:i + batch]) for i in range(0, len(ids), batch)] + [dec.flush()]


def _cases(tok, rng, n=40):
    return [tok.encode(t).ids for t in TEXTS] + [
        rng.integers(0, tok.get_vocab_size(), size=25).tolist() for _ in range(n)]


@pytest.mark.parametrize("name", ["byte-level", "byte-level, prefix space", "metaspace"])
def test_pieces_join_to_the_decoded_continuation(toks, name):
    tok = toks[name]
    rng = np.random.default_rng(0)
    for ids in _cases(tok, rng):
        for context in ([], tok.encode(PROMPT).ids, tok.encode("中文").ids):
            for batch in (1, 3):
                pieces = _stream(tok, context, ids, batch)
                whole = tok.decode(context + ids)
                assert "".join(pieces) == whole[len(tok.decode(context)):]
                assert not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_real_text_streams_exactly(toks):
    for tok in toks.values():  # byte fallback included: encoded text is valid UTF-8
        for text in TEXTS:
            ids = tok.encode(text).ids
            assert "".join(_stream(tok, tok.encode(PROMPT).ids, ids)) == \
                tok.decode(tok.encode(PROMPT).ids + ids)[len(tok.decode(tok.encode(PROMPT).ids)):]
            pieces = _stream(tok, [], ids)
            assert "".join(pieces) == tok.decode(ids) and pieces[-1] == ""


def test_a_character_split_over_tokens_comes_out_whole(toks):
    tok = toks["byte-level"]
    ids = tok.encode("😀").ids
    assert len(ids) > 1  # the emoji is not in the small vocabulary: byte tokens
    dec = StreamDecoder(tok, tok.encode(PROMPT).ids)
    assert [dec.push([t]) for t in ids] == [""] * (len(ids) - 1) + ["😀"]
    assert dec.flush() == ""


def test_flush_returns_the_incomplete_tail(toks):
    tok = toks["byte-level"]
    ids = tok.encode("a😀").ids[:-1]  # ends inside the emoji
    dec = StreamDecoder(tok)
    pieces = [dec.push([t]) for t in ids]
    tail = dec.flush()
    assert "".join(pieces) == "a" and tail.endswith("\ufffd")
    assert "".join(pieces) + tail == tok.decode(ids)
    assert dec.flush() == ""


def test_context_gives_the_first_token_its_leading_space(toks):
    tok = toks["metaspace"]
    word = tok.encode("fox").ids  # "▁fox": a new word
    assert tok.decode(word) == "fox"  # decoded alone, the leading space is dropped
    assert "".join(_stream(tok, tok.encode("the quick brown").ids, word)) == " fox"
    assert "".join(_stream(tok, [], word)) == "fox"


# What tokenizers.decoders.DecodeStream (0.22) does instead; see the text module docstring.
# If these start failing after a tokenizers upgrade, StreamDecoder may become a wrapper.


@pytest.mark.parametrize("name", ["byte-level", "byte-level, prefix space", "metaspace"])
def test_decode_stream_gives_the_same_pieces_but_no_flush(toks, name):
    tok = toks[name]
    rng = np.random.default_rng(1)
    held_back = 0
    for ids in _cases(tok, rng):
        for context in ([], tok.encode(PROMPT).ids):
            ours = _stream(tok, context, ids)
            ds = DecodeStream(ids=list(context), skip_special_tokens=True)
            theirs = [ds.step(tok, t) or "" for t in ids]
            assert theirs == ours[:-1]
            held_back += ours[-1] != ""
    assert not hasattr(DecodeStream, "flush")
    if name.startswith("byte-level"):
        assert held_back  # random ids often end mid-character: DecodeStream drops that text


def test_decode_stream_raises_on_invalid_byte_fallback_utf8(toks):
    tok = toks["byte fallback"]
    v = tok.get_vocab()
    ids = [v["<0x3E>"], v["<0xE4>"], tok.encode("é").ids[-1]]  # ">", a lead byte, "é"
    assert tok.decode(ids[:1]) == ">" and tok.decode(ids) == "\ufffd\ufffdé"
    ds = DecodeStream(skip_special_tokens=True)
    with pytest.raises(Exception, match="Invalid prefix"):
        for t in ids:
            ds.step(tok, t)
    pieces = _stream(tok, [], ids)  # ours keeps streaming (">" was already shown)
    assert pieces == [">", "", "\ufffdé", ""]
