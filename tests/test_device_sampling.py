"""Draft tokens sampled on the device: the sampling graph draws each token from the q row
it writes, that row is what the verification graph reads in place, and a speculative
iteration with it decides as NumPy does from the same rows and uniforms. Run on the CPU
provider, which executes the same graphs and bindings as CUDA."""

from __future__ import annotations

import numpy as np
import pytest

for _name in ("onnxruntime", "onnx", "tokenizers"):
    pytest.importorskip(_name)

from quickdraft.generation import ModelDrafter, speculative_step  # noqa: E402
from quickdraft.ort_backend import DecodeConfig, load_pair  # noqa: E402
from quickdraft.ort_backend.cli import default_model_dir  # noqa: E402
from quickdraft.ort_backend.device import Device  # noqa: E402
from quickdraft.ort_backend.device_draft import DeviceModelDrafter  # noqa: E402
from quickdraft.ort_backend.verify_graph import DeviceSampler, GraphVerifier  # noqa: E402
from quickdraft.protocols import Candidates  # noqa: E402
from quickdraft.sampling import SamplingConfig, adjust_logits  # noqa: E402

SAMPLINGS = [SamplingConfig(1.0), SamplingConfig(0.7), SamplingConfig(1.0, top_k=20),
             SamplingConfig(0.8, top_k=40, top_p=0.9)]


@pytest.fixture(scope="module")
def pair():
    return load_pair(default_model_dir(), device="cpu", max_gamma=4)


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_sampling_graph_draws_each_token_from_the_row_it_writes(sampling, dtype):
    """The row is adjust_logits' (to float32 rounding), and the token's CDF interval in
    that row holds the uniform: the draw is an inverse-CDF draw from q."""
    import onnxruntime as ort

    vocab, rows = 500, 3
    sampler = DeviceSampler(vocab, sampling, rows, device=Device("cpu"),
                            logits_dtype="fp16" if dtype == np.float16 else "fp32")
    rng = np.random.default_rng(0)
    for trial in range(60):
        z = (rng.normal(size=(1, 2, vocab)) * 3).astype(dtype)  # [1, S, V]
        u = float(rng.random())
        row = trial % rows
        token = sampler.sample(ort.OrtValue.ortvalue_from_numpy(z), u, row)
        q = sampler.rows_view(rows).numpy()[row].astype(np.float64)  # [V]
        assert np.allclose(q, adjust_logits(z[0, -1], sampling), atol=2e-6)
        cdf = np.cumsum(q)
        lo = cdf[token - 1] if token else 0.0
        assert q[token] > 0 and lo - 1e-5 <= u * cdf[-1] <= cdf[token] + 1e-5


def test_rows_are_read_in_place_and_decide_as_host_copies(pair):
    """The verification graph bound to a sampler's rows (no copy) gives the same verdict as
    the same graph given a host copy of them."""
    sampling, gamma = SamplingConfig(0.9), 4
    drafter = DeviceModelDrafter(pair.draft, sampling, gamma)
    verifier = GraphVerifier.for_model(pair.target)
    rng = np.random.default_rng(1)
    ids = list(pair.tokenizer.encode("def quicksort(arr):").ids)
    decided = set()
    for _ in range(6):
        u = rng.random(2 * gamma + 1)
        cand = drafter.get_candidates(ids, gamma, u[:gamma])
        assert cand.rows_on_device is not None and not cand.one_hot
        copy = Candidates(cand.tokens, cand.rows_on_device.numpy(), checked=True)
        verdicts = []
        for c in (cand, copy):
            state = pair.target.new_state()
            verdicts.append(verifier(state, ids + cand.tokens.tolist(), c, sampling,
                                     u[gamma:2 * gamma], float(u[-1])))
            state.close()
        assert verdicts[0] == verdicts[1]
        decided.add(verdicts[0].n_accepted)
        ids += cand.tokens[:verdicts[0].n_accepted].tolist() + [verdicts[0].next_token]
    assert len(decided) >= 2


@pytest.mark.parametrize("sampling", SAMPLINGS[1:])
def test_device_sampled_iterations_equal_numpy_verification_of_the_same_rows(pair, sampling):
    """Whole iterations: the device drafter's tokens and rows, verified by the graph in
    place, against NumPy's rule (host_verify) on a host copy of the same rows with the
    same uniforms."""
    gamma = 4
    recorded = _Recording(DeviceModelDrafter(pair.draft, sampling, gamma))
    rng = np.random.default_rng(2)
    ids = list(pair.tokenizer.encode("class Stack:\n").ids)
    targets = [pair.target.new_state(), pair.target.new_state()]
    verifier = GraphVerifier.for_model(pair.target)
    decided = set()
    for _ in range(6):
        u = rng.random(2 * gamma + 1)
        dev = speculative_step(targets[0], recorded, ids, sampling, u[:gamma],
                               u[gamma:2 * gamma], float(u[-1]), verifier=verifier)
        last = recorded.last
        replay = _Replay(Candidates(last.tokens, last.probs, checked=True))
        ref = speculative_step(targets[1], replay, ids, sampling, u[:gamma],
                               u[gamma:2 * gamma], float(u[-1]))
        assert (dev.tokens, dev.n_accepted) == (ref.tokens, ref.n_accepted)
        assert np.allclose(dev.betas, ref.betas, atol=1e-5)
        decided.add(dev.n_accepted)
        ids += dev.tokens
    for s in targets:
        s.close()
    assert len(decided) >= 2


