"""Acceptance tests of the architecture, on the CPU, on both cache kinds (the tiny Llama
pair's dynamic and static exports):

a. any Drafter plugs into the Generator: a drafter without a model (the two protocol
   methods only, one-hot q) decodes greedily to the autoregressive tokens, and a seeded
   sampled run with it is reproducible;
b. one loaded model serves several sequences: two Generators on one Pair stepped
   alternately give the tokens of two separate runs;
c. a state belongs to its thread: another thread gets a clear error, not wrong output;
   eight threads with their own Generators on one shared Pair each get their prompt's
   output;
d. a closed static state's cache slot is reused by the next state.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

from quickdraft.ort_backend import (  # noqa: E402
    DecodeConfig,
    Generator,
    Pair,
    StateThreadError,
    StaticDecodeState,
    StaticOrtModel,
    load_pair,
)
from quickdraft.protocols import (  # noqa: E402
    Candidates,
    ClosableState,
    MeasuredState,
    SamplingDrafter,
    StatefulDrafter,
)
from quickdraft.sampling import SamplingConfig  # noqa: E402

GREEDY = SamplingConfig(temperature=0)
SAMPLED = SamplingConfig(temperature=1.0)
MAX_GAMMA = 4  # the target's compiled steps: 1 .. MAX_GAMMA + 1
PROMPTS = [
    "def quicksort(arr):",
    "import os\n\ndef main(",
    "class Stack:\n    def __init__(self):\n        self.",
    "for i in range(10):\n    print(",
    "x = [1, 2, 3]\ny = ",
    "# Copyright (c) 2001",
    "def read_config(path):\n    ",
    "    return self._",
]
KINDS = ("dynamic", "static")


# -- drafters without a model: only the two Drafter methods ------------------------------------


class LookupDrafter:
    """Prompt lookup: proposes the tokens that followed the last earlier occurrence of the
    last token (up to ``k``), nothing when there is none; q is one-hot on them. Its length
    is its own business (here: ``k`` grows after a full acceptance, shrinks after a
    rejection)."""

    def __init__(self, vocab_size: int, k: int = 3):
        self.vocab_size = vocab_size
        self.k = k
        self.proposed: list[int] = []  # tokens proposed per call
        self.accepted: list[int] = []  # n_accepted per update

    def get_candidates(self, ids: Sequence[int], max_tokens: int,
                       uniforms: np.ndarray) -> Candidates:
        assert len(uniforms) == max_tokens
        ids = list(ids)
        n = min(self.k, int(max_tokens))
        tokens: list[int] = []
        if n > 0:
            last = ids[-1]
            for j in range(len(ids) - 2, -1, -1):
                if ids[j] == last:
                    tokens = ids[j + 1 : j + 1 + n]
                    break
        self.proposed.append(len(tokens))
        return Candidates(np.asarray(tokens, dtype=np.int64), None, vocab_size=self.vocab_size,
                          checked=True)

    def update_candidate_strategy(self, ids: Sequence[int], n_accepted: int) -> None:
        full = self.proposed and n_accepted == self.proposed[-1] > 0
        self.k = min(self.k + 1, 6) if full else max(1, self.k - 1)
        self.accepted.append(n_accepted)


class PatternDrafter:
    """Proposes a fixed token pattern (a cycle of ``pattern``), always ``max_tokens`` long
    (at most ``k``): mostly rejected, so the recovered-token path runs every iteration."""

    def __init__(self, vocab_size: int, pattern: Sequence[int], k: int = 3):
        self.vocab_size, self.pattern, self.k = vocab_size, list(pattern), k
        self.proposed: list[int] = []
        self.accepted: list[int] = []

    def get_candidates(self, ids, max_tokens, uniforms) -> Candidates:
        n = min(self.k, int(max_tokens))
        start = len(ids)
        tokens = [self.pattern[(start + i) % len(self.pattern)] for i in range(n)]
        self.proposed.append(n)
        return Candidates(np.asarray(tokens, dtype=np.int64), None, vocab_size=self.vocab_size,
                          checked=True)

    def update_candidate_strategy(self, ids, n_accepted) -> None:
        self.accepted.append(n_accepted)


def make_drafter(name: str, vocab: int):
    return LookupDrafter(vocab) if name == "lookup" else PatternDrafter(vocab, [3, 7, 11, 7])


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def static_export(static_llama_pair) -> Path:
    """The tiny Llama pair exported with --kv-cache static (a cache of 200 tokens)."""
    return static_llama_pair


@pytest.fixture(scope="module")
def dynamic_loaded(exported_llama_pair) -> Pair:
    """The tiny Llama pair's default (dynamic-cache) export, loaded once for this module."""
    return load_pair(exported_llama_pair, device="cpu", max_gamma=MAX_GAMMA)


