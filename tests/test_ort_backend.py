"""The ONNX Runtime backend on the CPU EP, on tiny exported Llama pairs (offline).

Pairs: the shared ``exported_llama_pair`` (independent random target and draft: greedy
acceptance is near zero, sampled acceptance partial), a "close" pair whose draft is the
target with its weights perturbed (mixed acceptance counts under greedy decoding) and a
"self" pair whose draft is the target itself (everything accepted: the bonus-token path).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

from goodness import check_fit  # noqa: E402

from quickdraft.cli import main as cli_main  # noqa: E402
from quickdraft.generation import speculative_generate  # noqa: E402
from quickdraft.ort_backend import (  # noqa: E402
    CudaUnavailableError,
    DecodeConfig,
    Device,
    Generator,
    ModelFolderError,
    OrtModel,
    Pair,
    StreamDecoder,
    load_pair,
)
from quickdraft.ort_backend.slicer import CacheSlicer, slice_model_bytes  # noqa: E402
from quickdraft.sampling import SamplingConfig, adjust_logits  # noqa: E402

GREEDY = SamplingConfig(temperature=0)
TOL = 1e-4  # max |logit difference| between fp32 runtimes
PROMPTS = [
    "def main(",
    "import os\nimport sys\n",
    "x",
    "class Foo(object):\n    def __init__(self",
    "    return self._",
    "# Copyright (c) 2001",
    "for i in range(10):\n",
    "é ü ∑ 中文",
]
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(exported_llama_pair) -> Path:
    return Path(exported_llama_pair)


@pytest.fixture(scope="module")
def loaded(pair) -> Pair:
    """The pair loaded once on the CPU, shared by the generators of these tests."""
    return load_pair(pair, device="cpu")


def encode(loaded: Pair, text: str) -> list[int]:
    return list(loaded.tokenizer.encode(text).ids)


@pytest.fixture(scope="module")
def close_pair(tmp_path_factory, hf_pair_dirs, pair) -> Path:
    """The target, and as draft the target's weights plus 5% noise."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from quickdraft.export import export_model

    src = Path(hf_pair_dirs["target"])
    root = tmp_path_factory.mktemp("close-pair")
    model = AutoModelForCausalLM.from_pretrained(src)
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * p.std() * 0.05)
    model.save_pretrained(root / "hf-draft")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(src / name, root / "hf-draft" / name)
    out = root / "pair"
    export_model(root / "hf-draft", out / "draft", validate=False)
    shutil.copytree(pair / "target", out / "target")
    return out


@pytest.fixture(scope="module")
def self_pair(tmp_path_factory, pair) -> Path:
    out = tmp_path_factory.mktemp("self-pair") / "pair"
    shutil.copytree(pair / "target", out / "target")
    shutil.copytree(pair / "target", out / "draft")
    return out


def _copy(pair: Path, tmp_path: Path) -> Path:
    out = tmp_path / "pair"
    shutil.copytree(pair, out)
    return out


def _edit_manifest(folder: Path, **changes) -> None:
    path = folder / "quickdraft.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# -- the model: logits, cache, rollback -------------------------------------------------------


def test_logits_equal_pytorch_and_the_numpy_reference(loaded, hf_pair_dirs):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from quickdraft.reference.transformer import NumpyTransformer

    for role, model in (("target", loaded.target), ("draft", loaded.draft)):
        hf = AutoModelForCausalLM.from_pretrained(hf_pair_dirs[role]).eval()
        ref = NumpyTransformer.from_pretrained(hf_pair_dirs[role])
        for text in PROMPTS[:4]:
            ids = encode(loaded, text)
            with torch.no_grad():
                want = hf(torch.tensor([ids])).logits[0].numpy()  # [T, V]
            got = model.new_state().append(ids)  # [T, V]
            assert got.shape == want.shape == (len(ids), model.vocab_size)
            assert np.abs(got - want).max() < TOL, role
            ours = ref.new_state().append(ids)
            assert np.abs(got - ours).max() < TOL, role


