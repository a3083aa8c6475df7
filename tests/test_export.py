"""Export of tiny random Hugging Face models to ONNX (CPU, offline).

The shared fixtures (conftest.py) build a random Llama pair with a locally trained
tokenizer and export it once per session; other architectures are built on demand.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import quickdraft.export.api as api  # noqa: E402
from quickdraft.cli import main as cli_main  # noqa: E402
from quickdraft.export import (  # noqa: E402
    ExportError,
    ExportValidationError,
    UnsupportedModelError,
    VocabularyMismatchError,
    check_pair,
    export_model,
    export_pair,
    load_manifest,
)
from quickdraft.export.toy import make_random_model, train_tokenizer  # noqa: E402
from quickdraft.export.validate import validate_export  # noqa: E402

PROMPTS = ["def main():\n    return", "import os\nimport sys\n", "x"]
GREEDY_STEPS = 24


# ---------------------------------------------------------------------------------------
# helpers: an ONNX Runtime loop written from the manifest alone, as the backend would


def _session(folder: Path):
    m = load_manifest(folder)
    return m, ort.InferenceSession(str(folder / m.model_file), providers=["CPUExecutionProvider"])


def _run(m, sess, ids: list[int], past: list[np.ndarray] | None):
    np_dtype = {"fp32": np.float32, "fp16": np.float16}[m.dtype]
    if past is None:
        past = [np.zeros((1, m.num_kv_heads, 0, m.head_dim), np_dtype)] * (2 * m.num_layers)
    p = past[0].shape[2]
    feed = {"input_ids": np.array([ids], np.int64)}
    if m.has_attention_mask:
        feed["attention_mask"] = np.ones((1, p + len(ids)), np.int64)
    if m.has_position_ids:
        feed["position_ids"] = np.arange(p, p + len(ids), dtype=np.int64)[None]
    for i in range(m.num_layers):
        feed[m.past_key_template.format(i=i)] = past[2 * i]
        feed[m.past_value_template.format(i=i)] = past[2 * i + 1]
    names = ["logits"] + [
        t.format(i=i)
        for i in range(m.num_layers)
        for t in (m.present_key_template, m.present_value_template)
    ]
    out = sess.run(names, feed)
    return out[0][0], out[1:]


def _ort_greedy(folder: Path, ids: list[int], steps: int) -> list[int]:
    m, sess = _session(folder)
    logits, past = _run(m, sess, ids, None)
    tokens = []
    for _ in range(steps):
        tok = int(logits[-1].argmax())
        tokens.append(tok)
        logits, past = _run(m, sess, [tok], past)
    return tokens


@functools.lru_cache(maxsize=8)
def _torch_model(hf_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir).eval()


def _torch_greedy(hf_dir: Path, ids: list[int], steps: int) -> list[int]:
    """Greedy tokens from PyTorch, recomputing the whole prefix each step (no cache)."""
    import torch

    model = _torch_model(hf_dir)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    return seq[len(ids):]


def _ids(tokenizer_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)(text, add_special_tokens=False)[
        "input_ids"
    ]


def _check_manifest_against_graph(folder: Path, arch: str, dtype: str = "fp32"):
    m = load_manifest(folder)
    graph = onnx.load(str(folder / m.model_file), load_external_data=False).graph
    inputs = {v.name: v.type.tensor_type for v in graph.input}
    outputs = {v.name: v.type.tensor_type for v in graph.output}
    assert m.architecture == arch
    assert m.input_names == [v.name for v in graph.input]
    assert m.output_names == [v.name for v in graph.output]
    assert m.has_position_ids == ("position_ids" in inputs)
    assert m.has_attention_mask == ("attention_mask" in inputs)
    assert m.kv_layout == "bnsh" and m.kv_cache == "dynamic" and m.dtype == dtype
    onnx_type = {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16,
                 "bf16": onnx.TensorProto.BFLOAT16}[dtype]
    for i in range(m.num_layers):
        for name, table in (
            (m.past_key_template.format(i=i), inputs),
            (m.past_value_template.format(i=i), inputs),
            (m.present_key_template.format(i=i), outputs),
            (m.present_value_template.format(i=i), outputs),
        ):
            t = table[name]
            assert t.elem_type == onnx_type
            dims = [d.dim_value or d.dim_param for d in t.shape.dim]
            assert dims[1] == m.num_kv_heads and dims[3] == m.head_dim, (name, dims)
    assert m.past_key_template.format(i=m.num_layers) not in inputs
    assert outputs["logits"].shape.dim[2].dim_value == m.vocab_size
    assert {"torch", "transformers", "optimum", "optimum-onnx", "onnx"} <= set(m.versions)
    config = json.loads((folder / "config.json").read_text())
    assert m.vocab_size == config["vocab_size"] == 512
    assert m.max_length == config.get("max_position_embeddings", config.get("n_positions"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file()
    return m


def _check_validation(m, max_diff: float = 1e-4):
    v = m.validation
    assert v["max_abs_diff"] < max_diff and v["max_abs_diff_cached"] < max_diff, v
    assert v["greedy_steps"] >= 20
    assert v["greedy_equal_steps"] == [v["greedy_steps"]] * v["prompts"], v
    assert v["finite"] is True
    assert v["diff_over_tolerance"] <= 1.0


# ---------------------------------------------------------------------------------------
# exports of the three architectures


@pytest.fixture(scope="module")
def exported_pairs(hf_pair_factory, exported_llama_pair, tmp_path_factory):
    """exported_pairs(arch) -> (hf dirs, OUT, report or None): each pair exported once."""
    done = {"llama": (hf_pair_factory("llama"), exported_llama_pair, None)}

    def get(arch: str):
        if arch not in done:
            dirs = hf_pair_factory(arch)
            out = tmp_path_factory.mktemp(f"onnx-{arch}") / "out"
            done[arch] = (dirs, out, export_pair(dirs["target"], dirs["draft"], out))
        return done[arch]

    return get


def test_llama_pair_manifest_and_validation(exported_llama_pair, hf_pair_dirs):
    for role, layers, kv_heads in (("target", 2, 2), ("draft", 1, 1)):
        m = _check_manifest_against_graph(exported_llama_pair / role, "llama")
        assert (m.num_layers, m.num_kv_heads) == (layers, kv_heads)
        assert m.num_attention_heads == 2 * layers
        assert m.head_dim == 16 and m.has_position_ids and m.eos_token_id == 0
        assert m.source == str(hf_pair_dirs[role].resolve())
        _check_validation(m)
    # the pair shares one tokenizer, copied unchanged
    t, d = (json.loads((exported_llama_pair / r / "tokenizer.json").read_text())
            for r in ("target", "draft"))
    assert t == d
    assert not list(exported_llama_pair.parent.glob(".*partial*"))


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_qwen2_and_gpt2_pairs(arch, exported_pairs):
    _, out, report = exported_pairs(arch)
    assert report.out == out.resolve()
    assert [p.name for p in sorted(report.out.iterdir())] == ["draft", "quickdraft-export.json",
                                                              "target"]
    for r, layers in ((report.target, 2), (report.draft, 1)):
        m = _check_manifest_against_graph(r.path, arch)
        assert m.num_layers == layers
        if arch == "gpt2":  # multi-head attention: as many KV heads as query heads
            assert m.num_kv_heads == m.num_attention_heads
        else:
            assert m.num_kv_heads == m.num_attention_heads // 2
        _check_validation(m)
        assert r.manifest == m  # the report carries what was saved
    assert json.dumps(report.to_dict())  # serialisable


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_ort_greedy_with_kv_cache_equals_pytorch(arch, exported_pairs, tiny_tokenizer_dir):
    dirs, out, _ = exported_pairs(arch)
    for role in ("target", "draft"):
        for prompt in PROMPTS:
            ids = _ids(tiny_tokenizer_dir, prompt)
            assert _ort_greedy(out / role, ids, GREEDY_STEPS) == _torch_greedy(
                dirs[role], ids, GREEDY_STEPS
            ), (arch, role, prompt)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_several_tokens_on_a_past_equal_one_full_pass(arch, exported_pairs):
    # the target scores gamma + 1 draft tokens at once on top of its cache
    _, out, _ = exported_pairs(arch)
    m, sess = _session(out / "target")
    ids = [3, 17, 250, 9, 31, 77, 5, 400, 12]
    full, _ = _run(m, sess, ids, None)
    first, past = _run(m, sess, ids[:3], None)
    second, past = _run(m, sess, ids[3:8], past)
    third, past = _run(m, sess, ids[8:], past)
    np.testing.assert_allclose(np.concatenate([first, second, third]), full, atol=1e-5)
    assert past[0].shape == (1, m.num_kv_heads, len(ids), m.head_dim)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_numpy_reference_transformer_matches_onnx(arch, exported_pairs, tiny_tokenizer_dir):
    ref = pytest.importorskip("quickdraft.reference.transformer")
    dirs, out, _ = exported_pairs(arch)
    for role in ("target", "draft"):
        numpy_model = ref.NumpyTransformer.from_pretrained(dirs[role])
        m, sess = _session(out / role)
        for prompt in PROMPTS:
            ids = _ids(tiny_tokenizer_dir, prompt)
            onnx_logits, past = _run(m, sess, ids, None)
            np.testing.assert_allclose(numpy_model.logits(ids), onnx_logits, atol=1e-4, rtol=0)
            # and through the cache: one more token on top of the ONNX past
            nxt = int(onnx_logits[-1].argmax())
            step, _ = _run(m, sess, [nxt], past)
            np.testing.assert_allclose(numpy_model.logits(ids + [nxt])[-1:], step, atol=1e-4)


def test_fp16_export_is_checked_for_finite_values(hf_pair_dirs, tmp_path):
    report = export_model(hf_pair_dirs["target"], tmp_path / "fp16", dtype="fp16")
    m = _check_manifest_against_graph(report.path, "llama", dtype="fp16")
    v = m.validation
    assert v["dtype"] == "fp16" and v["finite"] is True
    assert v["max_abs_diff"] < 0.05 and v["diff_over_tolerance"] <= 1.0
    assert min(v["greedy_equal_steps"]) >= 20 or v["greedy_near_ties"]
    logits, _ = _run(m, _session(report.path)[1], [5, 6, 7], None)
    assert logits.dtype == np.float16 and np.isfinite(logits).all()


def test_bf16_is_refused_with_validation_and_fails_cleanly_without(hf_pair_dirs, tmp_path,
                                                                    monkeypatch):
    with monkeypatch.context() as mp:
        _no_export(mp)
        with pytest.raises(ExportError, match="cannot be validated"):
            export_pair(hf_pair_dirs["target"], hf_pair_dirs["draft"], tmp_path / "a",
                        dtype="bf16")
    # optimum-onnx 0.1.0 with torch 2.13 cannot trace Llama in bf16 on CPU; whatever the
    # stack does, the outcome is a bf16 folder or a clear error and no folder
    out = tmp_path / "bf16"
    try:
        report = export_model(hf_pair_dirs["draft"], out, dtype="bf16", validate=False)
    except ExportError as e:
        assert "bf16" in str(e)
        assert not out.exists() and list(tmp_path.iterdir()) == []
    else:
        _check_manifest_against_graph(report.path, "llama", dtype="bf16")


def test_hub_id_from_the_local_cache(hf_pair_dirs, tmp_path):
    # a hub id resolves through the Hugging Face cache (the hub itself is off in the tests)
    from huggingface_hub import constants

    ids = {}
    for role in ("target", "draft"):
        repo = Path(constants.HF_HUB_CACHE) / f"models--quickdraft-tests--tiny-{role}"
        commit = "0" * 39 + ("1" if role == "target" else "2")
        shutil.copytree(hf_pair_dirs[role], repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        ids[role] = f"quickdraft-tests/tiny-{role}"
    report = export_pair(ids["target"], ids["draft"], tmp_path / "hub", steps=20)
    assert report.target.manifest.source == ids["target"]
    assert report.draft.manifest.num_layers == 1
    _check_validation(report.target.manifest)


def test_eos_ids_merge_config_and_generation_config(exported_llama_pair, tmp_path):
    from transformers import AutoConfig

    folder = tmp_path / "t"
    shutil.copytree(exported_llama_pair / "target", folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = [7, 0, 9]
    (folder / "generation_config.json").write_text(json.dumps(gen))
    m = api.build_manifest(folder, AutoConfig.from_pretrained(folder), "fp32")
    assert m.eos_token_id == 0 and m.eos_token_ids == [0, 7, 9]
    with pytest.raises(UnsupportedModelError, match="fp16"):
        api.build_manifest(folder, AutoConfig.from_pretrained(folder), "fp16")


# ---------------------------------------------------------------------------------------
# validation catches a wrong graph


def test_validation_fails_on_wrong_weights(exported_llama_pair, hf_pair_dirs, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(exported_llama_pair / "draft", folder)
    m = load_manifest(folder)
    model = onnx.load(str(folder / m.model_file))
    from onnx import numpy_helper

    biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = numpy_helper.to_array(biggest).copy()
    arr *= 1.01  # 1 % off: far above the fp32 tolerance
    biggest.CopyFrom(numpy_helper.from_array(arr, biggest.name))
    onnx.save(model, str(folder / m.model_file))
    with pytest.raises(ExportValidationError, match="differ"):
        validate_export(folder, m, hf_pair_dirs["draft"])


def test_validation_fails_on_non_finite_logits(exported_llama_pair, hf_pair_dirs, monkeypatch):
    from quickdraft.export import validate

    forward = validate.OrtDecoder.forward

    def overflowing(self, ids, past):
        logits, present = forward(self, ids, past)
        logits = logits.copy()
        logits[0, 0] = np.inf
        return logits, present

    monkeypatch.setattr(validate.OrtDecoder, "forward", overflowing)
    folder = exported_llama_pair / "draft"
    with pytest.raises(ExportValidationError, match="NaN or infinity"):
        validate_export(folder, load_manifest(folder), hf_pair_dirs["draft"])


# ---------------------------------------------------------------------------------------
# pair checks and bad input, all before any export


@pytest.fixture(scope="module")
def other_tokenizers(tmp_path_factory):
    """Tokenizers that differ from the shared one: in size, and in mapping at equal size."""
    root = tmp_path_factory.mktemp("other-tokenizers")
    from quickdraft.export.toy import stdlib_text

    train_tokenizer(root / "bigger", vocab_size=600)
    train_tokenizer(root / "shuffled", vocab_size=512, text=stdlib_text(300_000, skip_files=300))
    return root


def _no_export(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("an export started")

    monkeypatch.setattr(api, "_export_into", boom)


def test_vocabulary_size_mismatch_is_refused(hf_pair_dirs, other_tokenizers, tmp_path,
                                             monkeypatch):
    draft = tmp_path / "draft600"
    make_random_model("llama", draft, other_tokenizers / "bigger", role="draft")
    _no_export(monkeypatch)
    with pytest.raises(VocabularyMismatchError, match="512 logits.*600"):
        export_pair(hf_pair_dirs["target"], draft, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vocabulary_mapping_mismatch_is_refused(hf_pair_dirs, other_tokenizers, tmp_path,
                                                monkeypatch):
    draft = tmp_path / "draft-shuffled"
    make_random_model("llama", draft, other_tokenizers / "shuffled", role="draft")
    assert json.loads((draft / "config.json").read_text())["vocab_size"] == 512
    _no_export(monkeypatch)
    with pytest.raises(VocabularyMismatchError, match="map to different ids"):
        export_pair(hf_pair_dirs["target"], draft, tmp_path / "out")
    # same size, different tokens: a logits width that agrees is not enough
    with pytest.raises(VocabularyMismatchError):
        check_pair(draft, hf_pair_dirs["draft"])
    assert not (tmp_path / "out").exists()


def test_pair_with_mixed_architectures_is_accepted(hf_pair_factory, hf_pair_dirs):
    # one tokenizer, two architectures: the vocabulary is what must agree
    t, d = check_pair(hf_pair_dirs["target"], hf_pair_factory("gpt2")["draft"])
    assert (t.model_type, d.model_type) == ("llama", "gpt2")


def test_bad_paths_are_refused(hf_pair_dirs, tmp_path, monkeypatch):
    _no_export(monkeypatch)
    target = hf_pair_dirs["target"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_pair(target, tmp_path / "nope", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_pair("./no/such/folder", target, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export_pair(target, tmp_path / "empty", tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        export_pair(tmp_path / "file", target, tmp_path / "out")
    # a hub id with the hub switched off and nothing cached
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        export_pair(target, "quickdraft-tests/no-such-model", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"]


def _config_only(folder: Path, config: dict) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_non_causal_and_unsupported_models_are_refused(hf_pair_dirs, tmp_path, monkeypatch):
    from optimum.exporters.tasks import TasksManager
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    _no_export(monkeypatch)
    target, out = hf_pair_dirs["target"], tmp_path / "out"
    encoder = _config_only(tmp_path / "distilbert", {"model_type": "distilbert"})
    with pytest.raises(UnsupportedModelError, match="not a causal language model"):
        export_pair(target, encoder, out)
    t5 = _config_only(tmp_path / "t5", {"model_type": "t5"})
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        export_pair(t5, target, out)
    custom = _config_only(tmp_path / "custom", {"model_type": "my-own-lm"})
    with pytest.raises(UnsupportedModelError, match="trust_remote_code"):
        export_pair(target, custom, out)
    classifier = _config_only(
        tmp_path / "cls",
        {"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]},
    )
    with pytest.raises(UnsupportedModelError, match="not a causal LM head"):
        export_pair(target, classifier, out)
    # a causal LM that optimum-onnx cannot export with a KV cache
    supported = set(TasksManager.get_supported_model_type_for_task("text-generation-with-past",
                                                                   "onnx"))
    assert "mamba" in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and "mamba" not in supported
    other = _config_only(tmp_path / "mamba", {"model_type": "mamba"})
    with pytest.raises(UnsupportedModelError, match="not supported by optimum-onnx"):
        export_pair(other, target, out)
    assert not out.exists()


def test_folders_saved_by_transformers_5_are_refused_with_the_fix(hf_pair_dirs, tmp_path,
                                                                  monkeypatch):
    """transformers 4.57 would read a transformers-5 config with the default rotary base
    (and validate the export against that same wrong model), and cannot load its
    tokenizer class: both are named before any export starts."""
    _no_export(monkeypatch)
    target, out = hf_pair_dirs["target"], tmp_path / "out"
    new_rope = shutil.copytree(hf_pair_dirs["draft"], tmp_path / "rope")
    config = json.loads((new_rope / "config.json").read_text())
    theta = config.pop("rope_theta", 10000.0)
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    (new_rope / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="rope_parameters.*rope_theta"):
        export_pair(target, new_rope, out)
    new_tok = shutil.copytree(hf_pair_dirs["draft"], tmp_path / "tok")
    tok = json.loads((new_tok / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "TokenizersBackend"
    (new_tok / "tokenizer_config.json").write_text(json.dumps(tok))
    with pytest.raises(UnsupportedModelError, match="PreTrainedTokenizerFast"):
        export_pair(new_tok, target, out)
    assert not out.exists()


def test_bad_options_and_existing_destination(hf_pair_dirs, tmp_path, monkeypatch):
    _no_export(monkeypatch)
    t, d = hf_pair_dirs["target"], hf_pair_dirs["draft"]
    with pytest.raises(ValueError, match="dtype"):
        export_pair(t, d, tmp_path / "a", dtype="int3")
    with pytest.raises(ValueError, match="device"):
        export_pair(t, d, tmp_path / "a", device="tpu")
    with pytest.raises(ValueError, match="kv_cache"):
        export_pair(t, d, tmp_path / "a", kv_cache="paged")
    with pytest.raises(ValueError, match="static caches"):
        export_pair(t, d, tmp_path / "a", max_length=64)  # only static caches have one
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # not an export: never replaced
        with pytest.raises(ExportError, match="not a quickdraft export"):
            export_pair(t, d, tmp_path / "full", overwrite=overwrite)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export_pair(t, d, tmp_path / "afile", overwrite=True)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------
# atomic output


def _fail_on_draft(monkeypatch, exc):
    real = api._export_into
    seen = []

    def export_then_fail(info, folder, **kw):
        seen.append(folder)
        if kw["label"] == "draft":
            assert (folder.parent / "target" / "model.onnx").is_file()  # half done
            raise exc
        return real(info, folder, **kw)

    monkeypatch.setattr(api, "_export_into", export_then_fail)
    return seen


@pytest.mark.parametrize("exc", [RuntimeError("injected"), KeyboardInterrupt()])
def test_failed_export_leaves_nothing(hf_pair_dirs, tmp_path, monkeypatch, exc):
    seen = _fail_on_draft(monkeypatch, exc)
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        export_pair(hf_pair_dirs["target"], hf_pair_dirs["draft"], out, validate=False)
    assert len(seen) == 2 and seen[0].parent.parent == tmp_path  # temp folder beside out
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_export(hf_pair_dirs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "target").mkdir(parents=True)  # an export made before the marker file existed
    (out / "target" / "quickdraft.json").write_text("{}")
    (out / "old.txt").write_text("previous export")
    _fail_on_draft(monkeypatch, RuntimeError("injected"))
    with pytest.raises(RuntimeError, match="injected"):
        export_pair(hf_pair_dirs["target"], hf_pair_dirs["draft"], out, overwrite=True,
                    validate=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["old.txt", "target"]
    monkeypatch.undo()
    report = export_pair(hf_pair_dirs["target"], hf_pair_dirs["draft"], out, overwrite=True,
                         validate=False)
    assert sorted(p.name for p in out.iterdir()) == ["draft", "quickdraft-export.json", "target"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert report.target.manifest.validation == {}  # not validated: said so, not faked


def test_export_model_single_and_silent(hf_pair_dirs, tmp_path, capfd):
    messages = []
    report = export_model(hf_pair_dirs["draft"], tmp_path / "one", steps=20,
                          progress=messages.append)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # the library prints nothing
    assert messages and any("validating" in s for s in messages)
    assert report.path == (tmp_path / "one").resolve() and report.role == "model"
    assert report.manifest.validation["greedy_equal_steps"] == [20] * len(
        report.manifest.validation["greedy_equal_steps"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one"]
    assert json.loads((tmp_path / "one" / "quickdraft-export.json").read_text())["layout"] == (
        "model")


# ---------------------------------------------------------------------------------------
# the CLI verb


def test_cli_export(hf_pair_dirs, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["export", "--target", str(hf_pair_dirs["target"]), "--draft",
            str(hf_pair_dirs["draft"]), "--out", str(out), "--steps", "20"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert "checking the pair" in captured.err and "validating" in captured.err
    assert "target" in captured.out and "20/20" in captured.out and str(out) in captured.out
    assert load_manifest(out / "target").validation["greedy_steps"] == 20

    # exists already: an error on stderr, exit status 1, the export untouched
    assert cli_main(argv) == 1
    assert "already exists" in capsys.readouterr().err

    assert cli_main([*argv, "--overwrite", "--json", "--no-validate"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["draft"]["manifest"]["num_layers"] == 1
    assert report["target"]["manifest"]["validation"] == {}


def test_cli_export_errors(hf_pair_dirs, tmp_path, capsys):
    rc = cli_main(["export", "--target", str(hf_pair_dirs["target"]), "--draft",
                   str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "quickdraft export: error:" in err and "does not exist" in err
    with pytest.raises(SystemExit):  # not a dtype at all
        cli_main(["export", "--target", "a", "--draft", "b", "--out", "c", "--dtype", "int3"])
    # int4 is a static-cache dtype: refused in one line with the dynamic cache
    assert cli_main(["export", "--target", "a", "--draft", "b", "--out", "c", "--dtype",
                     "int4"]) == 1
    assert "--kv-cache static" in capsys.readouterr().err


def test_a_random_model_leaves_the_callers_torch_generator_alone(tmp_path):
    """make_random_model seeds its own weights (the same seed, the same model) without
    reseeding the process's torch generator."""
    import torch
    from safetensors.numpy import load_file

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    make_random_model("llama", tmp_path / "a", vocab_size=32, role="draft", seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    make_random_model("llama", tmp_path / "b", vocab_size=32, role="draft", seed=5)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "24"])
def test_export_refuses_validation_steps_that_are_not_a_count(steps, tmp_path):
    """steps < 1 divided by zero in a quantized export's validation, or validated nothing;
    refused before anything is read or written."""
    for call in (lambda: export_model(tmp_path / "src", tmp_path / "out", steps=steps),
                 lambda: export_pair(tmp_path / "t", tmp_path / "d", tmp_path / "pair",
                                     steps=steps)):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            call()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("content", ["[]", '{"model": {"vocab": {"a": 0}}, "added_tokens": '
                                     '[{"content": "b"}]}', "{not json"])
