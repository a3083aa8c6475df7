"""The fast path on the CPU: static-cache graphs (onnxruntime-genai's builder) run with
shared past/present buffers, driven by the generic generation loop, and verification on
the device as an ONNX graph."""

from __future__ import annotations

import json

import numpy as np
import pytest

for _name in ("onnxruntime_genai", "onnx_ir", "torch", "transformers", "onnxruntime", "onnx"):
    pytest.importorskip(_name)

from quickdraft.export import load_manifest  # noqa: E402
from quickdraft.export.checks import UnsupportedModelError  # noqa: E402
from quickdraft.export.static import export_static_model, export_static_pair  # noqa: E402
from quickdraft.generation import (  # noqa: E402
    ModelDrafter,
    autoregressive_generate,
    speculative_generate,
    speculative_step,
)
from quickdraft.ort_backend.static import StaticModelError, StaticOrtModel  # noqa: E402
from quickdraft.ort_backend.verify_graph import (  # noqa: E402
    DeviceVerifier,
    device_speculative_step,
)
from quickdraft.sampling import SamplingConfig  # noqa: E402

CACHE = 96  # tokens per static cache in these tests (the models allow 256)
PROMPTS = [[5], [17, 300, 41, 9], list(range(40, 52)), [0, 511, 256, 3, 3, 3, 3, 80]]


@pytest.fixture(scope="module")
def static_pair(tmp_path_factory, hf_pair_dirs):
    out = tmp_path_factory.mktemp("static") / "pair"
    export_static_pair(hf_pair_dirs["target"], hf_pair_dirs["draft"], out, steps=8)
    return out


def load(folder, steps=(1,)) -> StaticOrtModel:
    return StaticOrtModel(folder, max_length=CACHE, graph_steps=steps)