def test_cached_steps_equal_one_full_forward(loaded):
    ids = encode(loaded, PROMPTS[3])
    full = loaded.target.new_state().append(ids)
    state = loaded.target.new_state()
    parts = [state.append(ids[:1]), state.append(ids[1:4]), state.append(ids[4:])]
    assert np.abs(np.concatenate(parts) - full).max() < TOL
    assert state.tokens == ids
    assert state.append([]).shape == (0, loaded.target.vocab_size)


def test_rewind_then_append_equals_a_fresh_forward(loaded):
    model = loaded.target
    ids = encode(loaded, PROMPTS[1])
    rng = np.random.default_rng(0)
    state = model.new_state()
    state.append(ids)
    for _ in range(10):
        # grow by a few random tokens, cut back somewhere, grow again: like draft + reject
        state.append(rng.integers(0, model.vocab_size, size=int(rng.integers(1, 6))).tolist())
        keep = int(rng.integers(0, len(state.tokens) + 1))
        state.rewind(keep)
        assert len(state.tokens) == keep
        assert all(c.shape()[2] == keep for c in state.cache)
        new = rng.integers(0, model.vocab_size, size=int(rng.integers(1, 5))).tolist()
        got = state.append(new)
        fresh = model.new_state().append(state.tokens)[-len(new):]
        assert np.abs(got - fresh).max() < TOL
    with pytest.raises(ValueError, match="cannot rewind"):
        state.rewind(len(state.tokens) + 1)


class _CheckedModel:
    """Wraps a model; after every rewind, checks the next logits against a fresh forward."""

    def __init__(self, model):
        self.model = model
        self.checked = 0

    vocab_size = property(lambda self: self.model.vocab_size)
    max_length = property(lambda self: self.model.max_length)

    def new_state(self):
        outer, inner = self, self.model.new_state()

        class State:
            rewound = False
            tokens = property(lambda s: inner.tokens)

            def rewind(s, length):
                s.rewound = s.rewound or length < len(inner.tokens)
                inner.rewind(length)

            def append(s, tokens):
                got = inner.append(tokens)
                if s.rewound:
                    fresh = outer.model.new_state().append(inner.tokens)[-len(tokens):]
                    assert np.abs(got - fresh).max() < TOL
                    outer.checked += 1
                    s.rewound = False
                return got

        return State()


@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(temperature=1.0)])
def test_rollback_inside_the_speculative_loop(loaded, sampling):
    """After each rejection, the next target (and draft) logits equal a fresh full forward."""
    target, draft = _CheckedModel(loaded.target), _CheckedModel(loaded.draft)
    res = speculative_generate(target, draft, encode(loaded, PROMPTS[0]), gamma=4,
                               max_new_tokens=40, sampling=sampling,
                               rng=np.random.default_rng(1))
    assert len(res.tokens) == 40
    assert min(res.stats.accepted_per_iteration) < 4  # there were rejections
    assert target.checked >= 5 and draft.checked >= 5


def test_cache_slicer_graph_is_valid_onnx_and_slices():
    onnx = pytest.importorskip("onnx")
    for elem, dtype in ((1, np.float32), (10, np.float16)):
        onnx.checker.check_model(onnx.load_from_string(slice_model_bytes(3, elem)),
                                 full_check=True)
        slicer = CacheSlicer(3, elem, Device("cpu"))
        xs = [np.random.default_rng(j).random((1, 2, 7, 4)).astype(dtype) for j in range(3)]
        for length in (1, 5, 7):
            out = slicer([ort.OrtValue.ortvalue_from_numpy(x) for x in xs], length)
            for o, x in zip(out, xs):
                np.testing.assert_array_equal(o.numpy(), x[:, :, :length])


