"""The NumPy transformer against PyTorch on tiny random Hugging Face models, its KV cache,
its safetensors reader, and greedy speculative decoding on top of it.

Models are built locally (a BPE tokenizer trained on standard-library text and random
weights, ``quickdraft.export.toy``) once per module. Tests that need torch skip without it;
the reader and error tests need only NumPy.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from quickdraft.generation import autoregressive_generate, speculative_generate
from quickdraft.protocols import DecodeState, LanguageModel
from quickdraft.reference.safetensors_np import (
    SafetensorsError,
    checkpoint_files,
    load_checkpoint,
    load_safetensors,
    read_header,
)
from quickdraft.reference.transformer import (
    NumpyTransformer,
    TransformerConfig,
    causal_mask,
    rope,
    rope_cos_sin,
)
from quickdraft.sampling import SamplingConfig

ARCHS = ["llama", "qwen2", "gpt2"]
ROLES = ["target", "draft"]
TOL = 1e-4  # max |numpy - torch| on fp32 logits
GREEDY = SamplingConfig(temperature=0)

PROMPT_TEXTS = [
    "def main(argv):\n    return 0",
    "import os\nclass Path:",
    "x",
]


# ---------------------------------------------------------------------------------------
# Fixtures: one tokenizer and six tiny models per module
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """{'tokenizer': tok, 'dir': root, (arch, role): folder} for llama/qwen2/gpt2 x target/draft."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from quickdraft.export.toy import make_random_model, stdlib_text, train_tokenizer

    root = tmp_path_factory.mktemp("numpy_transformer_zoo")
    tok = train_tokenizer(root / "tok", vocab_size=512, text=stdlib_text(60_000))
    out = {"tokenizer": tok, "dir": root}
    for i, arch in enumerate(ARCHS):
        for j, role in enumerate(ROLES):
            folder = root / f"{arch}-{role}"
            make_random_model(arch, folder, root / "tok", role=role, seed=10 * i + j)
            out[arch, role] = folder
    return out


@pytest.fixture(scope="module")
def prompts(zoo):
    """A few prompts: encoded text of different lengths, plus a longer random one."""
    tok = zoo["tokenizer"]
    ps = [tok.encode(t) for t in PROMPT_TEXTS]
    ps.append(np.random.default_rng(0).integers(0, len(tok), 70).tolist())
    return ps


def torch_logits(folder, ids, dtype="float32"):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()  # [T, V]


