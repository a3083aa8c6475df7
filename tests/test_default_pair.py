"""The bundled default pair (quickdraft/models/default): its files agree with their manifests
and with each other, and greedy speculative decoding on it equals greedy autoregressive.

The pair is made by scripts/train_default_pair.py; MODEL_CARD.md beside it says how.
"""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files
from pathlib import Path

import pytest

from quickdraft.manifest import MANIFEST_NAME, load_manifest

ROOT = Path(str(files("quickdraft") / "models" / "default"))
ROLES = ("target", "draft")
SIZE_BUDGET = 30_000_000  # bytes: everything shipped in the folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PROMPTS = [
    "def quicksort(arr):",
    "import os\n\ndef main(",
    "class Stack:\n    def __init__(self):\n        self.",
    'def read_config(path):\n    """Read',
]


def _shipped() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def training() -> dict:
    return json.loads((ROOT / "training.json").read_text())


def test_files_present():
    assert ROOT.is_dir(), f"{ROOT} is missing: run scripts/train_default_pair.py --export-only"
    for name in ("MODEL_CARD.md", "training.json"):
        assert (ROOT / name).is_file(), name
    for source in json.loads((ROOT / "training.json").read_text())["corpus"]["sources"]:
        assert (ROOT / "LICENSES" / f"LICENSE-{source['name']}").is_file(), source["name"]
    for role in ROLES:
        folder = ROOT / role
        m = load_manifest(folder)
        needed = [MANIFEST_NAME, m.model_file, *TOKENIZER_FILES,
                  *m.external_data]
        for name in needed:
            assert (folder / name).is_file(), f"{role}/{name}"


def test_size_budget():
    total = sum(p.stat().st_size for p in _shipped())
    assert total <= SIZE_BUDGET, f"{total / 1e6:.2f} MB shipped, budget {SIZE_BUDGET / 1e6} MB"


@pytest.mark.parametrize("role", ROLES)
def test_manifest_matches_graph(role):
    onnx = pytest.importorskip("onnx")
    folder = ROOT / role
    m = load_manifest(folder)
    graph = onnx.load(str(folder / m.model_file), load_external_data=False).graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    assert [i.name for i in graph.input] == m.input_names
    assert [o.name for o in graph.output] == m.output_names
    assert m.has_position_ids == ("position_ids" in inputs)
    assert m.has_attention_mask == ("attention_mask" in inputs)
    assert "input_ids" in inputs and "logits" in outputs

    def dims(value_info) -> list:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param
                for d in value_info.type.tensor_type.shape.dim]

    float_type = {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16,
                  "bf16": onnx.TensorProto.BFLOAT16}[m.dtype]
    logits = dims(outputs["logits"])
    assert len(logits) == 3 and logits[-1] == m.vocab_size
    assert outputs["logits"].type.tensor_type.elem_type == float_type
    kv_names = []
    for i in range(m.num_layers):
        for name in (m.past_key_template.format(i=i), m.past_value_template.format(i=i)):
            assert name in inputs, name
            kv_names.append(name)
            shape = dims(inputs[name])  # bnsh: [batch, kv heads, past length, head dim]
            assert m.kv_layout == "bnsh" and len(shape) == 4
            assert shape[1] == m.num_kv_heads and shape[3] in (m.head_dim, "kv_cache_dim")
            assert inputs[name].type.tensor_type.elem_type == float_type
        for name in (m.present_key_template.format(i=i), m.present_value_template.format(i=i)):
            assert name in outputs, name
            shape = dims(outputs[name])  # the static builder's head dim is symbolic
            assert shape[1] == m.num_kv_heads and shape[3] in (m.head_dim, "kv_cache_dim")
    # no KV inputs beyond the manifest's layers
    assert len([n for n in inputs if n.startswith("past")]) == len(kv_names) == 2 * m.num_layers