@pytest.fixture(scope="module")
def static_loaded(static_export) -> Pair:
    """The static export, loaded once for this module."""
    return load_pair(static_export, device="cpu", max_gamma=MAX_GAMMA)


@pytest.fixture
def shared(request):
    """shared(kind) -> the module's Pair of that cache kind ("dynamic" or "static")."""
    return lambda kind: request.getfixturevalue(f"{kind}_loaded")


def run_all(gen: Generator, prompt) -> list[int]:
    return gen.generate(prompt).tokens


def in_thread(fn):
    """Run ``fn`` in a new thread; return what it raised (None if nothing)."""
    caught: list[BaseException] = []

    def body():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            caught.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return caught[0] if caught else None


# -- a. a drafter without a model, on both cache kinds ----------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["lookup", "pattern"])
def test_custom_drafter_greedy_equals_autoregressive(kind, name, shared):
    pair = shared(kind)
    vocab = pair.target.vocab_size
    cfg = DecodeConfig(max_new_tokens=32, sampling=GREEDY)
    with pair.generator(cfg) as auto:
        wants = [run_all(auto, text) for text in PROMPTS[:4]]
    drafter = make_drafter(name, vocab)
    assert not isinstance(drafter, (StatefulDrafter, SamplingDrafter))  # no model, no q rows
    with pair.generator(cfg, drafter=drafter) as gen:
        assert gen.speculative and gen.drafter is drafter
        for text, want in zip(PROMPTS[:4], wants):
            res = gen.generate(text)
            assert len(want) == 32
            assert res.tokens == want, (kind, name, text)
            assert res.text == pair.tokenizer.decode(want, skip_special_tokens=True)
            s = res.stats
            assert s.mode == "speculative" and s.kv_cache == kind
            assert s.draft.calls == 0 and s.draft_calls == 0  # no draft model ran
            g = s.generation
            assert g.drafted_per_iteration == drafter.proposed[-g.iterations:]
            assert all(0 <= n <= d for n, d in zip(g.accepted_per_iteration,
                                                     g.drafted_per_iteration))
            # each iteration is one target call; prefill: one more
            assert s.target.calls == g.iterations and s.target_calls == g.iterations + 1
    assert drafter.accepted and len(drafter.accepted) == len(drafter.proposed)
    assert max(drafter.proposed) >= 1
    if name == "lookup":
        assert 0 in drafter.proposed  # a proposal of no tokens: one target step
        assert max(drafter.accepted) >= 1  # and accepted draft tokens
    else:
        assert min(drafter.accepted) == 0  # rejections: recovered tokens


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["lookup", "pattern"])
def test_custom_drafter_sampled_run_is_reproducible(kind, name, shared):
    pair = shared(kind)
    vocab = pair.target.vocab_size
    cfg = DecodeConfig(max_new_tokens=24, sampling=SAMPLED, seed=11)
    runs = []
    with pair.generator(cfg, drafter=make_drafter(name, vocab)) as gen:
        if kind == "static":
            assert gen.verify == "device"  # one-hot q rows through the verification graph
        runs.append(gen.generate(PROMPTS[1]))
        runs.append(gen.generate(PROMPTS[1]))  # the same generator again
    with pair.generator(cfg, drafter=make_drafter(name, vocab)) as fresh:
        runs.append(fresh.generate(PROMPTS[1]))
    with pair.generator(cfg, drafter=make_drafter(name, vocab), verify="host") as host:
        runs.append(host.generate(PROMPTS[1]))  # the same rule on the host, same uniforms
    first = runs[0]
    assert len(first.tokens) == 24 and all(0 <= t < vocab for t in first.tokens)
    assert first.stats.verifier == ("device" if kind == "static" else "host")
    for other in runs[1:]:
        assert other.tokens == first.tokens
        assert (other.stats.generation.accepted_per_iteration
                == first.stats.generation.accepted_per_iteration)
    other_seed = DecodeConfig(max_new_tokens=24, sampling=SAMPLED, seed=12)
    with pair.generator(other_seed, drafter=make_drafter(name, vocab)) as gen:
        assert gen.generate(PROMPTS[1]).tokens != first.tokens


