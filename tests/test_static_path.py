"""The fast path on the CPU: static-cache graphs (onnxruntime-genai's builder) run with
shared past/present buffers, driven by the generic generation loop, and verification on
the device as an ONNX graph plugged into that loop as its verifier; the CLI verbs and the
Generator on static exports."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

for _name in ("onnxruntime_genai", "onnx_ir", "torch", "transformers", "onnxruntime", "onnx"):
    pytest.importorskip(_name)

from quickdraft.cli import main as cli_main  # noqa: E402
from quickdraft.export import load_manifest  # noqa: E402
from quickdraft.export.builder import export_static_model  # noqa: E402
from quickdraft.export.checks import UnsupportedModelError  # noqa: E402
from quickdraft.generation import (  # noqa: E402
    ModelDrafter,
    autoregressive_generate,
    speculative_generate,
    speculative_step,
)
from quickdraft.ort_backend import DecodeConfig, Generator, OrtModel, load_pair  # noqa: E402
from quickdraft.ort_backend.static import StaticModelError, StaticOrtModel  # noqa: E402
from quickdraft.ort_backend.verify_graph import GraphVerifier  # noqa: E402
from quickdraft.sampling import SamplingConfig  # noqa: E402

CACHE = 96  # tokens per static cache in these tests (the models allow 256)
EXPORT_CACHE = 200  # the cache length the export writes (--max-length)
PROMPTS = [[5], [17, 300, 41, 9], list(range(40, 52)), [0, 511, 256, 3, 3, 3, 3, 80]]


@pytest.fixture(scope="module")
def static_pair(static_llama_pair):
    """The tiny Llama pair exported by the CLI verb with --kv-cache static."""
    return static_llama_pair


def load(folder, steps=(1,)) -> StaticOrtModel:
    return StaticOrtModel(folder, cache_length=CACHE, graph_steps=steps)


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
        assert m.architecture == "llama" and m.vocab_size == 512
        assert m.max_length == 256 and m.max_cache_length == EXPORT_CACHE  # context, cache
        assert m.attention == "GroupQueryAttention" and "builder" in m.exporter
        assert not m.has_position_ids and m.has_attention_mask
        assert set(m.input_names) == {"input_ids", "attention_mask"} | {
            f"past_key_values.{i}.{kv}" for i in range(m.num_layers) for kv in ("key", "value")}
        assert m.output_names[0] == "logits" and m.output_names[-1] == "greedy_tokens"
        v = m.validation
        assert v["static_diff_over_tolerance"] < 1 and v["diff_over_tolerance"] < 1
        assert min(v["greedy_equal_steps"]) == 8
        assert "static" not in json.loads((folder / "quickdraft.json").read_text())
        assert StaticOrtModel(folder).max_length == EXPORT_CACHE  # the default cache
    assert not list(static_pair.parent.glob(".pair.partial-*"))


def test_version_1_manifest_is_read(static_pair, tmp_path):
    """Version 1 kept the cache length in max_length and the context in a "static" block."""
    folder = tmp_path / "v1"
    shutil.copytree(static_pair / "target", folder)
    data = json.loads((folder / "quickdraft.json").read_text())
    for key in ("max_cache_length", "exporter", "attention"):
        del data[key]
    data.update(manifest_version=1, max_length=EXPORT_CACHE, static={
        "max_cache_length": EXPORT_CACHE, "max_position_embeddings": 256})
    (folder / "quickdraft.json").write_text(json.dumps(data))
    m = load_manifest(folder)
    assert (m.max_length, m.max_cache_length, m.attention) == (256, EXPORT_CACHE,
                                                               "GroupQueryAttention")
    assert m.manifest_version == 2


def test_static_logits_equal_pytorch_and_optimum(static_pair, hf_pair_dirs,
                                                 exported_llama_pair):
    ids = [int(t) for t in np.random.default_rng(0).integers(0, 512, 30)]
    ref = torch_logits(hf_pair_dirs["target"], ids)
    model = load(static_pair / "target", steps=(1, 6))
    state = model.new_state()
    # a prompt, one token, a verify-sized step (6 tokens) on a past, then the rest
    cuts = [0, 11, 12, 18, 19, 30]
    got = np.concatenate([state.append(ids[a:b]) for a, b in zip(cuts, cuts[1:])])
    assert np.abs(got - ref).max() < 1e-4
    assert state.calls["captured_steps"] == 3  # the 1- and 6-token steps used their bindings
    assert state.times.calls == 5 and state.times.tokens == 30
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


def test_greedy_output_is_the_argmax_of_the_logits(static_pair):
    """append_greedy (the graph's greedy_tokens, read as ids) picks what greedy_tokens picks
    on append's logits, for every step length and through rollbacks; a 1-token step writes
    its argmax over its own input, and the next call with another token is not confused."""
    from quickdraft.protocols import advance_greedy, greedy_append
    from quickdraft.sampling import greedy_tokens

    greedy_model = load(static_pair / "target", steps=(1, 4))
    logits_model = load(static_pair / "target", steps=(1, 4))
    assert greedy_model.has_greedy
    g, lg = greedy_model.new_state(), logits_model.new_state()
    rng = np.random.default_rng(5)
    ids = [int(t) for t in rng.integers(0, 512, 9)]
    chunks = [ids, [3], [4, 5, 6, 7], [8, 9], [1]]
    for chunk in chunks:
        want = greedy_tokens(lg.append(chunk))  # [k]
        got = g.append_greedy(chunk)  # [k] int64
        assert got.dtype == np.int64 and got.tolist() == want.tolist()
    chain = [int(got[-1])]
    for _ in range(6):  # a greedy chain: each step feeds the last argmax
        a = greedy_append(g, chain[-1:])  # [1]
        assert a.tolist() == greedy_tokens(lg.append(chain[-1:])).tolist()
        chain.append(int(a[-1]))
    assert greedy_append(g, [0]).tolist() == greedy_tokens(lg.append([0])).tolist()
    back = len(ids) + 2
    g.rewind(back)
    lg.rewind(back)
    assert advance_greedy(g, g.tokens + [11, 12], 2).tolist() == \
        greedy_tokens(lg.append([11, 12])).tolist()
    assert g.append_greedy([]).shape == (0,)


def _greedy_generators(static_pair, config, prepare):
    """A speculative (gamma 3) and an autoregressive Generator on fresh static models,
    ``prepare`` applied to each of their states."""
    target = load(static_pair / "target", steps=(1, 2, 3, 4, 5))
    draft = load(static_pair / "draft", steps=(1, 2))
    spec = Generator(target, ModelDrafter(draft, config.sampling, 3), config)
    auto = Generator(target, None, config)
    for state in (spec._state, spec.drafter.state, auto._state):
        prepare(state)
    return spec, auto


def test_greedy_chain_skips_uploads_and_decodes_the_same(static_pair):
    """On a device, a 1-token step whose input is the argmax it just wrote skips the upload.
    Run here with the model set to copy its inputs as a device model does (on the CPU the
    bound buffers are the host arrays, so both ways see the same memory): greedy speculative
    and autoregressive decoding give the same tokens as the plain CPU model, and uploads
    were skipped only for chained calls."""
    greedy = DecodeConfig(max_new_tokens=24)

    def generators(device_like: bool):
        def prepare(state):
            state._slot.on_device = device_like  # copy inputs with update_inplace, as on CUDA

        return _greedy_generators(static_pair, greedy, prepare)

    def skipped(gen):
        return sum(s.calls["uploads_skipped"] for s in [gen._state, *gen._draft_states])

    (plain_sp, plain_ar), (chained_sp, chained_ar) = generators(False), generators(True)
    for prompt in PROMPTS[1:3]:
        want_ar = plain_ar.generate(prompt).tokens
        want_sp = plain_sp.generate(prompt).tokens
        assert chained_ar.generate(prompt).tokens == want_ar
        assert chained_sp.generate(prompt).tokens == want_sp == want_ar
    assert skipped(chained_ar) > 0  # the AR chain
    assert chained_sp.drafter.state.calls["uploads_skipped"] > 0  # the draft chains
    assert skipped(plain_ar) == skipped(plain_sp) == 0


def test_capture_calls_leave_the_decoding_unchanged(static_pair):
    """What a CUDA slot runs when it is made (CAPTURE_CALLS runs of each fixed-length step
    on token 0 at position 0, the calls in which ONNX Runtime captures its graphs) writes
    only cache positions the next prefill rewrites, and leaves no device ids assumed: on
    slots that ran them, here on the CPU with inputs copied as on a device, greedy
    speculative and autoregressive decoding give the plain slots' tokens, and the slots'
    call counts start at zero."""
    from quickdraft.ort_backend.static import CAPTURE_CALLS

    assert CAPTURE_CALLS >= 2  # ONNX Runtime 1.31: one regular run, then the capture
    greedy = DecodeConfig(max_new_tokens=24)

    def generators(captured: bool):
        def prepare(state):
            state._slot.on_device = True  # inputs copied with update_inplace, as on CUDA
            if captured:
                state._slot._capture()
                assert state.calls == {"captured_steps": 0, "generic_steps": 0,
                                       "uploads_skipped": 0}

        return _greedy_generators(static_pair, greedy, prepare)

    (plain_sp, plain_ar), (cap_sp, cap_ar) = generators(False), generators(True)
    for prompt in PROMPTS:
        want = plain_ar.generate(prompt).tokens
        assert cap_ar.generate(prompt).tokens == want
        assert cap_sp.generate(prompt).tokens == plain_sp.generate(prompt).tokens == want


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
        paths.append((t.new_state(), ModelDrafter(d, sampling, gamma)))
    verifier = GraphVerifier.for_model(paths[1][0].model)
    rng = np.random.default_rng(7)
    accepted = []
    for prompt in PROMPTS[1:3]:
        ids_np, ids_dev = list(prompt), list(prompt)
        for _ in range(8):
            u = rng.random(2 * gamma + 1)
            ref = speculative_step(paths[0][0], paths[0][1], ids_np, sampling,
                                   u[:gamma], u[gamma:2 * gamma], float(u[-1]))
            dev = speculative_step(paths[1][0], paths[1][1], ids_dev, sampling,
                                   u[:gamma], u[gamma:2 * gamma], float(u[-1]),
                                   verifier=verifier)
            assert (dev.tokens, dev.n_accepted) == (ref.tokens, ref.n_accepted)
            assert np.allclose(dev.betas, ref.betas, atol=1e-5)  # the graph's beta output
            ids_np += ref.tokens
            ids_dev += dev.tokens
            accepted.append(dev.n_accepted)
    print(sampling, draft_role, "accepted per iteration", accepted)


def test_greedy_device_loop_equals_autoregressive(static_pair):
    """The generic loop with verification on the device equals greedy decoding."""
    gamma, greedy = 3, SamplingConfig(temperature=0)
    target = load(static_pair / "target", steps=(1, gamma + 1))
    draft = load(static_pair / "draft", steps=(1, 2))
    verifier = GraphVerifier.for_model(target)
    for prompt in PROMPTS:
        ar = autoregressive_generate(target, prompt, max_new_tokens=24, sampling=greedy,
                                     rng=np.random.default_rng(0)).tokens
        sp = speculative_generate(target, draft, prompt, gamma=gamma, max_new_tokens=24,
                                  sampling=greedy, rng=np.random.default_rng(0),
                                  verifier=verifier)
        assert sp.tokens == ar
        assert 0 <= sp.stats.alpha <= 1  # betas came back from the graph


def test_state_errors(static_pair, exported_llama_pair):
    model = load(static_pair / "draft")
    old = model.new_state()
    new = model.new_state()
    old.append([1])  # states of one model each own their caches: both usable
    old.close()
    with pytest.raises(RuntimeError, match="closed"):
        old.append([1])
    with pytest.raises(ValueError, match="exceeds the static cache"):
        new.append(list(range(CACHE + 1)))
    new.append([1, 2])
    with pytest.raises(ValueError, match="rewind"):
        new.rewind(3)
    with pytest.raises(ValueError, match="token ids"):
        new.append([512])
    with pytest.raises(ValueError, match="cache_length"):
        StaticOrtModel(static_pair / "draft", cache_length=1000)
    with pytest.raises(ValueError, match="cuda_graph"):
        StaticOrtModel(static_pair / "draft", cuda_graph=True)
    with pytest.raises(StaticModelError, match="kv_cache"):
        StaticOrtModel(exported_llama_pair / "draft")


def test_qwen2_static_export(hf_pair_factory, tmp_path):
    dirs = hf_pair_factory("qwen2")
    report = export_static_model(dirs["draft"], tmp_path / "draft", max_length=128, steps=4)
    m = report.manifest
    assert m.architecture == "qwen2" and m.kv_cache == "static" and m.max_cache_length == 128
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


def test_generator_breakdown_and_seeds(static_pair):
    """Generator on static models (device verification, time breakdown): greedy
    speculative equals greedy autoregressive; seeded sampling repeats and equals the NumPy
    loop's output."""
    gamma = 3
    target = load(static_pair / "target", steps=range(1, gamma + 2))
    draft = load(static_pair / "draft", steps=(1, 2))
    greedy = DecodeConfig(max_new_tokens=20)
    spec = Generator(target, ModelDrafter(draft, greedy.sampling, gamma), greedy, max_draft=gamma)
    auto = Generator(target, None, greedy)
    for prompt in PROMPTS:
        ar, sp = auto.generate(prompt), spec.generate(prompt)
        assert sp.tokens == ar.tokens and len(sp.tokens) == 20
        s = sp.stats
        assert s.generation.iterations == s.target.calls
        assert s.generation.iterations == len(s.generation.accepted_per_iteration)
        assert s.target_s > 0 and s.draft_s > 0 and s.tokens_per_s > 0
        assert s.decode_s == pytest.approx(s.target_s + s.draft_s + s.verify_s + s.host_s)
        assert s.target_prefill.tokens == len(prompt) - 1 and ar.stats.new_tokens == 20
    sampling = SamplingConfig(temperature=1.0)
    config = DecodeConfig(max_new_tokens=25, sampling=sampling, seed=3)
    gen = Generator(target, ModelDrafter(draft, sampling, gamma), config, max_draft=gamma)
    first = gen.generate(PROMPTS[1]).tokens
    assert gen.generate(PROMPTS[1]).tokens == first
    ref = speculative_generate(target, draft, PROMPTS[1], gamma=gamma, max_new_tokens=25,
                               sampling=sampling, rng=np.random.default_rng(3))
    assert first == ref.tokens
    with pytest.raises(ValueError, match="same settings"):
        Generator(target, ModelDrafter(draft, SamplingConfig(0.5), gamma), config)


# -- one Generator for both kinds of export ----------------------------------------------------


GREEDY = SamplingConfig(temperature=0)


def test_load_pair_dispatches_on_kv_cache(static_pair, exported_llama_pair, tmp_path):
    fast = load_pair(static_pair, device="cpu", max_gamma=4)
    assert isinstance(fast.target, StaticOrtModel) and isinstance(fast.draft, StaticOrtModel)
    assert not fast.target.cuda_graph  # no CUDA graphs on the CPU
    assert fast.target.graph_steps == (1, 2, 3, 4, 5) and fast.draft.graph_steps == (1, 2)
    assert fast.target.max_length == EXPORT_CACHE and fast.max_draft == 4
    assert fast.generator(DecodeConfig(), gamma=4).verify == "device"
    generic = load_pair(exported_llama_pair, device="cpu")
    assert isinstance(generic.target, OrtModel)
    assert generic.generator(DecodeConfig(), gamma=4).verify == "host"
    # no RunOptions without a CUDA graph id (an empty one costs an exception per call)
    probe = fast.target.new_state()
    assert all(step.options is None for step in probe._slot.steps.values())
    assert probe._slot.generic_options is None
    probe.close()
    auto = load_pair(static_pair, draft=False)  # an fp32 static graph is for the CPU
    assert str(auto.device) == "cpu" and "built for the CPU" in auto.device_note
    short = DecodeConfig(max_new_tokens=16)
    with fast.generator(short) as ar_gen, fast.generator(short, gamma=4) as sp_gen, \
            generic.generator(short, gamma=4) as generic_gen, \
            fast.generator(DecodeConfig(max_new_tokens=8, sampling=SamplingConfig(),
                                        seed=0), gamma=4) as sampled_gen:
        for prompt in ("def main(", "import os\n"):
            ar, sp = ar_gen.generate(prompt), sp_gen.generate(prompt)
            assert sp.tokens == ar.tokens and len(sp.tokens) == 16
            # the same weights exported the other way decode the same
            assert generic_gen.generate(prompt).tokens == ar.tokens
            s = sp.stats
            # greedy: the rule on the target's argmax ids (the graph computes them);
            # sampling: the verification graph
            assert (s.kv_cache, s.verifier) == ("static", "host")
            sampled = sampled_gen.generate(prompt)
            assert sampled.stats.verifier == "device" and sampled.stats.verify_s > 0
            assert s.target.calls == s.generation.iterations and s.verify_s > 0
            assert s.decode_s >= s.target_s + s.draft_s + s.verify_s
            assert 0 <= s.generation.alpha <= 1
            assert ar.stats.verifier is None and ar.stats.verify_s == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(static_pair / "target", mixed / "target")
    shutil.copytree(exported_llama_pair / "draft", mixed / "draft")
    with pytest.raises(ValueError, match="export the pair together"):
        load_pair(mixed, device="cpu")
    target = fast.target
    # a static model can be its own draft: each state owns its caches
    with Generator(target, ModelDrafter(target, GREEDY, 2), short) as own:
        assert len(own.generate(PROMPTS[1]).tokens) == 16
    with pytest.raises(ValueError, match="verify"):
        Generator(target, verify="gpu")
    with pytest.raises(ValueError, match="--gamma 9 is more than the 4"):
        fast.generator(short, gamma=9)


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_host_and_device_verifiers_agree(kind, static_pair, exported_llama_pair):
    """The verifier seam: with one seed, verification on the host (NumPy) and on the device
    (the graph) take the same decisions in the same loop, on either kind of model."""
    folder = static_pair if kind == "static" else exported_llama_pair
    pair = load_pair(folder, device="cpu", max_gamma=3)
    accepted = set()
    for sampling in (SamplingConfig(temperature=1.0), SamplingConfig(0.8, top_k=20, top_p=0.9)):
        for seed in range(3):
            cfg = DecodeConfig(max_new_tokens=20, sampling=sampling, seed=seed)
            with pair.generator(cfg, gamma=3, verify="host") as host, \
                    pair.generator(cfg, gamma=3, verify="device") as device:
                a, b = host.generate("def main("), device.generate("def main(")
            assert a.tokens == b.tokens
            ga, gb = a.stats.generation, b.stats.generation
            assert ga.accepted_per_iteration == gb.accepted_per_iteration
            assert np.allclose(ga.beta_per_position, gb.beta_per_position, atol=1e-5)
            assert (a.stats.verifier, b.stats.verifier) == ("host", "device")
            accepted.update(ga.accepted_per_iteration)
    assert len(accepted) >= 2  # rejections and acceptances both decided


def test_graph_verifier_refuses_the_lossy_rule(static_pair):
    target = load(static_pair / "target", steps=(1, 3))
    draft = load(static_pair / "draft", steps=(1, 2))
    with pytest.raises(ValueError, match="lenience"):
        speculative_generate(target, draft, PROMPTS[1], gamma=2, max_new_tokens=4,
                             rng=np.random.default_rng(0), lenience=0.5,
                             verifier=GraphVerifier.for_model(target))


def _cli(capsys, *args):
    rc = cli_main([*map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_cli_on_a_static_export(static_pair, capsys):
    base = ["generate", "--model-dir", static_pair, "--prompt", "def main(",
            "--max-new-tokens", 12, "--device", "cpu", "--gamma", 3]
    rc, out, _ = _cli(capsys, *base, "--json")
    assert rc == 0
    res = json.loads(out)
    assert len(res["tokens"]) == 12
    # greedy: the rule on the target's argmax ids, on the host
    assert (res["stats"]["kv_cache"], res["stats"]["verifier"]) == ("static", "host")
    assert 0 <= res["stats"]["alpha"] <= 1
    rc, out, _ = _cli(capsys, *base, "--json", "--device-verify")
    graph = json.loads(out)
    # greedy is decided on the argmax ids wherever sampled proposals would be verified
    assert rc == 0 and graph["tokens"] == res["tokens"] and graph["stats"]["verifier"] == "host"
    rc, out, _ = _cli(capsys, *base, "--json", "--device-verify", "--temperature", 1,
                      "--seed", 0)
    assert rc == 0 and json.loads(out)["stats"]["verifier"] == "device"
    rc, out, _ = _cli(capsys, *base, "--json", "--autoregressive")
    assert rc == 0 and json.loads(out)["tokens"] == res["tokens"]  # greedy: the same
    rc, out, err = _cli(capsys, *base, "--stream", "--no-cuda-graph")
    assert rc == 0 and out == res["text"] + "\n"
    assert "static cache" in err and "verified on the host" in err
    with pytest.raises(SystemExit):
        _cli(capsys, *base, "--device-verify", "--host-verify")
    assert "not allowed with" in capsys.readouterr().err


def test_generate_and_serve_pass_the_attention_kernel_on(static_pair, capsys, monkeypatch):
    from quickdraft.ort_backend import generator
    from quickdraft.ort_backend.device import DEFAULT_ATTENTION
    from quickdraft.serve.app import Engine
    from quickdraft.serve.settings import ServeSettings

    seen, real = [], generator.load_pair

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attention"))
        return real(*args, **kwargs)

    monkeypatch.setattr(generator, "load_pair", spy)
    base = ["generate", "--model-dir", static_pair, "--prompt", "def main(",
            "--max-new-tokens", 8, "--device", "cpu", "--json"]
    rc, out, _ = _cli(capsys, *base)
    rc2, out2, _ = _cli(capsys, *base, "--attention", "xqa")
    assert rc == rc2 == 0 and seen == [DEFAULT_ATTENTION, "xqa"]  # the default, the flag's
    assert json.loads(out2)["tokens"] == json.loads(out)["tokens"]  # the CPU has one kernel
    with pytest.raises(SystemExit):
        _cli(capsys, *base, "--attention", "fast")
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="attention must be one of auto, xqa"):
        ServeSettings(attention="XQA")
    monkeypatch.setattr("quickdraft.serve.app.load_pair", spy)
    Engine.load(ServeSettings(model_dir=str(static_pair), device="cpu",
                              attention="flash")).close()
    assert seen[-1] == "flash"


def test_export_cli_kv_cache_errors(hf_pair_dirs, tmp_path, capsys):
    base = ["export", "--target", hf_pair_dirs["target"], "--draft", hf_pair_dirs["draft"],
            "--out", tmp_path / "out"]
    rc, _, err = _cli(capsys, *base, "--max-length", 64)
    assert rc == 1 and "max_length sets the length of static caches" in err
    rc, _, err = _cli(capsys, *base, "--kv-cache", "static", "--device", "cuda")
    assert rc == 1 and "runs on cpu" in err
    rc, _, err = _cli(capsys, *base, "--kv-cache", "static", "--max-length", 10_000)
    assert rc == 1 and "max_length must be in [8, 256]" in err
    rc, _, err = _cli(capsys, *base, "--kv-cache", "static", "--max-length", 2)
    assert rc == 1 and "a whole number of at least 8 tokens" in err  # failed in validation
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_a_gamma_the_static_cache_cannot_hold_is_refused_naming_gamma(static_llama_pair):
    """gamma + 1 target tokens and a draft chain of gamma + 1 steps after one cached token:
    at most cache - 2. gamma = cache - 1 passed the check and failed on the draft's
    chain_length, a parameter the user never set."""
    from quickdraft.ort_backend import load_pair

    with pytest.raises(ValueError, match=f"use --gamma <= {EXPORT_CACHE - 2}"):
        load_pair(static_llama_pair, device="cpu", max_gamma=EXPORT_CACHE - 1)


def _op_counts(folder):
    import collections

    import onnx

    graph = onnx.load(folder / "model.onnx", load_external_data=False).graph
    return collections.Counter(n.op_type for n in graph.node)


def test_fused_gate_up_export_has_a_matmul_fewer_per_layer_and_the_same_logits(
        hf_pair_dirs, tmp_path):
    hf = hf_pair_dirs["target"]
    fused = export_static_model(hf, tmp_path / "fused", max_length=128, steps=4,
                                fuse_gate_up=True)
    export_static_model(hf, tmp_path / "plain", max_length=128, validate=False,
                        fuse_gate_up=False)
    layers = fused.manifest.num_layers
    assert _op_counts(tmp_path / "plain")["MatMul"] - _op_counts(tmp_path / "fused")[
        "MatMul"] == layers
    assert fused.manifest.validation["static_diff_over_tolerance"] < 1
    ids = [int(t) for t in np.random.default_rng(4).integers(0, 512, 20)]
    want = torch_logits(hf, ids)
    got = StaticOrtModel(tmp_path / "fused", graph_steps=(1, 5)).new_state().append(ids)
    assert np.abs(got - want).max() < 1e-4
    # every weight of the fused graph stored transposed: FusedMatMul(transB=1), validated
    both = export_static_model(hf, tmp_path / "both", max_length=128, steps=4,
                               fuse_gate_up=True, transpose_weights=True)
    ops = _op_counts(tmp_path / "both")
    assert ops["MatMul"] == 0 and ops["FusedMatMul"] == _op_counts(tmp_path / "fused")["MatMul"]
    assert both.manifest.validation["static_diff_over_tolerance"] < 1
    assert (tmp_path / "both" / "model.onnx.data").stat().st_size == \
        (tmp_path / "fused" / "model.onnx.data").stat().st_size
    got = StaticOrtModel(tmp_path / "both", graph_steps=(1, 5)).new_state().append(ids)
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("option", ["fuse_gate_up", "transpose_weights"])
def test_graph_options_are_refused_outside_the_static_export(hf_pair_dirs, tmp_path, capsys,
                                                             option):
    from quickdraft.export import export_pair

    with pytest.raises(ValueError, match=f"{option}.*static"):
        export_pair(hf_pair_dirs["target"], hf_pair_dirs["draft"], tmp_path / "out",
                    **{option: True})
    assert cli_main(["export", "--target", str(hf_pair_dirs["target"]), "--draft",
                     str(hf_pair_dirs["draft"]), "--out", str(tmp_path / "cli"),
                     "--" + option.replace("_", "-")]) == 1
    assert option in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()


def test_an_attention_kernel_is_checked_and_scoped_to_session_creation(static_pair,
                                                                       monkeypatch):
    from quickdraft.ort_backend import device as qd_device

    with pytest.raises(ValueError, match="attention must be one of auto, xqa"):
        StaticOrtModel(static_pair / "target", attention="fast")
    with pytest.raises(ValueError, match="attention must be one of"):
        load_pair(static_pair, attention="XQA")
    monkeypatch.setenv("ORT_ENABLE_XQA", "7")
    monkeypatch.delenv("ORT_ENABLE_CUDNN_FLASH_ATTENTION", raising=False)
    with qd_device.attention_environment("cudnn"):
        assert qd_device.os.environ["ORT_ENABLE_XQA"] == "0"
        assert qd_device.os.environ["ORT_ENABLE_CUDNN_FLASH_ATTENTION"] == "1"
    assert qd_device.os.environ["ORT_ENABLE_XQA"] == "7"  # restored, also when absent before
    assert "ORT_ENABLE_CUDNN_FLASH_ATTENTION" not in qd_device.os.environ
    with pytest.raises(RuntimeError), qd_device.attention_environment("flash"):
        raise RuntimeError("a failed session")
    assert qd_device.os.environ["ORT_ENABLE_XQA"] == "7"
    # on the CPU the choice names no kernel: the environment is left as it is
    import onnxruntime as ort

    seen, session = [], ort.InferenceSession

    def spy(*args, **kwargs):
        seen.append(qd_device.os.environ.get("ORT_ENABLE_XQA"))
        if kwargs["providers"][0] == "CPUExecutionProvider":
            return session(*args, **kwargs)

        class Started:  # a CUDA session as create_session sees one
            def get_providers(self):
                return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return Started()

    monkeypatch.setattr(ort, "InferenceSession", spy)
    model = StaticOrtModel(static_pair / "target", attention="cudnn")
    assert model.attention == "cudnn" and seen == ["7"]
    # on CUDA the session is made inside the kernel's environment
    monkeypatch.setattr(qd_device, "cuda_problem", lambda: None)
    qd_device.create_session(b"", qd_device.Device("cuda"), attention="cudnn")
    qd_device.create_session(b"", qd_device.Device("cuda"), attention="auto")
    assert seen == ["7", "0", "7"]
