"""The cheap pieces of the benchmark harness (benchmarks/), on the CPU.

The controlled-alpha drafter keeps greedy speculative output equal to the target's greedy
output and is accepted at the rate it is told; the structured random pairs have wide
greedy margins and the draft agreement asked for; the analysis, the results table and the
onnxruntime-genai configs are right. The whole pipeline runs with
``python benchmarks/bench.py --smoke`` (minutes; not part of the test suite).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import analysis, report
from benchmarks.controlled import (
    ControlledAlphaDrafter,
    alpha_from_tokens_per_iteration,
    check_greedy_equal,
)
from quickdraft import theory
from quickdraft.generation import autoregressive_generate, speculative_generate
from quickdraft.reference import TableModel
from quickdraft.sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0.0)


def _pair(vocab: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    target = TableModel(rng.normal(size=(vocab, vocab, vocab)) * 3)  # a trigram
    draft = TableModel(rng.normal(size=(vocab, vocab)))  # a bigram
    return target, draft


def _greedy(target, prompt, n):
    return autoregressive_generate(target, prompt, max_new_tokens=n, sampling=GREEDY,
                                   rng=np.random.default_rng(0)).tokens


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_controlled_drafter_keeps_greedy_output(alpha, gamma):
    target, draft = _pair()
    prompt, n = [1, 2, 3], 40
    ref = _greedy(target, prompt, n)
    drafter = ControlledAlphaDrafter(draft, prompt, ref, alpha, np.random.default_rng(7),
                                     gamma=gamma)
    res = speculative_generate(target, None, prompt, max_new_tokens=n,
                               sampling=GREEDY, rng=np.random.default_rng(1), drafter=drafter)
    assert res.tokens == ref
    check_greedy_equal(res.tokens, ref)
    if alpha == 1.0:  # every proposal is the target's token: all accepted
        assert all(a == d for a, d in zip(res.stats.accepted_per_iteration,
                                           res.stats.drafted_per_iteration))
    if alpha == 0.0:  # every proposal corrupted: nothing accepted
        assert sum(res.stats.accepted_per_iteration) == 0


def test_controlled_drafter_runs_the_draft_like_model_drafter():
    target, draft = _pair()
    prompt, n, gamma = [4, 5], 30, 4
    ref = _greedy(target, prompt, n)
    natural = speculative_generate(target, draft, prompt, gamma=gamma, max_new_tokens=n,
                                   sampling=GREEDY, rng=np.random.default_rng(1))
    drafter = ControlledAlphaDrafter(draft, prompt, ref, 0.0, np.random.default_rng(0),
                                     gamma=gamma)
    ctl = speculative_generate(target, None, prompt, max_new_tokens=n,
                               sampling=GREEDY, rng=np.random.default_rng(1), drafter=drafter)
    # the same number of draft calls per drafted token as the real draft (one per token)
    assert ctl.stats.draft_calls == sum(ctl.stats.drafted_per_iteration)
    assert natural.stats.draft_calls == sum(natural.stats.drafted_per_iteration)


def test_runner_measures_whole_generations_on_the_generator():
    pytest.importorskip("onnxruntime")
    from benchmarks.adapters import Runner

    target, draft = _pair()
    prompt, n = [3, 1], 24
    ref = _greedy(target, prompt, n)
    runner = Runner(target, draft)
    tokens, ar = runner.autoregressive(prompt, n)
    assert tokens == ref and ar["mode"] == "autoregressive" and ar["new_tokens"] == n
    tokens, sp = runner.speculative(prompt, n, 3)
    assert tokens == ref and sp["gamma"] == 3 and max(sp["drafted_per_iteration"]) <= 3
    assert sp["beta_count"] >= sp["iterations"] and "host_ms_per_iteration" in sp
    # the controlled drafter in the Generator: its draft state is prefilled and closed there
    drafter = ControlledAlphaDrafter(draft, prompt, ref, 0.5, np.random.default_rng(0), gamma=4)
    tokens, ctl = runner.speculative(prompt, n, 4, drafter=drafter)
    assert tokens == ref and ctl["iterations"] == len(ctl["accepted_per_iteration"])
    assert drafter.states and drafter.max_tokens == 4


def test_controlled_drafter_acceptance_rate_is_alpha():
    target, draft = _pair(vocab=20, seed=3)
    prompt, n = [1], 400
    ref = _greedy(target, prompt, n)
    accepted, drafted = [], []
    for alpha in (0.6, 0.9):
        drafter = ControlledAlphaDrafter(draft, prompt, ref, alpha, np.random.default_rng(11),
                                         gamma=4, run_draft=False, vocab_size=20)
        res = speculative_generate(target, None, prompt, max_new_tokens=n,
                                   sampling=GREEDY, rng=np.random.default_rng(2),
                                   drafter=drafter)
        assert res.tokens == ref
        est = theory.alpha_from_acceptances(res.stats.accepted_per_iteration,
                                            res.stats.drafted_per_iteration)
        assert abs(est - alpha) < 0.08, (alpha, est)
        accepted.append(est)
        drafted.append(drafter.proposed)
    assert accepted[0] < accepted[1]


def test_controlled_drafter_phases_change_alpha_within_a_generation():
    target, draft = _pair(vocab=20, seed=3)
    prompt, n = [1], 400
    ref = _greedy(target, prompt, n)
    drafter = ControlledAlphaDrafter(draft, prompt, ref, 1.0, np.random.default_rng(5),
                                     gamma=1, run_draft=False, vocab_size=20,
                                     phases=[(0, 1.0), (200, 0.0)])
    res = speculative_generate(target, None, prompt, max_new_tokens=n, sampling=GREEDY,
                               rng=np.random.default_rng(2), drafter=drafter)
    assert res.tokens == ref
    acc = res.stats.accepted_per_iteration  # gamma 1: 2 tokens if accepted, else 1
    pos = np.cumsum([0] + [a + 1 for a in acc])[:-1]  # output position of each iteration
    assert all(a == 1 for a, p in zip(acc, pos) if p < 199)
    assert all(a == 0 for a, p in zip(acc, pos) if p >= 200)


def test_strategy_prompts_and_summary():
    from benchmarks import strategies

    assert strategies.edited([5, 6, 7, 8], 2, 10, 3) == [5, 7, 7, 9]
    rows = {"autoregressive": {"tokens_per_s": 100.0}, "gamma 2": {"tokens_per_s": 180.0},
            "gamma 4": {"tokens_per_s": 200.0}, "gamma auto": {"tokens_per_s": 198.0},
            "ngram+draft gamma 4": {"tokens_per_s": 300.0}, "bandit": {"tokens_per_s": 290.0}}
    s = strategies.summarize({"plain": rows})["plain"]
    assert s["best_fixed"] == "gamma 4"
    assert s["auto_over_best_fixed"] == pytest.approx(0.99)
    assert s["ngram_fallback_over_ar"] == pytest.approx(3.0)
    assert s["best_single"] == "ngram+draft gamma 4"
    assert s["bandit_over_best_single"] == pytest.approx(290 / 300)


def test_controlled_drafter_refuses_a_diverged_sequence():
    target, draft = _pair()
    prompt = [1, 2]
    ref = _greedy(target, prompt, 10)
    drafter = ControlledAlphaDrafter(draft, prompt, ref, 0.5, np.random.default_rng(0), gamma=2)
    wrong = (ref[0] + 1) % 12
    with pytest.raises(AssertionError, match="greedy"):
        drafter.get_candidates(prompt + [wrong], 2, np.zeros(2))
    with pytest.raises(ValueError):
        ControlledAlphaDrafter(draft, prompt, ref, 1.5, np.random.default_rng(0), gamma=2)
    with pytest.raises(AssertionError):
        check_greedy_equal([1, 2, 3], [1, 2, 4])


@pytest.mark.parametrize("gamma", [1, 2, 4, 8])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.8, 0.95])
def test_alpha_from_tokens_per_iteration_inverts_eq1(alpha, gamma):
    t = theory.expected_tokens(alpha, gamma)
    assert alpha_from_tokens_per_iteration(t, gamma) == pytest.approx(alpha, abs=1e-9)
    assert alpha_from_tokens_per_iteration(1.0, gamma) == 0.0
    assert alpha_from_tokens_per_iteration(gamma + 1, gamma) == 1.0


def test_summarize_and_compare():
    stats = [{"accepted_per_iteration": [4, 4, 2], "drafted_per_iteration": [4, 4, 3],
              "beta_sum": 9.0, "beta_count": 11, "cost_ratio_c": 0.05,
              "target": {"mean_call_ms": 2.0}, "draft": {"mean_call_ms": 0.1}},
             {"accepted_per_iteration": [0, 4], "cost_ratio_c": 0.07}]
    s = analysis.summarize_spec(stats, 4)
    assert s["iterations"] == 5
    assert s["alpha"] == pytest.approx(theory.alpha_from_acceptances(
        [4, 4, 2, 0, 4], [4, 4, 3, 4, 4]))
    assert s["tokens_per_iteration"] == pytest.approx((14 + 5) / 5)
    assert s["cost_ratio_c"] == pytest.approx(0.06)
    c = analysis.compare(100.0, 250.0, 0.8, 4, 0.05)
    assert c["speedup"] == pytest.approx(2.5)
    assert c["theoretical_improvement"] == pytest.approx(theory.walltime_improvement(0.8, 4, 0.05))
    assert c["realized_over_theoretical"] == pytest.approx(2.5 / c["theoretical_improvement"])
    assert analysis.floor_ms(2.2e9, 3000.0) == pytest.approx(0.7333, rel=1e-3)
    assert analysis.compare(None, 1.0, None, 4, None) == {}


def test_analysis_compare_with_the_measured_verify_cost():
    """Theorem 3.8's fields keep their meaning; a measured verify cost adds the theory with
    it beside them, and one that is not a finite number > 0 adds nothing."""
    plain = analysis.compare(100.0, 250.0, 0.8, 4, 0.05)
    c = analysis.compare(100.0, 250.0, 0.8, 4, 0.05, verify=1.14)
    assert {k: c[k] for k in plain} == plain  # bit-identical, verify or not
    want = theory.expected_tokens(0.8, 4) / (4 * 0.05 + 1.14)
    assert c["theoretical_with_verify"] == pytest.approx(want, rel=1e-12)
    assert c["realized_over_theoretical_with_verify"] == pytest.approx(2.5 / want, rel=1e-12)
    assert c["realized_over_theoretical_with_verify"] > c["realized_over_theoretical"]
    assert analysis.theoretical(0.8, 4, 0.05, 1.14) == c["theoretical_with_verify"]
    assert analysis.theoretical(0.8, 4, 0.05) == plain["theoretical_improvement"]
    for bad in (0.0, -1.0, float("nan"), float("inf"), None, True):
        assert "theoretical_with_verify" not in analysis.compare(100.0, 250.0, 0.8, 4, 0.05,
                                                                 verify=bad)
    assert analysis.theoretical(0.8, 4, 0.05, float("nan")) is None
    only_theory = analysis.compare(None, 250.0, 0.8, 4, 0.05, verify=1.14)  # no baseline
    assert "theoretical_with_verify" in only_theory
    assert "realized_over_theoretical_with_verify" not in only_theory


def _results() -> dict:
    qd = {"status": "ok", "ar": {"tokens_per_s": 200.0, "ms_per_token": 5.0},
          "spec": {"gamma": 4, "tokens_per_s": 500.0, "ms_per_token": 2.0, "speedup": 2.5,
                   "alpha": 0.8, "cost_ratio_c": 0.05, "tokens_per_iteration": 3.3,
                   "expected_tokens_eq1": 3.36, "theoretical_improvement": 2.8,
                   "realized_over_theoretical": 0.89, "best_gamma_theory": 5,
                   "greedy_equal": True},
          "sweep": [{"gamma": 2, "tokens_per_s": 400.0, "speedup": 2.0, "alpha": 0.8,
                     "cost_ratio_c": 0.05}],
          "best_gamma": {"measured": 4, "tokens_per_s": 500.0},
          "costs": {"target_step_ms": {"1": 5.0, "5": 5.5}, "draft_step_ms": {"1": 0.25},
                    "verify_over_step": {"4": 1.1}, "cost_ratio_c": 0.05},
          "controlled": [{"alpha_nominal": 0.8, "alpha": 0.79, "gamma": 5, "tokens_per_s": 560.0,
                          "speedup": 2.8, "theoretical_improvement": 3.0,
                          "realized_over_theoretical": 0.93, "cost_ratio_c": 0.05,
                          "greedy_equal": True}],
          "memory": {"peak_delta_mib": 15000.0}}
    genai = {"status": "ok", "ar": {"tokens_per_s": 180.0, "ms_per_token": 5.5}}
    gspec = {"status": "ok", "spec": {"gamma": 4, "tokens_per_s": 300.0, "alpha": 0.78},
             "best_gamma": {"measured": 3, "tokens_per_s": 320.0}}
    hf = {"status": "error", "errors": [{"message": "no CUDA"}]}
    return {"schema": 1, "bandwidth": {"gbps_median": 3000.0},
            "settings": {"prompt_len": 32, "new_tokens": 128, "repeats": 3},
            "environment": {"gpu": "H100", "packages": {"torch": "2.11"}},
            "pairs": {"7b": {"info": {"target": {"parameters": 6.7e9, "weight_bytes": 13.5e9},
                                      "draft": {"parameters": 7.7e7}, "draft_fraction": 0.0115,
                                      "draft_agreement": 0.8},
                             "systems": {"qd-fast": qd, "genai": genai, "genai-spec": gspec,
                                         "hf": hf}}},
            "errors": [{"kind": "unavailable", "message": "CUDA graphs need CUDA"}]}


def test_report_renders_tables_goals_and_records():
    pytest.importorskip("tabulate")  # the bench extra
    r = _results()
    text = report.render(r)
    assert "### 7b: systems" in text and "quickdraft fast" in text
    assert "| onnxruntime-genai" in text and "no CUDA" in text
    assert "4.500" in text  # the 7B floor: 13.5 GB / 3000 GB/s
    assert "controlled alpha" in text and "0.93" in text
    goals = {g["goal"]: g for g in report.goals(r)}
    floor = goals["quickdraft AR ms/token / weight floor, 7B"]
    assert floor["value"] == pytest.approx(5.0 / 4.5) and floor["passed"] is True
    assert goals["quickdraft speculative at alpha 0.8 / fastest quickdraft AR, 7B"]["value"] \
        == pytest.approx(2.8)
    vs = goals["quickdraft speculative / genai speculative (best K), 7b"]
    assert vs["value"] == pytest.approx(500 / 320) and vs["passed"] is False  # < 1.6
    recs = report.records(r)
    assert {x["gamma"] for x in recs} == {2, 5}
    json.dumps(r)  # plain JSON
    assert report.fmt(None) == "-" and report.fmt(float("nan")) == "-"
    assert report.fmt(True) == "yes"
    empty = report.render({})  # nothing measured: every goal says so, no system rows
    assert all(g["value"] is None and g["passed"] is None for g in report.goals({}))
    assert empty.count("not measured") == len(report.goals({}))
    assert "### 7b: systems" not in empty


def test_a_qd_task_loads_its_pair_for_its_longest_proposal():
    """The pair is loaded for the longest gamma of the sweep, the sampled rows and the
    pipelined rows (a pipelined gamma 16 needs draft chains of 17 steps)."""
    from benchmarks.worker import max_gamma_of

    spec = {"gammas": [1, 4, 8], "gamma": 4, "sampling_gammas": [4, 7], "pipelined": None}
    assert max_gamma_of(spec) == 8
    assert max_gamma_of({**spec, "pipelined": [8, 12, 16]}) == 16
    assert max_gamma_of({**spec, "sampling_gammas": [10]}) == 10


def test_goals_count_pipelined_and_sampled_rows():
    """The best 7B rate includes pipelined rows; the T=1 goal takes the better of the
    sampled speculative and pipelined speedups at top-p 1 only; effective c is the least
    over pipelined rows; the worst realized / theory spans sampled and pipelined rows."""
    r = _results()
    qd = r["pairs"]["7b"]["systems"]["qd-fast"]
    qd["pipelined"] = [{"gamma": 4, "tokens_per_s": 620.0, "effective_c": 0.04,
                        "realized_over_theoretical": 0.95},
                       {"gamma": 8, "tokens_per_s": 600.0, "effective_c": 0.03,
                        "realized_over_theoretical": 0.97}]
    trained = json.loads(json.dumps(qd))  # the same rows on the trained pair
    trained["sampled"] = [
        {"temperature": 1.0, "top_p": 1.0, "gamma": 4,
         "spec": {"speedup": 1.4, "realized_over_theoretical": 0.8},
         "pipelined": {"speedup": 1.6, "realized_over_theoretical": 0.7}},
        {"temperature": 0.7, "top_p": 0.9, "gamma": 4, "spec": {"speedup": 2.2}}]
    r["pairs"]["trained"] = {"systems": {"qd-fast": trained}}
    goals = {g["goal"]: g for g in report.goals(r)}
    assert goals["quickdraft best speculative or pipelined tok/s, 7B"]["value"] == 620.0
    t1 = goals["quickdraft speculative or pipelined / autoregressive sampling, trained pair, T=1"]
    assert t1["value"] == 1.6 and t1["passed"] is False  # not the 2.2 of top-p 0.9
    c7 = goals["effective c (pipelined, least), 7B"]
    assert c7["value"] == 0.03 and c7["passed"] is False  # > 0.025
    worst = goals["realized / theoretical walltime improvement (worst quickdraft row)"]
    assert worst["value"] == 0.7


def test_report_computes_the_verify_ratio_for_old_results(tmp_path):
    """Results written before the rows recorded the theory with the measured verify cost:
    the report computes it from costs.verify_over_step at the row's gamma, its alpha and c,
    speedup / (Eq. 1 / (gamma c + verify)); a pipelined row's recorded theory gets the
    verify call's cost in place of its leading 1. Rows that recorded it keep their own."""
    pytest.importorskip("tabulate")
    r = _results()  # spec: gamma 4, alpha 0.8, c 0.05, speedup 2.5; verify_over_step 4: 1.1
    qd = r["pairs"]["7b"]["systems"]["qd-fast"]
    qd["controlled"][0]["gamma"] = 4  # the costs have verify_over_step at gamma 4 only
    qd["pipelined"] = [{"gamma": 4, "alpha": 0.8, "speedup": 2.2, "tokens_per_s": 440.0,
                        "theoretical_improvement": 2.4, "realized_over_theoretical": 2.2 / 2.4}]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(r))  # string keys, as a results file has them
    r = json.loads(path.read_text())
    qd = r["pairs"]["7b"]["systems"]["qd-fast"]
    tokens = theory.expected_tokens(0.8, 4)
    spec_ratio = 2.5 / (tokens / (4 * 0.05 + 1.1))
    got = report.with_verify(qd["spec"], qd["costs"])
    assert got["theory"] == pytest.approx(tokens / 1.3, rel=1e-12)
    assert got["realized"] == pytest.approx(spec_ratio, rel=1e-12)
    ctl_ratio = 2.8 / (theory.expected_tokens(0.79, 4) / (4 * 0.05 + 1.1))
    assert report.with_verify(qd["controlled"][0], qd["costs"])["realized"] == pytest.approx(
        ctl_ratio, rel=1e-12)
    piped = report.with_verify(qd["pipelined"][0], qd["costs"], pipelined=True)
    assert piped["theory"] == pytest.approx(tokens / (tokens / 2.4 + 0.1), rel=1e-12)
    # no verify cost at the row's gamma, or no costs: nothing
    assert report.with_verify({**qd["spec"], "gamma": 7}, qd["costs"])["realized"] is None
    assert report.with_verify(qd["spec"], None) == {"theory": None, "realized": None}
    # a row that recorded its own is read, not recomputed
    own = {**qd["spec"], "theoretical_with_verify": 2.0,
           "realized_over_theoretical_with_verify": 1.25}
    assert report.with_verify(own, qd["costs"]) == {"theory": 2.0, "realized": 1.25}

    goals = {g["goal"]: g for g in report.goals(r)}
    plain = goals["realized / theoretical walltime improvement (worst quickdraft row)"]
    assert plain["value"] == 0.89  # unchanged: Theorem 3.8's fields, the spec row's
    worst = goals["realized / theoretical walltime improvement with the measured verify cost "
                  "(worst quickdraft row)"]
    want = min(spec_ratio, ctl_ratio, 2.2 / piped["theory"])
    assert worst["value"] == pytest.approx(want, rel=1e-12) and worst["value"] > plain["value"]

    text = report.render(r)
    assert "realized / theory with verify" in text
    cells = next(c for c in ([c.strip() for c in x.strip("|").split("|")]
                             for x in text.splitlines() if x.startswith("| quickdraft fast"))
                 if c[1] == "speculative")
    assert cells[10] == "2.50 / 2.80 = 0.89"  # Theorem 3.8's cell as recorded, kept
    assert cells[11] == f"2.50 / {tokens / 1.3:.2f} = {spec_ratio:.2f}"
    ctl = next(x for x in text.split("controlled alpha")[1].splitlines()
               if x.startswith("| qd-fast"))
    cells = [c.strip() for c in ctl.strip("|").split("|")]
    assert cells[7:11] == ["3.00", "0.93", f"{2.8 / ctl_ratio:.2f}", f"{ctl_ratio:.2f}"]
    targets = text.split("### Targets")[1]
    assert "with the measured verify cost (worst quickdraft row)" in targets
    del qd["costs"]["verify_over_step"]  # nothing to compute it from: not measured
    goals = {g["goal"]: g for g in report.goals(r)}
    assert goals["realized / theoretical walltime improvement with the measured verify cost "
                 "(worst quickdraft row)"]["value"] is None


