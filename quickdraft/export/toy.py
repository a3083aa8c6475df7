"""Small local models and tokenizers, built offline.

Tests, examples and benchmarks need Hugging Face causal LMs without a model hub: a BPE
tokenizer trained with ``tokenizers`` on local text (the Python standard library sources
are on every machine) and random-weight models built from a config.
Needs the ``export`` extra (torch, transformers, tokenizers).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from quickdraft.corpus import stdlib_files, stdlib_text

__all__ = ["stdlib_files", "stdlib_text", "train_tokenizer", "make_random_model", "TINY_SHAPES"]

# A few small shapes per architecture: (layers, hidden, heads, kv_heads, intermediate)
TINY_SHAPES = {
    "target": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=128),
    "draft": dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=64),
}


def _chunks(text: str, size: int = 4096) -> Iterator[str]:
    for i in range(0, len(text), size):
        yield text[i : i + size]


def train_tokenizer(out_dir: str | Path, vocab_size: int = 512, text: str | None = None,
                    model_max_length: int = 2048):
    """Train a byte-level BPE tokenizer and save it as a Hugging Face fast tokenizer.

    Special tokens: ``<|endoftext|>`` (id 0, BOS/EOS/PAD) and ``<unk>`` (id 1).
    Returns the ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = stdlib_text(300_000) if text is None else text
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_chunks(text), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def make_random_model(arch: str, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                      *, vocab_size: int | None = None, seed: int = 0, role: str = "target",
                      max_position_embeddings: int = 256, **overrides):
    """Build a random-weight causal LM of ``arch`` ("llama", "qwen2", "gpt2") and save it
    (safetensors, config.json and the tokenizer, if given) to ``out_dir``."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
    if vocab_size is None:
        if tokenizer is None:
            raise ValueError("give vocab_size or tokenizer_dir")
        vocab_size = len(tokenizer)
    shape = dict(TINY_SHAPES[role])
    shape.update(overrides)
    bos = tokenizer.bos_token_id if tokenizer is not None else 0
    eos = tokenizer.eos_token_id if tokenizer is not None else 0
    with torch.random.fork_rng(devices=[]):  # the caller's torch RNG is left as it was
        torch.manual_seed(seed)
        if arch in ("llama", "qwen2"):
            from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

            cfg_cls, model_cls = ((LlamaConfig, LlamaForCausalLM) if arch == "llama"
                                  else (Qwen2Config, Qwen2ForCausalLM))
            config = cfg_cls(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                             bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=False, **shape)
            model = model_cls(config)
        elif arch == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            config = GPT2Config(vocab_size=vocab_size, n_positions=max_position_embeddings,
                                n_embd=shape["hidden_size"], n_layer=shape["num_hidden_layers"],
                                n_head=shape["num_attention_heads"], bos_token_id=bos,
                                eos_token_id=eos)
            model = GPT2LMHeadModel(config)
        else:
            raise ValueError(f"unknown architecture {arch!r}; choose llama, qwen2 or gpt2")
        # random init is small; widen the logits so sampling is not nearly uniform
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.mul_(4.0)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return model