def test_session_threads(pair):
    """The draft (on the CPU) and the helper graphs run one intra-op thread: their idle
    workers would otherwise spin on the cores the target's next call needs."""
    from quickdraft.ort_backend.device import session_options

    loaded = load_pair(pair, device="cpu")
    assert loaded.draft.options.intra_op_num_threads == 1
    assert loaded.target.options.intra_op_num_threads == 0  # ONNX Runtime's default
    for model in (loaded.target, loaded.draft):
        slicer_options = model._slicer.session.get_session_options()
        assert slicer_options.intra_op_num_threads == 1
    assert load_pair(pair, device="cpu",
                     draft_threads=None).draft.options.intra_op_num_threads == 0
    assert load_pair(pair, device="cpu",
                     draft_threads=2).draft.options.intra_op_num_threads == 2
    with pytest.raises(ValueError, match="threads"):
        load_pair(pair, device="cpu", draft_threads=0)
    with pytest.raises(ValueError, match="threads"):
        session_options(threads=1.5)


# -- generation -------------------------------------------------------------------------------


@pytest.mark.parametrize("which, prompts", [("pair", 3), ("close_pair", 8), ("self_pair", 3)])
def test_greedy_speculative_equals_greedy_autoregressive(which, prompts, request):
    p = load_pair(request.getfixturevalue(which), device="cpu")
    cfg = DecodeConfig(max_new_tokens=24, sampling=GREEDY)
    accepted = set()
    with p.generator(cfg) as auto:  # no gamma, no drafter: autoregressive
        wants = {text: auto.generate(text) for text in PROMPTS[:prompts]}
    for gamma in range(1, 7):
        with p.generator(cfg, gamma=gamma) as spec:  # one generator, reused for every prompt
            for text in PROMPTS[:prompts]:
                want = wants[text]
                assert len(want.tokens) == 24 and want.stats.mode == "autoregressive"
                got = spec.generate(text)
                assert got.stats.mode == "speculative"
                assert got.tokens == want.tokens, (text, gamma)
                assert got.text == want.text
                accepted.update(got.stats.generation.accepted_per_iteration)
    if which == "close_pair":
        assert {0, 1, 2} <= accepted  # partial acceptance was exercised
    if which == "self_pair":
        assert 0 not in accepted and 6 in accepted  # everything accepted: bonus tokens


def test_same_seed_same_output(loaded):
    cfg = DecodeConfig(max_new_tokens=30, sampling=SamplingConfig(temperature=1.0), seed=123)
    with loaded.generator(cfg, gamma=3) as g:
        a, b = g.generate(PROMPTS[0]), g.generate(PROMPTS[0])  # the same generator, reused
    with loaded.generator(cfg, gamma=3) as fresh:
        f = fresh.generate(PROMPTS[0])
    for other in (b, f):
        assert a.tokens == other.tokens and a.text == other.text
        assert (a.stats.generation.accepted_per_iteration
                == other.stats.generation.accepted_per_iteration)
    other_seed = DecodeConfig(max_new_tokens=30, sampling=SamplingConfig(temperature=1.0),
                              seed=124)
    with loaded.generator(other_seed, gamma=3) as g:
        c = g.generate(PROMPTS[0])
    assert c.tokens != a.tokens


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1.0),
                                      SamplingConfig(temperature=0.8, top_p=0.9)])
def test_sampled_first_token_follows_the_target(loaded, sampling):
    """First token of a speculative iteration (gamma 3) vs the exact target distribution.

    1000 seeded runs from one prefill (rewind to the prompt, one step). Chi-square goodness
    of fit at a false-alarm rate of 1e-3; the same test applied to draws from the draft's q
    must fail, so it has the power to see a sampler that ignores the target.
    """
    runs = 1000
    prompt = encode(loaded, PROMPTS[0])
    p = adjust_logits(loaded.target.new_state().append(prompt)[-1], sampling)  # [V] exact
    q = adjust_logits(loaded.draft.new_state().append(prompt)[-1], sampling)  # [V]
    counts = np.zeros_like(p)
    gen = loaded.generator(DecodeConfig(max_new_tokens=8, sampling=sampling, seed=2024),
                           gamma=3)
    gen.prefill(prompt)
    rejected_first = 0
    for _ in range(runs):
        gen.rewind(len(prompt))
        tokens = gen.step()
        counts[tokens[0]] += 1
        rejected_first += gen.stats.generation.accepted_per_iteration[-1] == 0
    gen.close()
    assert 0.1 * runs < rejected_first < 0.9 * runs  # accepted and recovered tokens both seen
    check_fit(counts, p, q, 1e-3, min_df=5)


