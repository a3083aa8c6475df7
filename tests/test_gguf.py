"""GGUF sources: tiny GGUF files written here with the gguf package (GGUFWriter), exported
through transformers' GGUF loader (CPU, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")
pytest.importorskip("onnxruntime")
gguf = pytest.importorskip("gguf")

from quickdraft.cli import main as cli_main  # noqa: E402
from quickdraft.export import (  # noqa: E402
    ExportError,
    UnsupportedModelError,
    export_model,
    export_pair,
    load_manifest,
)
from quickdraft.export import gguf as qgguf  # noqa: E402

HIDDEN, HEADS, KV_HEADS, LAYERS, FF = 32, 2, 2, 2, 64


def _bpe_parts(tokenizer_dir: Path) -> tuple[list[str], list[str], list[int]]:
    """tokens (in id order), merges ("a b") and token types of a trained byte-level BPE."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    for added in data.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    specials = {a["content"] for a in data.get("added_tokens") or [] if a.get("special")}
    types = [3 if t in specials else 1 for t in tokens]
    return tokens, merges, types


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (convert_hf_to_gguf.py); transformers undoes it on load."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def hf_llama_weights(vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Random weights of a tiny Llama, under Hugging Face names (torch shapes)."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS

    def w(*shape, scale=0.5):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    out = {"model.embed_tokens.weight": w(vocab, HIDDEN, scale=1.0),
           "model.norm.weight": 1 + w(HIDDEN, scale=0.1),
           "lm_head.weight": w(vocab, HIDDEN, scale=1.0)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": 1 + w(HIDDEN, scale=0.1),
            p + "post_attention_layernorm.weight": 1 + w(HIDDEN, scale=0.1),
            p + "self_attn.q_proj.weight": w(HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": w(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": w(KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * head_dim),
            p + "mlp.gate_proj.weight": w(FF, HIDDEN),
            p + "mlp.up_proj.weight": w(FF, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, FF),
        })
    return out


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{_GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"


def write_llama_gguf(path: Path, tokenizer_dir: Path, *, seed: int = 0,
                     arch: str = "llama", merges: list[str] | None = None,
                     weights: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A tiny Llama as a GGUF file with a gpt2-style tokenizer (tokens + merges); q/k
    permuted as llama.cpp writes them, the MLP in f16. Returns the Hugging Face weights."""
    tokens, file_merges, types = _bpe_parts(tokenizer_dir)
    weights = weights or hf_llama_weights(len(tokens), seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges if merges is not None else file_merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_unk_token_id(1)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    for name, value in weights.items():
        if ".q_proj." in name:
            value = _permute(value, HEADS)
        elif ".k_proj." in name:
            value = _permute(value, KV_HEADS)
        if ".mlp." in name:
            value = value.astype(np.float16)
        w.add_tensor(_gguf_name(name), value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer_dir):
    """(path, Hugging Face weights) of a tiny Llama GGUF."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    weights = write_llama_gguf(path, tiny_tokenizer_dir, seed=0)
    return path, weights


@pytest.fixture(scope="module")
def tiny_gguf_draft(tmp_path_factory, tiny_tokenizer_dir):
    path = tmp_path_factory.mktemp("gguf-draft") / "tiny-draft.gguf"
    write_llama_gguf(path, tiny_tokenizer_dir, seed=1)
    return path


@pytest.fixture(scope="module")
def exported_gguf_pair(tmp_path_factory, tiny_gguf, tiny_gguf_draft):
    out = tmp_path_factory.mktemp("onnx-gguf") / "pair"
    messages = []
    report = export_pair(tiny_gguf[0], tiny_gguf_draft, out, steps=16, progress=messages.append)
    return out, report, messages


# -- the export ------------------------------------------------------------------------------


def test_gguf_pair_export_manifest_and_validation(exported_gguf_pair, tiny_gguf, tiny_gguf_draft):
    out, report, messages = exported_gguf_pair
    for role, path in (("target", tiny_gguf[0]), ("draft", tiny_gguf_draft)):
        m = load_manifest(out / role)
        assert m.source == str(path.resolve())
        assert m.architecture == "llama" and m.num_layers == LAYERS and m.vocab_size == 512
        v = m.validation
        assert v["greedy_equal_steps"] == [16] * v["prompts"], v
        assert v["max_abs_diff"] < 1e-3
        info = json.loads((out / role / "gguf.json").read_text())
        assert info["source"] == str(path.resolve()) and info["architecture"] == "llama"
        assert info["tensor_types"] == {"F32": 3 + 6 * LAYERS, "F16": 3 * LAYERS}
        assert info["tokenizer"]["passed"] and info["tokenizer"]["built_by"] == "transformers"
        assert info["tokenizer"]["transformers_problems"] == []
        assert (out / role / "tokenizer.json").is_file()
    marker = json.loads((out / "quickdraft-export.json").read_text())
    assert marker["models"]["target"]["source"] == str(tiny_gguf[0].resolve())
    assert report.target.source == str(tiny_gguf[0].resolve())
    assert any("tokenizer checks pass" in msg for msg in messages)
    # the conversion folder is gone: only the export is left next to it
    assert sorted(p.name for p in out.parent.iterdir()) == ["pair"]


def test_gguf_pair_speculative_equals_autoregressive(exported_gguf_pair):
    from quickdraft.ort_backend import DecodeConfig, load_pair
    from quickdraft.sampling import SamplingConfig

    out, _, _ = exported_gguf_pair
    config = DecodeConfig(max_new_tokens=24, sampling=SamplingConfig(temperature=0))
    pair = load_pair(out, device="cpu")
    prompts = ["def main():\n    return", "import os\n"]
    with pair.generator(config) as auto:
        wants = {p: auto.generate(p) for p in prompts}
    with pair.generator(config, gamma=3) as spec:
        for p in prompts:
            got = spec.generate(p)
            assert got.stats.mode == "speculative"
            assert got.tokens == wants[p].tokens and got.text == wants[p].text
    # the exported tokenizer adds no BOS (the file says add_bos_token false), as the source
    tok = json.loads((out / "target" / "tokenizer.json").read_text())
    assert tok["post_processor"] is None


def test_conversion_undoes_the_qk_permutation(tiny_gguf, tmp_path):
    from safetensors.numpy import load_file

    path, weights = tiny_gguf
    meta = qgguf.check_gguf(path)
    report = qgguf.convert_gguf(meta, tmp_path / "hf")
    assert report["ignored_tensors"] == []
    loaded = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name, value in weights.items():
        tol = 1e-2 if ".mlp." in name else 0  # written as f16
        np.testing.assert_allclose(loaded[name], value, atol=tol, err_msg=name)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == LAYERS and config["tie_word_embeddings"] is False


def test_same_gguf_as_target_and_draft_and_export_model(tiny_gguf, tmp_path):
    path = tiny_gguf[0]
    one = export_model(path, tmp_path / "one", steps=4, validate=False)
    assert one.manifest.source == str(path.resolve())
    assert (tmp_path / "one" / "gguf.json").is_file()
    rc = cli_main(["export", "--target", str(path), "--draft", str(path), "--out",
                   str(tmp_path / "pair"), "--steps", "4"])
    assert rc == 0
    assert load_manifest(tmp_path / "pair" / "draft").source == str(path.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "pair"]


# -- refusals before heavy work ----------------------------------------------------------------


def test_missing_and_non_gguf_files_are_refused(tiny_gguf, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="GGUF file .* does not exist"):
        export_pair(tmp_path / "nope.gguf", tiny_gguf[0], tmp_path / "out")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(ExportError, match="is not a GGUF file"):
        export_pair(tiny_gguf[0], fake, tmp_path / "out")
    rc = cli_main(["export", "--target", str(fake), "--draft", str(fake), "--out",
                   str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "is not a GGUF file" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf"]


def test_unsupported_architecture_is_refused(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba-unknown")
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="'mamba-unknown' cannot be loaded by "
                       "transformers .* GGUF loader covers .*llama"):
        export_pair(path, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_inconsistent_tokenizer_is_refused(tmp_path, tiny_tokenizer_dir, capsys):
    """Merges in reverse rank: every check but segmentation passes (the tokenizer is built
    from the same merges), but whole words that are tokens no longer encode to one token;
    the rebuilt tokenizer has the same merges, so the export is refused before the
    weights are converted."""
    _, merges, _ = _bpe_parts(tiny_tokenizer_dir)
    path = tmp_path / "bad-merges.gguf"
    write_llama_gguf(path, tiny_tokenizer_dir, merges=merges[::-1])
    meta = qgguf.check_gguf(path)
    with pytest.raises(ExportError, match="segmentation check failed"):
        qgguf.gguf_tokenizer(meta)
    rc = cli_main(["export", "--target", str(path), "--draft", str(path), "--out",
                   str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "segmentation check failed" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-merges.gguf"]


# -- the tokenizer checks and the rebuild ------------------------------------------------------


def _sentencepiece_gguf(path: Path, arch: str = "gemma3") -> None:
    """A tokenizer-only GGUF with a SentencePiece-BPE vocabulary (tokens and scores, no
    merges), as Gemma 3 files have: transformers builds a Unigram model from it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from quickdraft.corpus import stdlib_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False)
    tok.train_from_iterator([stdlib_text(200_000)], trainer=trainer)
    pieces = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = specials + byte_tokens + pieces
    types = [3, 3, 3, 2] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * (4 + 256) + [-float(i) for i in range(len(pieces))]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-sp")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def test_sentencepiece_tokenizer_that_transformers_builds_wrongly_is_rebuilt(tmp_path):
    path = tmp_path / "sp.gguf"
    _sentencepiece_gguf(path)
    meta = qgguf.read_gguf(path)
    fast, report = qgguf.gguf_tokenizer(meta)
    assert report["transformers_problems"], report  # the Unigram build is caught
    assert any("segmentation" in p or "vocabulary" in p for p in report["transformers_problems"])
    assert report["built_by"].startswith("quickdraft") and report["passed"]
    backend = fast.backend_tokenizer
    assert qgguf.tokenizer_problems(backend, meta) == []
    enc = backend.encode("The return of the import")
    assert enc.tokens[0] == "<bos>"  # add_bos_token true
    assert "▁return" in enc.tokens and "▁the" in enc.tokens
    assert backend.decode(enc.ids, skip_special_tokens=True) == "The return of the import"
    assert json.loads(backend.to_str())["model"]["type"] == "BPE"


def test_checks_name_what_fails(tiny_tokenizer_dir, tmp_path):
    from tokenizers import Tokenizer

    path = tmp_path / "ok.gguf"
    write_llama_gguf(path, tiny_tokenizer_dir)
    meta = qgguf.read_gguf(path)
    good = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    assert qgguf.tokenizer_problems(good, meta) == []
    rebuilt = qgguf.build_tokenizer(meta)
    assert qgguf.tokenizer_problems(rebuilt, meta) == []
    text = "def main():\n    return the naïve café"
    assert rebuilt.encode(text).ids == good.encode(text).ids
    meta.merges = meta.merges[:-5]
    assert any(p.startswith("merges check failed") for p in qgguf.tokenizer_problems(good, meta))
    meta.tokens = meta.tokens[:-1] + ["zzz"]
    assert any(p.startswith("vocabulary check failed")
               for p in qgguf.tokenizer_problems(good, meta))


def test_gguf_static_cache_export(tiny_gguf, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx_ir")
    path = tiny_gguf[0]
    rc = cli_main(["export", "--target", str(path), "--draft", str(path), "--out",
                   str(tmp_path / "pair"), "--kv-cache", "static", "--max-length", "128",
                   "--steps", "8"])
    assert rc == 0
    m = load_manifest(tmp_path / "pair" / "target")
    assert m.kv_cache == "static" and m.source == str(path.resolve())
    assert min(m.validation["greedy_equal_steps"]) == 8
    assert (tmp_path / "pair" / "target" / "gguf.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair"]


def test_a_vocabulary_mismatch_names_the_gguf_file_not_its_conversion(tiny_gguf, tmp_path):
    """The pair check runs on the GGUF's converted folder, which is gone once the export
    fails: the error names the GGUF file as given."""
    from quickdraft.export import VocabularyMismatchError
    from quickdraft.export.toy import make_random_model

    draft = tmp_path / "draft997"
    make_random_model("llama", draft, vocab_size=997, role="draft")
    with pytest.raises(VocabularyMismatchError) as e:
        export_pair(tiny_gguf[0], draft, tmp_path / "out", steps=2)
    assert str(tiny_gguf[0]) in str(e.value) and "997" in str(e.value)
    assert ".partial" not in str(e.value) and "gguf-0" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft997"]
