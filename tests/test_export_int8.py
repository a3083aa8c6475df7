"""int8 weight storage (quickdraft.export.int8): weights snapped to the int8 grid, stored as
int8 + DequantizeLinear, folded back to fp32 by ONNX Runtime at load, so the stored graph
computes what the fp32 graph computes; refusals leave the folder as it was."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

for _name in ("torch", "transformers", "onnxruntime", "onnx"):
    pytest.importorskip(_name)

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from quickdraft.export import export_pair, load_manifest  # noqa: E402
from quickdraft.export.int8 import int8_grid, snap_to_int8, store_int8  # noqa: E402
from quickdraft.manifest import INT8_FOLD_OPTION  # noqa: E402
from quickdraft.ort_backend import DecodeConfig, load_pair  # noqa: E402

PROMPTS = [[5], [17, 300, 41, 9], list(range(40, 52))]


@pytest.fixture(scope="module")
def snapped_dirs(tmp_path_factory, hf_pair_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("snapped")
    dirs = {}
    for role, src in hf_pair_dirs.items():
        model = AutoModelForCausalLM.from_pretrained(src)
        assert snap_to_int8(model) > 0
        model.save_pretrained(root / role)
        AutoTokenizer.from_pretrained(src).save_pretrained(root / role)
        dirs[role] = root / role
    return dirs


def _export(tmp_path_factory, dirs, name: str, **options):
    fp32 = tmp_path_factory.mktemp(name) / "pair"
    export_pair(dirs["target"], dirs["draft"], fp32, **options)
    int8 = fp32.parent / "pair-int8"
    shutil.copytree(fp32, int8)
    for role in ("target", "draft"):
        store_int8(int8 / role)
    return fp32, int8


@pytest.fixture(scope="module")
def dynamic_pairs(tmp_path_factory, snapped_dirs):
    return _export(tmp_path_factory, snapped_dirs, "int8-dynamic")


@pytest.fixture(scope="module")
def static_pairs(tmp_path_factory, snapped_dirs):
    for name in ("onnxruntime_genai", "onnx_ir"):
        pytest.importorskip(name)
    return _export(tmp_path_factory, snapped_dirs, "int8-static", kv_cache="static",
                   max_length=128)


def test_int8_grid_round_trip():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 96)).astype(np.float32)
    w[:, 3] = 0.0  # a channel of zeros
    q, scale = int8_grid(w, axis=1)
    assert q.dtype == np.int8 and scale.shape == (96,) and scale[3] == 1.0
    assert np.abs(q).max() == 127
    snapped = q.astype(np.float32) * scale
    assert np.abs(snapped - w).max() <= scale.max() / 2 + 1e-7
    q2, scale2 = int8_grid(snapped, axis=1)  # values on the grid stay where they are
    assert np.array_equal(q2, q)
    assert np.allclose(q2.astype(np.float32) * scale2, snapped, rtol=1e-6, atol=0)


def _logits(folder, prompt):
    pair = load_pair(folder, device="cpu", draft=False)
    state = pair.target.new_state()
    out = np.asarray(state.append(prompt))  # [len(prompt), V]
    state.close()
    return out


@pytest.mark.parametrize("pairs", ["dynamic_pairs", "static_pairs"])
def test_int8_storage_computes_the_fp32_graph(pairs, request):
    fp32, int8 = request.getfixturevalue(pairs)
    for role in ("target", "draft"):
        m = load_manifest(int8 / role)
        assert (m.dtype, m.weights, m.external_data) == ("fp32", "int8", [])
        graph = onnx.load(str(int8 / role / m.model_file)).graph
        assert [n for n in graph.node if n.op_type == "DequantizeLinear"]
        bytes8 = sum(p.stat().st_size for p in (int8 / role).glob("model.onnx*"))
        bytes32 = sum(p.stat().st_size for p in (fp32 / role).glob("model.onnx*"))
        # the tiny draft's graph is mostly small tensors that stay fp32
        assert bytes8 < (0.45 if role == "target" else 0.75) * bytes32, (role, bytes8, bytes32)
    for prompt in PROMPTS:
        a, b = _logits(fp32, prompt), _logits(int8, prompt)
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())


@pytest.mark.parametrize("pairs", ["dynamic_pairs", "static_pairs"])
def test_int8_pair_greedy_speculative_equals_autoregressive(pairs, request):
    _, int8 = request.getfixturevalue(pairs)
    pair = load_pair(int8, device="cpu", max_gamma=4)
    config = DecodeConfig(max_new_tokens=24)
    for prompt in PROMPTS:
        with pair.generator(config, gamma=4) as spec, pair.generator(config) as auto:
            assert spec.generate(prompt).tokens == auto.generate(prompt).tokens


def test_onnxruntime_folds_int8_weights_only_with_the_option(dynamic_pairs, tmp_path):
    _, int8 = dynamic_pairs
    path = int8 / "target" / load_manifest(int8 / "target").model_file
    ops = {}
    for fold in (True, False):
        options = ort.SessionOptions()
        if fold:
            options.add_session_config_entry(INT8_FOLD_OPTION, "1")
        options.optimized_model_filepath = str(tmp_path / f"opt-{fold}.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
        ops[fold] = {n.op_type for n in graph.node}
    assert "DequantizeLinear" not in ops[True] and "MatMulNBits" not in ops[True]
    assert "MatMul" in ops[True]
    # without the option ONNX Runtime computes in 8 bits: another model than the fp32 one
    assert "MatMulNBits" in ops[False] or "DequantizeLinear" in ops[False]


def test_store_int8_refuses_weights_off_the_grid(tmp_path_factory, hf_pair_dirs):
    out = tmp_path_factory.mktemp("int8-refuse") / "pair"
    export_pair(hf_pair_dirs["target"], hf_pair_dirs["draft"], out)
    folder = out / "target"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="not on an int8 grid.*snap_to_int8"):
        store_int8(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_store_int8_refuses_a_stored_folder(dynamic_pairs):
    _, int8 = dynamic_pairs
    with pytest.raises(ValueError, match="fp32 export with plain weights"):
        store_int8(int8 / "draft")


def test_cli_export_dtype_int8(tmp_path, hf_pair_dirs):
    """`quickdraft export --dtype int8`: snapped, exported, validated and stored in one go;
    the manifests and the export marker name the original sources."""
    import json

    from quickdraft.cli import main as cli_main

    out = tmp_path / "pair"
    rc = cli_main(["export", "--target", str(hf_pair_dirs["target"]), "--draft",
                   str(hf_pair_dirs["draft"]), "--out", str(out), "--dtype", "int8",
                   "--steps", "8"])
    assert rc == 0
    marker = json.loads((out / "quickdraft-export.json").read_text())
    for role in ("target", "draft"):
        m = load_manifest(out / role)
        assert (m.dtype, m.weights) == ("fp32", "int8")
        assert m.source == str(hf_pair_dirs[role]) == marker["models"][role]["source"]
        assert m.validation["greedy_steps"] == 8
    assert not list(tmp_path.glob(".quickdraft-int8-*"))  # nothing left beside it
    pair = load_pair(out, device="cpu", max_gamma=4)
    config = DecodeConfig(max_new_tokens=16)
    with pair.generator(config, gamma=4) as spec, pair.generator(config) as auto:
        assert spec.generate(PROMPTS[1]).tokens == auto.generate(PROMPTS[1]).tokens
    with pytest.raises(ValueError, match="--device cpu"):
        export_pair(hf_pair_dirs["target"], hf_pair_dirs["draft"], tmp_path / "x",
                    dtype="int8", device="cuda")
    with pytest.raises(ValueError, match="reads Hugging Face folders"):
        export_pair(tmp_path / "model.gguf", hf_pair_dirs["draft"], tmp_path / "y",
                    dtype="int8")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_int8_checks_its_sources_and_options_before_snapping(tmp_path, hf_pair_dirs):
    """--dtype int8 checks what the other exports check, before any weights are snapped:
    a missing folder or a bad option is named, errors name the user's folders (not a
    temporary copy), nothing is left behind; a new nested --out is made."""
    target, draft = hf_pair_dirs["target"], hf_pair_dirs["draft"]
    with pytest.raises(FileNotFoundError, match="nosuch"):
        export_pair(target, tmp_path / "nosuch", tmp_path / "a", dtype="int8")
    with pytest.raises(ValueError, match="max_length sets the length of static caches"):
        export_pair(target, draft, tmp_path / "b", dtype="int8", max_length=64)
    with pytest.raises(ValueError, match="max_length must be a whole number of at least 8"):
        export_pair(target, draft, tmp_path / "c", dtype="int8", kv_cache="static",
                    max_length=2)
    assert not list(tmp_path.iterdir())
    out = tmp_path / "new" / "nested" / "pair"
    export_pair(target, draft, out, dtype="int8", steps=2)
    assert load_manifest(out / "target").weights == "int8"
    assert not list(out.parent.glob(".quickdraft-int8-*"))
