"""Random-weight Llama pairs for the scale sweep, their tokenizer and the prompts.

A pair lives in ``WORK/pairs/NAME/``:

    hf/target, hf/draft     Hugging Face folders (config, safetensors, tokenizer)
    prompts.json            the prompts (token ids) every system runs
    pair.json               shapes, parameter counts and weight bytes

The weights are random (fp16, built directly on the GPU), with a structure that gives
greedy decoding wide margins and a known acceptance rate (:func:`structure_weights`):

* embeddings N(0, 1), every layer's o_proj and down_proj scaled by 0.01, so the residual
  stream is the current token's embedding plus a little: the model is a bigram in effect;
* the LM head maps token x to pi(x), a random permutation of the non-special tokens
  (row pi(x) = 10 / d * E[x]): the argmax logit is ~10 against ~N(0, 10 / sqrt(d))
  for the others, so fp16 rounding or a different kernel for gamma + 1 tokens cannot flip
  a greedy choice (near-ties, common with plain random init, would make greedy
  speculative output differ from greedy autoregressive output by numerics alone);
* the draft maps x to pi(x) for a fraction ``agreement`` of the tokens (to another token
  otherwise), so every system's own speculative decoding sees alpha ~ ``agreement``.

The shapes, and so every cost, are those of the named Llama models.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import dump_json, load_json, log

# Llama shapes. intermediate_size follows the originals (TinyLlama 1.1B, Llama 7B).
SHAPES = {
    "1b": {
        "target": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, intermediate_size=5632),
        # ~18M parameters, 1.6% of the target (16M of them in the untied embeddings)
        "draft": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=688),
    },
    "7b": {
        "target": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008),
        # ~77M parameters, 1.1% of the target
        "draft": dict(hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
                      num_key_value_heads=12, intermediate_size=2048),
        # a 1.1B-class draft (TinyLlama's shape) for the three-model hierarchical rows
        "mid": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, intermediate_size=5632),
    },
    # the trained pair's shapes (benchmarks/train_pair.py: a 97M target, and the draft
    # made of its first two layers), random weights: for cost measurements
    "97m": {
        "target": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, intermediate_size=2048),
        "draft": dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                      num_key_value_heads=12, intermediate_size=2048),
    },
    # for --smoke on a CPU
    "tiny": {
        "mid": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, intermediate_size=192),
        "target": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=256),
        "draft": dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=128),
    },
}
VOCAB = {"1b": 32000, "7b": 32000, "97m": 8192, "tiny": 1000}
CONTEXT = {"1b": 2048, "7b": 2048, "97m": 1024, "tiny": 512}
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
MID_AGREEMENT = 0.9  # the optional third model ("mid", a larger draft) agrees this often


def word_level_tokenizer(out_dir: Path, vocab_size: int, model_max_length: int):
    """A word-level tokenizer over made-up tokens ("w3", "w4", ...), saved as a fast
    tokenizer: enough for every system to load the folder; prompts are token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for i in range(len(SPECIALS), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces; fine for made-up words
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>",
                                   model_max_length=model_max_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def structure_weights(model, perm, *, role: str, agreement: float, generator) -> None:
    """Give a random Llama the bigram structure described in the module docstring.

    ``perm`` [V] int64: the target's next token for each token (specials unused).
    """
    import torch

    emb = model.model.embed_tokens.weight  # [V, d]
    head = model.lm_head.weight  # [V, d]
    vocab, d = emb.shape
    with torch.no_grad():
        emb.normal_(0.0, 1.0, generator=generator)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.01)
            layer.mlp.down_proj.weight.mul_(0.01)
        nxt = perm.clone().to(emb.device)
        if role == "draft":
            n = len(SPECIALS)
            u = torch.rand(vocab, generator=generator, device=emb.device)
            other = torch.randint(n, vocab - 1, (vocab,), generator=generator, device=emb.device)
            other = torch.where(other >= nxt, other + 1, other)  # != pi(x), still not special
            nxt = torch.where(u < agreement, nxt, other)
        rows = emb[len(SPECIALS):] * (10.0 / d)  # [V - n, d]
        head.zero_()
        head.index_add_(0, nxt[len(SPECIALS):], rows.to(head.dtype))


def make_random_pair(name: str, pair_dir: Path, *, device: str, seed: int = 0,
                     num_prompts: int = 1, prompt_len: int = 32,
                     agreement: float = 0.8) -> dict:
    """Build the random target and draft of ``name`` on ``device`` and save them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes, vocab, ctx = SHAPES[name], VOCAB[name], CONTEXT[name]
    dtype = torch.float16 if device == "cuda" else torch.float32
    tok_dir = pair_dir / "tokenizer"
    tokenizer = word_level_tokenizer(tok_dir, vocab, ctx)
    info = {"name": name, "kind": "random", "vocab_size": vocab, "context": ctx,
            "dtype": str(dtype).replace("torch.", ""), "seed": seed,
            "structure": "bigram permutation (see benchmarks/models.py)",
            "draft_agreement": agreement}
    gen = torch.Generator(device=device).manual_seed(seed)
    n = len(SPECIALS)
    perm = torch.arange(vocab, device=device)
    perm[n:] = n + torch.randperm(vocab - n, generator=gen, device=device)
    roles = [("target", 0, agreement), ("draft", 1, agreement)]
    if "mid" in shapes:
        roles.append(("mid", 2, MID_AGREEMENT))
        info["mid_agreement"] = MID_AGREEMENT
    for role, seed_offset, agree in roles:
        t0 = time.perf_counter()
        config = LlamaConfig(vocab_size=vocab, max_position_embeddings=ctx,
                             bos_token_id=1, eos_token_id=2, pad_token_id=2,
                             tie_word_embeddings=False, rope_theta=10000.0,
                             **shapes[role])
        torch.manual_seed(seed + seed_offset)
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(old)
        structure_weights(model, perm, role="target" if role == "target" else "draft",
                          agreement=agree, generator=gen)
        model.eval()
        model.generation_config.eos_token_id = None  # generate the full length everywhere
        model.generation_config.pad_token_id = 2
        out = pair_dir / "hf" / role
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        info[role] = {"parameters": count_params(model), "weight_bytes": weight_bytes(model),
                      "shape": shapes[role], "seconds": round(time.perf_counter() - t0, 2)}
        log(f"{name} {role}: {info[role]['parameters'] / 1e6:.1f}M parameters, "
            f"{info[role]['weight_bytes'] / 1e9:.2f} GB, saved in {info[role]['seconds']}s")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    info["draft_fraction"] = info["draft"]["parameters"] / info["target"]["parameters"]
    prompts = random_prompts(vocab, num_prompts, prompt_len, seed)
    dump_json(pair_dir / "prompts.json", {"prompts": prompts, "source": "uniform random ids"})
    dump_json(pair_dir / "pair.json", info)
    return info


def random_prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(1000 + seed)
    return [rng.integers(len(SPECIALS), vocab, size=length).tolist() for _ in range(n)]


def prompts_of(pair_dir: Path) -> list[list[int]]:
    data = load_json(pair_dir / "prompts.json")
    if not data or not data.get("prompts"):
        raise FileNotFoundError(f"{pair_dir}/prompts.json is missing: make the pair first")
    return [list(map(int, p)) for p in data["prompts"]]
