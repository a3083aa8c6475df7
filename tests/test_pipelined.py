"""Pipelined speculative decoding on table models: exact sequence distributions, greedy
equality, the accounting of pre-drafted tokens, input checks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from exact import exact_pipelined_sequences, exact_target_sequences
from hypothesis import given, settings
from hypothesis import strategies as st
from test_generation import SAMPLINGS, Z_LIMIT, random_tables

from quickdraft import pipelined
from quickdraft.generation import ModelDrafter, autoregressive_generate
from quickdraft.pipelined import (
    ShadowRule,
    pipeline_lengths,
    pipelined_generate,
    pipelined_step,
)
from quickdraft.reference import TableModel
from quickdraft.sampling import SamplingConfig
from quickdraft.theory import expected_tokens

# (vocab, gamma, tokens, sampling, seed, draft): every row reaches pre-drafted (warm)
# iterations; n_tokens >= 2 gamma + 2 reaches a full pre-drafted proposal of gamma tokens
EXACT_CASES = [
    (2, 1, 5, "plain", 0, "random"),
    (2, 1, 5, "temperature", 1, "random"),
    (2, 2, 6, "all", 2, "random"),
    (2, 2, 5, "plain", 3, "random"),
    (2, 3, 5, "plain", 4, "random"),
    (2, 4, 5, "temperature", 10, "random"),
    (3, 1, 4, "top_k", 5, "random"),
    (3, 2, 4, "all", 6, "random"),
    (3, 3, 4, "temperature", 7, "same"),
    (3, 2, 4, "plain", 8, "disjoint"),
    (3, 3, 5, "greedy", 9, "random"),
]


def assert_same_law(got, want):
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-9)
    for seq in set(want) | set(got):
        assert got.get(seq, 0.0) == pytest.approx(want.get(seq, 0.0), abs=1e-9), seq


@pytest.mark.parametrize("vocab,gamma,n_tokens,sampling,seed,draft_kind", EXACT_CASES)
def test_sequences_follow_the_target_exactly(vocab, gamma, n_tokens, sampling, seed,
                                             draft_kind):
    """The distribution of whole output sequences, integrated over every uniform of every
    iteration (proposal, continuation, accept, sample), is the target's to 1e-9."""
    cfg = SAMPLINGS[sampling]
    target, draft = random_tables(vocab, seed, draft_kind)
    want = exact_target_sequences(target, [1], n_tokens, cfg)
    assert_same_law(exact_pipelined_sequences(target, draft, [1], gamma, n_tokens, cfg), want)


# rules that decline continuations: after misses (a keep rate below 1/2 after two in a
# row), and always (every iteration Algorithm 1's but those with nothing to verify)
RULES = {"after misses": ShadowRule(min_keep_rate=0.5, memory=0.5),
         "never": ShadowRule(min_keep_rate=1.0, memory=0.0, start=0.0)}


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("vocab,gamma,n_tokens,sampling,seed,draft_kind", [
    (2, 2, 6, "all", 2, "random"),
    (2, 1, 5, "temperature", 7, "random"),
    (3, 1, 4, "plain", 8, "disjoint"),
])
def test_sequences_follow_the_target_exactly_whatever_the_rule(
        rule, vocab, gamma, n_tokens, sampling, seed, draft_kind):
    """Iterations that skip the continuation (Algorithm 1's, with the bonus) as the rule
    decides from the iterations before them: the sequence law is still the target's."""
    cfg = SAMPLINGS[sampling]
    target, draft = random_tables(vocab, seed, draft_kind)
    want = exact_target_sequences(target, [1], n_tokens, cfg)
    got = exact_pipelined_sequences(target, draft, [1], gamma, n_tokens, cfg, RULES[rule])
    assert_same_law(got, want)


def test_the_exact_test_sees_a_wrong_bonus(monkeypatch):
    """The integrator covers iterations without a continuation: a bonus drawn from p_1
    instead of p_{k+1} moves the sequence law away from the target's."""
    from quickdraft.verification import verify

    def first_row_bonus(p, q, x, u, s, *, validate=True):
        return verify(np.concatenate([p[:-1], p[:1]]), q, x, u, s, validate=validate)

    monkeypatch.setattr(pipelined, "verify", first_row_bonus)
    cfg = SAMPLINGS["plain"]
    target, draft = random_tables(3, 7, "random")
    got = exact_pipelined_sequences(target, draft, [1], 2, 5, cfg, RULES["never"])
    want = exact_target_sequences(target, [1], 5, cfg)
    assert max(abs(got.get(s, 0.0) - want.get(s, 0.0)) for s in set(got) | set(want)) > 1e-3