class _Recording:
    """The device drafter, keeping its last proposal."""

    def __init__(self, inner):
        self.inner, self.last = inner, None

    def get_candidates(self, ids, max_tokens, uniforms):
        self.last = self.inner.get_candidates(ids, max_tokens, uniforms)
        return self.last

    def update_candidate_strategy(self, ids, n_accepted):
        self.inner.update_candidate_strategy(ids, n_accepted)


class _Replay:
    """A drafter that proposes the candidates it is given."""

    def __init__(self, candidates):
        self.candidates = candidates

    def get_candidates(self, ids, max_tokens, uniforms):
        return self.candidates

    def update_candidate_strategy(self, ids, n_accepted):
        pass


def test_generation_and_choices(pair):
    """Pair.drafter samples on the device when asked (by default only for a static draft on
    CUDA); greedy drafting stays the argmax chain; a draft whose logits do not stay on the
    device is refused with the reason."""
    cfg = DecodeConfig(max_new_tokens=40, sampling=SamplingConfig(0.8), seed=5)
    assert type(pair.drafter(cfg.sampling, 4)) is ModelDrafter  # the CPU default: the host
    on = pair.drafter(cfg.sampling, 4, device_sampling=True)
    assert isinstance(on, DeviceModelDrafter)
    with pair.generator(cfg, drafter=on) as g:
        r = g.generate("def main(")
    assert r.stats.new_tokens == 40 and r.stats.verifier == "device"
    greedy = DecodeConfig(max_new_tokens=24)
    with pair.generator(greedy, drafter=pair.drafter(greedy.sampling, 4,
                                                     device_sampling=True)) as g, \
            pair.generator(greedy) as ar:
        assert g.generate("def main(").tokens == ar.generate("def main(").tokens


def test_a_draft_without_device_logits_is_refused(exported_llama_pair):
    dynamic = load_pair(exported_llama_pair, device="cpu")
    with pytest.raises(ValueError, match="static export"):
        DeviceModelDrafter(dynamic.draft, SamplingConfig(1.0), 3)


def test_autoregressive_sampling_on_the_device_draws_the_host_tokens(pair):
    """Autoregressive sampling with the target's tokens drawn by the sampling graph takes
    one uniform per token in the host path's order: with one seed it gives the host's
    tokens. They could part only where a uniform falls within float32 rounding of a CDF
    step of the row (about 1e-7 per token: under 1e-4 for these 360 tokens)."""
    for sampling in (SamplingConfig(1.0), SamplingConfig(0.7, top_k=50, top_p=0.9)):
        for seed in range(3):
            cfg = DecodeConfig(max_new_tokens=60, sampling=sampling, seed=seed)
            with pair.generator(cfg, device_sampling=True) as dev, \
                    pair.generator(cfg, device_sampling=False) as host:
                a, b = dev.generate("def main("), host.generate("def main(")
            assert a.tokens == b.tokens and len(a.tokens) == 60
            assert a.stats.generation.target_calls == b.stats.generation.target_calls == 60


def test_device_sampling_needs_device_logits(exported_llama_pair):
    dynamic = load_pair(exported_llama_pair, device="cpu")
    cfg = DecodeConfig(max_new_tokens=4, sampling=SamplingConfig(1.0))
    with pytest.raises(ValueError, match="static export"):
        dynamic.generator(cfg, device_sampling=True)
    with dynamic.generator(cfg) as g:  # the default: the host
        assert len(g.generate([5, 6]).tokens) == 4


