"""The verification graph makes the same decisions as quickdraft.verification.verify.

Property tests on the CPU execution provider, in float32 and float64.

The boundary rule. The graph computes in float32 (or float64) what ``verify`` computes in
float64, so a decision can legitimately flip only where the compared quantities are within
rounding of each other. An example is skipped (``assume``) when, at a position the rule
examines:

* an acceptance test is that close: ``|u_i q_i(x_i) - p_i(x_i)| <= REL * max(u_i q_i(x_i),
  p_i(x_i))`` (unless ``p_i(x_i)`` is exactly 0: a masked token is 0 in both);
* the inverse-CDF threshold is: ``|u * total - cdf_k| <= REL * total`` for some k;
* a top-p cut is: ``|mass_before_j - top_p| <= REL`` for some sorted j;
* a rejection leaves a residual of total mass <= MIN_RESIDUAL (p_n ~ q_n: its
  normalisation amplifies rounding; such a rejection has probability ~0 anyway).

REL is 1e-5 in float32 and 1e-10 in float64. Logits are drawn on a grid of eighths, so two
logits are either equal (ties, which both sides break towards the lower index) or far apart.
Arbitrary probability rows (zeros, p == q, disjoint supports) reach the graph as logits
log(p), -inf where p is 0, at temperature 1. Greedy decoding (temperature 0) has no graph:
GraphVerifier hands it to host_verify, and the graph refuses it.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
import threading  # noqa: E402

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from quickdraft.generation import ModelDrafter, host_verify  # noqa: E402
from quickdraft.ort_backend.device import Device, helper_options  # noqa: E402
from quickdraft.ort_backend.verify_graph import (  # noqa: E402
    MAX_GRAPHS,
    CapturedGraphs,
    DeviceSampler,
    DeviceVerifier,
    GraphVerifier,
)
from quickdraft.protocols import Candidates  # noqa: E402
from quickdraft.reference.models import TableModel  # noqa: E402
from quickdraft.sampling import SamplingConfig, adjust_logits, sample_token  # noqa: E402
from quickdraft.theory import beta  # noqa: E402
from quickdraft.verification import (  # noqa: E402
    build_verify_graph,
    residual_distribution,
    verify,
)

REL = {"float32": 1e-5, "float64": 1e-10}
MIN_RESIDUAL = {"float32": 1e-3, "float64": 1e-8}
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

_VERIFIERS: dict = {}


def verifier(gamma, vocab, sampling, compute="float32", **kw) -> DeviceVerifier:
    key = (gamma, vocab, sampling, compute, tuple(sorted(kw.items())))
    if key not in _VERIFIERS:
        _VERIFIERS[key] = DeviceVerifier(gamma, vocab, sampling, compute=compute, **kw)
    return _VERIFIERS[key]


samplings = st.builds(
    SamplingConfig,
    temperature=st.sampled_from([0.5, 1.0, 1.7]),
    top_k=st.sampled_from([0, 1, 2, 3, 6]),
    top_p=st.sampled_from([1.0, 0.9, 0.6, 0.3]),
)
unit = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)


def grid_logits(rows, vocab):
    return st.lists(st.lists(st.integers(-24, 24), min_size=vocab, max_size=vocab),
                    min_size=rows, max_size=rows).map(lambda r: np.asarray(r, np.float32) / 8)


@st.composite
def logit_cases(draw, sampling=samplings):
    vocab = draw(st.integers(2, 9))
    gamma = draw(st.integers(1, 5))
    extra = draw(st.integers(0, 2))  # rows before the last gamma + 1 (a prefill)
    cfg = draw(sampling)
    target = draw(grid_logits(gamma + 1 + extra, vocab))
    # draft logits: the target's plus a grid offset (often equal, so tokens get accepted)
    offset = draw(grid_logits(gamma, vocab)) * draw(st.sampled_from([0.0, 0.25, 1.0]))
    draft_logits = target[extra: extra + gamma] + offset
    q = adjust_logits(draft_logits, cfg)
    tokens = np.asarray([sample_token(q[i], draw(unit)) for i in range(gamma)], np.int64)
    u = np.asarray([draw(unit) for _ in range(gamma)])
    s = draw(unit)
    return target, q, tokens, u, s, cfg


def assume_clear_of_boundaries(p, q, x, u, s, n, compute, top_p=1.0, before_adjust=None):
    """Skip examples within rounding of a decision boundary (see the module docstring)."""
    rel = REL[compute]
    gamma = len(x)
    for i in range(min(n + 1, gamma)):
        a, b = u[i] * q[i, x[i]], p[i, x[i]]
        if b != 0.0:
            assume(abs(a - b) > rel * max(a, b))
    if top_p < 1.0 and before_adjust is not None:
        for row in before_adjust[: n + 1]:
            srt = np.sort(row)[::-1]
            before = np.cumsum(srt) - srt
            assume(np.all(np.abs(before - top_p) > rel))
    q_pad = np.concatenate([q, np.zeros_like(p[:1])])
    r = np.maximum(p[n] - q_pad[n], 0.0)
    if n < gamma:
        assume(r.sum() > MIN_RESIDUAL[compute])
    w = residual_distribution(p[n], q_pad[n])
    cdf = np.cumsum(w)
    assume(np.all(np.abs(cdf - s * cdf[-1]) > rel * cdf[-1]))


def _softmax_tempered_topk(logits, cfg):
    """The probabilities top-p cuts (temperature and top-k applied, before top-p)."""
    return adjust_logits(logits, SamplingConfig(cfg.temperature, cfg.top_k, 1.0))


@pytest.mark.parametrize("compute", ["float32", "float64"])
@SETTINGS
@given(case=logit_cases())
def test_logits_graph_matches_verify(compute, case):
    target, q, x, u, s, cfg = case
    gamma = len(x)
    rows = target[-(gamma + 1):]
    p = adjust_logits(rows, cfg)
    n, token = verify(p, q, x, u, s)
    assume_clear_of_boundaries(p, q, x, u, s, n, compute, cfg.top_p,
                               _softmax_tempered_topk(rows, cfg))
    got_n, got_token, got_beta = verifier(gamma, target.shape[1], cfg, compute).run(
        target, q, x, u, s)
    assert (got_n, got_token) == (n, token)
    # beta output: sum_x min(p_i(x), q_i(x)) at every draft position, for the statistics
    np.testing.assert_allclose(got_beta, beta(p[:gamma], q), atol=1e-5)


@pytest.mark.parametrize("compute", ["float32", "float64"])
@SETTINGS
@given(case=logit_cases())
def test_stand_in_graph_matches_verify_without_bonus(compute, case):
    """The pipelined verdict's graph (gamma candidates, the last a stand-in for the bonus,
    its q row given apart, the target scoring only gamma positions) decides as
    quickdraft.pipelined.verify_without_bonus; a recovered token only after a rejection."""
    from quickdraft.pipelined import verify_without_bonus

    target, q, x, u, s, cfg = case
    m = len(x)
    logits = target[:-1]  # the target scored the candidates' m positions (and a prefill)
    rows = logits[-m:]
    p = adjust_logits(rows, cfg)  # [m, V]
    n, recovered = verify_without_bonus(p, q, x, u, s)
    assume_clear_of_boundaries(np.concatenate([p, p[-1:]]), q, x, u, s, n, compute,
                               cfg.top_p, _softmax_tempered_topk(rows, cfg))
    graph = verifier(m, target.shape[1], cfg, compute, stand_in=True)
    got_n, got_token, got_beta = graph.run(logits, q[:-1] if m > 1 else None, x, u, s,
                                           stand_in_probs=q[-1:])
    assert got_n == n and (n == m or got_token == recovered)
    np.testing.assert_allclose(got_beta, beta(p, q), atol=1e-5)


def test_a_stand_in_verifier_takes_the_stand_in_row_apart():
    cfg = SamplingConfig(1.0)
    with pytest.raises(ValueError, match="stand_in_probs"):
        verifier(2, 4, cfg, stand_in=True).run(np.zeros((2, 4)), np.full((1, 4), 0.25),
                                               [0, 1], [0.5, 0.5], 0.5)
    with pytest.raises(ValueError, match="stand_in_probs"):
        verifier(2, 4, cfg).run(np.zeros((3, 4)), np.full((2, 4), 0.25), [0, 1], [0.5, 0.5],
                                0.5, stand_in_probs=np.full((1, 4), 0.25))


@st.composite
def prob_cases(draw):
    """Arbitrary p and q rows: random weights with zeros, p == q, disjoint supports."""
    vocab = draw(st.integers(2, 8))
    gamma = draw(st.integers(1, 4))
    weights = st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 7.0]),
                       min_size=vocab, max_size=vocab).filter(lambda w: sum(w) > 0)
    p = np.asarray([draw(weights) for _ in range(gamma + 1)], np.float64)
    p /= p.sum(axis=1, keepdims=True)
    mode = draw(st.sampled_from(["random", "equal", "disjoint"]))
    if mode == "equal":
        q = p[:gamma].copy()
    else:
        q = np.asarray([draw(weights) for _ in range(gamma)], np.float64)
        if mode == "disjoint":
            q = np.where(p[:gamma] > 0, 0.0, q)
            q[q.sum(axis=1) == 0, 0] = 1.0
        q /= q.sum(axis=1, keepdims=True)
    x = np.asarray([sample_token(q[i], draw(unit)) for i in range(gamma)], np.int64)
    u = np.asarray([draw(unit) for _ in range(gamma)])
    return p, q, x, u, draw(unit)


@pytest.mark.parametrize("compute", ["float32", "float64"])
@SETTINGS
@given(case=prob_cases())
def test_probs_as_logits_graph_matches_verify(compute, case):
    """Arbitrary p rows enter as logits log(p) (-inf where p is 0) at temperature 1: the
    graph's softmax gives p back, and it decides as verify(p, ...) does."""
    p, q, x, u, s = case
    gamma, vocab = q.shape
    np_type = np.float32 if compute == "float32" else np.float64
    with np.errstate(divide="ignore"):
        logits = np.log(p).astype(np_type)  # [gamma + 1, V]
    cfg = SamplingConfig()
    p_soft = adjust_logits(logits, cfg)  # [gamma + 1, V] the rows the graph computes
    np.testing.assert_array_equal(p_soft == 0, p == 0)  # -inf: exactly 0 on both sides
    np.testing.assert_allclose(p_soft, p, atol=1e-6)
    n, token = verify(p, q, x, u, s)
    # the graph sees softmax(log p) and q in its own type: the reference decides on those
    q_c = q.astype(np_type).astype(np.float64)
    assume((n, token) == verify(p_soft, q_c, x, u, s, validate=False))
    assume_clear_of_boundaries(p_soft, q_c, x, u, s, n, compute)
    logits_dtype = "fp32" if compute == "float32" else "fp64"
    got = verifier(gamma, vocab, cfg, compute, logits_dtype=logits_dtype)(logits, q, x, u, s)
    assert got == (n, token)


