"""Pipelined decoding on ONNX Runtime: launched calls and device-side chains give what the
sequential calls give, and the overlapped loop makes exactly the iterations of the NumPy
reference (quickdraft.pipelined) on the same models with the same uniforms, greedy (so its
output is greedy autoregressive decoding's) and sampled (draws and verdicts on the device,
so its output follows the target; checked end to end on the first token). Run on the CPU
provider, which executes the same bindings as CUDA (there the launches simply finish
before they return)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

for _name in ("onnxruntime", "onnx", "tokenizers"):
    pytest.importorskip(_name)

from goodness import check_fit  # noqa: E402

from quickdraft.generation import ModelDrafter  # noqa: E402
from quickdraft.ort_backend import DecodeConfig, Generator, load_pair  # noqa: E402
from quickdraft.ort_backend.cli import default_model_dir  # noqa: E402
from quickdraft.ort_backend.device import Device  # noqa: E402
from quickdraft.ort_backend.overlap import GreedyHalves, overlapped_stream  # noqa: E402
from quickdraft.ort_backend.static import StaticOrtModel  # noqa: E402
from quickdraft.pipelined import (  # noqa: E402
    PipelinedStats,
    ShadowRule,
    pipelined_generate,
    verify_greedy_without_bonus,
    verify_without_bonus,
)
from quickdraft.sampling import SamplingConfig, adjust_logits  # noqa: E402

GREEDY = SamplingConfig(temperature=0.0)
PROMPTS = ["Once upon a time", "The little dog", "She said that the"]


@pytest.fixture(scope="module")
def pair():
    return load_pair(default_model_dir(), device="cpu", max_gamma=8)


def _ids(pair, prompt):
    return list(pair.tokenizer.encode(prompt).ids)


def _ar(pair, prompt, n):
    with pair.generator(DecodeConfig(max_new_tokens=n)) as gen:
        return gen.generate(prompt).tokens


def test_launched_chain_equals_sequential_greedy_steps(pair):
    """launch_chain's tokens are append_greedy's one step at a time, and the state then
    holds the same tokens (the last chain token not consumed)."""
    ids = _ids(pair, PROMPTS[0])
    a, b = pair.draft.new_state(), pair.draft.new_state()
    try:
        tokens = [int(a.append_greedy(ids)[-1])]
        for _ in range(8):
            tokens.append(int(a.append_greedy([tokens[-1]])[-1]))
        b.append_greedy(ids[:-1])
        chain = b.launch_chain(ids[-1], 9).wait()
        assert chain.tolist() == tokens
        assert b.tokens == a.tokens
        # a shorter chain later in the sequence, after a rewind
        a.rewind(len(ids) + 2)
        b.rewind(len(ids) + 2)
        again = [int(a.append_greedy([tokens[2]])[-1])]
        for _ in range(2):
            again.append(int(a.append_greedy([again[-1]])[-1]))
        assert b.launch_chain(tokens[2], 3).wait().tolist() == again
        assert b.tokens == a.tokens
    finally:
        a.close()
        b.close()


def test_launched_calls_equal_their_appends(pair):
    """launch_greedy's ids and launch_device's logits (not waited for until wait()) are
    append_greedy's and append's, and the state then holds the same tokens."""
    for greedy, prompt in ((True, PROMPTS[1]), (False, PROMPTS[2])):
        ids = _ids(pair, prompt)
        a, b = pair.target.new_state(), pair.target.new_state()
        try:
            want = (a.append_greedy if greedy else a.append)(ids)[-4:]
            b.append(ids[:-4])
            launched = (b.launch_greedy if greedy else b.launch_device)(ids[-4:])
            with pytest.raises(RuntimeError, match="launched work"):
                b.append([ids[0]])
            got = launched.wait()
            if greedy:
                assert got.tolist() == want.tolist()
            else:
                np.testing.assert_allclose(got.numpy()[0], want, atol=1e-5)  # [4, V]
            assert b.tokens == a.tokens
        finally:
            a.close()
            b.close()


def test_a_state_with_launched_work_refuses_other_calls_until_it_is_waited_for(pair):
    state = pair.draft.new_state()
    ids = _ids(pair, PROMPTS[0])
    launched = state.launch_chain(ids[0], 3)
    with pytest.raises(RuntimeError, match="launched work"):
        state.append([ids[1]])
    with pytest.raises(RuntimeError, match="launched work"):
        state.launch_greedy([ids[1]])
    first = launched.wait()
    assert launched.wait() is first  # waited once
    state.append_greedy([ids[1]])
    state.launch_chain(ids[2], 2)
    state.close()  # waits for the chain, then frees the slot
    with pytest.raises(RuntimeError, match="closed"):
        state.append([1])


def test_a_chain_longer_than_the_model_was_loaded_for_is_refused(pair):
    state = pair.draft.new_state()
    with pytest.raises(ValueError, match="chain_length >= 10"):
        state.launch_chain(1, 10)
    state.close()
    with pytest.raises(ValueError, match="chain_length must be an integer"):
        StaticOrtModel(default_model_dir() / "draft", Device("cpu"), chain_length=-1)


@pytest.mark.parametrize("gamma", [1, 3, 8])
def test_pipelined_iterations_are_the_references(pair, gamma):
    """The overlapped loop on ONNX Runtime and pipelined_generate on the same models agree
    on every iteration: tokens, accepted counts, warm iterations, draft calls."""
    for prompt in PROMPTS:
        res = _as_the_reference(pair, prompt, gamma, DecodeConfig(max_new_tokens=48, seed=0))
        assert res.stats.overlap.shadow_s > 0


@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(temperature=1.0)])
def test_iterations_without_a_continuation_are_the_references(pair, sampling):
    """With a rule that declines continuations after misses, the overlapped loop still
    makes pipelined_generate's iterations, both kinds of them (greedy and sampled)."""
    rule = ShadowRule(min_keep_rate=0.5, memory=0.5)
    for prompt in PROMPTS[:1]:
        res = _as_the_reference(pair, prompt, 4,
                                DecodeConfig(max_new_tokens=40, seed=3, sampling=sampling),
                                rule)
        stats = res.stats.generation
        checked = stats.checked_per_iteration
        assert 4 in checked and 5 in checked  # with and without a continuation