def test_draft_shapes_rows_read_the_measured_results():
    """A draft-shapes row from a qd result as it comes back from JSON (string keys), and
    its table."""
    from benchmarks.draft_shapes import render, summary

    r = _results()
    qd = json.loads(json.dumps({**r["pairs"]["7b"]["systems"]["qd-fast"], "sampled": [
        {"temperature": 1.0, "top_p": 1.0, "gamma": 4, "spec": {"speedup": 1.3, "alpha": 0.7}}],
        "pipelined": [{"gamma": 4, "tokens_per_s": 600.0, "speedup": 3.0,
                       "effective_c": 0.02, "greedy_equal": True}]}))
    draft = {"parameters": 11.6e6, "draft_fraction": 0.12, "training": {"steps": 9, "lr": 1e-3},
             "heldout": {"alpha_T0": 0.6, "alpha_T1": 0.58},
             "own_text": {"alpha_T0": 0.71, "alpha_T1": 0.52}}
    row = summary("512x1", draft, qd)
    assert row["draft_step_ms"] == 0.25 and row["c"] == 0.05 and row["best_gamma"] == 4
    assert row["sampled"][0]["speedup"] == 1.3 and row["pipelined"][0]["effective_c"] == 0.02
    text = render([row], 4)
    assert "T=1 gamma 4: speedup" in text and "| 512x1 | 11.6" in text
    assert "3.00 / 0.020" in text and "0.600 / 0.580" in text and "0.710 / 0.520" in text