def test_the_rule_decides_from_the_keep_rate():
    """Continuations while the running keep rate is high enough; the generation's
    iterations without one are counted (no shadow calls, checked = proposal)."""
    rule = ShadowRule(min_keep_rate=0.5, memory=0.5)
    assert rule.shadow(rule.start) and rule.shadow(0.5) and not rule.shadow(0.49)
    step = pipelined.PipelinedStep([1, 2], 1, 2, [1.0, 0.0], None, False, 2, 3, 3)
    assert rule.update(1.0, step) == 0.5  # a rejection halves it
    kept = pipelined.PipelinedStep([1, 2, 3], 3, 3, [1.0] * 3, None, False, 2, 3, 3)
    assert rule.update(0.5, kept) == 0.75
    target, draft = random_tables(6, 3, "random")
    cfg = SamplingConfig(temperature=1.0)
    never = pipelined_generate(target, draft, [1], gamma=3, max_new_tokens=40, sampling=cfg,
                               rng=np.random.default_rng(0), rule=RULES["never"])
    assert never.stats.shadow_draft_calls <= 1  # only a last stand-in, if any
    assert never.stats.warm_iterations == 0
    always = pipelined_generate(target, draft, [1], gamma=3, max_new_tokens=40, sampling=cfg,
                                rng=np.random.default_rng(0))
    assert always.stats.shadow_draft_calls > 10


def test_a_rule_for_the_hidden_share_starts_at_the_break_even_rate():
    rule = ShadowRule.for_hidden_share(4, 0.76, memory=0.5)
    assert rule.min_keep_rate == pytest.approx(0.3) and rule.memory == 0.5
    assert ShadowRule.for_hidden_share(7, 0.57).min_keep_rate == pytest.approx(0.43 * 8 / 7)
    never = ShadowRule.for_hidden_share(2, 0.0)  # nothing hides: no continuation pays
    assert never.min_keep_rate == 1.0 and not never.shadow(never.start)
    kept = pipelined.PipelinedStep([1, 2, 3], 3, 3, [1.0] * 3, None, False, 2, 3, 3)
    rate = never.start
    for _ in range(2000):  # every iteration keeps everything: still no continuation
        rate = never.update(rate, kept)
    assert not never.shadow(rate)
    target, draft = random_tables(6, 3, "random")
    run = pipelined_generate(target, draft, [1], gamma=2, max_new_tokens=40,
                             sampling=SamplingConfig(temperature=1.0),
                             rng=np.random.default_rng(0), rule=never)
    assert run.stats.shadow_draft_calls <= 1  # only a last stand-in, if any
    assert rule.shadow(rule.start)  # a paying rate starts drafting
    with pytest.raises(ValueError, match="h must be in"):
        ShadowRule.for_hidden_share(4, 1.2)


def _unchecked_stand_in(p, q, x, u, s, *, validate=True):
    u = np.array(u, dtype=np.float64)
    u[-1] = 0.0  # the stand-in is always accepted
    return _RULE(p, q, x, u, s, validate=validate)


def _shared_uniform(p, q, x, u, s, *, validate=True):
    u = np.array(u, dtype=np.float64)
    if len(u) > 1:
        u[-1] = u[-2]  # the stand-in reuses the last proposal token's uniform
    return _RULE(p, q, x, u, s, validate=validate)


_RULE = pipelined.verify_without_bonus


@pytest.mark.parametrize("broken", [_unchecked_stand_in, _shared_uniform])
def test_the_exact_test_sees_a_broken_stand_in(monkeypatch, broken):
    """The integrator can tell: an unchecked stand-in, or one decided with a uniform already
    used, moves the sequence law away from the target's."""
    monkeypatch.setattr(pipelined, "verify_without_bonus", broken)
    cfg = SAMPLINGS["plain"]
    target, draft = random_tables(2, 0, "random")
    got = exact_pipelined_sequences(target, draft, [1], 2, 5, cfg)
    want = exact_target_sequences(target, [1], 5, cfg)
    assert max(abs(got.get(s, 0.0) - want.get(s, 0.0)) for s in set(got) | set(want)) > 1e-3


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 20), st.integers(1, 8), st.integers(0, 2**32 - 1), st.integers(1, 30))
def test_greedy_pipelined_equals_greedy_target(vocab, gamma, seed, length):
    target, draft = random_tables(vocab, seed, "random")
    greedy = SamplingConfig(temperature=0)
    ar = autoregressive_generate(target, [0], max_new_tokens=length, sampling=greedy,
                                 rng=np.random.default_rng(seed))
    pl = pipelined_generate(target, draft, [0], gamma=gamma, max_new_tokens=length,
                            sampling=greedy, rng=np.random.default_rng(seed))
    assert pl.tokens == ar.tokens
    assert pl.stats.new_tokens == length and pl.stats.target_calls <= length