def torch_greedy(folder, ids, steps):
    """Greedy tokens by full forward passes in torch, and the smallest top-2 logit margin."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seq, margin = list(ids), np.inf
    with torch.no_grad():
        for _ in range(steps):
            z = model(torch.tensor([seq])).logits[0, -1].numpy()  # [V]
            top2 = np.sort(z)[-2:]
            margin = min(margin, float(top2[1] - top2[0]))
            seq.append(int(np.argmax(z)))
    return seq[len(ids):], margin


def min_top2_margin(model: NumpyTransformer, ids) -> float:
    z = np.sort(model.logits(ids), axis=-1)  # [T, V]
    return float(np.min(z[:, -1] - z[:, -2]))


# ---------------------------------------------------------------------------------------
# Against PyTorch
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_torch(zoo, prompts, arch, role):
    folder = zoo[arch, role]
    model = NumpyTransformer.from_pretrained(folder)
    assert isinstance(model, LanguageModel)
    assert model.vocab_size == len(zoo["tokenizer"]) and model.max_length == 256
    for ids in prompts:
        got = model.logits(ids)  # [T, V]
        want = torch_logits(folder, ids)
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() < TOL, (arch, role, len(ids))
        # the random weights are scaled so logits are far from uniform
        assert np.abs(want).max() > 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_torch(zoo, prompts, arch):
    folder = zoo[arch, "target"]
    model = NumpyTransformer.from_pretrained(folder)
    for ids in prompts[:2]:
        want, margin = torch_greedy(folder, ids, 20)
        # Honest comparison: argmax is only comparable where the top-2 gap exceeds the
        # numerical tolerance. The seeds here give gaps far above it.
        assert margin > 10 * TOL, f"near-tie ({margin:.2e}) in torch's greedy run; change seed"
        got = autoregressive_generate(model, ids, max_new_tokens=20, sampling=GREEDY,
                                      rng=np.random.default_rng(0)).tokens
        assert got == want


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_float64_option(zoo, prompts, arch):
    folder = zoo[arch, "target"]
    m32 = NumpyTransformer.from_pretrained(folder)
    m64 = NumpyTransformer.from_pretrained(folder, dtype=np.float64)
    ids = prompts[0]
    z64 = m64.logits(ids)
    assert z64.dtype == np.float64
    assert np.abs(z64 - m32.logits(ids)).max() < TOL
    # HF builds its rotary cos/sin tables in float32 even for a float64 model, so only
    # GPT-2 (learned positions) agrees with torch's float64 to float64 precision.
    tight = 1e-9 if arch == "gpt2" else 1e-5
    assert np.abs(z64 - torch_logits(folder, ids, "float64")).max() < tight
    with pytest.raises(ValueError, match="float32 or float64"):
        NumpyTransformer.from_pretrained(folder, dtype=np.float16)


def test_bf16_checkpoint_loads(zoo, prompts, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    src = zoo["qwen2", "draft"]
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp_path)
    header, _ = read_header(tmp_path / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    model = NumpyTransformer.from_pretrained(tmp_path)
    ids = prompts[0]
    # torch upcasts the same bf16 values to fp32 exactly, so the models agree as in fp32
    assert np.abs(model.logits(ids) - torch_logits(tmp_path, ids)).max() < TOL
    # and the bf16 -> fp32 widening is exact
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    w = ref.model.embed_tokens.weight.detach().numpy()
    assert np.array_equal(model.params["embed"], w)


def test_sharded_checkpoint_loads(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    src = zoo["llama", "draft"]
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    files = checkpoint_files(tmp_path)
    assert len(set(files.values())) > 1
    sharded, single = load_checkpoint(tmp_path), load_checkpoint(src)
    assert sharded.keys() == single.keys()
    assert all(np.array_equal(sharded[k], single[k]) for k in single)
    ids = [5, 6, 7, 8]
    a = NumpyTransformer.from_pretrained(tmp_path).logits(ids)
    assert np.array_equal(a, NumpyTransformer.from_pretrained(src).logits(ids))
    # a missing shard is named
    next(iter(set(files.values()))).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        NumpyTransformer.from_pretrained(tmp_path)


def test_tied_embeddings_and_sliding_window(tmp_path):
    """Qwen2 with tied embeddings; Mistral with a sliding window shorter than the prompt."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(vocab_size=512, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128)
    torch.manual_seed(3)
    qwen = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **small))
    mistral = MistralForCausalLM(MistralConfig(sliding_window=8, **small))
    ids = np.random.default_rng(1).integers(0, 512, 30).tolist()
    for name, hf in [("qwen-tied", qwen), ("mistral-swa", mistral)]:
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() >= 2:
                    p.mul_(4.0)
        folder = tmp_path / name
        hf.eval().save_pretrained(folder)
        model = NumpyTransformer.from_pretrained(folder)
        assert np.abs(model.logits(ids) - torch_logits(folder, ids)).max() < TOL, name
    cfg = NumpyTransformer.from_pretrained(tmp_path / "mistral-swa").config
    assert cfg.sliding_windows == (8, 8)
    assert "lm_head.weight" not in load_checkpoint(tmp_path / "qwen-tied")


# ---------------------------------------------------------------------------------------
# The KV cache
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_append_and_rewind_match_full_forward(zoo, arch):
    model = NumpyTransformer.from_pretrained(zoo[arch, "target"])
    rng = np.random.default_rng(7)
    seq = rng.integers(0, model.vocab_size, 40).tolist()
    full = model.logits(seq)  # [40, V]
    state = model.new_state()
    assert isinstance(state, DecodeState)
    pieces, at = [1, 3, 1, 7, 12, 16], 0
    rows = []
    for k in pieces:
        rows.append(state.append(seq[at : at + k]))
        at += k
    assert state.tokens == seq
    assert np.abs(np.concatenate(rows) - full).max() < 1e-5

    # rewind into the middle, continue with other tokens, compare with a fresh forward
    state.rewind(17)
    assert state.tokens == seq[:17]
    other = rng.integers(0, model.vocab_size, 9).tolist()
    got = np.concatenate([state.append(other[:4]), state.append(other[4:])])
    assert np.abs(got - model.logits(seq[:17] + other)[17:]).max() < 1e-5
    # growing past the old length after a rewind (the cache buffers are reused)
    more = rng.integers(0, model.vocab_size, 30).tolist()
    got = state.append(more)
    assert np.abs(got - model.logits(seq[:17] + other + more)[26:]).max() < 1e-5

    state.rewind(0)
    assert state.tokens == [] and state.append([]).shape == (0, model.vocab_size)
    assert np.abs(state.append(seq[:5]) - full[:5]).max() < 1e-5
    with pytest.raises(ValueError, match="rewind"):
        state.rewind(6)