def test_eos_stops_generation(loaded):
    cfg = DecodeConfig(max_new_tokens=20, sampling=GREEDY)
    with loaded.generator(cfg) as auto:
        base = auto.generate(PROMPTS[2])
    assert base.finish_reason == "length"
    stop = base.tokens[6]
    for drafter in (None, loaded.drafter(GREEDY, 4)):  # autoregressive, speculative
        with Generator(loaded.target, drafter, cfg, tokenizer=loaded.tokenizer,
                       eos_ids={stop}, max_draft=loaded.max_draft) as g:
            res = g.generate(PROMPTS[2])
            assert res.tokens == base.tokens[: base.tokens.index(stop) + 1]
            assert res.finish_reason == "eos" and g.done


def test_statistics_are_consistent(loaded):
    cfg = DecodeConfig(max_new_tokens=25, seed=0, sampling=SamplingConfig(temperature=1.0))
    with loaded.generator(cfg, gamma=4) as g:
        res = g.generate(PROMPTS[1])
    prompt_tokens = len(encode(loaded, PROMPTS[1]))
    s, g = res.stats, res.stats.generation
    assert s.mode == "speculative" and s.kv_cache == "dynamic" and s.verifier == "host"
    assert s.new_tokens == len(res.tokens) == 25 and s.prompt_tokens == prompt_tokens
    assert s.target.calls == g.target_calls == g.iterations  # one target call per iteration
    assert s.draft.calls == g.draft_calls
    # the prefill: one call per model, over the prompt less its last token
    assert s.target_prefill.calls == 1 and s.draft_prefill.calls == 1
    assert s.target_prefill.tokens == s.draft_prefill.tokens == prompt_tokens - 1
    assert s.target_calls == s.target.calls + 1 and s.draft_calls == s.draft.calls + 1  # prefill
    assert sum(g.accepted_per_iteration) + g.iterations >= 25  # the last may be cut short
    assert 0 <= g.alpha <= 1
    assert s.cost_ratio > 0 and s.decode_s >= s.target_s + s.draft_s
    d = res.as_dict()
    json.dumps(d, allow_nan=False)
    for key in ("alpha", "cost_ratio_c", "target_s", "draft_s", "verify_s", "target_calls",
                "draft_calls", "accepted_per_iteration", "tokens_per_s", "target",
                "target_prefill", "draft"):
        assert key in d["stats"]
    with loaded.generator(DecodeConfig(max_new_tokens=5, seed=0)) as auto:
        ar = auto.generate(PROMPTS[1])
    assert ar.stats.mode == "autoregressive" and ar.stats.verifier is None
    assert ar.stats.draft is None and ar.stats.draft_prefill is None
    assert ar.as_dict()["stats"]["cost_ratio_c"] is None
    assert ar.stats.target_calls == 1 + 5  # prefill of prompt[:-1], then one call per token
    assert ar.stats.target.calls == 5 and ar.stats.target.tokens == 5