@pytest.mark.parametrize("gamma,length,eos", [(1, 9, None), (3, 17, None), (4, 40, 5)])
def test_generate_is_the_chain_of_steps_the_exact_test_integrates(gamma, length, eos):
    """pipelined_generate = pipelined_step chained with pipeline_lengths, each iteration's
    uniforms drawn as rng.random(k_open + L + k + 2), fresh states each step (the cache
    reuse changes nothing), output cut at EOS."""
    target, draft = random_tables(6, 11, "random")
    cfg = SamplingConfig(temperature=0.9, top_k=4)
    got = pipelined_generate(target, draft, [2], gamma=gamma, max_new_tokens=length,
                             sampling=cfg, rng=np.random.default_rng(5), eos_id=eos)
    rng = np.random.default_rng(5)
    ids, out, pending = [2], [], None
    while len(out) < length:
        k, L = pipeline_lengths(length - len(out), gamma,
                                None if pending is None else len(pending.tokens))
        k_open = 0 if pending is not None else k
        u = rng.random(k_open + L + k + 2)
        step = pipelined_step(target.new_state(), ModelDrafter(draft, cfg, gamma + 1), ids,
                              pending, cfg, u[:k_open], u[k_open:k_open + L],
                              u[k_open + L:-1], float(u[-1]))
        piece = step.tokens
        if eos in piece:
            piece = piece[: piece.index(eos) + 1]
        ids += piece
        out += piece
        pending = step.pending
        if eos in piece:
            break
    assert got.tokens == out


def test_draft_equal_to_target_keeps_every_continuation():
    target, _ = random_tables(6, 1, "random")
    gamma, n = 3, 50
    s = pipelined_generate(target, target, [0], gamma=gamma, max_new_tokens=n,
                           rng=np.random.default_rng(0)).stats
    assert s.acceptance_rate == 1.0 and s.alpha == pytest.approx(1.0)
    assert s.open_draft_calls == gamma  # only the first proposal made the target wait
    assert s.warm_iterations == s.iterations - 1
    assert s.pre_drafted_discarded == 0 and s.pre_drafted_kept == s.shadow_draft_calls
    assert s.target_calls == math.ceil(n / (gamma + 1))


@pytest.mark.parametrize("gamma", [1, 2, 3])
def test_the_accounting_adds_up(gamma):
    target, draft = random_tables(4, 2, "random")
    res = pipelined_generate(target, draft, [1, 2], gamma=gamma, max_new_tokens=60,
                             rng=np.random.default_rng(9))
    s = res.stats
    assert len(res.tokens) == s.new_tokens == 60
    assert s.iterations == s.target_calls == len(s.accepted_per_iteration)
    assert s.pre_drafted_kept + s.pre_drafted_discarded == s.shadow_draft_calls
    assert s.draft_calls == s.open_draft_calls + s.shadow_draft_calls
    assert 0 < s.warm_iterations < s.iterations and s.pre_drafted_discarded > 0
    # every iteration checks at most gamma + 1 candidates, the stand-in among them
    assert all(1 <= c <= gamma + 1 for c in s.checked_per_iteration)
    # each emits min(n + 1, candidates) tokens
    assert sum(min(n + 1, c) for n, c in zip(s.accepted_per_iteration,
                                              s.checked_per_iteration)) == 60


