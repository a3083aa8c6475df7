"""Static exports with 4-bit weights (--kv-cache static --dtype int4): the builder's
MatMulNBits graph on the CPU, its manifest (dtype fp32, weights int4), the runtime on it,
validation to a quantization tolerance that still refuses a broken graph, and the
refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

for _name in ("onnxruntime_genai", "onnx_ir", "torch", "transformers", "onnxruntime", "onnx"):
    pytest.importorskip(_name)

import onnx  # noqa: E402

from quickdraft.cli import main as cli_main  # noqa: E402
from quickdraft.export import builder as static  # noqa: E402
from quickdraft.export import load_manifest  # noqa: E402
from quickdraft.export.validate import QUANTIZED_TOLERANCES, ExportValidationError  # noqa: E402
from quickdraft.generation import autoregressive_generate, speculative_generate  # noqa: E402
from quickdraft.ort_backend import load_pair  # noqa: E402
from quickdraft.sampling import SamplingConfig  # noqa: E402

PROMPTS = [[5], [17, 300, 41, 9], list(range(40, 52))]


@pytest.fixture(scope="module")
def int4_pair(tmp_path_factory, hf_pair_dirs):
    """The tiny Llama pair exported by the CLI verb, static int4 on the CPU."""
    out = tmp_path_factory.mktemp("int4") / "pair"
    rc = cli_main(["export", "--target", str(hf_pair_dirs["target"]), "--draft",
                   str(hf_pair_dirs["draft"]), "--out", str(out), "--kv-cache", "static",
                   "--dtype", "int4", "--max-length", "128", "--steps", "12"])
    assert rc == 0
    return out


def test_int4_manifest_and_graph(int4_pair):
    max_rel, min_agree, _ = QUANTIZED_TOLERANCES["int4"]
    for role in ("target", "draft"):
        folder = int4_pair / role
        m = load_manifest(folder)
        assert (m.dtype, m.weights, m.execution_provider) == ("fp32", "int4", "cpu")
        assert m.kv_cache == "static" and m.attention == "GroupQueryAttention"
        assert json.loads((folder / "quickdraft.json").read_text())["weights"] == "int4"
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert nbits and not [n for n in graph.node if n.op_type == "MatMul"]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, 32, 4)
        types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
        assert types["logits"] == types["past_key_values.0.key"] == onnx.TensorProto.FLOAT
        v = m.validation
        assert v["weights"] == "int4" and v["greedy_steps"] == 12
        assert 0 < v["max_rel_diff"] <= max_rel and v["greedy_agreement"] >= min_agree
        assert v["cache_max_rel_diff"] < 0.05 and v["static_max_rel_diff"] <= max_rel
        assert v["diff_over_tolerance"] <= 1 and v["static_diff_over_tolerance"] <= 1


def test_int4_speculative_equals_autoregressive(int4_pair):
    pair = load_pair(int4_pair, device="cpu")
    assert pair.target.manifest.weights == "int4"
    greedy = SamplingConfig(temperature=0)
    for prompt in PROMPTS:
        ar = autoregressive_generate(pair.target, prompt, max_new_tokens=24, sampling=greedy,
                                     rng=np.random.default_rng(0))
        sp = speculative_generate(pair.target, pair.draft, prompt, gamma=3,
                                  max_new_tokens=24, sampling=greedy,
                                  rng=np.random.default_rng(0))
        assert sp.tokens == ar.tokens and len(ar.tokens) == 24


def _swap_layers(path):
    """Give layer 0 the MatMulNBits weights of layer 1 and the reverse (wrong layer order)."""
    model = onnx.load(str(path), load_external_data=False)
    nodes = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    swapped = 0
    for name, node in nodes.items():
        other = nodes.get(name.replace("/layers.0/", "/layers.1/"))
        if "/layers.0/" in name and other is not None:
            a, b = list(node.input[1:]), list(other.input[1:])
            del node.input[1:], other.input[1:]
            node.input.extend(b)
            other.input.extend(a)
            swapped += 1
    assert swapped
    onnx.save(model, str(path))


def _zero_cache(path):
    """Feed every GroupQueryAttention past * 0: the cache reads back as zeros."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    graph.initializer.append(onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT, [], [0.0]))
    nodes = []
    for node in graph.node:
        if node.op_type == "GroupQueryAttention":
            for j in (3, 4):  # past_key, past_value
                name = node.input[j] + "_zeroed"
                nodes.append(onnx.helper.make_node("Mul", [node.input[j], "zero"], [name]))
                node.input[j] = name
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))


@pytest.mark.parametrize(("breaker", "message"), [
    (_swap_layers, "differ from PyTorch by"),
    (_zero_cache, "KV cache is broken"),
])
def test_broken_int4_graph_is_refused(hf_pair_dirs, tmp_path, monkeypatch, breaker, message):
    """Quantization error passes validation; a graph broken after the build does not."""
    run_builder = static.run_builder

    def broken_builder(source, out_dir, **kwargs):
        output = run_builder(source, out_dir, **kwargs)
        breaker(out_dir / "model.onnx")
        return output

    monkeypatch.setattr(static, "run_builder", broken_builder)
    with pytest.raises(ExportValidationError, match=message):
        static.export_static_model(hf_pair_dirs["target"], tmp_path / "x", dtype="int4",
                                   max_length=64, steps=8)
    assert not (tmp_path / "x").exists()


def test_int4_refusals(hf_pair_dirs, tmp_path, capsys):
    base = ["export", "--target", str(hf_pair_dirs["target"]), "--draft",
            str(hf_pair_dirs["draft"]), "--out", str(tmp_path / "out"), "--dtype", "int4"]
    assert cli_main(base) == 1  # --kv-cache dynamic, the default
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--kv-cache static" in err and "int4" in err
    assert cli_main([*base, "--kv-cache", "dynamic"]) == 1
    assert "--kv-cache static" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():  # validating a CUDA build needs a CUDA machine
        assert cli_main([*base, "--kv-cache", "static", "--device", "cuda"]) == 1
        assert "--no-validate" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_int4_cuda_builds_without_a_gpu(hf_pair_dirs, tmp_path):
    """-e cuda needs no GPU to build: fp16 caches and logits, execution_provider cuda."""
    report = static.export_static_model(hf_pair_dirs["draft"], tmp_path / "cuda", dtype="int4",
                                        device="cuda", max_length=64, validate=False)
    m = report.manifest
    assert (m.dtype, m.weights, m.execution_provider) == ("fp16", "int4", "cuda")
    assert m.validation == {}
    graph = onnx.load(str(tmp_path / "cuda" / "model.onnx"), load_external_data=False).graph
    assert any(n.op_type == "MatMulNBits" for n in graph.node)


def test_int4_target_kernel_is_chosen_by_use(int4_pair):
    """On CUDA an int4 target that verifies drafts gets the fpA_intB kernel, an
    autoregressive one the default; float weights and the CPU keep quickdraft's options."""
    from quickdraft.ort_backend import Device
    from quickdraft.ort_backend.generator import FPA_INTB_GEMM, target_options

    m = load_manifest(int4_pair / "target")
    spec = target_options(m, Device("cuda"), speculative=True)
    ar = target_options(m, Device("cuda"), speculative=False)
    assert spec.get_session_config_entry(FPA_INTB_GEMM) == "1"
    assert ar.get_session_config_entry(FPA_INTB_GEMM) == "0"
    assert target_options(m, Device("cpu"), speculative=True) is None
    import dataclasses
    assert target_options(dataclasses.replace(m, weights=""), Device("cuda"),
                          speculative=True) is None
