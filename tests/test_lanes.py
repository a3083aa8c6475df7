"""Lanes: several sequences scored in one target call (the bundled static pair, CPU EP).

Each lane's logits and greedy ids equal its sequence scored alone; a lane idle in a call
is not disturbed; generators stepped together (``begin_step`` / ``score_lanes`` /
``end_step``) give what each gives alone, greedy and seeded sampling alike, host and
device verification alike; bad calls are refused by name.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from quickdraft.ort_backend import DecodeConfig, Device, load_pair  # noqa: E402
from quickdraft.ort_backend.cli import default_model_dir  # noqa: E402
from quickdraft.ort_backend.lanes_graph import LanesGraphError, lanes_graph  # noqa: E402
from quickdraft.ort_backend.static import StaticOrtModel  # noqa: E402
from quickdraft.protocols import fill  # noqa: E402
from quickdraft.sampling import SamplingConfig  # noqa: E402

TOL = 1e-4  # |logit difference| between one call over many rows and a call over fewer
STEPS = (1, 3, 5)


@pytest.fixture(scope="module")
def target_dir():
    return default_model_dir() / "target"


@pytest.fixture(scope="module")
def models(target_dir):
    lanes = StaticOrtModel(target_dir, Device("cpu"), graph_steps=STEPS, lanes=3)
    alone = StaticOrtModel(target_dir, Device("cpu"), graph_steps=STEPS)
    return lanes, alone


@pytest.fixture(scope="module")
def pairs():
    root = default_model_dir()
    return load_pair(root, device="cpu", max_gamma=4, lanes=4), load_pair(root, device="cpu",
                                                                            max_gamma=4)


def test_each_lane_scores_as_its_sequence_alone(models):
    lanes, alone = models
    rng = np.random.default_rng(0)
    states = [lanes.new_state() for _ in range(3)]
    assert sorted(s.lane for s in states) == [0, 1, 2]
    refs = [alone.new_state() for _ in range(3)]
    for s, r, n in zip(states, refs, (7, 30, 2)):
        prompt = rng.integers(1, lanes.vocab_size, n).tolist()
        s.append(prompt)
        r.append(prompt)
    # rounds of different lanes and lengths (lane 1 idle in round 1; a rewind in round 2)
    for use, lengths in (([0, 1, 2], (5, 3, 1)), ([0, 2], (2, 4, 4)), ([2, 1, 0], (1, 1, 5))):
        if lengths == (1, 1, 5):
            for s, r in zip(states, refs):
                s.rewind(len(s.tokens) - 2)
                r.rewind(len(r.tokens) - 2)
        toks = {i: rng.integers(1, lanes.vocab_size, k).tolist() for i, k in zip(use, lengths)}
        got = lanes.score_lanes([states[i] for i in use], [toks[i] for i in use],
                                [False] * len(use))
        for i, sc in zip(use, got):
            want = refs[i].append(toks[i])  # [k, V]
            rows = np.asarray(sc.logits)
            assert rows.shape == want.shape
            np.testing.assert_allclose(rows, want, atol=TOL, rtol=0)
        greedy = lanes.score_lanes([states[i] for i in use], [[3, 4]] * len(use),
                                   [True] * len(use))
        for i, sc in zip(use, greedy):
            np.testing.assert_array_equal(sc.greedy, refs[i].append_greedy([3, 4]))
    for s, r in zip(states, refs):
        assert s.tokens == r.tokens
        s.close()
        r.close()


def test_lanes_keep_scratch_room_and_refuse_bad_calls(models, target_dir):
    lanes, alone = models
    assert lanes.lanes == 3 and lanes.lane_tokens == max(STEPS)
    assert lanes.max_length == alone.max_length - max(STEPS)
    a, b = lanes.new_state(), lanes.new_state()
    other = alone.new_state()
    a.append([1, 2])
    b.append([1, 2])
    with pytest.raises(ValueError, match="hold a lane"):
        lanes.score_lanes([a, other], [[1], [1]], [True, True])
    with pytest.raises(ValueError, match="share a lane"):
        lanes.score_lanes([a, a], [[1], [1]], [True, True])
    with pytest.raises(ValueError, match="at most 5 tokens"):
        lanes.score_lanes([a, b], [[1] * 6, [1]], [True, True])
    with pytest.raises(ValueError, match="one token list and one greedy flag"):
        lanes.score_lanes([a, b], [[1]], [True, True])
    with pytest.raises(ValueError, match="no lanes"):
        alone.score_lanes([other], [[1]], [True])
    assert a.tokens == [1, 2]  # nothing appended by a refused call
    for s in (a, b, other):
        s.close()
    with pytest.raises(ValueError, match="lanes must be"):
        StaticOrtModel(target_dir, Device("cpu"), lanes=-1)


def test_lanes_graph_covers_only_static_attention(target_dir):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, [1, 2])
    plain = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])],
        "g", [x], [y]))
    with pytest.raises(LanesGraphError, match="no GroupQueryAttention"):
        lanes_graph(plain, 2, ["past_key_values.0.key"], ["present.0.key"])
    real = onnx.load(str(target_dir / "model.onnx"), load_external_data=False)
    with pytest.raises(ValueError, match="lanes must be an integer >= 2"):
        lanes_graph(real, 1, [], [])


def _settings():
    return [
        (SamplingConfig(temperature=0.0), 3, "auto"),
        (SamplingConfig(temperature=0.0), 4, "auto"),
        (SamplingConfig(temperature=0.8, top_p=0.95), 3, "device"),
        (SamplingConfig(temperature=1.0, top_k=40), 2, "host"),
    ]


def _stepped_together(pair, prompts, settings, budget, *, draft_together=False):
    gens = [pair.generator(DecodeConfig(max_new_tokens=budget + i, sampling=s, seed=10 + i),
                           gamma=g, verify=v) for i, (s, g, v) in enumerate(settings)]
    for g, p in zip(gens, prompts):
        g.prefill(p)
    calls = 0
    while any(g.lane_ready for g in gens):
        ready = [g for g in gens if g.lane_ready]
        if draft_together:  # the greedy proposals as one chain of the draft's lanes
            plans = [p for p in (g.plan_draft() for g in ready) if p is not None]
            for plan in plans:
                if plan.lag:
                    fill(plan.state, plan.lag)
            outs = pair.draft.chain_lanes([p.state for p in plans], [p.token for p in plans],
                                          [p.length for p in plans]) if plans else []
            for plan, tokens in zip(plans, outs):
                plan.tokens = tokens
        asks = [g.begin_step() for g in ready]
        scores = pair.target.score_lanes([a.state for a in asks], [a.tokens for a in asks],
                                         [a.greedy for a in asks])
        calls += 1
        for g, sc in zip(ready, scores):
            g.end_step(sc)
    out = [(g.new_tokens, g.stats.generation.accepted_per_iteration) for g in gens]
    for g in gens:  # the shared calls, the draft's among them, count in each one's time
        s = g.stats
        assert s.decode_s >= s.target.decode_s + s.draft.decode_s
        g.close()
    return out, calls


def _alone(pair, prompts, settings, budget):
    out = []
    for i, ((s, g, v), p) in enumerate(zip(settings, prompts)):
        config = DecodeConfig(max_new_tokens=budget + i, sampling=s, seed=10 + i)
        with pair.generator(config, gamma=g, verify=v) as gen:
            gen.generate(p)
            out.append((gen.new_tokens, gen.stats.generation.accepted_per_iteration))
    return out


@pytest.mark.parametrize("draft_together", [False, True])
def test_generators_stepped_together_give_what_each_gives_alone(pairs, draft_together):
    """Verified in one target call per round (and, ``draft_together``, the greedy streams'
    proposals drafted as one chain of the draft's lanes): each stream's tokens and accepted
    counts are what it gives alone."""
    together, alone = pairs
    prompts = ["def fib(n):", "import os\nimport sys\n", "class Stack:\n    def", "for i in"]
    got, calls = _stepped_together(together, prompts, _settings(), 24,
                                   draft_together=draft_together)
    want = _alone(alone, prompts, _settings(), 24)
    assert got == want
    iterations = [len(acc) for _, acc in want]
    assert max(iterations) <= calls < sum(iterations)  # calls shared by the streams
    assert all(any(n > 0 for n in acc) for _, acc in got[:2])  # greedy streams accepted


def test_end_step_without_scores_verifies_alone_and_misuse_is_refused(pairs):
    together, alone = pairs
    config = DecodeConfig(max_new_tokens=12)
    with together.generator(config, gamma=3) as g:
        _misuse_and_alone(g, together, alone, config)
    with together.generator(DecodeConfig(max_new_tokens=4)) as ar:  # autoregressive
        ar.prefill("x = 1")
        assert not ar.lane_ready
        specs = [together.generator(config, gamma=3) for _ in range(together.target.lanes)]
        for s in specs:  # the autoregressive one took no lane: every speculative one has one
            s.prefill("y = 2")
            assert s.lane_ready
            s.close()


def _misuse_and_alone(g, together, alone, config):
    with pytest.raises(ValueError, match="call prefill"):
        g.begin_step()
    g.prefill("def f(x):")
    ask = g.begin_step()
    assert ask.greedy and together.target.in_lane(ask.state)
    with pytest.raises(ValueError, match="waits for end_step"):
        g.step()
    g.end_step(None)
    while not g.done:
        g.step()
    with pytest.raises(ValueError, match="end_step needs a begin_step"):
        g.end_step(None)
    with pytest.raises(ValueError, match="begin_step needs a speculative generation in"):
        g.begin_step()  # done
    with alone.generator(config, gamma=3) as ref:
        ref.generate("def f(x):")
        assert g.new_tokens == ref.new_tokens


def test_scheduler_verifies_streams_together_and_each_gets_its_own_tokens(pairs):
    """Streams of every drafting strategy and several gammas share lanes calls; each gets
    what its request gives alone (greedy, and seeded sampling where the draws do not
    depend on measured times)."""
    import queue

    from quickdraft.serve.scheduler import Done, Job, Scheduler

    together, alone = pairs
    requests = [  # drafter, gamma, temperature, prompt
        ("model", 3, 0.0, "def fib(n):"),
        ("model", 4, 0.0, "while True:\n    x"),
        ("model", 2, 0.0, "import numpy as np\n"),
        ("ngram", 4, 0.0, "import os\nimport sys\nimport os"),
        ("auto", 3, 0.0, "class Stack:\n    def push(self, x):\n        self.items"),
        ("model", 4, 0.7, "for i in range(3):"),
        ("ngram", 3, 0.8, "x = [x for x in"),
        ("model", "auto", 0.0, "try:\n"),
    ]
    configs = [DecodeConfig(max_new_tokens=10 + 3 * i, seed=i,
                            sampling=SamplingConfig(temperature=t))
               for i, (_, _, t, _) in enumerate(requests)]
    scheduler = Scheduler(together, max_concurrency=4).start()
    events: queue.Queue = queue.Queue()
    try:
        for i, ((drafter, gamma, _, p), c) in enumerate(zip(requests, configs)):
            scheduler.submit(Job(together.tokenizer.encode(p).ids, c, gamma, drafter,
                                 emit=lambda e, i=i: events.put((i, e))))
        done = {}
        while len(done) < len(requests):
            i, e = events.get(timeout=60)
            assert isinstance(e, Done), e
            done[i] = e.text
    finally:
        scheduler.stop()
    for i, ((drafter, gamma, _, p), c) in enumerate(zip(requests, configs)):
        with alone.generator(c, gamma=gamma, drafter=drafter) as g:
            assert done[i] == g.generate(p).text, requests[i]
    assert scheduler.lane_calls > 0 and scheduler.draft_lane_calls > 0


def test_the_scheduler_drafts_together_when_half_the_lanes_are_busy():
    from quickdraft.serve.scheduler import draft_together_pays

    assert draft_together_pays(16, 16) and draft_together_pays(8, 16)
    assert not draft_together_pays(4, 16) and not draft_together_pays(7, 16)
    assert draft_together_pays(2, 4) and not draft_together_pays(1, 2)


def test_draft_lanes_chain_each_state_as_alone(pairs):
    """chain_lanes: the greedy chains of several states (different lengths, positions,
    after rewinds) in one chain of the draft's lanes give each state's launch_chain alone,
    leave each state holding what launch_chain leaves, and a lane idle in the chain gives
    its own chain afterwards as if nothing had run."""
    together, alone = pairs
    draft, ref = together.draft, alone.draft
    assert draft.lanes == 4 and draft.lane_chain_length == 5
    prompts = [list(together.tokenizer.encode(t).ids) for t in
               ("def fib(n):", "import os\nimport sys\n", "class Stack:\n    def", "x = 1")]
    states = [draft.new_state() for _ in prompts]
    refs = [ref.new_state() for _ in prompts]
    try:
        assert all(draft.in_lane(s) for s in states)
        for s, r, ids in zip(states, refs, prompts):
            s.append(ids[:-1])
            r.append(ids[:-1])
        heads = [ids[-1] for ids in prompts]
        for lengths, rewind in (([4, 2, 5], 0), ([1, 3, 3], 2)):
            if rewind:
                for s, r in zip(states, refs):
                    s.rewind(len(s.tokens) - rewind)
                    r.rewind(len(r.tokens) - rewind)
                heads = [s.tokens[-1] for s in states[:3]]
                for s, r in zip(states[:3], refs[:3]):
                    s.rewind(len(s.tokens) - 1)
                    r.rewind(len(r.tokens) - 1)
            got = draft.chain_lanes(states[:3], heads[:3], lengths)
            want = [r.launch_chain(h, n).wait() for r, h, n in zip(refs, heads, lengths)]
            for g, w, s, r in zip(got, want, states, refs):
                assert g.tolist() == w.tolist() and s.tokens == r.tokens
            heads = [int(g[-1]) for g in got] + heads[3:]
        idle = draft.chain_lanes([states[3]], [prompts[3][-1]], [4])[0]
        # a state near its end takes its own steps beside a longer chain (the extra steps
        # fall in the scratch positions)
        states[0].rewind(0)
        states[0].append([prompts[0][0]] * (draft.max_length - 2))
        got = draft.chain_lanes(states[:2], [prompts[0][0], heads[1]], [1, 5])
        assert len(got[0]) == 1 and len(states[0].tokens) == draft.max_length - 1
        with pytest.raises(ValueError, match="a lane may hold"):
            draft.chain_lanes(states[:1], [prompts[0][0]], [2])
        assert idle.tolist() == refs[3].launch_chain(prompts[3][-1], 4).wait().tolist()
        with pytest.raises(ValueError, match=r"chain lengths must be integers in \[1, 5\]"):
            draft.chain_lanes(states[:1], [1], [6])
        with pytest.raises(ValueError, match="share a lane"):
            draft.chain_lanes([states[0], states[0]], [1, 1], [1, 1])
        assert together.target.lane_chain_length == 0  # no chains: the target scores
    finally:
        for s in states + refs:
            s.close()


def test_lanes_belong_to_one_thread_at_a_time(target_dir):
    """On CUDA a lane's graphs are captured on the thread that takes the lanes (ONNX Runtime
    keeps them per thread): while a thread's state holds a lane, states made elsewhere get
    none and a lanes call from another thread is refused; once every lane is free again,
    another thread takes them."""
    import threading

    model = StaticOrtModel(target_dir, Device("cpu"), graph_steps=STEPS, lanes=2)
    mine = model.new_state()
    assert mine.lane is not None
    other: dict = {}

    def elsewhere():
        s = model.new_state()
        other["lane"] = s.lane
        try:
            model.score_lanes([mine], [[1]], [True])
        except RuntimeError as e:
            other["error"] = str(e)
        s.close()

    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    assert other["lane"] is None
    assert "belong to the thread" in other["error"]
    second = model.new_state()
    assert second.lane is not None and second.lane != mine.lane
    mine.close()
    second.close()
    t = threading.Thread(target=lambda: other.update(lane=model.new_state().lane))
    t.start()
    t.join()
    assert other["lane"] is not None  # all lanes were free: that thread took them
    assert model.new_state().lane is None  # and holds one, so this thread gets none


def test_end_step_refuses_scores_it_cannot_decide_on(pairs):
    """Refused scores leave the proposal waiting: the right ones (or None) finish it."""
    from quickdraft.protocols import Scores

    together, alone = pairs
    config = DecodeConfig(max_new_tokens=12)
    a, b = (together.generator(config, gamma=3) for _ in range(2))
    try:
        a.prefill("def f(x):")
        b.prefill("import os")
        ask_a, ask_b = a.begin_step(), b.begin_step()
        with pytest.raises(ValueError, match="not of this generator's proposal"):
            a.end_step(Scores(greedy=np.zeros(4, dtype=np.int64)))  # nothing appended yet
        got = together.target.score_lanes([ask_a.state, ask_b.state],
                                          [ask_a.tokens, ask_b.tokens], [True, True])
        with pytest.raises(ValueError, match="needs the target's greedy ids"):
            b.end_step(Scores(logits=got[1].greedy))
        with pytest.raises(RuntimeError, match="failed for this sequence: bad rows"):
            b.end_step(Scores(error="bad rows"))
        b.end_step(got[1])
        a.end_step(got[0])
        for g in (a, b):
            while not g.done:
                g.step()
        for g, p in ((a, "def f(x):"), (b, "import os")):
            with alone.generator(config, gamma=3) as ref:
                assert g.new_tokens == ref.generate(p).tokens
    finally:
        a.close()
        b.close()


def test_a_lane_refuses_to_grow_into_the_scratch_positions(models):
    lanes, _ = models
    s = lanes.new_state()
    try:
        assert s.lane is not None
        s.append([1] * (lanes.max_length - 1))
        with pytest.raises(ValueError, match="a lane may hold"):
            s.append([1, 2])
        with pytest.raises(ValueError, match="a lane may hold"):
            lanes.score_lanes([s], [[1, 2]], [True])
        assert len(s.tokens) == lanes.max_length - 1
    finally:
        s.close()


def test_lanes_graph_refuses_other_readers_of_the_caches_and_extra_inputs(target_dir):
    real = onnx.load(str(target_dir / "model.onnx"), load_external_data=False)
    past = [i.name for i in real.graph.input if i.name.startswith("past_key_values")]
    present = [o.name for o in real.graph.output if o.name.startswith("present")]
    from onnx import helper

    reader = type(real)()
    reader.CopyFrom(real)
    reader.graph.node.append(helper.make_node("Shape", [past[0]], ["cache_shape"]))
    with pytest.raises(LanesGraphError, match="reads the caches"):
        lanes_graph(reader, 2, past, present)
    extra = type(real)()
    extra.CopyFrom(real)
    node = next(n for n in extra.graph.node if n.op_type == "GroupQueryAttention")
    while len(node.input) < 11:
        node.input.append("")
    node.input[10] = "attention_bias"
    with pytest.raises(LanesGraphError, match="past the rotary caches"):
        lanes_graph(extra, 2, past, present)


def test_a_failed_lanes_call_fails_its_streams_only(pairs, monkeypatch):
    import queue

    from quickdraft.serve.scheduler import Done, Failed, Job, Scheduler

    together, alone = pairs
    scheduler = Scheduler(together, max_concurrency=4).start()
    calls = {"n": 0}
    real = type(together.target).score_lanes

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(together.target), "score_lanes", flaky)
    events: queue.Queue = queue.Queue()
    try:
        config = DecodeConfig(max_new_tokens=16)
        for i, p in enumerate(["def f(x):", "import os\n", "class A:"]):
            scheduler.submit(Job(together.tokenizer.encode(p).ids, config, 3, "model",
                                 emit=lambda e, i=i: events.put((i, e))))
        got = dict(events.get(timeout=60) for _ in range(3))
        failed = [i for i, e in got.items() if isinstance(e, Failed)]
        assert failed and all(got[i].status == 500 and "device lost" in got[i].message
                              for i in failed)
        # the scheduler goes on: a new request is answered as alone
        scheduler.submit(Job(together.tokenizer.encode("x = 1").ids, config, 3, "model",
                             emit=lambda e: events.put((9, e))))
        _, done = events.get(timeout=60)
        assert isinstance(done, Done)
        with alone.generator(config, gamma=3) as g:
            assert done.text == g.generate("x = 1").text
    finally:
        scheduler.stop()