def test_lifecycle_prefill_step_rewind(loaded):
    prompt = encode(loaded, PROMPTS[4])
    cfg = DecodeConfig(max_new_tokens=12, sampling=GREEDY)
    with loaded.generator(cfg, gamma=3) as gen:
        want = gen.generate(prompt).tokens
        assert gen.done
        assert gen.prefill(prompt) == prompt  # the same generator starts again
        assert not gen.done and gen.new_tokens == []
        # the caches keep the prefix they share with the new prompt: nothing to prefill
        assert gen.stats.target_prefill.tokens == gen.stats.draft_prefill.tokens == 0
        got = []
        while not gen.done:
            got += gen.step()
        assert got == want and gen.step() == []
        gen.rewind(len(prompt) + 4)  # drop 8 tokens and continue: greedy gives them again
        assert gen.new_tokens == want[:4] and not gen.done
        while not gen.done:
            gen.step()
        assert gen.new_tokens == want
        with pytest.raises(ValueError, match="cannot rewind"):
            gen.rewind(0)
    with loaded.generator(cfg, gamma=3) as fresh:
        fresh.prefill(prompt)  # the last prompt token is fed by step: the prefill the rest
        assert fresh.stats.target_prefill.tokens == len(prompt) - 1
        assert fresh.stats.draft_prefill.tokens == len(prompt) - 1
    with pytest.raises(RuntimeError, match="closed"):
        fresh.step()
    fresh.close()  # idempotent


def test_stream_decoder_pieces_join_to_the_decoded_text(loaded):
    tok = loaded.tokenizer
    rng = np.random.default_rng(0)
    context = tok.encode("héllo wörld ").ids
    for _ in range(50):  # random ids: byte tokens that split characters, specials included
        ids = rng.integers(0, tok.get_vocab_size(), size=30).tolist()
        for ctx in ([], context):
            dec = StreamDecoder(tok, ctx)
            pieces = [dec.push([t]) for t in ids] + [dec.flush()]
            whole = tok.decode(ctx + ids, skip_special_tokens=True)
            assert "".join(pieces) == whole[len(tok.decode(ctx, skip_special_tokens=True)):]
            # a piece never ends in a half character (only the final flush may)
            assert not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_stream_yields_the_generated_text(loaded):
    cfg = DecodeConfig(max_new_tokens=25, sampling=SamplingConfig(temperature=1.0), seed=5)
    with loaded.generator(cfg, gamma=3) as gen:
        pieces = list(gen.stream(PROMPTS[7]))
        streamed = gen.result
        assert streamed.text == "".join(pieces)
        assert streamed.tokens == gen.generate(PROMPTS[7]).tokens
        assert streamed.text == gen.decode(streamed.tokens)


# -- errors -----------------------------------------------------------------------------------


def test_missing_and_partial_folders(pair, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pair(tmp_path / "nowhere", device="cpu")
    half = tmp_path / "half"
    shutil.copytree(pair / "target", half / "target")
    with pytest.raises(FileNotFoundError, match="no draft folder"):
        load_pair(half, device="cpu")
    target_only = load_pair(half, device="cpu", draft=False)
    assert target_only.draft is None and target_only.max_draft is None
    with pytest.raises(FileNotFoundError, match="not a pair"):
        load_pair(half / "target", device="cpu")
    for missing, message in (("model.onnx", "incomplete"), ("tokenizer.json", "tokenizer.json"),
                             ("quickdraft.json", "not a quickdraft export")):
        broken = _copy(pair, tmp_path / missing)
        (broken / "draft" / missing).unlink()
        with pytest.raises(FileNotFoundError, match=message):
            load_pair(broken, device="cpu")
    corrupt = _copy(pair, tmp_path / "corrupt")
    (corrupt / "target" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(RuntimeError, match="could not load"):
        load_pair(corrupt, device="cpu")


@pytest.mark.parametrize("changes, message", [
    ({"input_names": ["input_ids", "attention_mask"]}, "input_names"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"num_layers": 3}, "num_layers"),
    ({"vocab_size": 100}, "vocab_size"),
    ({"dtype": "fp16"}, "dtype"),
    ({"has_position_ids": False}, "has_position_ids"),
    ({"kv_cache": "static"}, "static"),
])
def test_manifest_disagreeing_with_the_graph(pair, tmp_path, changes, message):
    broken = _copy(pair, tmp_path)
    _edit_manifest(broken / "target", **changes)
    with pytest.raises(ModelFolderError, match=message):
        OrtModel(broken / "target")


def test_vocabulary_mismatch(pair, tmp_path):
    broken = _copy(pair, tmp_path)
    path = broken / "draft" / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="tokenizer differs"):
        load_pair(broken, device="cpu")
    wider = _copy(pair, tmp_path / "wider")
    _edit_manifest(wider / "draft", vocab_size=1024)
    with pytest.raises(ValueError, match="vocab"):
        load_pair(wider, device="cpu")


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
def test_cuda_requested_but_unavailable(pair):
    with pytest.raises(CudaUnavailableError, match="CUDA was requested"):
        load_pair(pair, device="cuda")
    p = load_pair(pair, device="auto")
    assert str(p.device) == "cpu" and "running on the CPU" in p.device_note
    with p.generator(DecodeConfig(max_new_tokens=2), gamma=2) as g:
        assert g.generate(PROMPTS[0]).stats.device == "cpu"