@pytest.mark.parametrize("role", ROLES)
def test_manifest_matches_the_trained_shape(role, training):
    m = load_manifest(ROOT / role)
    shape = training["models"][role]["shape"]
    assert m.architecture == "llama"
    assert m.num_layers == shape["num_hidden_layers"]
    assert m.num_attention_heads == shape["num_attention_heads"]
    assert m.num_kv_heads == shape["num_key_value_heads"]
    assert m.hidden_size == shape["hidden_size"] == m.num_attention_heads * m.head_dim
    assert m.vocab_size == training["tokenizer"]["vocab_size"]
    assert m.max_length == training["args"]["ctx"]
    assert m.dtype == "fp32"


@pytest.mark.parametrize("role", ROLES)
def test_vocabulary_size_is_tokenizer_size(role):
    tokenizers = pytest.importorskip("tokenizers")
    folder = ROOT / role
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == load_manifest(folder).vocab_size
    eos = load_manifest(folder).eos_token_id
    assert tok.id_to_token(eos) == "<|endoftext|>"


def test_one_shared_tokenizer(training):
    for name in TOKENIZER_FILES:
        assert (ROOT / "target" / name).read_bytes() == (ROOT / "draft" / name).read_bytes(), name
    digest = hashlib.sha256((ROOT / "target" / "tokenizer.json").read_bytes()).hexdigest()
    assert digest == training["tokenizer"]["tokenizer_json_sha256"]
    t, d = (load_manifest(ROOT / r) for r in ROLES)
    assert (t.vocab_size, t.bos_token_id, t.eos_token_id) == (d.vocab_size, d.bos_token_id,
                                                             d.eos_token_id)


def test_training_record_matches_the_files(training):
    """training.json and MODEL_CARD.md were written for exactly these files."""
    for name, size in training["export"]["files"].items():
        assert (ROOT / name).stat().st_size == size, name
    card = (ROOT / "MODEL_CARD.md").read_text()
    heldout = training["heldout"]
    for key in ("alpha_T0", "alpha_T1"):
        assert 0.0 < heldout[key] < 1.0
        assert f"**{heldout[key]:.3f}**" in card, key
    for role in ROLES:
        assert f"{training['models'][role]['parameters']:,}" in card
    words = " ".join(card.split())
    assert "PSF License Agreement" in words
    for source in training["corpus"]["sources"]:
        assert f"| {source['name']} | {source['version']} |" in card
    assert training["command"] in card


@pytest.mark.parametrize("role", ROLES)
def test_weights_are_stored_as_int8(role):
    onnx = pytest.importorskip("onnx")
    folder = ROOT / role
    m = load_manifest(folder)
    assert (m.dtype, m.weights, m.kv_cache, m.external_data) == ("fp32", "int8", "static", [])
    graph = onnx.load(str(folder / m.model_file)).graph
    stored = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    dequantized = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(stored) == len(dequantized) >= m.num_layers
    big_fp32 = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT
                and len(i.dims) == 2 and i.dims[0] * i.dims[1] >= 65536]
    assert not big_fp32, big_fp32


def test_greedy_speculative_equals_greedy_autoregressive():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tokenizers")
    from quickdraft.ort_backend import DecodeConfig, load_pair
    from quickdraft.sampling import SamplingConfig

    greedy = SamplingConfig(temperature=0)
    config = DecodeConfig(max_new_tokens=40, sampling=greedy)
    pair = load_pair(ROOT, device="cpu")
    accepted = set()
    with pair.generator(config) as auto:
        wants = {text: auto.generate(text) for text in PROMPTS}
    for gamma in (1, 2, 3, 5):
        with pair.generator(config, gamma=gamma) as spec:  # reused for every prompt
            for text in PROMPTS:
                want = wants[text]
                assert len(want.tokens) >= 1
                assert want.stats.mode == "autoregressive"
                got = spec.generate(text)
                assert got.stats.mode == "speculative"
                assert got.tokens == want.tokens, (text, gamma)
                assert got.text == want.text
                accepted.update(got.stats.generation.accepted_per_iteration)
    assert 0 in accepted and max(accepted) >= 2  # rejections and multi-token acceptances