def test_custom_drafter_through_the_generator_constructor(shared):
    """Generator(target, drafter, config) without a Pair; a drafter proposing more than
    max_tokens is refused."""
    pair = shared("static")
    cfg = DecodeConfig(max_new_tokens=16)
    with pair.generator(cfg) as auto:
        want = auto.generate(PROMPTS[0]).tokens
    drafter = LookupDrafter(pair.target.vocab_size)
    with Generator(pair.target, drafter, cfg, tokenizer=pair.tokenizer,
                   max_draft=MAX_GAMMA) as gen:
        assert gen.generate(PROMPTS[0]).tokens == want

    class Greedy(LookupDrafter):  # ignores max_tokens
        def get_candidates(self, ids, max_tokens, uniforms):
            return Candidates(np.asarray(list(ids[-MAX_GAMMA:]), dtype=np.int64), None,
                              vocab_size=self.vocab_size, checked=True)

    greedy = Greedy(pair.target.vocab_size)
    with pair.generator(DecodeConfig(max_new_tokens=3), drafter=greedy) as gen:
        with pytest.raises(ValueError, match="max_tokens"):
            gen.generate(PROMPTS[0])


# -- b. two sequences on one loaded model, stepped alternately ---------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["greedy", "sampled", "mixed"])
def test_two_generators_on_one_pair_alternate(kind, mode, shared):
    pair = shared(kind)
    greedy = DecodeConfig(max_new_tokens=20, sampling=GREEDY)
    sampled = DecodeConfig(max_new_tokens=20, sampling=SAMPLED, seed=3)
    plans = {  # (config, gamma) of A and B
        "greedy": [(greedy, 3), (greedy, 2)],
        "sampled": [(sampled, 3), (sampled, 3)],
        "mixed": [(greedy, None), (sampled, 2)],  # autoregressive next to speculative
    }[mode]
    prompts = [PROMPTS[2], PROMPTS[5]]
    separate = []
    for (cfg, gamma), prompt in zip(plans, prompts):
        with pair.generator(cfg, gamma=gamma) as g:
            separate.append(g.generate(prompt))
    a, b = (pair.generator(cfg, gamma=gamma) for cfg, gamma in plans)
    with a, b:
        a.prefill(prompts[0])
        b.prefill(prompts[1])
        got = [[], []]
        while not (a.done and b.done):
            got[0] += a.step()  # [] once done
            got[1] += b.step()
        for gen, tokens, want in zip((a, b), got, separate):
            assert tokens == gen.new_tokens == want.tokens
            assert gen.stats.generation.accepted_per_iteration == \
                want.stats.generation.accepted_per_iteration
            # each state counts its own calls: the same as in the separate run
            assert gen.stats.target.calls == want.stats.target.calls
            assert gen.stats.target_calls == want.stats.target_calls
            assert gen.stats.draft_calls == want.stats.draft_calls
        # and again, the other way round (B first), reusing both generators
        b.prefill(prompts[1])
        a.prefill(prompts[0])
        while not (a.done and b.done):
            b.step()
            a.step()
        assert [a.new_tokens, b.new_tokens] == [w.tokens for w in separate]