def _table_pair(vocab, seed):
    """A bigram target and a bigram draft near it (host logits)."""
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(vocab, vocab))
    if seed % 2:
        target = np.round(target)  # ties: the first argmax
    return TableModel(target), TableModel(target + rng.normal(size=(vocab, vocab)))


def _iterations(target, draft, sampling, verifier, *, seed=0, steps=12, gamma=3):
    """Verdicts of ``steps`` speculative iterations with ``verifier``, from one prompt."""
    rng = np.random.default_rng(seed)
    state, drafter, ids, verdicts = target.new_state(), ModelDrafter(draft, sampling), [1], []
    for _ in range(steps):
        u = rng.random(2 * gamma + 1)
        cand = drafter.get_candidates(ids, gamma, u[:gamma])
        scored = ids + cand.tokens.tolist()
        verdict = verifier(state, scored, cand, sampling, u[gamma:2 * gamma], float(u[-1]))
        verdicts.append(verdict)
        ids = ids + cand.tokens[:verdict.n_accepted].tolist() + [verdict.next_token]
    return verdicts


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_greedy_is_verified_on_the_host(seed):
    """Temperature 0: GraphVerifier gives host_verify's verdicts (verify_greedy on the
    target's argmax ids where greedy_applies, one-hot rows otherwise); no graph is made."""
    target, draft = _table_pair(11, seed)
    greedy = SamplingConfig(temperature=0)
    graph = GraphVerifier(11)
    graph.prepare(4, greedy)
    assert _iterations(target, draft, greedy, graph) == _iterations(target, draft, greedy,
                                                                     host_verify)
    # unchecked candidates with q rows: host_verify validates and verifies on one-hot p
    q = adjust_logits(np.eye(11)[[2, 5]] * 3.0, SamplingConfig())  # [2, V] supports 2, 5
    cand = Candidates(np.array([2, 5]), q, checked=False)
    args = ([1, 2, 5], cand, greedy, np.array([0.3, 0.6]), 0.2)
    assert graph(target.new_state(), *args) == host_verify(target.new_state(), *args)
    assert graph._verifiers == {}


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(0.8, 4, 0.9)])
def test_graph_verifier_iterations_equal_host_verify(sampling):
    """Whole iterations on host logits: the same verdicts as host_verify (float64 graph,
    fixed seeds clear of the boundaries), betas to rounding."""
    target, draft = _table_pair(13, 5)
    graph = GraphVerifier(13, compute="float64")
    got = _iterations(target, draft, sampling, graph, seed=3)
    want = _iterations(target, draft, sampling, host_verify, seed=3)
    assert [v[:2] for v in got] == [v[:2] for v in want]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.betas, b.betas, atol=1e-9)
    with pytest.raises(ValueError, match="exact rule"):
        graph(target.new_state(), [1, 2], Candidates(np.array([2]), np.full((1, 13), 1 / 13)),
              sampling, np.array([0.5]), 0.5, lenience=0.5)