def test_bad_requests(loaded, pair, tmp_path):
    gen = loaded.generator(DecodeConfig())
    with pytest.raises(ValueError, match="prompt is empty"):
        gen.generate("")
    with pytest.raises(ValueError, match="prompt is empty"):
        gen.generate([])
    long_prompt = "x = 1\n" * 200
    with pytest.raises(ValueError, match="no room to generate"):
        gen.generate(long_prompt)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        loaded.generator(DecodeConfig(max_new_tokens=255)).generate(PROMPTS[0])
    with pytest.raises(ValueError, match="token ids"):
        gen.generate([5, 10_000])
    with pytest.raises(TypeError, match="token ids must be integers"):
        gen.generate([5, 1.5])
    with pytest.raises(TypeError, match="bytes"):
        gen.generate(b"def main(")
    with pytest.raises(ValueError, match="nothing to rewind"):
        loaded.generator(DecodeConfig()).rewind(1)
    gen.close()
    # gamma belongs to the drafter now: DecodeConfig has no gamma (nor autoregressive) field
    for kwargs in (dict(gamma=3), dict(autoregressive=True)):
        with pytest.raises(TypeError):
            DecodeConfig(**kwargs)
    for gamma in (0, 1.5, -1):
        with pytest.raises(ValueError, match="gamma"):
            loaded.generator(DecodeConfig(), gamma=gamma)
    with pytest.raises(ValueError, match="--gamma 9 is more than the 8"):
        loaded.generator(DecodeConfig(), gamma=9)  # the target's steps: max_gamma 8
    with pytest.raises(ValueError, match="not both"):
        loaded.generator(DecodeConfig(), gamma=2, drafter=loaded.drafter(GREEDY, 2))
    with pytest.raises(ValueError, match="same settings"):  # q and p shaped alike
        loaded.generator(DecodeConfig(), drafter=loaded.drafter(SamplingConfig(0.7), 2))
    with loaded.generator(DecodeConfig(lenience=0.5, max_new_tokens=4)) as ar:  # AR: no rule
        assert not ar.generate("def f(").stats.lossy
    with loaded.generator(DecodeConfig(lenience=0.5, max_new_tokens=8, sampling=SamplingConfig(),
                                       seed=0), gamma=2) as lossy:
        stats = lossy.generate("def f(").stats
        assert stats.lossy and stats.as_dict()["lossy"] and stats.verifier == "host"
    with pytest.raises(ValueError, match="verify must be one of"):
        loaded.generator(DecodeConfig(), gamma=2, verify="gpu")
    with pytest.raises(TypeError, match="DecodeConfig"):
        Generator(loaded.target, None, {"max_new_tokens": 4})
    for kwargs in (dict(max_new_tokens=0), dict(max_new_tokens=2.5), dict(seed=-1),
                   dict(seed=1.5), dict(lenience=0.0), dict(lenience=1.5)):
        with pytest.raises(ValueError):
            DecodeConfig(**kwargs)
    with pytest.raises(TypeError, match="SamplingConfig"):
        DecodeConfig(sampling={"temperature": 1.0})
    for kwargs in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingConfig(**kwargs)
    with pytest.raises(ValueError, match="max_gamma"):
        load_pair(pair, device="cpu", max_gamma=0)
    # a pair loaded without its draft model decodes autoregressively, and refuses a gamma
    half = tmp_path / "half"
    shutil.copytree(pair / "target", half / "target")
    target_only = load_pair(half, device="cpu", draft=False)
    with pytest.raises(ValueError, match="without its draft model"):
        target_only.generator(DecodeConfig(), gamma=2)
    with pytest.raises(ValueError, match="without its draft model"):
        target_only.drafter(GREEDY, 2)
    cfg = DecodeConfig(max_new_tokens=6)
    with target_only.generator(cfg) as alone, loaded.generator(cfg) as both:
        assert alone.generate(PROMPTS[0]).tokens == both.generate(PROMPTS[0]).tokens