def _as_the_reference(pair, prompt, gamma, config, rule=ShadowRule()):
    """A pipelined generation, checked iteration for iteration against pipelined_generate
    on the same models with the config's seed; the Generation."""
    with pair.generator(config, gamma=gamma, pipelined=True, shadow_rule=rule) as gen:
        res = gen.generate(prompt)
    ref = pipelined_generate(pair.target, pair.draft, _ids(pair, prompt), gamma=gamma,
                             max_new_tokens=config.max_new_tokens, sampling=config.sampling,
                             eos_id=pair.eos_ids, rng=np.random.default_rng(config.seed),
                             rule=rule)
    got, want = res.stats.generation, ref.stats
    assert res.tokens == ref.tokens
    assert got.accepted_per_iteration == want.accepted_per_iteration
    assert got.checked_per_iteration == want.checked_per_iteration
    assert (got.warm_iterations, got.open_draft_calls, got.shadow_draft_calls) == \
        (want.warm_iterations, want.open_draft_calls, want.shadow_draft_calls)
    np.testing.assert_allclose(got.beta_per_position, want.beta_per_position, atol=1e-5)
    assert res.stats.mode == "pipelined"
    return res


@pytest.mark.parametrize("n", [1, 2, 3, 5, 40])
def test_pipelined_greedy_output_is_greedy_autoregressive_output(pair, n):
    for prompt in PROMPTS[:2]:
        want = _ar(pair, prompt, n)
        for gamma in (1, 4, 8):
            with pair.generator(DecodeConfig(max_new_tokens=n), gamma=gamma,
                                pipelined=True) as gen:
                assert gen.generate(prompt).tokens == want, (prompt, n, gamma)


def test_pipelined_stops_at_eos_where_autoregressive_decoding_does(pair):
    ids = _ids(pair, PROMPTS[2])
    full = _ar(pair, ids, 40)
    eos = full[25]  # a token the greedy continuation reaches
    want = full[: full.index(eos) + 1]
    state = pair.target.new_state()
    state.append(ids[:-1])
    drafter = ModelDrafter(pair.draft, GREEDY, 4)
    stats = PipelinedStats(gamma=4)
    pieces = list(overlapped_stream(state, GreedyHalves(drafter), ids, gamma=4,
                                    max_new_tokens=40, rng=np.random.default_rng(1),
                                    eos_id=eos, stats=stats))
    assert sum(pieces, []) == want and stats.new_tokens == len(want)
    state.close()
    drafter.state.close()


def test_a_pipelined_generator_continues_a_shared_prefix_and_after_a_rewind(pair):
    with pair.generator(DecodeConfig(max_new_tokens=30), gamma=4, pipelined=True) as gen:
        first = gen.generate(PROMPTS[0])
        second = gen.generate(PROMPTS[0] + " there")
        assert first.tokens == _ar(pair, PROMPTS[0], 30)
        assert second.tokens == _ar(pair, PROMPTS[0] + " there", 30)
        ids = gen.prefill(PROMPTS[1])
        gen.step()
        gen.rewind(len(ids))
        while not gen.done:
            gen.step()
        assert gen.new_tokens == _ar(pair, PROMPTS[1], 30)