@pytest.mark.parametrize("kind", KINDS)
def test_two_states_of_one_model_interleave(kind, shared):
    """Two states of one model appended and rewound alternately give each one's own
    logits (no state is made stale by another: each has its own cache)."""
    model = shared(kind).target
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, model.vocab_size, 30).tolist() for _ in range(2)]
    fresh = [model.new_state().append(s) for s in seqs]  # [30, V] each
    states = [model.new_state(), model.new_state()]
    assert states[0] is not states[1]
    cuts = [0, 7, 8, 13, 14, 30]
    for lo, hi in zip(cuts, cuts[1:]):
        for i, state in enumerate(states):
            got = state.append(seqs[i][lo:hi])
            assert np.abs(got - fresh[i][lo:hi]).max() < 1e-4, (i, lo)
            assert state.tokens == seqs[i][:hi]
    states[0].rewind(10)  # a rollback of one leaves the other alone
    again = [states[0].append(seqs[0][10:12]), states[1].append([seqs[1][0]])]
    assert np.abs(again[0] - fresh[0][10:12]).max() < 1e-4
    ref = model.new_state().append(seqs[1] + [seqs[1][0]])[-1:]
    assert np.abs(again[1] - ref).max() < 1e-4
    for state in states:
        assert isinstance(state, MeasuredState)
    assert states[0].times.calls == states[1].times.calls == len(cuts) - 1 + 1
    assert states[0].times.rewinds == 1 and states[1].times.rewinds == 0
    if kind == "static":
        assert isinstance(states[0], StaticDecodeState)
        assert states[0].calls["captured_steps"] >= 1  # the 1-token steps have bindings
    for state in states:
        if isinstance(state, ClosableState):
            state.close()


# -- c. threads ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_state_used_from_another_thread_raises(kind, shared):
    pair = shared(kind)
    cfg = DecodeConfig(max_new_tokens=12)
    with pair.generator(cfg, gamma=2) as ref:
        want = ref.generate(PROMPTS[0]).tokens
    gen = pair.generator(cfg, gamma=2)
    gen.prefill(PROMPTS[0])
    first = gen.step()
    for call in (gen.step, lambda: gen.prefill(PROMPTS[1]), lambda: gen.rewind(3),
                 lambda: gen.generate(PROMPTS[1]), gen.close):
        err = in_thread(call)
        assert isinstance(err, RuntimeError) and "thread" in str(err), err
    # nothing was changed by the refused calls: the sequence goes on, correctly
    while not gen.done:
        gen.step()
    assert gen.new_tokens == want and gen.new_tokens[: len(first)] == first
    gen.close()
    # a drafter made in this thread and handed to another: its draft state refuses
    drafter = pair.drafter(GREEDY, 2)
    err = in_thread(lambda: pair.generator(cfg, drafter=drafter).generate(PROMPTS[0]))
    assert isinstance(err, StateThreadError), err
    # the states themselves
    state = pair.target.new_state()
    state.append([1, 2, 3])
    calls = {"append": lambda: state.append([4]), "rewind": lambda: state.rewind(1),
             "close": state.close}  # a close from elsewhere would drop the owner's cache
    if kind == "static":
        calls.update(append_greedy=lambda: state.append_greedy([4]),
                     append_device=lambda: state.append_device([4]),
                     calls=lambda: state.calls)
    for what, call in calls.items():
        err = in_thread(call)
        assert isinstance(err, StateThreadError) and "thread" in str(err), (what, err)
        assert isinstance(err, RuntimeError)
    assert state.tokens == [1, 2, 3]
    fresh = pair.target.new_state().append([1, 2, 3, 4])[-1:]
    assert np.abs(state.append([4]) - fresh).max() < 1e-4
    if isinstance(state, ClosableState):
        state.close()