def torch_logits(hf_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def test_static_export_layout(static_pair):
    for role in ("target", "draft"):
        folder = static_pair / role
        for name in ("model.onnx", "model.onnx.data", "tokenizer.json", "genai_config.json"):
            assert (folder / name).is_file(), name
        m = load_manifest(folder)
        assert m.kv_cache == "static" and m.kv_layout == "bnsh" and m.dtype == "fp32"
        assert m.architecture == "llama" and m.vocab_size == 512 and m.max_length == 256
        assert not m.has_position_ids and m.has_attention_mask
        assert set(m.input_names) == {"input_ids", "attention_mask"} | {
            f"past_key_values.{i}.{kv}" for i in range(m.num_layers) for kv in ("key", "value")}
        v = m.validation
        assert v["static_diff_over_tolerance"] < 1 and v["diff_over_tolerance"] < 1
        assert min(v["greedy_equal_steps"]) == 8
        extra = json.loads((folder / "quickdraft.json").read_text())["static"]
        assert extra["max_cache_length"] == 256
    assert not list(static_pair.parent.glob(".pair.partial-*"))


def test_static_logits_equal_pytorch_and_optimum(static_pair, hf_pair_dirs,
                                                 exported_llama_pair):
    from quickdraft.ort_backend import OrtModel

    ids = [int(t) for t in np.random.default_rng(0).integers(0, 512, 30)]
    ref = torch_logits(hf_pair_dirs["target"], ids)
    model = load(static_pair / "target", steps=(1, 6))
    state = model.new_state()
    # a prompt, one token, a verify-sized step (6 tokens) on a past, then the rest
    cuts = [0, 11, 12, 18, 19, 30]
    got = np.concatenate([state.append(ids[a:b]) for a, b in zip(cuts, cuts[1:])])
    assert np.abs(got - ref).max() < 1e-4
    assert model.calls["captured_steps"] == 3  # the 1- and 6-token steps used their bindings
    generic = OrtModel(exported_llama_pair / "target").new_state().append(ids)
    assert np.abs(got - generic).max() < 1e-4


def test_rewind_gives_a_fresh_forward(static_pair):
    model = load(static_pair / "target", steps=(1, 4))
    ids = [int(t) for t in np.random.default_rng(1).integers(0, 512, 24)]
    fresh = model.new_state().append(ids)
    state = model.new_state()
    state.append(ids[:10])
    state.append([7, 8, 9, 10])  # rejected draft tokens, written into the caches
    state.rewind(10)
    state.append([1, 2, 3, 4])
    state.rewind(6)  # roll back into the prompt
    assert state.tokens == ids[:6]
    rows = [state.append(ids[6:10]), state.append([ids[10]]), state.append(ids[11:])]
    assert np.abs(np.concatenate(rows) - fresh[6:]).max() < 1e-5


@pytest.mark.parametrize("draft_role", ["draft", "target"])
@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_speculative_equals_autoregressive(static_pair, gamma, draft_role):
    """With the real (random, unrelated) draft nearly every draft token is rejected; with
    the target as its own draft every one is accepted and the bonus token is used."""
    target = load(static_pair / "target", steps=(1, gamma + 1))
    draft = load(static_pair / draft_role, steps=(1, 2))
    greedy = SamplingConfig(temperature=0)
    for prompt in PROMPTS:
        ar = autoregressive_generate(target, prompt, max_new_tokens=30, sampling=greedy,
                                     rng=np.random.default_rng(0))
        sp = speculative_generate(target, draft, prompt, gamma=gamma, max_new_tokens=30,
                                  sampling=greedy, rng=np.random.default_rng(0))
        assert sp.tokens == ar.tokens
        if draft_role == "target":
            assert sp.stats.accepted_per_iteration[:-1] == [gamma] * (sp.stats.iterations - 1)
    assert target.calls["captured_steps"] > 0 and draft.calls["captured_steps"] > 0


@pytest.mark.parametrize(("sampling", "draft_role"), [
    (SamplingConfig(temperature=0), "draft"),
    (SamplingConfig(temperature=0), "target"),
    (SamplingConfig(temperature=1.0), "draft"),
    (SamplingConfig(temperature=0.8, top_k=20, top_p=0.9), "draft"),
    (SamplingConfig(temperature=1.5, top_k=3), "draft"),
])
def test_verify_graph_iteration_equals_numpy_iteration(static_pair, sampling, draft_role):
    """Whole speculative iterations: NumPy verify vs the verification graph, from the same
    states and uniforms, give the same tokens (and the graph path stays on the device
    for the target's logits)."""
    gamma = 4
    paths = []
    for _ in range(2):  # two independent pairs of models: one per path
        t = load(static_pair / "target", steps=(1, gamma + 1))
        d = load(static_pair / draft_role, steps=(1, 2))
        paths.append((t.new_state(), ModelDrafter(d, sampling)))
    vocab = paths[0][0].model.vocab_size
    verifier = DeviceVerifier(gamma, vocab, sampling)
    rng = np.random.default_rng(7)
    accepted = []
    for prompt in PROMPTS[1:3]:
        ids_np, ids_dev = list(prompt), list(prompt)
        for _ in range(8):
            u = rng.random(2 * gamma + 1)
            ref = speculative_step(paths[0][0], paths[0][1], ids_np, gamma, sampling,
                                   u[:gamma], u[gamma:2 * gamma], float(u[-1]))
            tokens, n, _ = device_speculative_step(
                paths[1][0], paths[1][1], ids_dev, gamma, sampling, u[:gamma],
                u[gamma:2 * gamma], float(u[-1]), verifier)
            assert (tokens, n) == (ref.tokens, ref.n_accepted)
            ids_np += ref.tokens
            ids_dev += tokens
            accepted.append(n)
    print(sampling, draft_role, "accepted per iteration", accepted)


def test_greedy_device_loop_equals_autoregressive(static_pair):
    """A generation loop with verification on the device equals greedy decoding."""
    gamma, greedy = 3, SamplingConfig(temperature=0)
    target = load(static_pair / "target", steps=(1, gamma + 1))
    draft = load(static_pair / "draft", steps=(1, 2))
    verifier = DeviceVerifier(gamma, target.vocab_size, greedy)
    for prompt in PROMPTS:
        ar = autoregressive_generate(target, prompt, max_new_tokens=24, sampling=greedy,
                                     rng=np.random.default_rng(0)).tokens
        state, drafter, ids = target.new_state(), ModelDrafter(draft, greedy), list(prompt)
        while len(ids) - len(prompt) < 24:
            zeros = np.zeros(gamma)
            tokens, _, _ = device_speculative_step(state, drafter, ids, gamma, greedy, zeros,
                                                   zeros, 0.0, verifier)
            ids += tokens
        assert ids[len(prompt):len(prompt) + 24] == ar


def test_state_errors(static_pair, exported_llama_pair):
    model = load(static_pair / "draft")
    old = model.new_state()
    new = model.new_state()
    with pytest.raises(RuntimeError, match="stale"):
        old.append([1])
    with pytest.raises(ValueError, match="exceeds the static cache"):
        new.append(list(range(CACHE + 1)))
    new.append([1, 2])
    with pytest.raises(ValueError, match="rewind"):
        new.rewind(3)
    with pytest.raises(ValueError, match="token ids"):
        new.append([512])
    with pytest.raises(ValueError, match="max_length"):
        StaticOrtModel(static_pair / "draft", max_length=1000)
    with pytest.raises(ValueError, match="cuda_graph"):
        StaticOrtModel(static_pair / "draft", cuda_graph=True)
    with pytest.raises(StaticModelError, match="kv_cache"):
        StaticOrtModel(exported_llama_pair / "draft")


def test_qwen2_static_export(hf_pair_factory, tmp_path):
    dirs = hf_pair_factory("qwen2")
    report = export_static_model(dirs["draft"], tmp_path / "draft", max_length=128, steps=4)
    m = report.manifest
    assert m.architecture == "qwen2" and m.kv_cache == "static" and m.max_length == 128
    assert m.validation["static_diff_over_tolerance"] < 1
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    got = StaticOrtModel(tmp_path / "draft", graph_steps=(1,)).new_state().append(ids)
    assert np.abs(got - torch_logits(dirs["draft"], ids)).max() < 1e-4


def test_static_export_refusals(hf_pair_factory, hf_pair_dirs, tmp_path):
    gpt2 = hf_pair_factory("gpt2")
    with pytest.raises(UnsupportedModelError, match="not covered by the static path"):
        export_static_model(gpt2["draft"], tmp_path / "gpt2")
    with pytest.raises(ValueError, match="runs on cpu"):
        export_static_model(hf_pair_dirs["draft"], tmp_path / "x", dtype="fp32", device="cuda")
    with pytest.raises(ValueError, match="dtype"):
        export_static_model(hf_pair_dirs["draft"], tmp_path / "x", dtype="bf16", device="cuda")
    with pytest.raises(ValueError, match="max_length"):
        export_static_model(hf_pair_dirs["draft"], tmp_path / "x", max_length=10_000,
                            validate=False)
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.partial-")]


def test_fast_generator(static_pair):
    """FastGenerator (device verification, time breakdown): greedy speculative equals
    greedy autoregressive; seeded sampling repeats and equals the NumPy loop's output."""
    from quickdraft.ort_backend.static import FastGenerator

    gamma = 3
    target = load(static_pair / "target", steps=range(1, gamma + 2))
    draft = load(static_pair / "draft", steps=(1, 2))
    greedy = FastGenerator(target, draft, sampling=SamplingConfig(temperature=0))
    greedy.eos_ids = frozenset()
    for prompt in PROMPTS:
        ar, ar_stats = greedy.autoregressive(prompt, 20)
        sp, stats = greedy.speculative(prompt, 20, gamma)
        assert sp == ar and len(sp) == 20
        assert stats["iterations"] == stats["target_calls"] == len(stats["accepted_per_iteration"])
        assert stats["host_s"] >= 0 and stats["tokens_per_s"] > 0
        assert ar_stats["new_tokens"] == 20
    sampling = SamplingConfig(temperature=1.0)
    gen = FastGenerator(target, draft, sampling=sampling)
    gen.eos_ids = frozenset()
    first, _ = gen.speculative(PROMPTS[1], 25, gamma, seed=3)
    assert gen.speculative(PROMPTS[1], 25, gamma, seed=3)[0] == first
    ref = speculative_generate(target, draft, PROMPTS[1], gamma=gamma, max_new_tokens=25,
                               sampling=sampling, rng=np.random.default_rng(3))
    assert first == ref.tokens