# -- CLI --------------------------------------------------------------------------------------


def _cli(capsys, *args):
    rc = cli_main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_json_and_stream(pair, capsys):
    base = ["--model-dir", pair, "--prompt", "def main(", "--max-new-tokens", 12,
            "--device", "cpu"]
    rc, out, err = _cli(capsys, *base, "--json", "--gamma", 3)
    assert rc == 0
    res = json.loads(out)
    assert len(res["tokens"]) == 12 and res["stats"]["mode"] == "speculative"
    assert res["stats"]["gamma"] == 3 and res["stats"]["target_calls"] >= 1
    rc, out_ar, _ = _cli(capsys, *base, "--json", "--autoregressive")
    assert rc == 0 and json.loads(out_ar)["tokens"] == res["tokens"]  # greedy: the same
    rc, out, err = _cli(capsys, *base, "--stream")
    assert rc == 0 and out == res["text"] + "\n"
    assert "speculative on cpu" in err and "tok/s" in err
    rc, out, _ = _cli(capsys, *base, "--stream", "--json", "--temperature", 0.9, "--top-k", 20,
                      "--seed", 3)
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[-1]["done"] is True
    assert sum((line["tokens"] for line in lines[:-1]), []) == lines[-1]["tokens"]
    assert "".join(line["text"] for line in lines[:-1]) == lines[-1]["text"]


def test_cli_gamma_is_a_count_or_auto(pair, capsys):
    for bad in ("0", "1.5", "many"):
        with pytest.raises(SystemExit) as e:
            _cli(capsys, "--model-dir", pair, "--prompt", "x", "--gamma", bad)
        assert e.value.code == 2 and "--gamma" in capsys.readouterr().err
    rc, out, err = _cli(capsys, "--model-dir", pair, "--prompt", "def f(", "--device", "cpu",
                        "--gamma", "auto", "--max-new-tokens", 8, "--json")
    assert rc == 0 and len(json.loads(out)["tokens"]) == 8


@pytest.mark.parametrize("args, message", [
    (["--temperature", -1], "temperature"),
    (["--top-p", 2], "top_p"),
    (["--max-new-tokens", 0], "max_new_tokens"),
])
def test_cli_bad_values(pair, capsys, args, message):
    rc, out, err = _cli(capsys, "--model-dir", pair, "--prompt", "x", "--device", "cpu", *args)
    assert rc == 1 and message in err and out == ""


def test_cli_errors(pair, tmp_path, capsys):
    rc, _, err = _cli(capsys, "--model-dir", tmp_path / "nope", "--prompt", "x")
    assert rc == 1 and "does not exist" in err
    rc, _, err = _cli(capsys, "--model-dir", pair, "--prompt", "")
    assert rc == 1 and "prompt is empty" in err
    if not HAS_CUDA:
        rc, _, err = _cli(capsys, "--model-dir", pair, "--prompt", "x", "--device", "cuda")
        assert rc == 1 and "CUDA was requested" in err
        rc, out, err = _cli(capsys, "--model-dir", pair, "--prompt", "x", "--device", "auto",
                            "--max-new-tokens", 3)
        assert rc == 0 and "running on the CPU" in err