def test_report_shows_a_trained_pairs_alpha_on_held_out_and_on_its_own_text():
    pytest.importorskip("tabulate")
    r = _results()
    r["pairs"]["7b"]["info"].update(heldout={"alpha_T0": 0.81, "alpha_T1": 0.8},
                                    own_text={"alpha_T0": 0.93, "alpha_T1": 0.74})
    text = report.render(r)
    assert "T=0 0.810 / T=1 0.800" in text
    assert "on its own text T=0 0.930 / T=1 0.740" in text
    r["pairs"]["7b"]["info"]["own_text"] = {"error": "RuntimeError: out of memory"}
    text = report.render(r)  # a failed measurement: held-out alpha alone
    assert "T=0 0.810 / T=1 0.800" in text and "own text" not in text
    del r["pairs"]["7b"]["info"]["heldout"]
    assert "by construction ~0.8" in report.render(r)


def test_report_merge_later_wins():
    a, b = _results(), _results()
    b["pairs"]["7b"]["systems"]["qd-fast"]["ar"]["tokens_per_s"] = 222.0
    b["pairs"]["1b"] = {"systems": {"genai": {"status": "ok", "ar": {"tokens_per_s": 1.0}}}}
    m = report.merge([a, b])
    assert m["pairs"]["7b"]["systems"]["qd-fast"]["ar"]["tokens_per_s"] == 222.0
    assert "1b" in m["pairs"] and len(m["errors"]) == 2