def test_what_the_pipelined_loop_cannot_run_is_refused_with_the_fix(pair):
    sampled = DecodeConfig(sampling=SamplingConfig(0.7))
    with pytest.raises(ValueError, match="DeviceModelDrafter"):
        pair.generator(sampled, gamma=4, pipelined=True, device_sampling=False)
    with pytest.raises(ValueError, match="verify must be 'device'"):
        pair.generator(sampled, gamma=4, pipelined=True, verify="host")
    with pytest.raises(ValueError, match="same compute"):
        pair.generator(sampled, gamma=4, pipelined=True, compute="float64")
    with pytest.raises(ValueError, match="ModelDrafter"):
        pair.generator(DecodeConfig(), drafter="ngram", pipelined=True)
    with pytest.raises(ValueError, match="lenience"):
        pair.generator(DecodeConfig(lenience=0.5), gamma=4, pipelined=True)
    short = StaticOrtModel(default_model_dir() / "draft", Device("cpu"), chain_length=3)
    with pytest.raises(ValueError, match="chain_length >= 5"):
        Generator(pair.target, ModelDrafter(short, GREEDY, 4), DecodeConfig(), pipelined=True)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_the_greedy_verdict_is_the_rows_verdict_on_one_hot_rows(data):
    """verify_greedy_without_bonus on argmax ids decides as verify_without_bonus does on
    the one-hot rows, for every uniform."""
    m = data.draw(st.integers(1, 6))
    vocab = data.draw(st.integers(2, 5))
    choices = np.array(data.draw(st.lists(st.integers(0, vocab - 1), min_size=m, max_size=m)))
    candidates = np.array(data.draw(st.lists(st.integers(0, vocab - 1), min_size=m,
                                             max_size=m)))
    u = np.array(data.draw(st.lists(st.floats(0, 1, exclude_max=True), min_size=m,
                                    max_size=m)))
    s = data.draw(st.floats(0, 1, exclude_max=True))
    p = np.eye(vocab)[choices]  # [m, V]
    q = np.eye(vocab)[candidates]  # [m, V]
    assert verify_greedy_without_bonus(choices, candidates) == \
        verify_without_bonus(p, q, candidates, u, s)


def test_a_greedy_drafter_proposes_in_one_chain_what_it_proposes_step_by_step(pair):
    """ModelDrafter on a ChainState (one launch, one wait) and on the same model loaded
    without chains (a call and a read per token): the same proposals, the same states."""
    from quickdraft.protocols import ChainState, supports

    plain = StaticOrtModel(default_model_dir() / "draft", Device("cpu"), graph_steps=(1, 2))
    chained, stepped = ModelDrafter(pair.draft, GREEDY, 6), ModelDrafter(plain, GREEDY, 6)
    assert supports(chained.state, ChainState) and chained.state.max_chain >= 6
    assert plain.chain_length == 0
    ids = _ids(pair, PROMPTS[2])
    u = np.zeros(6)
    for step in range(4):
        a = chained.get_candidates(ids, 6, u)
        b = stepped.get_candidates(ids, 6, u)
        assert a.tokens.tolist() == b.tokens.tolist() and a.model_calls == b.model_calls
        assert chained.state.tokens == stepped.state.tokens
        ids = ids + a.tokens[: step + 1].tolist()  # keep a prefix, as after a rejection


def test_a_failed_verify_call_leaves_no_state_waiting(pair, monkeypatch):
    """When the target's call fails (an invalid-logits error, say), the draft's chain
    launched beside it is still waited for: both states take calls again."""
    from quickdraft.ort_backend import overlap

    class Failing:
        def wait(self):
            raise ValueError("logits contain NaN")

    def failing_verify(target, scored, rows, greedy):
        overlap.rewind_to_common_prefix(target, scored, rows)
        return Failing()

    monkeypatch.setattr(overlap, "_launch_verify", failing_verify)
    ids = _ids(pair, PROMPTS[0])
    state = pair.target.new_state()
    drafter = ModelDrafter(pair.draft, GREEDY, 4)
    with pytest.raises(ValueError, match="NaN"):
        list(overlapped_stream(state, GreedyHalves(drafter), ids, gamma=4, max_new_tokens=8,
                               rng=np.random.default_rng(0)))
    drafter.state.append_greedy([ids[0]])  # not "launched work not waited for"
    state.append_greedy([ids[0]])
    drafter.state.close()
    state.close()