def test_context_and_token_limits(zoo):
    model = NumpyTransformer.from_pretrained(zoo["gpt2", "draft"])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.logits([1] * 257)
    state = model.new_state()
    state.append([1] * 250)
    with pytest.raises(ValueError, match="context of 256"):
        state.append([1] * 7)
    assert len(state.tokens) == 250  # a refused append changes nothing
    with pytest.raises(ValueError, match="context"):
        autoregressive_generate(model, [1] * 250, max_new_tokens=10, sampling=GREEDY,
                                rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="token ids"):
        model.logits([model.vocab_size])


# ---------------------------------------------------------------------------------------
# Speculative decoding on NumPy transformers
# ---------------------------------------------------------------------------------------


def perturbed_copy(model_dir, noise: float, seed: int = 0) -> NumpyTransformer:
    """The model at ``model_dir`` with every weight jittered by ``noise`` of its spread: a
    draft that agrees with its target often but not always."""
    target = NumpyTransformer.from_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    tensors = {k: v + noise * v.std() * rng.standard_normal(v.shape).astype(v.dtype)
               for k, v in load_checkpoint(model_dir).items()}
    return NumpyTransformer(target.config, tensors)


def drafted_per_iteration(stats, gamma: int, n: int) -> list[int]:
    """How many tokens each iteration drafted (generation shrinks gamma near the end)."""
    out, produced = [], 0
    for a in stats.accepted_per_iteration:
        remaining = n - produced
        out.append(max(1, min(gamma, remaining - 1)))
        produced += min(a + 1, remaining)
    return out


@pytest.mark.parametrize(
    "target_arch,draft,noise",
    [("llama", "llama", None), ("qwen2", "gpt2", None), ("llama", "jitter", 0.05),
     ("qwen2", "jitter", 0.05), ("gpt2", "jitter", 0.15)],
)
def test_greedy_speculative_equals_target_greedy(zoo, prompts, target_arch, draft, noise):
    """Unrelated random drafts are almost always rejected; a jittered copy of the target
    is accepted part of the time. Either way the output is the target's greedy output."""
    target = NumpyTransformer.from_pretrained(zoo[target_arch, "target"])
    if draft == "jitter":
        draft_model = perturbed_copy(zoo[target_arch, "target"], noise)
    else:
        draft_model = NumpyTransformer.from_pretrained(zoo[draft, "draft"])
    ids, n = prompts[0], 24
    want = autoregressive_generate(target, ids, max_new_tokens=n, sampling=GREEDY,
                                   rng=np.random.default_rng(0)).tokens
    # Speculation scores blocks of gamma + 1 tokens where autoregression scores one at a
    # time; fp32 rounding then differs slightly, so check no argmax is a near-tie.
    assert min_top2_margin(target, ids + want[:-1]) > 10 * TOL
    accepted = rejected = 0
    for gamma in (1, 2, 3, 5, 8):
        res = speculative_generate(target, draft_model, ids, gamma=gamma, max_new_tokens=n,
                                   sampling=GREEDY, rng=np.random.default_rng(gamma))
        assert res.tokens == want, gamma
        st = res.stats
        assert st.new_tokens == n and st.target_calls == st.iterations <= n
        assert sum(st.accepted_per_iteration) + st.iterations >= n
        accepted += sum(st.accepted_per_iteration)
        rejected += sum(a < g for a, g in zip(st.accepted_per_iteration,
                                                drafted_per_iteration(st, gamma, n)))
    if draft == "jitter":  # both paths of the rule were taken, with rewinds in both models
        assert accepted >= 10 and rejected >= 3


def test_greedy_speculative_with_itself_as_draft_accepts_everything(zoo, prompts):
    target = NumpyTransformer.from_pretrained(zoo["llama", "target"])
    res = speculative_generate(target, target, prompts[1], gamma=4, max_new_tokens=16,
                               sampling=GREEDY, rng=np.random.default_rng(0))
    # 5 + 5 + 5 tokens, then the last token is one target step (nothing left to draft)
    assert res.stats.accepted_per_iteration == [4, 4, 4, 0]
    assert res.stats.drafted_per_iteration == [4, 4, 4, 0]
    assert res.stats.target_calls == 4
    assert all(b == 1.0 for b in res.stats.beta_per_position)