def test_genai_configs(tmp_path):
    from benchmarks import genai

    def folder(name, layers):
        d = tmp_path / name
        d.mkdir()
        (d / "model.onnx").write_bytes(b"x")
        (d / "model.onnx.data").write_bytes(b"y")
        cfg = {"model": {"type": "llama", "vocab_size": 10, "decoder": {
            "filename": "model.onnx", "num_hidden_layers": layers,
            "session_options": {"provider_options": [{"cuda": {"enable_cuda_graph": "0"}}]}}},
            "search": {"max_length": 64}}
        (d / "genai_config.json").write_text(json.dumps(cfg))
        return d

    t, d = folder("target", 4), folder("draft", 1)
    spec = json.loads((genai.prepare("spec", t, d, tmp_path / "v") / "genai_config.json")
                      .read_text())
    assert spec["model"]["type"] == "speculative"
    assert spec["model"]["decoder"]["filename"] == "target/model.onnx"
    assert spec["model"]["draft"]["filename"] == "draft/model.onnx"
    assert spec["model"]["draft"]["num_hidden_layers"] == 1
    assert (tmp_path / "v" / "spec" / "draft" / "model.onnx.data").is_file()
    graph = genai.prepare("ar-graph", t, d, tmp_path / "v")
    cfg = json.loads((graph / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["session_options"]["provider_options"][0]["cuda"][
        "enable_cuda_graph"] == "1"
    assert (graph / "model.onnx.data").is_file()
    # the source folder's config is untouched
    src = json.loads((t / "genai_config.json").read_text())
    assert src["model"]["decoder"]["session_options"]["provider_options"][0]["cuda"][
        "enable_cuda_graph"] == "0"
    stats = genai.spec_summary({"rounds": 10, "draft_tokens_evaluated": 40,
                                "draft_tokens_accepted": 30, "tokens_emitted": 40,
                                "draft_forward_passes": 40, "total_draft_ms": 4.0,
                                "total_target_verify_ms": 60.0,
                                "target_verify_forward_passes": 10}, 4, 5.0)
    assert stats["alpha"] == 0.75 and stats["tokens_per_iteration"] == 4.0
    assert stats["cost_ratio_c"] == pytest.approx(0.1 / 5.0)
    assert stats["verify_over_ar_step"] == pytest.approx(1.2)


def test_structured_random_pair_has_margins_and_agreement(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from benchmarks.models import SPECIALS, make_random_pair

    info = make_random_pair("tiny", tmp_path, device="cpu", agreement=0.7)
    assert info["draft_agreement"] == 0.7
    n = len(SPECIALS)
    ids = torch.arange(n, info["vocab_size"])[:, None]  # every ordinary token alone
    out = {}
    for role in ("target", "draft"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / role).eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1]  # [V - n, V]
        top2 = logits.topk(2, dim=-1).values
        out[role] = (logits.argmax(-1), (top2[:, 0] - top2[:, 1]).min().item())
    nxt, margin = out["target"]
    assert margin > 1.0  # fp16 rounding cannot flip these greedy choices
    assert len(set(nxt.tolist())) == len(nxt) and int(nxt.min()) >= n  # a permutation
    agree = (out["draft"][0] == nxt).float().mean().item()
    assert 0.6 < agree < 0.8
    prompts = json.loads((tmp_path / "prompts.json").read_text())["prompts"]
    assert len(prompts[0]) == 32 and min(prompts[0]) >= n


def test_train_pair_helpers():
    from benchmarks.train_pair import prompts_from
    from benchmarks.training import heldout_windows

    stream = np.arange(1000, dtype=np.int32) % 97 + 1
    stream[500] = 0  # an end-of-file token
    w = heldout_windows(stream, 16, 5)
    assert w.shape == (5, 17)
    ps = prompts_from(stream, 3, 8, eos=0)
    assert len(ps) == 3 and all(len(p) == 8 and 0 not in p for p in ps)


SMOKE_STEPS = {"target_steps": 3, "draft_steps": 3}


@pytest.fixture(scope="module")
def smoke_pair(tmp_path_factory):
    """A tiny pair trained by train_pair (3 + 3 steps, CPU): its folder and info."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from benchmarks.train_pair import SMOKE, TrainConfig, train_pair

    out = tmp_path_factory.mktemp("pair") / "whole"
    return out, train_pair(out, TrainConfig(**{**SMOKE, **SMOKE_STEPS}), "cpu")


def _weights(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def test_train_pair_stopped_and_resumed_trains_the_same_pair(tmp_path, smoke_pair):
    """benchmarks/train_pair.py --call-seconds: a run stopped after every step and resumed
    from its checkpoint ends with the weights, held-out losses and alphas of a run that
    never stopped (the same steps on the same windows, the optimizer state restored)."""
    from benchmarks.train_pair import SMOKE, TrainConfig, train_pair

    cfg = TrainConfig(**{**SMOKE, **SMOKE_STEPS})
    whole_dir, whole = smoke_pair
    parts, calls = tmp_path / "parts", 0
    while True:
        calls += 1
        info = train_pair(parts, cfg, "cpu", call_seconds=0.0)  # one step per call
        if not info.get("incomplete"):
            break
        assert calls < 10
    assert calls == 5  # 3 + 3 steps, one stop after each but the last of each model
    strip = {"seconds"}
    assert {k: v for k, v in info["heldout"].items() if k not in strip} == \
        {k: v for k, v in whole["heldout"].items() if k not in strip}
    for role in ("target", "draft"):
        a, b = _weights(whole_dir / "hf" / role), _weights(parts / "hf" / role)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert info[role]["training"]["calls"] > 1
    with pytest.raises(ValueError, match="other settings"):
        train_pair(parts, TrainConfig(**{**SMOKE, "target_steps": 4}), "cpu", call_seconds=0)


def test_a_run_with_target_samples_resumes_with_the_same_samples(tmp_path):
    """train_pair --draft-samples --call-seconds: the samples are written once, kept in the
    checkpoint, and the resumed draft ends with the weights of a run that never stopped."""
    from benchmarks.train_pair import SMOKE, TrainConfig, train_pair

    cfg = TrainConfig(**{**SMOKE, **SMOKE_STEPS, "draft_samples": 4, "sample_tokens": 20,
                         "sample_batch": 2})
    whole = train_pair(tmp_path / "whole", cfg, "cpu")
    assert whole["target_samples"]["tokens"] == 4 * 21
    calls = 0
    while (info := train_pair(tmp_path / "parts", cfg, "cpu", call_seconds=0.0)).get(
            "incomplete"):
        calls += 1
        assert calls < 10
    assert info["target_samples"]["tokens"] == 4 * 21
    a = _weights(tmp_path / "whole" / "hf" / "draft")
    b = _weights(tmp_path / "parts" / "hf" / "draft")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_resumed_run_refuses_token_streams_another_run_wrote(tmp_path):
    from benchmarks.train_pair import SMOKE, TrainConfig, load_streams, train_pair

    cfg = TrainConfig(**{**SMOKE, **SMOKE_STEPS})
    assert train_pair(tmp_path, cfg, "cpu", call_seconds=0.0)["incomplete"]
    train, held = load_streams(tmp_path)
    np.savez(tmp_path / "streams.npz", train=train[:-5], held=held)  # another corpus
    with pytest.raises(ValueError, match="another run wrote into this folder"):
        train_pair(tmp_path, cfg, "cpu", call_seconds=0.0)


def test_a_draft_distilled_for_a_trained_pair_follows_the_pairs_recipe(tmp_path, smoke_pair):
    """benchmarks/draft_shapes.py's drafts: distill_draft trains a draft of any shape as
    the pair's own draft was trained, so at the own draft's shape and steps it gives the
    own draft's weights and held-out alphas exactly; another shape differs, and its alphas
    are acceptance rates."""
    from benchmarks.train_pair import distill_draft, draft_shape

    pair_dir, info = smoke_pair
    again = distill_draft(pair_dir, info["draft"]["shape"], tmp_path / "same", "cpu",
                          steps=SMOKE_STEPS["draft_steps"])
    a, b = _weights(pair_dir / "hf" / "draft"), _weights(tmp_path / "same" / "hf" / "draft")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for key in ("alpha_T0", "alpha_T1", "draft_loss", "target_loss"):
        assert again["heldout"][key] == info["heldout"][key]
    assert again["parameters"] == info["draft"]["parameters"]
    strip = {"seconds"}
    assert {k: v for k, v in again["own_text"].items() if k not in strip} == \
        {k: v for k, v in info["own_text"].items() if k not in strip}

    wide = distill_draft(pair_dir, draft_shape("64x1"), tmp_path / "wide", "cpu", steps=2)
    assert wide["shape"]["num_hidden_layers"] == 1 and wide["training"]["steps"] == 2
    assert wide["parameters"] != info["draft"]["parameters"]
    assert 0.0 <= wide["heldout"]["alpha_T1"] <= 1.0
    assert wide["heldout"]["target_loss"] == info["heldout"]["target_loss"]


def test_a_draft_distilled_with_the_targets_samples_writes_them_once(tmp_path, smoke_pair):
    """distill_draft(samples=...): half of every batch from the target's continuations,
    written once into the cache and read back for the next draft (the same weights), a
    different draft from the corpus-only one at the same steps."""
    from benchmarks.train_pair import distill_draft

    pair_dir, info = smoke_pair
    shape, cache = info["draft"]["shape"], tmp_path / "samples.npz"
    settings = {"draft_samples": 4, "sample_tokens": 20, "sample_batch": 2,
                "sample_temperature": 1.0, "sample_top_p": 1.0}
    first = distill_draft(pair_dir, shape, tmp_path / "a", "cpu", steps=2, samples=settings,
                          samples_cache=cache)
    assert cache.is_file() and not first["target_samples"].get("cached")
    assert first["target_samples"]["tokens"] == 4 * 21  # longer than a window of 65
    again = distill_draft(pair_dir, shape, tmp_path / "b", "cpu", steps=2, samples=settings,
                          samples_cache=cache)
    assert again["target_samples"]["cached"] is True
    a, b = _weights(tmp_path / "a" / "hf" / "draft"), _weights(tmp_path / "b" / "hf" / "draft")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    plain = distill_draft(pair_dir, shape, tmp_path / "c", "cpu", steps=2)
    c = _weights(tmp_path / "c" / "hf" / "draft")
    assert plain["target_samples"] is None and not all(np.array_equal(a[k], c[k]) for k in a)
    other = distill_draft(pair_dir, shape, tmp_path / "d", "cpu", steps=2,
                          samples={**settings, "sample_temperature": 2.0}, samples_cache=cache)
    assert not other["target_samples"].get("cached")  # other settings: written again
    with pytest.raises(ValueError, match="unknown sample settings"):
        distill_draft(pair_dir, shape, tmp_path / "e", "cpu", steps=1, samples={"top_p": 1})


def test_target_samples_are_read_back_only_for_the_same_target(tmp_path, smoke_pair):
    """train_pair.target_samples: the cache serves the same target and settings; another
    model (here the pair's draft standing in for a retrained target) or a damaged file is a
    miss that writes the cache again."""
    from dataclasses import replace

    from transformers import LlamaForCausalLM

    from benchmarks.train_pair import SMOKE, TrainConfig, load_streams, target_samples

    pair_dir, _ = smoke_pair
    train, _ = load_streams(pair_dir)
    cfg = replace(TrainConfig(**SMOKE), draft_samples=2, sample_tokens=3, sample_batch=2)
    target = LlamaForCausalLM.from_pretrained(pair_dir / "hf" / "target")
    other = LlamaForCausalLM.from_pretrained(pair_dir / "hf" / "draft")
    cache = tmp_path / "s.npz"
    first, entry = target_samples(target, train, 0, cfg, "cpu", cache)
    assert "cached" not in entry and cache.is_file()
    again, entry = target_samples(target, train, 0, cfg, "cpu", cache)
    assert entry["cached"] is True and np.array_equal(again.numpy(), first.numpy())
    _, entry = target_samples(other, train, 0, cfg, "cpu", cache)
    assert "cached" not in entry  # another model's samples are not these
    cache.write_bytes(b"not an npz")
    back, entry = target_samples(target, train, 0, cfg, "cpu", cache)
    assert "cached" not in entry and np.array_equal(back.numpy(), first.numpy())
    assert not list(tmp_path.glob("*.part*"))


def test_draft_shapes_adds_a_samples_row_per_shape(tmp_path):
    from benchmarks.draft_shapes import parse

    a = parse(["--pair-dir", str(tmp_path), "--shapes", "512x1,targetx2", "--samples", "64"])
    assert [(name, s is not None) for name, _, s, _ in a.variants] == [
        ("512x1", False), ("512x1+samples", True), ("targetx2", False),
        ("targetx2+samples", True)]
    assert a.variants[1][2] == {"draft_samples": 64, "sample_temperature": 1.0,
                                "sample_top_p": 1.0, "sample_batch": 1024}
    assert [v[0] for v in parse(["--pair-dir", str(tmp_path)]).variants] == \
        ["512x1", "512x2", "768x1"]
    with pytest.raises(SystemExit, match="--sample-top-p"):
        parse(["--pair-dir", str(tmp_path), "--samples", "8", "--sample-top-p", "0"])


def test_draft_shapes_adds_a_row_per_divergence(tmp_path):
    from benchmarks.draft_shapes import parse

    a = parse(["--pair-dir", str(tmp_path), "--shapes", "targetx2", "--divergences", "kl,tvd"])
    assert [(v[0], v[3]) for v in a.variants] == [("targetx2+kl", "kl"), ("targetx2+tvd", "tvd")]
    a = parse(["--pair-dir", str(tmp_path), "--shapes", "targetx2", "--samples", "8",
               "--samples-only", "--divergences", "tvd"])
    assert [(v[0], v[2] is not None, v[3]) for v in a.variants] == [
        ("targetx2+samples+tvd", True, "tvd")]
    assert [v[3] for v in parse(["--pair-dir", str(tmp_path)]).variants] == [None] * 3
    with pytest.raises(SystemExit, match="--divergences: js; use a comma list of kl, tvd"):
        parse(["--pair-dir", str(tmp_path), "--divergences", "kl,js"])
    with pytest.raises(SystemExit, match="--samples-only needs --samples"):
        parse(["--pair-dir", str(tmp_path), "--samples-only"])


def test_the_total_variation_loss_is_one_minus_alpha_at_t1(smoke_pair):
    """The ``tvd`` distillation loss on a batch is exactly 1 - alpha at T=1 as the held-out
    evaluation (quickdraft.theory) measures it on the same windows; KL is another number."""
    import torch
    from transformers import LlamaForCausalLM

    from benchmarks.train_pair import load_streams
    from benchmarks.training import _loss, evaluate, heldout_windows

    pair_dir, info = smoke_pair
    target = LlamaForCausalLM.from_pretrained(pair_dir / "hf" / "target").eval()
    draft = LlamaForCausalLM.from_pretrained(pair_dir / "hf" / "draft").eval()
    _, held = load_streams(pair_dir)
    windows = torch.from_numpy(heldout_windows(held.astype(np.int64), 16, 3))  # [3, 17]
    with torch.no_grad():
        x, y = windows[:, :-1], windows[:, 1:].reshape(-1)
        lp, lq = target(input_ids=x).logits, draft(input_ids=x).logits  # [3, 16, V]
        lq = lq.reshape(-1, lq.shape[-1])  # [48, V]
        loss, tv, ce = _loss(lq, y, lp, 1.0, "tvd")
        _, kl, _ = _loss(lq, y, lp, 1.0, "kl")
    alpha = evaluate(target, draft, windows, "cpu")["alpha_T1"]
    assert float(loss) == float(tv)  # weight 1: the divergence alone
    assert float(tv) == pytest.approx(1.0 - alpha, abs=1e-6)
    assert 0.0 < float(tv) < 1.0 and float(kl) != pytest.approx(float(tv), abs=1e-3)
    assert float(ce) == pytest.approx(torch.nn.functional.cross_entropy(lq, y).item())


def test_a_draft_distilled_on_total_variation_records_its_loss(tmp_path, smoke_pair):
    """distill_draft(divergence="tvd") trains on 0.9 * TV + 0.1 * CE from the same start and
    windows as the pair's KL recipe: other weights, the objective recorded; an unknown
    divergence is refused before anything trains."""
    from benchmarks.train_pair import TrainConfig, check_divergence, distill_draft

    pair_dir, info = smoke_pair
    shape, steps = info["draft"]["shape"], SMOKE_STEPS["draft_steps"]
    tv = distill_draft(pair_dir, shape, tmp_path / "tv", "cpu", steps=steps, divergence="tvd")
    assert tv["training"]["objective"] == "0.9 * TV(target, draft) + 0.1 * CE"
    assert tv["training"]["divergence"] == "tvd" and tv["training"]["steps"] == steps
    assert info["draft"]["training"]["divergence"] == "kl"
    a, b = _weights(pair_dir / "hf" / "draft"), _weights(tmp_path / "tv" / "hf" / "draft")
    assert a.keys() == b.keys() and not all(np.array_equal(a[k], b[k]) for k in a)
    assert 0.0 <= tv["heldout"]["alpha_T1"] <= 1.0
    with pytest.raises(ValueError, match="--distill-divergence 'js' is not one of"):
        distill_draft(pair_dir, shape, tmp_path / "x", "cpu", steps=1, divergence="js")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="pass kl"):
        check_divergence(TrainConfig(distill_divergence="JS"))


def test_the_distill_task_writes_a_pair_of_its_own_divergence(tmp_path, smoke_pair,
                                                              monkeypatch):
    """The draft_shapes worker's distill task: the folder's pair.json names the divergence
    this draft trained on, in its config too (the export is replaced: it is the pair's)."""
    from benchmarks import adapters, worker
    from benchmarks.common import Record, load_json

    pair_dir, info = smoke_pair
    monkeypatch.setattr(adapters, "export_draft", lambda *a, **k: {"stub": True})
    out = tmp_path / "tv"
    rec = Record(tmp_path / "rec.json")
    worker.task_distill({"pair_dir": str(pair_dir), "out_dir": str(out),
                         "shape": info["draft"]["shape"], "device": "cpu", "steps": 1,
                         "divergence": "tvd"}, rec)
    written = load_json(out / "pair.json")
    assert written["distill_divergence"] == written["config"]["distill_divergence"] == "tvd"
    assert written["draft"]["training"]["divergence"] == "tvd"
    assert load_json(pair_dir / "pair.json")["distill_divergence"] == "kl"
    assert rec.data["export"] == {"stub": True}


def test_training_on_total_variation_raises_alpha_at_t1():
    """Steps on the TV loss alone (a fixed seed, CPU) raise a random draft's alpha at T=1
    towards a fixed teacher's on the windows it trains on."""
    import torch

    from benchmarks.training import build_llama, evaluate, train

    class Vocab:  # what build_llama reads of a tokenizer
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    dims = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=64)
    teacher = build_llama(dims, Vocab(), vocab_size=64, max_positions=64, tie=False, seed=1)
    draft = build_llama(dims, Vocab(), vocab_size=64, max_positions=64, tie=False, seed=2)
    windows = torch.from_numpy(np.random.default_rng(0).integers(3, 64, size=(4, 17)))
    before = evaluate(teacher, draft, windows, "cpu")["alpha_T1"]
    tr = train("draft", draft, iter([windows] * 40), lr=3e-3, device="cpu", steps=40,
               warmup_steps=1, teacher=teacher, distill_weight=1.0, divergence="tvd",
               log=lambda _: None)
    after = evaluate(teacher, draft, windows, "cpu")["alpha_T1"]
    assert tr["objective"] == "1 * TV(target, draft) + 0 * CE"
    assert after > before + 0.02, (before, after)
    with pytest.raises(ValueError, match="unknown divergence 'js'"):
        train("draft", draft, iter([windows]), lr=1e-3, device="cpu", steps=1,
              teacher=teacher, distill_weight=1.0, divergence="js")


def test_a_draft_of_all_the_targets_layers_is_the_target(tmp_path, smoke_pair):
    """A draft made of the target's first layers starts from their weights: all of them,
    untrained, are the target itself (alpha exactly 1 at T=0, 1 up to rounding at T=1);
    one of them is a draft of its own that continues at the target's learning rate."""
    from benchmarks.train_pair import distill_draft, draft_shape

    pair_dir, info = smoke_pair
    layers = info["target"]["shape"]["num_hidden_layers"]
    whole = distill_draft(pair_dir, draft_shape(f"targetx{layers}"), tmp_path / "all", "cpu",
                          steps=0)
    assert whole["init"] == "target" and whole["shape"] == info["target"]["shape"]
    assert whole["heldout"]["alpha_T0"] == 1.0
    assert whole["heldout"]["alpha_T1"] == pytest.approx(1.0, abs=1e-5)
    assert whole["own_text"]["alpha_T0"] == 1.0
    assert whole["own_text"]["alpha_T1"] == pytest.approx(1.0, abs=1e-5)
    a, b = _weights(pair_dir / "hf" / "target"), _weights(tmp_path / "all" / "hf" / "draft")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    first = distill_draft(pair_dir, draft_shape("targetx1"), tmp_path / "one", "cpu", steps=1)
    assert first["shape"]["num_hidden_layers"] == 1
    assert first["training"]["lr"] == info["config"]["target_lr"]
    assert first["heldout"]["alpha_T1"] < 1.0
    assert first["own_text"]["alpha_T1"] < 1.0
    with pytest.raises(ValueError, match="the target has"):
        distill_draft(pair_dir, draft_shape(f"targetx{layers + 1}"), tmp_path / "x", "cpu",
                      steps=0)


def test_the_targets_own_continuations_are_its_argmax_and_its_inverse_cdf(smoke_pair):
    """training.continuations (one token per step with the KV cache) writes what a whole
    forward pass over the text so far picks: its argmax at T=0, at T=1 the first token
    whose cumulative softmax exceeds the given uniform."""
    import torch
    from transformers import LlamaForCausalLM

    from benchmarks.training import continuations, own_text_alpha

    pair_dir, info = smoke_pair
    target = LlamaForCausalLM.from_pretrained(pair_dir / "hf" / "target").eval()
    prompts = torch.randint(3, info["vocab_size"], (3, 5), generator=torch.Generator()
                            .manual_seed(0))
    u = torch.rand(6, 3, generator=torch.Generator().manual_seed(1))
    for t in (0.0, 1.0):
        cont = continuations(target, prompts, new_tokens=6, temperature=t, device="cpu",
                             uniforms=u if t else None)
        assert cont.shape == (3, 6)
        with torch.no_grad():
            z = target(input_ids=torch.cat([prompts, cont], 1)).logits[:, 4:-1].double()
        if t == 0:
            assert torch.equal(cont, z.argmax(-1))
        else:
            cdf = torch.cumsum(torch.softmax(z, -1), -1)  # [3, 6, V]
            below = torch.gather(cdf, -1, (cont - 1).clamp_min(0)[..., None])[..., 0]
            at = torch.gather(cdf, -1, cont[..., None])[..., 0]
            ut = u.T.double()
            assert bool(((below <= ut + 1e-5) | (cont == 0)).all() and (at >= ut - 1e-5).all())
    with pytest.raises(ValueError, match="uniforms of shape"):
        continuations(target, prompts, new_tokens=6, temperature=1.0, device="cpu")
    greedy = continuations(target, prompts, new_tokens=6, temperature=0.0, device="cpu")
    # a nucleus of one token (a tiny top-p) is the argmax whatever the uniforms
    assert torch.equal(continuations(target, prompts, new_tokens=6, temperature=1.0,
                                     device="cpu", uniforms=u, top_p=1e-6), greedy)
    with pytest.raises(ValueError, match="top_p must lie in"):
        continuations(target, prompts, new_tokens=6, temperature=1.0, device="cpu",
                      uniforms=u, top_p=0.0)
    same = own_text_alpha(target, target, prompts, new_tokens=4, device="cpu", seed=0)
    assert same["alpha_T0"] == 1.0 and same["positions"] == 3 * 4
    # a nucleus of half the mass: every sampled token lies inside it
    cont = continuations(target, prompts, new_tokens=6, temperature=1.0, device="cpu",
                         uniforms=u, top_p=0.5)
    with torch.no_grad():
        z = target(input_ids=torch.cat([prompts, cont], 1)).logits[:, 4:-1].double()
    probs = torch.softmax(z, -1)  # [3, 6, V]
    ranked = probs.sort(-1, descending=True)
    before = ranked.values.cumsum(-1) - ranked.values  # mass ranked above each token
    rank = (ranked.indices == cont[..., None]).double().argmax(-1)  # [3, 6]
    assert bool((torch.gather(before, -1, rank[..., None]) < 0.5 + 1e-6).all())


def test_own_text_alpha_is_alpha_at_the_continuations_positions(smoke_pair):
    """own_text_alpha: at T=0 the share of the target's greedy continuation tokens the
    draft's argmax agrees with; at T=1 the mean of sum_x min(p, q) at the positions that
    predict the continuation sampled with the seed's uniforms (computed here by hand)."""
    import torch
    from transformers import LlamaForCausalLM

    from benchmarks.training import continuations, own_text_alpha

    pair_dir, info = smoke_pair
    target = LlamaForCausalLM.from_pretrained(pair_dir / "hf" / "target").eval()
    draft = LlamaForCausalLM.from_pretrained(pair_dir / "hf" / "draft").eval()
    prompts = torch.randint(3, info["vocab_size"], (2, 5), generator=torch.Generator()
                            .manual_seed(3))
    got = own_text_alpha(target, draft, prompts, new_tokens=7, device="cpu", seed=11)
    g = torch.Generator().manual_seed(11)
    want = {}
    for t in (0.0, 1.0):
        u = torch.rand(7, 2, generator=g) if t else None
        cont = continuations(target, prompts, new_tokens=7, temperature=t, device="cpu",
                             uniforms=u)
        text = torch.cat([prompts, cont], 1)
        with torch.no_grad():
            zp = target(input_ids=text).logits[:, 4:-1].double()  # [2, 7, V]
            zq = draft(input_ids=text).logits[:, 4:-1].double()
        if t == 0:
            want[t] = (zp.argmax(-1) == zq.argmax(-1)).double().mean().item()
        else:
            want[t] = torch.minimum(zp.softmax(-1), zq.softmax(-1)).sum(-1).mean().item()
    assert got["positions"] == 14
    assert got["alpha_T0"] == pytest.approx(want[0.0], abs=1e-9)
    assert got["alpha_T1"] == pytest.approx(want[1.0], abs=1e-5)
    assert 0 < got["alpha_T1"] < 1


def test_the_targets_samples_are_half_greedy_half_sampled_in_every_batch(smoke_pair):
    """training.sample_stream: n continuations of new_tokens, each followed by EOS, the
    first half of every batch greedy (the same at any temperature), the rest sampled (they
    change with it), however the batches fall; the same seed gives the same samples."""
    import torch
    from transformers import LlamaForCausalLM

    from benchmarks.train_pair import load_streams
    from benchmarks.training import sample_stream

    pair_dir, _ = smoke_pair
    target = LlamaForCausalLM.from_pretrained(pair_dir / "hf" / "target").eval()
    train, _ = load_streams(pair_dir)
    stream = torch.from_numpy(train.astype(np.int64))
    eos = int(train.max()) + 1  # a token the stream never holds: no file starts

    def rows(temperature, batch, n=4):
        out = sample_stream(target, stream, n=n, new_tokens=8, device="cpu", seed=0,
                            eos=eos, prompt_tokens=6, temperature=temperature, top_p=1.0,
                            batch=batch)
        assert out.shape == (n * 9,) and (out.reshape(n, 9)[:, -1] == eos).all()
        return out.reshape(n, 9)[:, :-1]

    cool, hot = rows(0.5, 4), rows(50.0, 4)  # one batch of 4: rows 0-1 greedy
    assert torch.equal(cool[:2], hot[:2]) and not torch.equal(cool[2:], hot[2:])
    cool, hot = rows(0.5, 2), rows(50.0, 2)  # two batches of 2: rows 0 and 2 greedy
    assert torch.equal(cool[[0, 2]], hot[[0, 2]])
    assert not torch.equal(cool[[1, 3]], hot[[1, 3]])
    one, other = rows(1.0, 8, n=1), rows(9.0, 8, n=1)  # a batch of one row: sampled
    assert not torch.equal(one, other)
    assert torch.equal(rows(0.5, 2), cool)  # seeded
    with pytest.raises(ValueError, match="batch must be at least 1"):
        rows(1.0, 0)
    with pytest.raises(ValueError, match="temperature above 0"):
        rows(0.0, 2)


def test_train_pair_refuses_bad_sample_settings_before_training(tmp_path):
    from benchmarks.train_pair import SMOKE, TrainConfig, train_pair

    for bad, match in (({"sample_top_p": 0.0}, "--sample-top-p"),
                       ({"sample_temperature": -1.0}, "--sample-temperature"),
                       ({"sample_batch": 0}, "--sample-batch")):
        cfg = TrainConfig(**{**SMOKE, **SMOKE_STEPS, "draft_samples": 4, **bad})
        with pytest.raises(ValueError, match=match):
            train_pair(tmp_path / "x", cfg, "cpu")
        assert not (tmp_path / "x").exists()  # nothing written


def test_train_pair_can_start_the_draft_from_the_targets_layers(tmp_path):
    """train_pair --draft-shape targetx1: the draft begins as the trained target's first
    layer, embedding and head, so after 3 Adam steps at most 3 x lr away from them."""
    from benchmarks.train_pair import SMOKE, TrainConfig, draft_shape, train_pair

    cfg = TrainConfig(**{**SMOKE, **SMOKE_STEPS, "draft": draft_shape("targetx1")})
    info = train_pair(tmp_path, cfg, "cpu")
    assert info["draft"]["init"] == "target" and info["draft"]["shape"]["num_hidden_layers"] == 1
    assert info["draft"]["training"]["lr"] == cfg.target_lr
    t, d = _weights(tmp_path / "hf" / "target"), _weights(tmp_path / "hf" / "draft")
    for key in ("model.embed_tokens.weight", "lm_head.weight",
                "model.layers.0.mlp.down_proj.weight"):
        moved = np.abs(d[key] - t[key]).max()
        assert 0 < moved <= 3 * cfg.target_lr * 1.05, key
    assert "model.layers.1.mlp.down_proj.weight" not in d


def test_draft_shapes_are_parsed_with_heads_of_64():
    from benchmarks.train_pair import draft_shape

    assert draft_shape("256x2") == dict(hidden_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4,
                                        intermediate_size=704)  # the paper-shape draft
    assert draft_shape(" 768X1")["num_attention_heads"] == 12
    assert draft_shape("targetx2") == {"from_target": True, "num_hidden_layers": 2}
    for bad in ("512", "100x1", "512x0", "ax1", "targetx0"):
        with pytest.raises(ValueError, match="HIDDENxLAYERS|multiple of 64|at least 1"):
            draft_shape(bad)


def test_a_diverging_run_stops_with_the_fix_named():
    """A loss that turns NaN or infinite (here a learning rate of 1e6) stops the run within
    FINITE_CHECK_EVERY steps, naming the steps and the fix, instead of training on NaN."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from benchmarks import training

    class Ids:
        bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, intermediate_size=64)
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 64, (2000,), generator=g)

    def batches():
        return training.random_windows(stream, 4, 16, lambda high, n: torch.randint(
            0, high, (n,), generator=g))

    def model():
        return training.build_llama(shape, Ids, vocab_size=64, max_positions=64, tie=False,
                                    seed=0)

    with pytest.raises(FloatingPointError, match=r"between steps 1 and 50 .*--target-lr"):
        training.train("target", model(), batches(), lr=1e6, device="cpu", steps=200,
                       warmup_steps=1, log=lambda line: None)
    out = training.train("target", model(), batches(), lr=1e-3, device="cpu", steps=60,
                         warmup_steps=1, log=lambda line: None)
    assert out["done"] and out["steps"] == 60


def test_greedy_divergence_on_the_bundled_pair_finds_none():
    """benchmarks/greedy_divergence.py: the bundled fp32 pair's greedy speculative tokens
    equal its autoregressive ones, and the row it analyses at a divergence is the one
    autoregressive decoding chose from."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tokenizers")
    from benchmarks import greedy_divergence
    from quickdraft.ort_backend import load_pair
    from quickdraft.ort_backend.cli import default_model_dir

    pair = load_pair(default_model_dir(), device="cpu", max_gamma=3)
    rec = greedy_divergence.first_divergence(pair, "def quicksort(arr):", 3, 24)
    assert rec["same"] and rec["tokens"] == 24
    # the analysis of a position: the 1-token row is what autoregressive decoding saw
    ids = list(pair.tokenizer.encode("def quicksort(arr):").ids)
    row = greedy_divergence._autoregressive_row(pair.target, ids, [])
    state = pair.target.new_state()
    want = np.asarray(state.append(ids))[-1]
    state.close()
    assert np.array_equal(row, want.astype(np.float64))


def test_sampled_runs_are_parsed_and_reported():
    from benchmarks import bench

    assert bench.parse_samplings("1.0:1.0,0.7:0.9") == [[1.0, 1.0], [0.7, 0.9]]
    assert bench.parse_samplings("0.8") == [[0.8, 1.0]] and bench.parse_samplings("none") == []
    assert bench.parse_rates("0.3, 0.5") == [0.3, 0.5] and bench.parse_rates("") == []
    assert bench.parse_rates("0.3,auto") == [0.3, "auto"]
    for bad in ("x", "1.5", "automatic"):
        with pytest.raises(SystemExit, match="--shadow-keep-rates"):
            bench.parse_rates(bad)
    for bad in ("0:1", "0.7:1.5", "warm:0.9"):
        with pytest.raises(SystemExit, match="--samplings"):
            bench.parse_samplings(bad)
    row = {"temperature": 0.7, "top_p": 0.9, "gamma": 4,
           "ar": {"tokens_per_s": 100.0},
           "spec": {"tokens_per_s": 180.0, "speedup": 1.8, "alpha": 0.7, "cost_ratio_c": 0.1,
                    "theoretical_improvement": 2.0, "realized_over_theoretical": 0.9}}
    results = {"pairs": {"p": {"systems": {"qd-fast": {"status": "ok", "sampled": [row]}}}}}
    text = report.render(results)
    assert "### p: sampled" in text
    line = next(x for x in text.splitlines() if x.startswith("| qd-fast | 0.70"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:7] == ["qd-fast", "0.70", "0.90", "4", "100", "180", "-"]  # - : uncaptured
    assert cells[7] == "1.80"


def test_a_break_even_rule_without_a_hidden_share_is_named_not_run():
    from benchmarks import worker

    with pytest.raises(worker.Unavailable, match="no hidden share.*cost stage"):
        worker._with_rule(object(), "auto", 4, {"gamma": 4})
    row = {"gamma": 4, "rule": "auto", "error": "no hidden share"}
    assert report._keep_rate(row) == "auto (not run: no hidden share)"


def test_sampled_runs_time_pipelined_sampling_beside_them(monkeypatch):
    """The harness's sampled rows on the bundled pair (CPU, tiny): with the cost stage's
    costs a pipelined row is timed beside the sequential ones, seeded as they are, and the
    report shows it; where the draws and verdicts are captured (made to look so here), the
    same runs uncaptured are timed beside them, their tokens compared."""
    pytest.importorskip("onnxruntime")
    from benchmarks import adapters, worker
    from quickdraft.ort_backend.cli import default_model_dir

    monkeypatch.setattr(worker, "_captures_helpers", lambda runner: True)

    pair = adapters.load("fast", default_model_dir(), device="cpu", max_gamma=2)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    t_ms = adapters.step_costs(pair.target, prompts[0], [1, 2, 3], reps=2)
    d_ms = adapters.step_costs(pair.draft, prompts[0], [1], reps=2)
    row = worker._sampled_runs(pair, prompts, 10, 2, 0.8, 0.9, 0, 1, 0.1, (t_ms, d_ms),
                               rates=(1.0, "auto"))
    piped = row["pipelined"]
    # the same, continuations only until the first miss; then at the break-even rate
    ruled, even = row["pipelined_rules"]
    assert piped["min_keep_rate"] == 0.0 and ruled["min_keep_rate"] == 1.0
    assert piped["rule"] is None and ruled["rule"] == 1.0 and even["rule"] == "auto"
    h = min(1.0, max(0.0, piped["hidden_share"]))
    assert even["min_keep_rate"] == pytest.approx(min(1.0, (1 - h) * 3 / 2))
    assert ruled["shadow_draft_calls"] < piped["shadow_draft_calls"]
    # s: every iteration drafts a continuation without a rule, some with one; the theory
    # charges each its unhidden share, h measured per continuation
    assert piped["shadow_rate"] == 1.0 and 0.0 < ruled["shadow_rate"] < 1.0
    for r in (piped, ruled):
        share = r["shadow_rate"]
        assert r["hidden_share"] == pytest.approx(1.0 - (
            r["shadow_ms_per_iteration"] - r["verify_ms_alone"]) / (
            share * 3 * r["draft_step_ms_alone"]))
        assert r["theoretical_improvement"] == pytest.approx(
            theory.pipelined_walltime_improvement(
                r["alpha"], 2, r["draft_step_ms_alone"] / t_ms[1],
                min(1.0, max(0.0, r["hidden_share"])), shadow_rate=share))
    assert piped["tokens_per_s"] > 0 and 0.0 <= piped["warm_share"] <= 1.0
    assert piped["greedy_equal"] is None and piped["sequential_tokens_per_s"] == \
        row["spec"]["tokens_per_s"]
    assert piped["stats"]["mode"] == "pipelined"
    assert "effective_c" in piped and "realized_over_theoretical" in piped
    # the theory with the measured verify cost beside Theorem 3.8's: t_ms[3] / t_ms[1]
    verify = t_ms[3] / t_ms[1]
    for r in (piped, ruled):
        assert r["theoretical_with_verify"] == pytest.approx(
            theory.pipelined_walltime_improvement(
                r["alpha"], 2, r["draft_step_ms_alone"] / t_ms[1],
                min(1.0, max(0.0, r["hidden_share"])), shadow_rate=r["shadow_rate"],
                verify=verify))
        assert r["realized_over_theoretical_with_verify"] == pytest.approx(
            r["speedup"] / r["theoretical_with_verify"])
    sp = row["spec"]
    assert sp["theoretical_with_verify"] == pytest.approx(
        theory.walltime_improvement(sp["alpha"], 2, 0.1, verify))
    assert sp["theoretical_improvement"] == pytest.approx(
        theory.walltime_improvement(sp["alpha"], 2, 0.1))
    draws, verdicts = row["ar"]["uncaptured_draws"], row["spec"]["uncaptured_verdicts"]
    assert draws["tokens_equal"] and verdicts["tokens_equal"]  # the same seeds, same tokens
    assert draws["tokens_per_s"] > 0 and verdicts["tokens_per_s"] > 0
    results = {"pairs": {"p": {"systems": {"qd-fast": {"status": "ok", "sampled": [row]}}}}}
    text = report.render(results)
    assert "pipelined tok/s" in text and f"{piped['tokens_per_s']:.0f}" in text
    assert f"{draws['tokens_per_s']:.0f} / {verdicts['tokens_per_s']:.0f} (yes)" in text
    assert "pipelined with a ShadowRule" in text  # the rule's row, its rate over AR sampling
    rule_rows = [[c.strip() for c in x.strip("|").split("|")] for x in
                 text.split("pipelined with a ShadowRule")[1].split("###")[0].splitlines()
                 if x.startswith("| qd-fast")]
    cells, even_cells = rule_rows
    assert cells[:5] == ["qd-fast", "0.80", "0.90", "2", "1.00"]
    assert even_cells[4] == f"{even['min_keep_rate']:.2f} (break-even)"
    assert cells[8] == f"{ruled['tokens_per_s']:.0f}"
    assert cells[9] == f"{ruled['tokens_per_s'] / row['ar']['tokens_per_s']:.2f}"


def test_greedy_check_measures_the_targets_margin_where_output_parts():
    """The harness's greedy check on the bundled pair: output equal to autoregressive
    decoding passes; output made to part at token 3 is caught there, and the target's two
    best tokens at that point (through autoregressive decoding's path) put the
    autoregressive token first, by a positive margin, which the report cell shows."""
    pytest.importorskip("onnxruntime")
    from benchmarks import adapters, worker
    from quickdraft.ort_backend.cli import default_model_dir

    pair = adapters.load("fast", default_model_dir(), device="cpu", max_gamma=2)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    ref = [adapters.autoregressive(pair, p, 8)[0] for p in prompts]
    assert worker.greedy_check(pair.target, prompts, ref, ref) == {
        "greedy_equal": True, "mismatches": []}
    assert worker.greedy_check(pair.target, prompts, ref, None)["greedy_equal"] is None
    parted = [list(ref[0]), ref[1][:3] + [(ref[1][3] + 1) % 512] + ref[1][4:]]
    out = worker.greedy_check(pair.target, prompts, parted, ref)
    assert out["greedy_equal"] is False and len(out["mismatches"]) == 1
    (d,) = out["divergences"]
    assert (d["prompt"], d["at"], d["autoregressive"]) == (1, 3, ref[1][3])
    assert d["top2"][0] == ref[1][3] and d["margin"] > 0
    assert report.greedy_cell(out) == f"NO (1 prompt; margin {d['margin']:.3g})"
    assert report.greedy_cell({"greedy_equal": True}) == "yes"
    failed = {"greedy_equal": False, "mismatches": ["prompt 1", "prompt 2"],
              "divergences": [{"prompt": 1, "error": "RuntimeError: no slot"}]}
    assert report.greedy_cell(failed) == "NO (2 prompts)"  # an analysis that failed: no margin


def test_host_profile_finds_the_run_calls_of_a_generation():
    """benchmarks/host_overhead.py --profile: a profiled generation on the bundled pair lists
    the functions of its decode steps by their own time per iteration, most first, ONNX
    Runtime's run call first on the CPU."""
    pytest.importorskip("onnxruntime")
    from benchmarks import host_overhead
    from quickdraft.ort_backend import DecodeConfig, load_pair
    from quickdraft.ort_backend.cli import default_model_dir

    pair = load_pair(default_model_dir(), device="cpu")
    gen = pair.generator(DecodeConfig(max_new_tokens=8, seed=0), gamma=2)
    prompt = list(pair.tokenizer.encode("import os\n").ids)
    rows = host_overhead.host_profile(gen, prompt, runs=2, top=8)
    gen.close()
    assert len(rows) == 8
    own = [r["ms_per_iteration"] for r in rows]
    assert own == sorted(own, reverse=True) and own[-1] >= 0
    assert "run_with_iobinding" in rows[0]["function"]  # on the CPU the models' time leads
    assert rows[0]["calls_per_iteration"] >= 2  # the draft's step and the target's verify
    assert not any("prefill" in r["function"] for r in rows)  # decode steps only
    text = host_overhead.profile_table({"pair": "default", "temperature": 0.0,
                                        "system": "SD g=2", "host_profile": rows})
    assert "calls/it" in text and rows[0]["function"] in text


def test_host_overhead_times_pipelined_systems_on_a_static_pair(static_llama_pair, tmp_path):
    """benchmarks/host_overhead.py --pipelined / --shadow-keep-rates: each pipelined system
    (plain and under a ShadowRule) gets a row beside autoregressive and speculative
    decoding, greedy output checked equal to autoregressive decoding's."""
    from benchmarks import host_overhead

    out = tmp_path / "host.json"
    assert host_overhead.main([
        "--pairs", "static", "--static-dir", str(static_llama_pair), "--gammas", "2",
        "--pipelined", "2", "--shadow-keep-rates", "0.3", "--temperatures", "0",
        "--repeats", "1", "--new-tokens", "12", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["system"] for r in rows] == ["AR", "SD g=2", "PL g=2", "PL g=2 keep>=0.3"]
    assert all(r["tokens"] == rows[0]["tokens"] and r["new_tokens"] == 12 for r in rows)
    assert all(r["ms_per_iteration"] >= r["host_ms_per_iteration"] > 0 for r in rows)


@pytest.mark.parametrize("argv, names", [
    (["--pairs", "static", "--shadow-keep-rates", "0.3"], "--pipelined GAMMA"),
    (["--pairs", "default", "--pipelined", "4"], "--pairs static"),
    (["--pairs", "static", "--pipelined", "0"], "gammas >= 1"),
])
def test_host_overhead_refuses_options_that_would_time_nothing(argv, names, capsys):
    from benchmarks import host_overhead

    with pytest.raises(SystemExit) as refused:
        host_overhead.main(argv)
    assert refused.value.code == 2 and names in capsys.readouterr().err


def test_stream_priority_times_both_launches_alone_and_together(static_llama_pair, tmp_path):
    """benchmarks/stream_priority.py on the CPU (where only ONNX Runtime's own streams
    exist): per gamma the verify call, the draft's chain and both, each rewound so the
    states end where they began; a stream priority on the CPU, or a malformed setting, is
    refused."""
    from benchmarks import stream_priority

    out = tmp_path / "sp.json"
    assert stream_priority.main([str(static_llama_pair), "--device", "cpu", "--gammas", "2,4",
                                 "--settings", "default/default", "--repeats", "3",
                                 "--warmup", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["gamma"] for r in rows] == [2, 4]
    for r in rows:
        assert r["verify_ms"] > 0 and r["chain_ms"] > 0 and r["both_ms"] > 0
        assert r["sequential_ms"] == pytest.approx(r["verify_ms"] + r["chain_ms"])
    with pytest.raises(ValueError, match="only default/default"):
        stream_priority.measure_setting(static_llama_pair, "cpu", ("high", "normal"), [2],
                                        repeats=1, warmup=0, prompt_tokens=4, seed=0)
    with pytest.raises(ValueError, match="TARGET/DRAFT"):
        stream_priority.parse_settings("high")


def test_cuda_stream_options_name_a_priority():
    from quickdraft.ort_backend.streams import cuda_stream_options

    assert cuda_stream_options("default") == {}  # ONNX Runtime makes the stream
    with pytest.raises(ValueError, match="one of default, normal, high"):
        cuda_stream_options("urgent")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        from quickdraft.ort_backend.streams import StreamError

        with pytest.raises(StreamError, match="needs CUDA.*onnxruntime-gpu"):
            cuda_stream_options("high")


def test_seeded_repeat_counts_the_distinct_outputs_of_a_seed():
    """benchmarks/seeded_repeat.py on the bundled pair (CPU): sampled at T=1 with one seed,
    every run of each system gives one output, interleaved or not; a first difference is
    its index, or the shorter length when one output is a prefix of the other."""
    pytest.importorskip("onnxruntime")
    from benchmarks import seeded_repeat
    from benchmarks.cuda_graph_check import first_difference
    from quickdraft.ort_backend.cli import default_model_dir

    for interleave in (False, True):
        out = seeded_repeat.collect(default_model_dir(), device="cpu", attention=["auto"],
                                    runs=3, new_tokens=12, temperature=1.0, gammas=[3],
                                    seed=5, prompt_tokens=8, interleave=interleave)
        assert [(r["system"], r["distinct"]) for r in out] == [("AR", 1), ("SD g=3", 1)]
        assert all(r["first_difference"] == [None, None] for r in out)
    assert first_difference([1, 2, 3], [1, 4, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2


def test_node_profile_counts_the_bundled_draft_step():
    """benchmarks/node_profile.py on the CPU: every node of a draft step is in ONNX
    Runtime's profile, and the weight bytes its matrix products read, folded int8 storage
    included, are the model's parameters in fp32."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from benchmarks import node_profile
    from quickdraft.ort_backend.cli import default_model_dir
    from quickdraft.ort_backend.device import Device

    folder = default_model_dir() / "draft"
    weights = node_profile.node_weight_bytes(folder / "model.onnx")
    out = node_profile.ort_profile(folder, Device("cpu"), [1, 3], past=8, warmup=1,
                                   repeats=3)
    for k in ("1", "3"):
        rec = out[k]
        assert rec["nodes_per_step"] == sum(r["nodes"] for r in rec["ops"]) > 10
        assert {"MatMul", "GroupQueryAttention", "ArgMax"} <= {r["op"] for r in rec["ops"]}
        assert 0 < rec["weight_mb"] <= round(sum(weights.values()) / 1e6, 1)
    matmul = next(r for r in out["1"]["ops"] if r["op"] == "MatMul")
    assert 4 * 2.4e6 < matmul["weight_mb"] * 1e6 < 4 * 2.8e6  # the 2.6M draft, fp32


def test_partial_sorts_are_timed_beside_the_full_sort():
    from benchmarks import sampling_cost
    from quickdraft.sampling import SamplingConfig, adjust_logits

    z = np.random.default_rng(0).normal(size=(2, 300)) * 4
    for c in (SamplingConfig(0.7, top_p=0.9), SamplingConfig(1.0, top_k=50)):
        assert np.array_equal(adjust_logits(z, c),
                              sampling_cost.full_sort(z, c.top_k, c.top_p, c.temperature))


def test_sample_throughput_times_both_ways_of_writing_the_targets_text(tmp_path):
    pytest.importorskip("transformers")
    from benchmarks.sample_throughput import main

    out = tmp_path / "t.json"
    assert main(["--device", "cpu", "--smoke", "--sequences", "3", "--new-tokens", "2",
                 "--batches", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"].split()[0], r["sequences"]) for r in rows] == \
        [("generate", 4), ("continuations", 4)]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    with pytest.raises(SystemExit, match="positive integers"):
        main(["--device", "cpu", "--smoke", "--batches", "0"])


def test_upload_cost_runs_and_checks_what_it_uploaded(tmp_path):
    """benchmarks/upload_cost.py on the CPU: the chain model runs, the uploaded mask is the
    one the session summed, every timing is recorded; a bad size names its flag."""
    pytest.importorskip("onnxruntime")
    from benchmarks.common import load_json
    from benchmarks.upload_cost import main

    out = tmp_path / "u.json"
    assert main(["--smoke", "--json", str(out)]) == 0
    row = load_json(out)["result"]
    assert row["device"] == "cpu" and row["weight_bytes_read"] == 3 * 32 * 32 * 2
    for key in ("call_us", "launch_us", "upload_idle_us", "upload_after_launch_us",
                "uploads_5_one_by_one_us", "upload_5_rows_at_once_us"):
        assert row[key] > 0
    with pytest.raises(SystemExit, match="--mask-tokens must be at least 1"):
        main(["--smoke", "--mask-tokens", "0"])


def test_target_step_variants_decode_as_the_plain_export(tmp_path, hf_pair_dirs):
    """benchmarks/target_step.py on the CPU: the fused-MLP graph with transposed weights
    gives the plain export's tokens, and a second call resumes from the files."""
    import subprocess
    import sys

    from benchmarks.common import REPO

    out = tmp_path / "steps.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "target_step.py"),
           str(hf_pair_dirs["target"]), "--work", str(tmp_path / "work"), "--device", "cpu",
           "--runs", "plain/auto,gate_up_trans_b/cudnn", "--rounds", "1",
           "--repeats", "2", "--check-steps", "6", "--max-length", "64", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [(s["variant"], s["attention"]) for s in result["summary"]] == [
        ("plain", "auto"), ("gate_up_trans_b", "cudnn")]
    for s in result["summary"]:
        assert s["tokens_equal"] and s["max_logit_diff"] < 1e-3
        assert s["ms_1"][0] > 0 and s["ms_5"][0] > 0
    assert result["built"]["gate_up_trans_b"]["transpose_weights"] is True
    assert result["built"]["gate_up_trans_b"]["fuse_gate_up"] is True
    assert set(result["built"]) == {"plain", "gate_up_trans_b"}  # those run only
    first = (tmp_path / "work" / "run_0_plain_auto.json").stat().st_mtime_ns
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    assert (tmp_path / "work" / "run_0_plain_auto.json").stat().st_mtime_ns == first