def test_sessions_are_shared_bindings_are_not():
    """Verifiers of the same settings share one session; each binds its own buffers, so
    many sequences (threads) verify at once without seeing each other's inputs."""
    gamma, vocab, cfg = 3, 12, SamplingConfig(0.9, top_k=5)
    a, b = DeviceVerifier(gamma, vocab, cfg), DeviceVerifier(gamma, vocab, cfg)
    assert a.session is b.session and a.binding is not b.binding
    assert DeviceVerifier(gamma, vocab, cfg, compute="float64").session is not a.session
    assert DeviceVerifier(gamma, vocab, cfg, options=helper_options()).session is not a.session
    assert GraphVerifier(vocab).get(gamma, cfg).session is a.session
    rng = np.random.default_rng(1)
    cases = []
    for _ in range(40):
        logits = rng.normal(size=(gamma + 1, vocab)).astype(np.float32)
        q = adjust_logits(logits[:gamma] + rng.normal(size=(gamma, vocab)), cfg)
        x = np.array([sample_token(q[i], rng.random()) for i in range(gamma)])
        cases.append((logits, q, x, rng.random(gamma), float(rng.random())))
    alone = [a.run(*c) for c in cases]  # one verifier, one thread
    results, errors = {}, []

    def worker(k):
        try:
            own = DeviceVerifier(gamma, vocab, cfg)  # one per sequence
            order = cases[k:] + cases[:k]  # each thread in its own order
            results[k] = [own.run(*c) for c in order for _ in range(3)][::3]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, got in results.items():
        for (n, token, b_), (n0, token0, b0) in zip(got, alone[k:] + alone[:k]):
            assert (n, token) == (n0, token0)
            np.testing.assert_array_equal(b_, b0)