# ---------------------------------------------------------------------------------------
# Errors and refusals (NumPy only)
# ---------------------------------------------------------------------------------------


def _llama_config(**over):
    cfg = dict(model_type="llama", vocab_size=10, hidden_size=8, num_attention_heads=2,
               num_key_value_heads=1, intermediate_size=16, num_hidden_layers=1,
               max_position_embeddings=32, rms_norm_eps=1e-6, rope_theta=10000.0,
               hidden_act="silu", tie_word_embeddings=True)
    cfg.update(over)
    return cfg


def test_unsupported_model_type_and_rope_scaling(tmp_path):
    with pytest.raises(ValueError, match="model_type 't5'.*llama.*qwen2.*gpt2"):
        TransformerConfig.from_hf({"model_type": "t5"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    with pytest.raises(ValueError, match="unsupported model_type 'falcon'"):
        NumpyTransformer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rope_scaling.*supports only"):
        TransformerConfig.from_hf(_llama_config(
            rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    with pytest.raises(ValueError, match="rope_scaling"):
        TransformerConfig.from_hf(_llama_config(rope_scaling={"type": "linear", "factor": 2.0}))
    ok = TransformerConfig.from_hf(_llama_config(rope_scaling={"rope_type": "default"}))
    assert ok.head_dim == 4 and ok.num_kv_heads == 1


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        NumpyTransformer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        NumpyTransformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_llama_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no safetensors weights.*pytorch_model.bin"):
        NumpyTransformer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors file not found"):
        load_safetensors(tmp_path / "model.safetensors")


def test_missing_tensor_and_wrong_shape():
    cfg = TransformerConfig.from_hf(_llama_config())
    rng = np.random.default_rng(0)
    tensors = _random_llama_tensors(rng)
    NumpyTransformer(cfg, tensors)  # complete: builds
    broken = dict(tensors)
    del broken["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="lacks tensor 'model.layers.0.mlp.up_proj.weight'"):
        NumpyTransformer(cfg, broken)
    broken = dict(tensors, **{"model.norm.weight": np.ones(9, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        NumpyTransformer(cfg, broken)


def _random_llama_tensors(rng):
    shapes = {
        "model.embed_tokens.weight": (10, 8),
        "model.norm.weight": (8,),
        "model.layers.0.input_layernorm.weight": (8,),
        "model.layers.0.post_attention_layernorm.weight": (8,),
        "model.layers.0.self_attn.q_proj.weight": (8, 8),
        "model.layers.0.self_attn.k_proj.weight": (4, 8),
        "model.layers.0.self_attn.v_proj.weight": (4, 8),
        "model.layers.0.self_attn.o_proj.weight": (8, 8),
        "model.layers.0.mlp.gate_proj.weight": (16, 8),
        "model.layers.0.mlp.up_proj.weight": (16, 8),
        "model.layers.0.mlp.down_proj.weight": (8, 16),
    }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def test_numpy_only_model_runs_and_caches(tmp_path):
    """A hand-written checkpoint (no torch): save with the test writer, load, decode."""
    rng = np.random.default_rng(1)
    tensors = _random_llama_tensors(rng)
    _write_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text(json.dumps(_llama_config()))
    model = NumpyTransformer.from_pretrained(tmp_path)
    seq = rng.integers(0, 10, 20).tolist()
    state = model.new_state()
    got = np.concatenate([state.append(seq[:7]), state.append(seq[7:])])
    assert np.abs(got - model.logits(seq)).max() < 1e-5


# ---------------------------------------------------------------------------------------
# The safetensors reader
# ---------------------------------------------------------------------------------------


def _write_safetensors(path, tensors: dict[str, np.ndarray], raw_dtypes: dict | None = None):
    """A minimal writer: {name: array}; raw_dtypes overrides the dtype tag (e.g. BF16)."""
    names = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16",
             np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("u1"): "U8",
             np.dtype("?"): "BOOL", np.dtype("<u2"): "U16"}
    header, blobs, offset = {"__metadata__": {"format": "np"}}, [], 0
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        blob = arr.astype(arr.dtype.newbyteorder("<")).tobytes()  # C order
        tag = (raw_dtypes or {}).get(name, names[arr.dtype.newbyteorder("<")])
        header[name] = {"dtype": tag, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_safetensors_roundtrip_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f64": rng.standard_normal((3, 4)),
        "f32": rng.standard_normal((2, 3, 2)).astype(np.float32),
        "f16": rng.standard_normal(5).astype(np.float16),
        "i64": rng.integers(-5, 5, (4,)),
        "i32": rng.integers(-5, 5, (2, 2)).astype(np.int32),
        "u8": rng.integers(0, 255, 6).astype(np.uint8),
        "bool": rng.random(3) < 0.5,
        "scalar": np.float32(2.5).reshape(()),
        "empty": np.zeros((0, 3), np.float32),
    }
    _write_safetensors(tmp_path / "a.safetensors", tensors)
    got = load_safetensors(tmp_path / "a.safetensors")
    assert got.keys() == tensors.keys()
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k], v)
    assert load_safetensors(tmp_path / "a.safetensors", ["f16"]).keys() == {"f16"}
    with pytest.raises(KeyError, match="nope"):
        load_safetensors(tmp_path / "a.safetensors", ["nope"])


def test_safetensors_bf16_widening(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 1e-3, -0.0, np.inf], dtype=np.float32)
    top = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bf16 bit patterns
    _write_safetensors(tmp_path / "b.safetensors", {"w": top}, raw_dtypes={"w": "BF16"})
    got = load_safetensors(tmp_path / "b.safetensors")["w"]
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), top.astype(np.uint32) << 16)
    assert np.array_equal(got[:3], values[:3])  # exactly representable in bf16


def test_safetensors_matches_the_reference_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    import torch

    t = {"a": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.randn(4, dtype=torch.float16),
         "c": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    st.save_file(t, tmp_path / "r.safetensors")
    got = load_safetensors(tmp_path / "r.safetensors")
    for k, v in t.items():
        want = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        assert got[k].dtype == want.dtype and np.array_equal(got[k], want)


def test_safetensors_malformed(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match="too short"):
        load_safetensors(p)
    p.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(SafetensorsError, match="header length"):
        load_safetensors(p)
    p.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(SafetensorsError, match="not valid JSON"):
        load_safetensors(p)
    head = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    p.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 8)
    with pytest.raises(SafetensorsError, match="data offsets"):
        load_safetensors(p)
    head = json.dumps({"x": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}).encode()
    p.write_bytes(struct.pack("<Q", len(head)) + head + b"\0")
    with pytest.raises(SafetensorsError, match="F8_E4M3.*supported: F64"):
        load_safetensors(p)


def test_sharded_index_by_hand(tmp_path):
    rng = np.random.default_rng(2)
    a = {"x": rng.standard_normal(3).astype(np.float32)}
    b = {"y": rng.standard_normal((2, 2)).astype(np.float32)}
    _write_safetensors(tmp_path / "model-00001-of-00002.safetensors", a)
    _write_safetensors(tmp_path / "model-00002-of-00002.safetensors", b)
    index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                                            "y": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    got = load_checkpoint(tmp_path)
    assert np.array_equal(got["x"], a["x"]) and np.array_equal(got["y"], b["y"])
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        load_checkpoint(tmp_path / "absent")


# ---------------------------------------------------------------------------------------
# The small functions
# ---------------------------------------------------------------------------------------


def test_rope_is_a_rotation_and_relative():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 8))  # [H, T, Dh]
    k = rng.standard_normal((1, 1, 8))
    # norms are kept
    cos, sin = rope_cos_sin(np.array([5]), 8, 10000.0, np.float64)
    assert np.isclose(np.linalg.norm(rope(q, cos, sin)), np.linalg.norm(q))

    # q . k depends only on the position difference
    def score(i, j):
        ci, si = rope_cos_sin(np.array([i]), 8, 10000.0, np.float64)
        cj, sj = rope_cos_sin(np.array([j]), 8, 10000.0, np.float64)
        return float((rope(q, ci, si) * rope(k, cj, sj)).sum())

    assert np.isclose(score(7, 3), score(14, 10)) and np.isclose(score(0, 0), score(9, 9))


def test_causal_mask_with_window():
    m = causal_mask(np.array([2, 3]), 4)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    w = causal_mask(np.array([3]), 4, window=2)
    assert w.tolist() == [[False, False, True, True]]