def _plan(i: int):
    """Thread i's prompt and (config, gamma): greedy speculative, seeded sampled
    speculative and autoregressive in turn."""
    configs = [(DecodeConfig(max_new_tokens=16, sampling=GREEDY), 3),
               (DecodeConfig(max_new_tokens=16, sampling=SAMPLED, seed=100 + i), 2),
               (DecodeConfig(max_new_tokens=16, sampling=GREEDY), None)]
    return PROMPTS[i % len(PROMPTS)], configs[i % 3]


@pytest.mark.parametrize("kind", KINDS)
def test_eight_threads_with_their_own_generators_share_one_pair(kind, shared):
    pair = shared(kind)
    n = 8
    want = []
    for i in range(n):  # sequential runs
        prompt, (cfg, gamma) = _plan(i)
        with pair.generator(cfg, gamma=gamma) as g:
            want.append(g.generate(prompt).tokens)
    before = pair.target.slots_made if kind == "static" else 0
    start = threading.Barrier(n)

    def work(i: int) -> list[list[int]]:
        prompt, (cfg, gamma) = _plan(i)
        out = []
        with pair.generator(cfg, gamma=gamma) as g:  # made in this thread
            start.wait(timeout=120)  # a thread that failed first breaks it: no hang
            for _ in range(2):  # two generations each, stepped (the threads interleave)
                g.prefill(prompt)
                while not g.done:
                    g.step()
                out.append(g.new_tokens)
        return out

    with ThreadPoolExecutor(max_workers=n) as pool:
        got = list(pool.map(work, range(n)))
    for i in range(n):
        assert got[i] == [want[i], want[i]], i
    if kind == "static":  # one slot per live state: at most 8 more target slots
        assert before <= pair.target.slots_made <= before + n


# -- d. cache slots are pooled -----------------------------------------------------------------


def test_closed_static_states_slots_are_reused(request):
    folder = request.getfixturevalue("static_export")
    pair = load_pair(folder, device="cpu", max_gamma=MAX_GAMMA)  # fresh: no slots yet
    assert isinstance(pair.target, StaticOrtModel) and pair.target.slots_made == 0
    cfg = DecodeConfig(max_new_tokens=16)
    outputs = []
    for text in PROMPTS[:4] * 2:
        with pair.generator(cfg, gamma=3) as gen:
            outputs.append(gen.generate(text).tokens)
        assert pair.target.slots_made == 1 and pair.draft.slots_made == 1
    assert outputs[:4] == outputs[4:]  # a reused slot holds nothing of its last sequence
    with pair.generator(cfg) as auto:  # autoregressive: the target's slot only
        assert [auto.generate(t).tokens for t in PROMPTS[:4]] == outputs[:4]
    assert pair.target.slots_made == 1 and pair.draft.slots_made == 1
    # two open at once need two slots; closed, they serve the next two
    for _ in range(3):
        a, b = pair.generator(cfg, gamma=2), pair.generator(cfg, gamma=2)
        assert [a.generate(PROMPTS[0]).tokens, b.generate(PROMPTS[1]).tokens] == outputs[:2]
        a.close()
        b.close()
        assert pair.target.slots_made == 2 and pair.draft.slots_made == 2
    # the state level: close gives the slot back; a closed state refuses to run
    state = pair.target.new_state()
    state.append([1, 2])
    state.close()
    state.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        state.append([3])
    again = pair.target.new_state()
    assert again.tokens == [] and pair.target.slots_made == 2
    fresh = StaticOrtModel(folder / "target").new_state().append([5, 6, 7])
    assert np.abs(again.append([5, 6, 7]) - fresh).max() < 1e-4
    again.close()