def test_each_set_of_bound_addresses_gets_its_own_cuda_graph():
    """A captured graph replays the addresses it was captured with: the same addresses
    replay the same graph id, new ones get a new id (unique on the session, across the
    verifiers sharing it) until the limit, and beyond it runs are uncaptured (-1)."""

    class Session:  # stands in for an InferenceSession: ids are counted per session
        pass

    def graph_id(options):
        return int(options.get_run_config_entry("gpu_graph_id"))

    session = Session()
    a, b = CapturedGraphs(session, limit=2), CapturedGraphs(session, limit=2)
    first = graph_id(a.options({"target_logits": (1000, 5), "draft_probs": (2000, 4)}))
    assert first >= 1  # 0 is ONNX Runtime's default id
    assert graph_id(a.options({"draft_probs": (2000, 4), "target_logits": (1000, 5)})) == first
    second = graph_id(a.options({"target_logits": (3000, 5), "draft_probs": (2000, 4)}))
    other = graph_id(b.options({"target_logits": (1000, 5), "draft_probs": (2000, 4)}))
    assert len({first, second, other}) == 3 and len(a) == 2
    assert graph_id(a.options({"target_logits": (1000, 6)})) == -1  # past the limit
    assert len(a) == 2
    assert graph_id(CapturedGraphs(Session()).options({"x": 1})) == 1  # another session
    assert MAX_GRAPHS >= 2


