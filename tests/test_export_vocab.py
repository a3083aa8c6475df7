"""Frequency-ranked draft heads (quickdraft.export.vocab): the truncated head gives the
original logits on the kept tokens and probability 0 elsewhere, the graph's interface is
unchanged, greedy speculative decoding with it still equals autoregressive decoding, and
bad requests change nothing."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

for _name in ("torch", "transformers", "onnxruntime", "onnx"):
    pytest.importorskip(_name)

from quickdraft.export import load_manifest  # noqa: E402
from quickdraft.export.vocab import EXCLUDED_LOGIT, frequent_tokens, truncate_head  # noqa: E402
from quickdraft.ort_backend import DecodeConfig, load_model, load_pair  # noqa: E402
from quickdraft.sampling import SamplingConfig, adjust_logits  # noqa: E402

PROMPTS = [[5], [17, 300, 41, 9], list(range(40, 52))]
TEXT = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int\n    y: int\n" * 20


@pytest.fixture(scope="module", params=["dynamic", "static", "bundled-int8"])
def pairs(request, tmp_path_factory, exported_llama_pair):
    if request.param == "static":
        for name in ("onnxruntime_genai", "onnx_ir"):
            pytest.importorskip(name)
        source = request.getfixturevalue("static_llama_pair")
    elif request.param == "bundled-int8":  # int8 storage: the head is a DequantizeLinear
        from quickdraft.ort_backend.cli import default_model_dir

        source = default_model_dir()
    else:
        source = exported_llama_pair
    out = tmp_path_factory.mktemp(f"head-{request.param}") / "pair"
    shutil.copytree(source, out)
    keep = frequent_tokens(out / "draft" / "tokenizer.json", [TEXT], 64)
    keep = np.union1d(keep, [5, 9, 17, 41])  # some of the prompts' tokens too
    truncate_head(out / "draft", keep)
    return source, out, keep


def _logits(folder, prompt):
    model = load_model(folder)
    state = model.new_state()
    out = np.asarray(state.append(prompt))  # [len(prompt), V]
    state.close()
    return out


def test_frequent_tokens_counts_and_keeps_special_tokens(tiny_tokenizer_dir):
    from tokenizers import Tokenizer

    path = tiny_tokenizer_dir / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    ids = frequent_tokens(path, [TEXT], 10)
    counts = np.bincount(tok.encode(TEXT).ids, minlength=tok.get_vocab_size())
    top = set(np.argsort(-counts, kind="stable")[:10].tolist())
    specials = set(tok.get_added_tokens_decoder())
    assert set(ids.tolist()) == top | specials and list(ids) == sorted(ids)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        frequent_tokens(path, [TEXT], 0)
    with pytest.raises(ValueError, match="no tokens"):
        frequent_tokens(path, [""], 5)


def test_truncated_head_scores_kept_tokens_only(pairs):
    source, out, keep = pairs
    m = load_manifest(out / "draft")
    assert m.head_tokens == len(keep) and m.external_data == []
    dropped = np.setdiff1d(np.arange(m.vocab_size), keep)
    for prompt in PROMPTS:
        full, cut = _logits(source / "draft", prompt), _logits(out / "draft", prompt)
        assert cut.shape == full.shape
        assert np.allclose(cut[:, keep], full[:, keep], rtol=1e-5, atol=1e-5)
        assert np.all(cut[:, dropped] == np.float32(EXCLUDED_LOGIT))
        for t in (1.0, 0.7, 0.05):  # probability exactly 0 outside, at any temperature
            q = adjust_logits(cut, SamplingConfig(temperature=t))
            assert np.all(q[:, dropped] == 0.0) and np.allclose(q.sum(-1), 1.0)


def test_truncated_draft_keeps_greedy_output(pairs):
    source, out, _ = pairs
    config = DecodeConfig(max_new_tokens=20)
    want = load_pair(source, device="cpu", max_gamma=4)
    pair = load_pair(out, device="cpu", max_gamma=4)
    for prompt in PROMPTS:
        with want.generator(config) as auto, pair.generator(config, gamma=4) as spec:
            assert spec.generate(prompt).tokens == auto.generate(prompt).tokens


def test_truncate_head_refusals_change_nothing(pairs):
    _, out, keep = pairs
    folder = out / "draft"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="already scores"):
        truncate_head(folder, keep)
    with pytest.raises(ValueError, match=r"token ids in \[0, "):
        truncate_head(out / "target", [10 ** 9])
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