def test_a_malformed_tokenizer_json_is_named_not_a_traceback(hf_pair_dirs, tmp_path, content,
                                                              monkeypatch):
    """A tokenizer.json that is not what tokenizers writes: an UnsupportedModelError naming
    the file and the fix (it was an AttributeError, a KeyError or a bare JSON message)."""
    draft = tmp_path / "draft"
    shutil.copytree(hf_pair_dirs["draft"], draft)
    (draft / "tokenizer.json").write_text(content)
    _no_export(monkeypatch)
    with pytest.raises(UnsupportedModelError, match="tokenizer.json is not a tokenizers JSON "
                                                    "file.*save_pretrained"):
        export_pair(hf_pair_dirs["target"], draft, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_config_without_model_type_is_refused_not_guessed(hf_pair_dirs, tmp_path,
                                                           monkeypatch):
    """transformers guesses a missing model_type from the folder's name ("cfg_empty" reads
    as MPT); quickdraft refuses the config, naming the field, and invalid JSON too."""
    _no_export(monkeypatch)
    target, out = hf_pair_dirs["target"], tmp_path / "out"
    for name, text in (("cfg_empty", "{}"), ("my-gpt2-copy", "[]"), ("broken", "{oops")):
        folder = tmp_path / name
        shutil.copytree(hf_pair_dirs["draft"], folder)
        (folder / "config.json").write_text(text)
        with pytest.raises(UnsupportedModelError, match="model_type|not valid JSON"):
            export_pair(target, folder, out)
    assert not out.exists()