def test_cuda_graphs_of_the_verdict_need_cuda():
    with pytest.raises(ValueError, match="cuda_graph needs device cuda"):
        DeviceVerifier(2, 10, SamplingConfig(), cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph needs device cuda"):
        DeviceSampler(10, SamplingConfig(), 1, device=Device("cpu"), cuda_graph=True)
    sampler = DeviceSampler.take(10, SamplingConfig(), 1, device=Device("cpu"))
    sampler.close()  # not pooled off CUDA: the next take makes a new one
    again = DeviceSampler.take(10, SamplingConfig(), 1, device=Device("cpu"))
    assert again is not sampler and again.graphs == 0
    with pytest.raises(ValueError, match="cuda_graph needs device cuda"):
        GraphVerifier(10, cuda_graph=True)
    ver = GraphVerifier(10)
    first = ver.get(2, SamplingConfig())
    assert not ver.cuda_graph and first.graphs == 0 and ver.get(2, SamplingConfig()) is first
    ver.close()  # nothing pooled off CUDA; the next call makes its verifiers again
    assert ver.get(2, SamplingConfig()) is not first
    kept = DeviceVerifier.take(2, 10, SamplingConfig())
    kept.close()
    assert DeviceVerifier.take(2, 10, SamplingConfig()) is not kept


def test_a_refused_capture_falls_back_to_uncaptured_verdicts(monkeypatch):
    """Where ONNX Runtime refuses to capture the graph, the GraphVerifier says why and
    makes its verifiers without CUDA graphs from then on (none is made on CUDA here)."""
    made = []

    def take(gamma, vocab, sampling, *, cuda_graph, **kw):
        made.append(cuda_graph)
        if cuda_graph:
            raise RuntimeError("nodes not partitioned to the CUDA EP")
        return ("uncaptured", gamma)

    monkeypatch.setattr(DeviceVerifier, "take", staticmethod(take))
    ver = GraphVerifier(10, device=Device("cuda"), cuda_graph=True)
    assert ver.get(2, SamplingConfig()) == ("uncaptured", 2)
    assert "not partitioned" in ver.cuda_graph_refused
    assert ver.get(3, SamplingConfig()) == ("uncaptured", 3)
    assert made == [True, False, False]  # not tried again


def test_graph_uses_standard_operators_only():
    for cfg in (SamplingConfig(), SamplingConfig(0.7, 5, 0.9), SamplingConfig(1.3, top_p=0.5)):
        model = build_verify_graph(4, 100, cfg)
        assert {op.domain for op in model.opset_import} == {""}
        assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
        assert [i.name for i in model.graph.input] == [
            "target_logits", "draft_probs", "draft_tokens", "accept_uniforms", "sample_uniform"]
        assert [o.name for o in model.graph.output] == ["n", "next_token", "beta"]


def test_bonus_token_and_full_acceptance():
    """p == q everywhere: every draft token is accepted, the bonus comes from p_gamma."""
    gamma, vocab = 3, 5
    logits = np.log(np.asarray([[1, 2, 3, 4, 5]] * (gamma + 1), np.float32))
    cfg = SamplingConfig()
    q = adjust_logits(logits[:gamma], cfg)
    x = np.asarray([4, 2, 0])
    for s in (0.0, 0.3, 0.99):
        n, token = verifier(gamma, vocab, cfg)(logits, q, x, np.full(gamma, 0.5), s)
        assert n == gamma
        assert token == verify(adjust_logits(logits, cfg), q, x, np.full(gamma, 0.5), s)[1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="gamma"):
        build_verify_graph(0, 10)
    with pytest.raises(ValueError, match="compute"):
        build_verify_graph(2, 10, compute="float16")
    with pytest.raises(ValueError, match="logits_dtype"):
        build_verify_graph(2, 10, logits_dtype="bf16")
    with pytest.raises(ValueError, match="verify_greedy"):
        build_verify_graph(2, 10, SamplingConfig(temperature=0))
    with pytest.raises(ValueError, match="verify_greedy"):
        DeviceVerifier(2, 10, SamplingConfig(temperature=0))


def test_tiny_temperature_is_verified_on_the_host_and_refused_clearly_on_the_device():
    """At T = 1e-300 the graph's z / T overflows: "auto" verifies on the host (whose rule
    takes it), and an explicit "device" raises a clear ValueError instead of returning a
    token id outside the vocabulary."""
    pytest.importorskip("tokenizers")
    from quickdraft.ort_backend import DecodeConfig, load_pair
    from quickdraft.ort_backend.cli import default_model_dir
    from quickdraft.sampling import SamplingConfig

    pair = load_pair(default_model_dir(), device="cpu", max_gamma=4)
    config = DecodeConfig(max_new_tokens=4, sampling=SamplingConfig(temperature=1e-300),
                          seed=0)
    with pair.generator(config, gamma=4) as g:
        assert g.verify == "host"
        tokens = g.generate("a").tokens
        assert len(tokens) == 4 and all(0 <= t < pair.target.vocab_size for t in tokens)
    with pair.generator(config, gamma=4, verify="device") as g:
        with pytest.raises(ValueError, match="below the 1e-30 the device graphs take"):
            g.generate("a")


def test_a_verdict_on_a_distribution_that_was_not_finite_is_refused():
    """Both verdicts, with and without a bonus, refuse what an overflowing graph returns
    (a token outside the vocabulary, NaN beta); without a bonus the token of a verdict that
    kept every candidate is not read, so its value does not matter."""
    from quickdraft.ort_backend.verify_graph import _check_verdict
    from quickdraft.sampling import SamplingConfig

    cfg, ok = SamplingConfig(1.0), np.array([0.5, 0.5])
    _check_verdict(2, -1, ok, 2, 8, cfg, bonus=False)  # all kept: no recovered token
    for n, token, betas, bonus in ((2, -1, ok, True), (1, 8, ok, False),
                                   (1, 3, np.array([0.5, np.nan]), False), (3, 0, ok, True)):
        with pytest.raises(ValueError, match="not finite"):
            _check_verdict(n, token, betas, 2, 8, cfg, bonus=bonus)


def test_device_verification_of_a_model_that_is_not_exported_is_refused():
    """verify="device" needs an exported model's logits; a NumPy model is refused with a
    message naming the fix, before anything runs; "auto" verifies it on the host."""
    from quickdraft.ort_backend.generator import DecodeConfig, Generator

    rng = np.random.default_rng(0)
    target = TableModel(rng.normal(size=(5, 5)))  # a bigram
    sampling = SamplingConfig(temperature=1.0)
    drafter = ModelDrafter(TableModel(rng.normal(size=(5, 5))), sampling, gamma=2)
    cfg = DecodeConfig(sampling=sampling, max_new_tokens=3)
    with pytest.raises(ValueError, match="TableModel is not an exported model: pass "
                                         "verify='host'"):
        Generator(target, drafter, cfg, verify="device")
    with Generator(target, drafter, cfg) as gen:
        assert gen.verify == "host"


def test_the_device_graphs_refuse_a_temperature_their_division_would_overflow():
    """Below MIN_TEMPERATURE the graphs' logits / T overflow float32: building one is
    refused, naming the host; the host rule samples such a temperature as the argmax."""
    from quickdraft.verification import build_sample_graph, build_verify_graph
    from quickdraft.verification.graph import MIN_TEMPERATURE

    tiny = SamplingConfig(temperature=MIN_TEMPERATURE / 10)
    for build in (lambda: build_sample_graph(5, tiny), lambda: build_verify_graph(2, 5, tiny)):
        with pytest.raises(ValueError, match="sample and verify such temperatures on the host"):
            build()
    build_sample_graph(5, SamplingConfig(temperature=MIN_TEMPERATURE))  # the lowest taken
    p = adjust_logits(np.array([3.0, 1e4, -2.0, 9999.0]), tiny)
    np.testing.assert_array_equal(p, [0.0, 1.0, 0.0, 0.0])