SAMPLED = [SamplingConfig(1.0), SamplingConfig(0.8, top_k=40, top_p=0.9)]


@pytest.mark.parametrize("sampling,gamma", [(SAMPLED[0], 1), (SAMPLED[0], 8), (SAMPLED[1], 1),
                                            (SAMPLED[1], 4)])
def test_pipelined_sampled_iterations_are_the_references(pair, sampling, gamma):
    """Sampled: the draft draws inside its chains and the verification graph decides on the
    rows where they lie, and every iteration is pipelined_generate's on the same models with
    the same seed (the reference draws and decides in float64 on host copies of the
    logits): tokens, accepted counts, warm iterations, draft calls, beta. The float32 graphs
    could part from it only where a uniform falls within rounding of a decision boundary
    (about 1e-7 per decision: under 1e-4 for these runs)."""
    n = 40
    warm = 0
    for seed in (0, 1):
        config = DecodeConfig(max_new_tokens=n, sampling=sampling, seed=seed)
        res = _as_the_reference(pair, PROMPTS[seed], gamma, config)
        assert res.stats.verifier == "device"
        warm += res.stats.generation.warm_iterations
    if gamma == 1:
        assert warm > 0  # pre-drafted proposals (their rows in the other bank) were verified


@pytest.mark.parametrize("n", [1, 2, 3])
def test_pipelined_sampling_at_the_end_of_a_budget_is_the_references(pair, n):
    """The last iterations of a budget: a lone stand-in (a verdict graph of one candidate,
    no proposal rows) and short continuations."""
    _as_the_reference(pair, PROMPTS[0], 4, DecodeConfig(max_new_tokens=n, sampling=SAMPLED[1],
                                                        seed=n))


def test_pipelined_sampling_first_token_follows_the_target(pair):
    """End to end on the bundled pair: the first token of pipelined sampling (gamma 2)
    against the exact target distribution, 1000 draws from one prefill (rewind to the
    prompt, one step; the generator's random stream goes on). Chi-square goodness of fit
    at a false-alarm rate of 1e-4; the same test on draws from the draft's q must fail."""
    runs, sampling = 1000, SamplingConfig(1.0, top_k=12)
    prompt = _ids(pair, PROMPTS[0])
    p = adjust_logits(pair.target.new_state().append(prompt)[-1], sampling)  # [V] exact
    q = adjust_logits(pair.draft.new_state().append(prompt)[-1], sampling)  # [V]
    counts = np.zeros_like(p)
    rejected_first = 0
    with pair.generator(DecodeConfig(max_new_tokens=6, sampling=sampling, seed=7), gamma=2,
                        pipelined=True) as gen:
        gen.prefill(prompt)
        for _ in range(runs):
            gen.rewind(len(prompt))
            counts[gen.step()[0]] += 1
            rejected_first += gen.stats.generation.accepted_per_iteration[-1] == 0
    assert 0.05 * runs < rejected_first < 0.95 * runs  # accepted and recovered both seen
    check_fit(counts, p, q, 1e-4, min_df=4)


def test_a_sampled_chain_writes_only_its_own_banks_rows(pair):
    """Two row banks: a chain in bank 1 leaves bank 0's rows as they were (a proposal's q
    rows stay readable while the continuation is drafted), and each bank's draws are the
    tokens and rows a chain in bank 0 gives from the same state and uniforms."""
    sampling = SAMPLED[0]  # a model keeps sampled-chain sessions for a few settings
    ids = _ids(pair, PROMPTS[1])
    state = pair.draft.new_state()
    assert state.prepare_sampled_chain(sampling)
    state.append(ids[:-1])
    u = np.random.default_rng(3).random(5)
    first = state.launch_sampled_chain(ids[-1], u, sampling, bank=0)
    tokens, rows = first.wait(), first.rows.numpy()
    state.rewind(len(ids) - 1)
    second = state.launch_sampled_chain(ids[-1], u, sampling, bank=1)
    assert second.wait().tolist() == tokens.tolist()
    np.testing.assert_array_equal(second.rows.numpy(), rows)
    np.testing.assert_array_equal(first.rows.numpy(), rows)  # bank 0 untouched
    state.rewind(len(ids) - 1)
    other = state.launch_sampled_chain(ids[-1], u[::-1].copy(), sampling, bank=1)
    other.wait()
    np.testing.assert_array_equal(first.rows.numpy(), rows)
    with pytest.raises(ValueError, match="bank must be 0 or 1"):
        state.launch_sampled_chain(ids[-1], u, sampling, bank=2)
    state.close()
