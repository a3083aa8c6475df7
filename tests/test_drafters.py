"""Drafting strategies: exact output law (integrated, not sampled), greedy equality, and
what each strategy is for (lookup on copy-heavy text, gamma following alpha, the bandit
converging to the fastest drafter and following a change)."""

from __future__ import annotations

import numpy as np
import pytest
from exact import (
    exact_drafter_sequences,
    exact_speculative_sequences,
    exact_target_sequences,
)

from quickdraft.drafters import (
    AdaptiveGammaDrafter,
    BanditDrafter,
    BanditStats,
    FallbackDrafter,
    HeuristicGammaDrafter,
    HierarchicalDrafter,
    NgramDrafter,
)
from quickdraft.generation import ModelDrafter, autoregressive_generate, speculative_generate
from quickdraft.reference import TableModel
from quickdraft.sampling import SamplingConfig

SAMPLING = SamplingConfig(temperature=0.9)
GREEDY = SamplingConfig(temperature=0)


def tables(vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    target = TableModel(rng.normal(size=(vocab,) * 3) * 2.0)  # trigram p
    draft = TableModel(rng.normal(size=(vocab,) * 2) * 2.0)  # bigram q
    tiny = TableModel(rng.normal(size=vocab) * 2.0)  # unigram: a draft of the draft
    return target, draft, tiny


def _assert_same_law(got: dict, want: dict) -> None:
    assert set(got) <= set(want)
    for seq, w in want.items():
        assert abs(got.get(seq, 0.0) - w) < 1e-9, (seq, got.get(seq, 0.0), w)
    assert abs(sum(got.values()) - 1.0) < 1e-9


def _drafters(target, draft, vocab, sampling):
    return {
        "ngram": NgramDrafter(vocab, max_tokens=2, max_ngram=2),
        "fallback": FallbackDrafter(NgramDrafter(vocab, max_tokens=2, max_ngram=2),
                                    ModelDrafter(draft, sampling, 2)),
        "adaptive": AdaptiveGammaDrafter(ModelDrafter(draft, sampling, 2), max_gamma=2,
                                         cost_ratio=0.05, decay=0.5, prior_weight=0.5),
        "heuristic": HeuristicGammaDrafter(ModelDrafter(draft, sampling, 2), start=1,
                                           max_gamma=2),
        "early_stop": ModelDrafter(draft, sampling, 2, stop_below=0.5),
        "bandit": BanditDrafter(
            {"model": ModelDrafter(draft, sampling, 2),
             "ngram": NgramDrafter(vocab, max_tokens=2)},
            cost_model=lambda arm, cand: (0.1 if arm == "ngram" else 0.3) * len(cand.tokens) + 1),
    }


@pytest.mark.parametrize("name", ["ngram", "fallback", "adaptive", "heuristic", "early_stop",
                                  "bandit"])
@pytest.mark.parametrize("sampling", [SAMPLING, SamplingConfig(temperature=1.2, top_k=2)])
def test_every_drafter_keeps_the_target_law_exactly(name, sampling):
    """Whole 3-token output sequences over several iterations follow the target to 1e-9,
    integrated over every uniform cell, for drafters whose proposal length depends on the
    past (adaptive, heuristic, the bandit's choice) or on the draft's own draws (early
    stop), and for model-free proposals (lookup). Each branch of the history keeps its own
    drafter state."""
    vocab = 2
    target, draft, _ = tables(vocab, 3)
    prompt, n_tokens = [0, 1, 0], 3
    drafter = _drafters(target, draft, vocab, sampling)[name]
    got = exact_drafter_sequences(target, draft, prompt, n_tokens, sampling, drafter,
                                  bound=drafter.max_tokens)
    _assert_same_law(got, exact_target_sequences(target, prompt, n_tokens, sampling))


@pytest.mark.parametrize("name", ["ngram", "fallback", "adaptive", "heuristic", "early_stop",
                                  "bandit"])
def test_every_drafter_is_greedy_exact(name):
    vocab = 6
    target, draft, _ = tables(vocab, 5)
    prompt = [1, 2, 3, 1, 2]
    want = autoregressive_generate(target, prompt, max_new_tokens=40, sampling=GREEDY,
                                   rng=np.random.default_rng(0)).tokens
    drafter = _drafters(target, draft, vocab, GREEDY)[name]
    got = speculative_generate(target, None, prompt, drafter=drafter, max_new_tokens=40,
                               sampling=GREEDY, rng=np.random.default_rng(0))
    assert got.tokens == want


def test_hierarchical_proposal_is_the_inner_speculative_scheme_draw_for_draw():
    """The hierarchical drafter's proposal is speculative decoding of q by the smaller
    draft, draw for draw (the same uniforms give the same tokens), and that scheme's law
    is exactly q's (integrated): so its proposals follow q and carry q's own rows."""
    vocab = 3
    _, draft, tiny = tables(vocab, 7)
    ids = [1, 2]
    for seed in range(20):
        d = HierarchicalDrafter(draft, ModelDrafter(tiny, SAMPLING, 2), SAMPLING, 4,
                                np.random.default_rng(seed), inner_gamma=2)
        cand = d.get_candidates(ids, 4, np.zeros(4))
        ref = speculative_generate(draft, tiny, ids, gamma=2, max_new_tokens=4,
                                   sampling=SAMPLING, rng=np.random.default_rng(seed))
        assert cand.tokens.tolist() == ref.tokens
        rows = cand.probs  # [4, V] q at each proposed position
        for i in range(4):
            from quickdraft.sampling import adjust_logits

            want = adjust_logits(draft.score(ids + ref.tokens[:i]), SAMPLING)
            assert np.allclose(rows[i], want)
    law = exact_speculative_sequences(draft, tiny, ids, 2, 4, SAMPLING)
    _assert_same_law(law, exact_target_sequences(draft, ids, 4, SAMPLING))


def test_hierarchical_whole_sequences_follow_the_target():
    """Two levels composed exactly: the proposal's law (the inner scheme's, integrated)
    times the outer verification's (integrated over its uniforms) gives the target's law
    over whole sequences, to 1e-9."""
    from exact import exact_step_distribution

    vocab = 2
    target, draft, tiny = tables(vocab, 11)
    prompt, n_tokens, gamma = [0, 1], 3, 2
    # the hierarchical drafter proposes exactly q's law (previous test): its outer steps
    # are ModelDrafter steps over q, which exact_step_distribution integrates
    law = exact_speculative_sequences(target, draft, prompt, gamma, n_tokens, SAMPLING)
    _assert_same_law(law, exact_target_sequences(target, prompt, n_tokens, SAMPLING))
    inner = exact_speculative_sequences(draft, tiny, prompt, 1, gamma, SAMPLING)
    direct = exact_target_sequences(draft, prompt, gamma, SAMPLING)
    _assert_same_law(inner, direct)
    assert exact_step_distribution(target, draft, prompt, gamma, SAMPLING)


def test_hierarchical_greedy_and_seeded():
    vocab = 8
    target, draft, tiny = tables(vocab, 2)
    prompt = [1, 4, 2]
    want = autoregressive_generate(target, prompt, max_new_tokens=30, sampling=GREEDY,
                                   rng=np.random.default_rng(0)).tokens
    for inner in (ModelDrafter(tiny, GREEDY, 3), NgramDrafter(vocab, max_tokens=3)):
        d = HierarchicalDrafter(draft, inner, GREEDY, 4, np.random.default_rng(0))
        got = speculative_generate(target, None, prompt, drafter=d, max_new_tokens=30,
                                   sampling=GREEDY, rng=np.random.default_rng(0))
        assert got.tokens == want
    runs = [speculative_generate(
        target, None, prompt, max_new_tokens=20, sampling=SAMPLING, rng=np.random.default_rng(4),
        drafter=HierarchicalDrafter(draft, ModelDrafter(tiny, SAMPLING, 2), SAMPLING, 3,
                                    np.random.default_rng(9))).tokens for _ in range(2)]
    assert runs[0] == runs[1]


def test_ngram_lookup_proposes_the_latest_continuation():
    d = NgramDrafter(20, max_tokens=3, max_ngram=2)
    ids = [1, 2, 3, 4, 9, 1, 2, 7, 8, 1, 2]
    # the latest earlier "1 2" is followed by 7 8 1
    assert d.get_candidates(ids, 3, np.zeros(3)).tokens.tolist() == [7, 8, 1]
    assert d.get_candidates(ids, 1, np.zeros(1)).tokens.tolist() == [7]
    assert d.get_candidates([5, 6], 3, np.zeros(3)).tokens.tolist() == []  # no match
    assert d.get_candidates(ids[:4], 3, np.zeros(3)).tokens.tolist() == []  # rewound
    grown = ids + [7]  # "2 7" seen before: followed by 8
    assert d.get_candidates(grown, 2, np.zeros(2)).tokens.tolist() == [8, 1]
    cand = d.get_candidates(ids, 3, np.zeros(3))
    assert cand.model_calls == 0 and cand.checked and cand.one_hot


def test_ngram_shines_on_copy_heavy_text():
    """A target that copies its context (a trigram table that repeats a pattern): lookup
    proposes the copy and most tokens are accepted with no draft model at all."""
    vocab = 12
    logits = np.full((vocab,) * 3, -8.0)
    pattern = [3, 7, 1, 9, 4, 2, 11, 5]
    for a, b, c in zip(pattern, pattern[1:] + pattern[:1], pattern[2:] + pattern[:2]):
        logits[a, b, c] = 8.0
    target = TableModel(logits)
    prompt = pattern * 2
    res = speculative_generate(target, None, prompt, drafter=NgramDrafter(vocab, max_tokens=6),
                               max_new_tokens=48, sampling=GREEDY, rng=np.random.default_rng(0))
    assert res.stats.acceptance_rate > 0.9
    assert res.stats.tokens_per_target_call > 4
    assert res.stats.draft_calls == 0


def test_adaptive_gamma_follows_alpha():
    """With a draft equal to the target (alpha 1) gamma grows to its maximum; with an
    unrelated draft and a costly one (alpha << c) it stops drafting, probing now and then."""
    vocab = 6
    target, draft, _ = tables(vocab, 1)
    good = AdaptiveGammaDrafter(ModelDrafter(target, SAMPLING, 8), max_gamma=8, cost_ratio=0.05)
    speculative_generate(target, None, [1, 2], drafter=good, max_new_tokens=200,
                         sampling=SAMPLING, rng=np.random.default_rng(0))
    assert good.chosen[-6:-1] == [8] * 5 and good.choose() == 8 and good.alpha > 0.9
    bad_target = TableModel(np.eye(vocab)[[1, 2, 3, 4, 5, 0]] * 20)  # deterministic cycle
    bad_draft = TableModel(np.eye(vocab)[[3, 4, 5, 0, 1, 2]] * 20)  # always wrong
    bad = AdaptiveGammaDrafter(ModelDrafter(bad_draft, SAMPLING, 8), max_gamma=8,
                               cost_ratio=0.5)
    res = speculative_generate(bad_target, None, [0], drafter=bad, max_new_tokens=100,
                               sampling=SAMPLING, rng=np.random.default_rng(0))
    assert bad.alpha < 0.2 and bad.chosen[-16:].count(0) >= 12
    assert res.stats.draft_calls < 40  # mostly target steps alone
    bad.observe_cost(0.0)  # free drafting: any alpha > 0 pays again
    assert bad.choose() >= 1


def test_bandit_converges_and_follows_a_change():
    """Two arms with deterministic costs: the bandit plays the faster one most of the time,
    and switches when the costs swap mid-generation."""
    vocab = 6
    target, _, _ = tables(vocab, 4)
    fast_first = {"flag": True}

    def cost(arm, cand):
        a_cheap = fast_first["flag"]
        per_token = 0.05 if (arm == "a") == a_cheap else 0.6
        return 1.0 + per_token * len(cand.tokens)

    arms = {"a": ModelDrafter(target, SAMPLING, 3), "b": ModelDrafter(target, SAMPLING, 3)}
    bandit = BanditDrafter(arms, cost_model=cost, discount=0.9, explore=0.3)
    speculative_generate(target, None, [1], drafter=bandit, max_new_tokens=240,
                         sampling=SAMPLING, rng=np.random.default_rng(0))
    first = bandit.plays[-40:]
    assert first.count("a") > 30
    fast_first["flag"] = False
    speculative_generate(target, None, [1], drafter=bandit, max_new_tokens=240,
                         sampling=SAMPLING, rng=np.random.default_rng(1))
    assert bandit.plays[-40:].count("b") > 30


def test_bandits_sharing_statistics_start_from_what_others_measured():
    """A second sequence's bandit over shared BanditStats plays the arm the first one found
    fastest from its first iteration, without trying every arm again."""
    vocab = 6
    target, _, _ = tables(vocab, 4)

    def cost(arm, cand):
        return 1.0 + (0.05 if arm == "b" else 0.6) * len(cand.tokens)

    def arms():
        return {"a": ModelDrafter(target, SAMPLING, 3), "b": ModelDrafter(target, SAMPLING, 3)}

    stats = BanditStats(["a", "b"])
    first = BanditDrafter(arms(), cost_model=cost, explore=0.3, stats=stats)
    speculative_generate(target, None, [1], drafter=first, max_new_tokens=120,
                         sampling=SAMPLING, rng=np.random.default_rng(0))
    assert first.plays[0] == "a" and first.plays.count("b") > len(first.plays) // 2
    second = BanditDrafter(arms(), cost_model=cost, explore=0.3, stats=stats)
    speculative_generate(target, None, [2], drafter=second, max_new_tokens=12,
                         sampling=SAMPLING, rng=np.random.default_rng(1))
    assert second.plays[0] == "b"
    alone = BanditDrafter(arms(), cost_model=cost, explore=0.3)
    speculative_generate(target, None, [2], drafter=alone, max_new_tokens=12,
                         sampling=SAMPLING, rng=np.random.default_rng(1))
    assert alone.plays[0] == "a"  # its own statistics: every arm is tried first
    with pytest.raises(ValueError, match="arms"):
        BanditDrafter(arms(), stats=BanditStats(["a", "c"]))


def test_composite_drafters_declare_their_parts():
    vocab = 5
    target, draft, tiny = tables(vocab, 0)
    model = ModelDrafter(draft, SAMPLING, 3)
    auto = FallbackDrafter(NgramDrafter(vocab, max_tokens=5), model)
    assert auto.max_tokens == 5 and auto.states == [model.state] and auto.sampling == SAMPLING
    assert NgramDrafter(vocab).max_tokens == 8
    with pytest.raises(ValueError, match="different settings"):
        BanditDrafter({"a": model, "b": ModelDrafter(draft, GREEDY, 2)})
    h = HierarchicalDrafter(draft, ModelDrafter(tiny, SAMPLING, 2), SAMPLING, 4,
                            np.random.default_rng(0))
    assert len(h.states) == 2 and h.max_tokens == 4
    with pytest.raises(TypeError, match="Generator"):
        HierarchicalDrafter(draft, model, SAMPLING, 4, rng=0)
    with pytest.raises(ValueError, match="same settings"):
        speculative_generate(target, None, [0], drafter=auto, max_new_tokens=4,
                             sampling=GREEDY, rng=np.random.default_rng(0))


class _Misreporting(ModelDrafter):
    """Draws from q but reports flat rows: not speculative sampling any more."""

    def get_candidates(self, ids, max_tokens, uniforms):
        from quickdraft.protocols import Candidates

        cand = super().get_candidates(ids, max_tokens, uniforms)
        flat = np.full_like(cand.probs, 1.0 / cand.probs.shape[-1])
        return Candidates(cand.tokens, flat, cand.model_calls, checked=True)


def test_the_exact_enumeration_detects_a_wrong_drafter():
    """The integration is sharp: a drafter whose rows are not its proposal's law changes
    the output law, and the enumeration sees it."""
    vocab = 2
    target, draft, _ = tables(vocab, 3)
    prompt, n_tokens = [0, 1, 0], 3
    got = exact_drafter_sequences(target, draft, prompt, n_tokens, SAMPLING,
                                  _Misreporting(draft, SAMPLING, 2), bound=2)
    want = exact_target_sequences(target, prompt, n_tokens, SAMPLING)
    assert max(abs(got.get(s, 0.0) - w) for s, w in want.items()) > 1e-3


class _Repeat:
    """A drafter with no bound of its own: proposes the last token, as many as allowed."""

    def get_candidates(self, ids, max_tokens, uniforms):
        from quickdraft.protocols import Candidates

        k = int(max_tokens)
        return Candidates(tokens=np.full(k, ids[-1], dtype=np.int64), probs=None,
                          model_calls=0, vocab_size=6)

    def update_candidate_strategy(self, ids, n_accepted):
        pass


def test_a_fallback_of_unbounded_drafters_takes_the_runtimes_bound():
    """A drafter made of drafters without a bound has none either (max_tokens None): the
    caller's max_draft decides, and without one the loop asks for it by name."""
    target = TableModel(np.random.default_rng(0).normal(size=(6, 6)))  # a bigram
    both = FallbackDrafter(_Repeat(), _Repeat())
    assert both.max_tokens is None
    out = speculative_generate(target, None, [1, 2], drafter=both, max_draft=3,
                               max_new_tokens=8, sampling=SamplingConfig(temperature=0.0),
                               rng=np.random.default_rng(1))
    want = autoregressive_generate(target, [1, 2], max_new_tokens=8,
                                   sampling=SamplingConfig(temperature=0.0),
                                   rng=np.random.default_rng(1))
    assert out.tokens == want.tokens
    assert max(out.stats.drafted_per_iteration) == 3  # the runtime's bound, reached
    with pytest.raises(ValueError, match="declares no max_tokens: pass max_draft"):
        speculative_generate(target, None, [1, 2], drafter=both, max_new_tokens=4,
                             sampling=SamplingConfig(temperature=0.0),
                             rng=np.random.default_rng(1))
    bounded = FallbackDrafter(_Repeat(), NgramDrafter(6, max_tokens=2))
    assert bounded.max_tokens == 2
