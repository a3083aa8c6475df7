"""A self-contained demo pair: character n-gram models fit on the standard library.

The target is a 5-gram character model, the draft a bigram (the paper's Table 3 uses
unigram and bigram drafts the same way). Both share one character vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quickdraft.corpus import stdlib_text
from quickdraft.generation import GenerationResult, autoregressive_generate, speculative_generate
from quickdraft.reference.models import CharTokenizer, NgramModel
from quickdraft.sampling import SamplingConfig

__all__ = ["DemoPair", "build_demo_pair", "run_demo"]


@dataclass
class DemoPair:
    tokenizer: CharTokenizer  # shared character vocabulary
    target: NgramModel  # p: higher-order character model
    draft: NgramModel  # q: low-order character model


def build_demo_pair(max_chars: int = 300_000, target_order: int = 4, draft_order: int = 1,
                    text: str | None = None) -> DemoPair:
    """Fit the target (context ``target_order``) and draft (``draft_order``) on text."""
    if draft_order >= target_order:
        raise ValueError("the draft should be the smaller model: draft_order < target_order")
    text = stdlib_text(max_chars) if text is None else text
    tok = CharTokenizer(text)
    ids = tok.encode(text)
    target = NgramModel.fit(ids, tok.vocab_size, order=target_order, lam=2.0, add_k=0.01)
    draft = NgramModel.fit(ids, tok.vocab_size, order=draft_order, lam=2.0, add_k=0.01)
    return DemoPair(tok, target, draft)


def run_demo(pair: DemoPair, prompt: str, *, gamma: int, max_new_tokens: int,
             sampling: SamplingConfig, seed: int) -> tuple[GenerationResult, GenerationResult]:
    """Speculative and autoregressive generation from the same prompt and seed."""
    ids = pair.tokenizer.encode(prompt)
    spec = speculative_generate(pair.target, pair.draft, ids, gamma=gamma,
                                max_new_tokens=max_new_tokens, sampling=sampling,
                                rng=np.random.default_rng(seed))
    auto = autoregressive_generate(pair.target, ids, max_new_tokens=max_new_tokens,
                                   sampling=sampling, rng=np.random.default_rng(seed))
    return spec, auto