@pytest.mark.parametrize("vocab", [255, 256, 257, 1000, 3001])
def test_the_blocked_scan_never_draws_a_zero_weight_token(vocab):
    """The sampling graph's prefix sums run in blocks (ONNX Runtime's CumSum is quadratic
    in the row). On rows where most tokens have zero weight (top-k) and uniforms that put
    the threshold exactly on cumulative sums, every draw has positive weight and agrees
    with the host's inverse CDF except within float32 rounding of a boundary."""
    import onnxruntime as ort

    from quickdraft.verification.rule import inverse_cdf_row

    sampling = SamplingConfig(1.0, top_k=7)
    sampler = DeviceSampler(vocab, sampling, 1, device=Device("cpu"))
    rng = np.random.default_rng(vocab)
    for _ in range(40):
        z = rng.normal(size=(1, 1, vocab)).astype(np.float32)  # [1, 1, V]
        q = adjust_logits(z[0, -1], sampling)  # [V], 7 positive
        cdf = np.cumsum(q, dtype=np.float64)
        edges = [float(c / cdf[-1]) for c in cdf[q > 0][:-1]]  # thresholds on boundaries
        for u in [float(rng.random()), 0.0, *edges, float(np.nextafter(1.0, 0.0))]:
            token = sampler.sample(ort.OrtValue.ortvalue_from_numpy(z), u, 0)
            assert q[token] > 0, (vocab, u, token)
            host = inverse_cdf_row(q, u)
            if token != host:  # only where u * total sits on a boundary, up to rounding
                assert abs(u * cdf[-1] - cdf[min(token, host)]) < 1e-5


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_a_sampled_chain_draws_what_the_separate_sampler_draws(pair, sampling):
    """DeviceModelDrafter on a state that draws inside its own chain (the sampling graph
    appended to the draft's graph, gamma steps in one launch) and on the same model loaded
    without chains (a model call and a sampling-graph call per token): the same tokens from
    the same uniforms, the same q rows to float32 rounding, the same states."""
    from quickdraft.ort_backend.static import StaticOrtModel

    folder = default_model_dir() / "draft"
    plain = StaticOrtModel(folder, Device("cpu"), graph_steps=(1, 2))
    chained = DeviceModelDrafter(StaticOrtModel(folder, Device("cpu"), chain_length=4),
                                 sampling, 4)
    separate = DeviceModelDrafter(plain, sampling, 4)
    assert chained.chained and not separate.chained and chained.sampler is None
    ids = list(pair.tokenizer.encode("def quicksort(arr):").ids)
    rng = np.random.default_rng(2)
    for step in range(6):
        u = rng.random(4)
        a = chained.get_candidates(ids, 4, u)
        b = separate.get_candidates(ids, 4, u)
        assert a.tokens.tolist() == b.tokens.tolist()
        assert np.allclose(a.rows_on_device.numpy(), b.rows_on_device.numpy(), atol=1e-5)
        assert chained.state.tokens == separate.state.tokens
        q = a.rows_on_device.numpy()  # each token has positive weight in its own row
        assert all(q[i, t] > 0 for i, t in enumerate(a.tokens))
        ids = ids + a.tokens[: step % 4 + 1].tolist()  # keep a prefix, as after a rejection


def test_sampled_speculative_decoding_with_chains_is_the_separate_samplers(pair):
    """Whole seeded generations: speculative sampling whose draft draws inside its chain
    gives the tokens of the same generation drafted token by token."""
    from quickdraft.ort_backend import Generator
    from quickdraft.ort_backend.static import StaticOrtModel

    folder = default_model_dir() / "draft"
    plain = StaticOrtModel(folder, Device("cpu"), graph_steps=(1, 2))
    sampling = SamplingConfig(0.8, top_p=0.95)
    config = DecodeConfig(max_new_tokens=40, sampling=sampling, seed=3)
    outs = []
    for draft in (StaticOrtModel(folder, Device("cpu"), chain_length=4), plain):
        drafter = DeviceModelDrafter(draft, sampling, 4)
        assert drafter.chained == (draft is not plain)
        with Generator(pair.target, drafter, config, max_draft=4) as gen:
            outs.append(gen.generate(list(pair.tokenizer.encode("import numpy").ids)).tokens)
    assert outs[0] == outs[1] and len(outs[0]) == 40


def test_append_sample_graph_keeps_the_model_and_adds_its_draw():
    import onnx

    from quickdraft.verification.graph import (
        SAMPLE_UNIFORM,
        SAMPLED_PROBS,
        SAMPLED_TOKEN,
        append_sample_graph,
    )

    model = onnx.load(str(default_model_dir() / "draft" / "model.onnx"))
    merged = append_sample_graph(model, 4096, SamplingConfig(0.7, top_k=50))
    names = [o.name for o in merged.graph.output]
    assert names[: len(model.graph.output)] == [o.name for o in model.graph.output]
    assert names[-2:] == [SAMPLED_TOKEN, SAMPLED_PROBS]
    assert merged.graph.input[-1].name == SAMPLE_UNIFORM
    assert merged.opset_import == model.opset_import  # the model keeps its opset
    with pytest.raises(ValueError, match="greedy"):
        append_sample_graph(model, 4096, SamplingConfig(0.0))


def test_sampling_settings_beyond_the_limit_use_the_separate_sampler():
    """Each sampling setting's chain holds the draft's weights again: past
    MAX_SAMPLED_SETTINGS a drafter falls back to the sampling graph, with the same draws."""
    from quickdraft.ort_backend.static import StaticOrtModel

    model = StaticOrtModel(default_model_dir() / "draft", Device("cpu"), chain_length=3)
    settings = [SamplingConfig(0.5 + 0.1 * i) for i in range(model.MAX_SAMPLED_SETTINGS + 1)]
    drafters = [DeviceModelDrafter(model, s, 3) for s in settings]
    assert [d.chained for d in drafters] == [True] * model.MAX_SAMPLED_SETTINGS + [False]
    assert DeviceModelDrafter(model, settings[0], 3).chained  # a known setting stays chained