def test_monte_carlo_matches_the_walltime_model():
    """i.i.d. beta: an iteration emits Eq. 1 tokens and keeps its continuation with
    probability alpha^(gamma + 1), the two quantities the walltime formula is made of."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=8) * 1.5
    target = TableModel(logits)  # unigrams: beta (0.87 here) is the same at every position
    draft = TableModel(logits + rng.normal(size=8) * 0.7)
    gamma = 3
    s = pipelined_generate(target, draft, [0], gamma=gamma, max_new_tokens=1500,
                           rng=np.random.default_rng(777)).stats
    alpha = s.beta_per_position[0]
    full = [(n, c) for n, c in zip(s.accepted_per_iteration, s.checked_per_iteration)
            if c == gamma + 1][:-1]
    tokens = np.array([min(n + 1, c) for n, c in full], dtype=float)
    z = (tokens.mean() - expected_tokens(alpha, gamma)) / (tokens.std(ddof=1)
                                                          / math.sqrt(tokens.size))
    assert abs(z) < Z_LIMIT, z
    kept = np.array([n == c for n, c in full], dtype=float)
    p = alpha ** (gamma + 1)
    z = (kept.mean() - p) / math.sqrt(p * (1 - p) / kept.size)
    assert abs(z) < Z_LIMIT, z


def test_eos_stops_and_is_included():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 5, 5))
    logits[..., 4] += 1.0
    target, draft = TableModel(logits), TableModel(rng.normal(size=(5, 5)))
    res = pipelined_generate(target, draft, [0], gamma=3, max_new_tokens=200, eos_id=4,
                             rng=np.random.default_rng(0))
    assert res.tokens[-1] == 4 and 4 not in res.tokens[:-1]


def test_same_seed_same_output():
    target, draft = random_tables(8, 4, "random")
    run = lambda seed: pipelined_generate(target, draft, [0], gamma=3,  # noqa: E731
                                          max_new_tokens=30,
                                          rng=np.random.default_rng(seed)).tokens
    assert run(1) == run(1) and run(1) != run(2)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(gamma=0), ValueError, "gamma must be an integer >= 1"),
        (dict(gamma=1.5), ValueError, "gamma must be an integer >= 1"),
        (dict(gamma=True), ValueError, "gamma must be an integer >= 1"),
        (dict(prompt_ids=[]), ValueError, "prompt is empty"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(prompt_ids=[9]), ValueError, "prompt token ids"),
        (dict(max_new_tokens=20), ValueError, "exceeds the model's context"),
        (dict(rng=0), TypeError, "numpy.random.Generator"),
    ],
)
def test_bad_requests(kwargs, error, message):
    target = TableModel(np.zeros((4, 4)), max_length=10)
    draft = TableModel(np.zeros((4, 4)))
    args = dict(prompt_ids=[0], gamma=2, max_new_tokens=5, rng=np.random.default_rng(0))
    args.update(kwargs)
    prompt = args.pop("prompt_ids")
    with pytest.raises(error, match=message):
        pipelined_generate(target, draft, prompt, **args)


def test_vocabulary_mismatch_and_bad_parts_are_refused():
    with pytest.raises(ValueError, match="vocabulary"):
        pipelined_generate(TableModel(np.zeros(4)), TableModel(np.zeros(5)), [0], gamma=2,
                           max_new_tokens=3, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="does not fit"):
        pipeline_lengths(3, 2, 3)  # a pre-drafted proposal longer than the budget allows
    target, draft = random_tables(4, 0, "random")
    cfg = SamplingConfig()
    with pytest.raises(ValueError, match="a proposal or a continuation"):
        pipelined_step(target.new_state(), ModelDrafter(draft, cfg, 3), [1], None, cfg,
                       np.zeros(0), np.zeros(0), np.array([0.5]), 0.5)
    for bad, field in (({"min_keep_rate": 1.5}, "min_keep_rate"), ({"memory": 1.0}, "memory"),
                       ({"start": -0.1}, "start")):
        with pytest.raises(ValueError, match=field):
            ShadowRule(**bad)


def test_lengths_follow_the_budget():
    assert pipeline_lengths(10, 4, None) == (4, 5)  # a proposal, a stand-in and gamma more
    assert pipeline_lengths(10, 4, None, shadow=False) == (4, 0)  # Algorithm 1's iteration
    assert pipeline_lengths(10, 4, 0, shadow=False) == (0, 5)  # nothing to verify: a stand-in
    assert pipeline_lengths(1, 4, None, shadow=False) == (0, 1)
    assert pipeline_lengths(5, 4, 4) == (4, 1)  # the stand-in fills the budget
    assert pipeline_lengths(1, 4, None) == (0, 1)  # the stand-in alone
    assert pipeline_lengths(3, 1, 0) == (0, 2)


@pytest.mark.parametrize("rule", sorted(RULES) + ["plain"])
def test_shadow_iterations_count_the_iterations_that_drafted_a_continuation(rule):
    """s for the walltime (theory.pipelined_walltime_improvement's shadow_rate): the
    iterations the rule let draft a continuation, replayed from the keeps, plus a last one
    whose proposal was empty (a stand-in alone); not the draft calls (L per continuation)."""
    shadow_rule = RULES.get(rule, ShadowRule())
    target, draft = random_tables(6, 3, "random")
    s = pipelined_generate(target, draft, [1], gamma=3, max_new_tokens=60,
                           sampling=SamplingConfig(temperature=1.0),
                           rng=np.random.default_rng(4), rule=shadow_rule).stats
    rate, asked = shadow_rule.start, []
    for n, checked in zip(s.accepted_per_iteration, s.checked_per_iteration):
        asked.append(shadow_rule.shadow(rate))
        rate = shadow_rule.memory * rate + (1.0 - shadow_rule.memory) * float(n == checked)
    assert sum(asked) <= s.shadow_iterations <= sum(asked) + (not asked[-1])
    assert s.shadow_iterations <= s.shadow_draft_calls <= 4 * s.shadow_iterations
    assert s.shadow_rate == s.shadow_iterations / s.iterations
    assert s.as_dict()["shadow_iterations"] == s.shadow_iterations
    if rule == "plain":
        assert s.shadow_rate == 1.0
    elif rule == "after misses":
        assert 0 < s.shadow_iterations < s.iterations
    else:  # memory 0: only right after an iteration that kept all its candidates
        assert 0 < s.shadow_rate < 0.1


def _exact_iteration(target, draft, gamma: int, cfg: SamplingConfig, *, warm: bool,
                     shadow: bool) -> list[tuple[float, pipelined.PipelinedStep]]:
    """Every outcome of one :func:`pipelined_step` far from the budget, with its
    probability: integrated over the cells of every uniform (proposal, continuation,
    accept, sample). ``warm``: the proposal is pre-drafted, drawn from q as the last
    continuation's tail was (on unigram tables it does not depend on the keep that made it
    warm); ``shadow``: the iteration drafts a continuation of gamma + 1 tokens."""
    from exact import accept_cells, cells, draft_paths, sample_breakpoints

    from quickdraft.sampling import adjust_logits

    ids, k, L = [0], gamma, gamma + 1 if shadow else 0
    out = []
    for v_x, x, w_x in draft_paths(draft, ids, k, cfg):
        drafter = ModelDrafter(draft, cfg, gamma + 1)
        pending = drafter.get_candidates(ids, k, np.asarray(v_x)) if warm else None
        v_open = np.zeros(0) if warm else np.asarray(v_x)
        for v_y, y, w_y in draft_paths(draft, ids + x, L, cfg):
            c = x + y[:1]  # [m] the candidates: the proposal, and the stand-in if any
            p = adjust_logits(np.stack([target.score(ids + c[:i]) for i in range(len(c))]
                                       + [target.score(ids + c)]), cfg)  # [m + 1, V]
            q = adjust_logits(np.stack([draft.score(ids + c[:i]) for i in range(len(c))]),
                              cfg)  # [m, V]
            s_cells = cells(sample_breakpoints(p, q))
            per_pos = [accept_cells(p[i, c[i]], q[i, c[i]]) for i in range(len(c))]
            for combo in itertools.product(*per_pos):
                u = np.array([a[0] for a in combo] + [0.5] * (k + 1 - len(c)))  # [k + 1]
                w_u = float(np.prod([a[1] for a in combo]))
                for s, w_s in zip(*s_cells):
                    step = pipelined_step(target.new_state(), ModelDrafter(draft, cfg, gamma + 1),
                                          ids, pending, cfg, v_open, np.asarray(v_y), u,
                                          float(s))
                    out.append((w_x * w_y * w_u * w_s, step))
    return out


@pytest.mark.parametrize("vocab,gamma", [(3, 1), (2, 2), (2, 3)])
def test_the_walltime_model_is_the_loop_s_exact_long_run_rate(vocab, gamma):
    """Exact, no Monte Carlo: on unigram tables (beta = alpha at every position) one iteration's
    outcomes are integrated exactly, for each kind (cold or warm proposal, with or without
    a continuation). They give the model's parts: Eq. 1 tokens in every kind, a keep with
    probability alpha^(gamma + 1) with a continuation (alpha^gamma without), gamma draft
    calls waited for when cold, gamma + 1 in the shadow with a continuation. Chained as a
    Markov chain over (warm, running rate) by a rule that decides from the last keep, the
    long-run tokens over the long-run cost (1 per target call, c per draft call waited for,
    (1 - h) c per one in the shadow) is the walltime formula at the chain's share s of
    iterations with a continuation: s = 1 plain, 0 < s < 1 with the rule, and s = 0 is
    Theorem 3.8."""
    from quickdraft import theory

    rng = np.random.default_rng(vocab + 10 * gamma)
    logits = rng.normal(size=vocab) * 1.5
    target, draft = TableModel(logits), TableModel(logits + rng.normal(size=vocab))
    cfg = SamplingConfig(temperature=1.0)
    p, q = (np.exp(t.logits) / np.exp(t.logits).sum() for t in (target, draft))
    alpha = float(theory.beta(p, q))
    assert 0.2 < alpha < 0.99
    kinds = {(w, s): _exact_iteration(target, draft, gamma, cfg, warm=w, shadow=s)
             for w in (False, True) for s in (False, True)}
    for (warm, shadow), outcomes in kinds.items():
        assert sum(w for w, _ in outcomes) == pytest.approx(1.0, abs=1e-12)
        tokens = sum(w * len(step.tokens) for w, step in outcomes)
        assert tokens == pytest.approx(expected_tokens(alpha, gamma), rel=1e-12)
        kept = sum(w for w, step in outcomes if step.n_accepted == step.checked)
        assert kept == pytest.approx(alpha ** (gamma + shadow), rel=1e-12)
        nxt = sum(w for w, step in outcomes if step.pending is not None)
        assert nxt == pytest.approx(kept if shadow else 0.0, rel=1e-12, abs=1e-15)
        assert {(step.warm, step.open_calls, step.shadow_calls, step.pre_drafted)
                for _, step in outcomes} == {(warm, 0 if warm else gamma,
                                            (gamma + 1) * shadow, (gamma + 1) * shadow)}

    def long_run(rule, c, h):
        """(tokens / cost, s) in the stationary law of the chain the rule makes."""
        states, edges, todo = [], {}, [(False, rule.start)]
        while todo:
            state = todo.pop()
            if state in edges:
                continue
            states.append(state)
            warm, rate = state
            edges[state] = [(w, (step.pending is not None, rule.update(rate, step)), step)
                            for w, step in kinds[warm, rule.shadow(rate)]]
            todo += [to for _, to, _ in edges[state] if to not in edges]
        assert len(states) <= 4  # memory 0: the rate is 0 or 1
        index = {state: i for i, state in enumerate(states)}
        moves = np.zeros((len(states), len(states)))  # [from, to]
        for state, out in edges.items():
            for w, to, _ in out:
                moves[index[state], index[to]] += w
        # the stationary law: pi (moves - I) = 0, sum(pi) = 1
        a = np.vstack([(moves - np.eye(len(states))).T, np.ones(len(states))])
        pi = np.linalg.lstsq(a, np.append(np.zeros(len(states)), 1.0), rcond=None)[0]
        tokens = cost = s = 0.0
        for state, out in edges.items():
            s += pi[index[state]] * rule.shadow(state[1])
            for w, _, step in out:
                tokens += pi[index[state]] * w * len(step.tokens)
                cost += pi[index[state]] * w * (
                    1.0 + c * step.open_calls + (1.0 - h) * c * step.shadow_calls)
        return tokens / cost, s

    plain = ShadowRule(min_keep_rate=0.0, memory=0.0)
    after_a_keep = ShadowRule(min_keep_rate=1.0, memory=0.0)  # only right after a keep
    for c, h in [(0.1, 0.0), (0.3, 0.5), (0.05, 0.9), (0.2, 1.0)]:
        got, s = long_run(plain, c, h)
        assert s == pytest.approx(1.0)
        assert got == pytest.approx(theory.pipelined_walltime_improvement(
            alpha, gamma, c, h), rel=1e-9)
        got, s = long_run(after_a_keep, c, h)
        # kept: alpha^(gamma + 1) after a continuation, alpha^gamma after none
        assert s == pytest.approx(alpha ** gamma / (1 - alpha ** (gamma + 1) + alpha ** gamma))
        assert got == pytest.approx(theory.pipelined_walltime_improvement(
            alpha, gamma, c, h, shadow_rate=s), rel=1e-9)
        # no continuation ever: every iteration is Algorithm 1's
        cold = kinds[False, False]
        got = sum(w * len(step.tokens) for w, step in cold) / sum(
            w * (1.0 + c * step.open_calls) for w, step in cold)
        assert got == pytest.approx(theory.walltime_improvement(alpha, gamma, c), rel=1e-12)
        assert theory.pipelined_walltime_improvement(alpha, gamma, c, h, shadow_rate=0.0) == (
            theory.walltime_improvement(alpha, gamma, c))
