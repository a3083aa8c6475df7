"""Tiny models for the reference: n-gram tables (the paper's Table 3 unigram and bigram
drafts) and a state that replays a stateless scoring function as a cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["PrefixState", "TableModel", "NgramModel", "CharTokenizer"]


class PrefixState:
    """A :class:`~quickdraft.protocols.DecodeState` for models that score a whole prefix.

    ``score(prefix)`` returns the next-token logits [V] after ``prefix``.
    """

    def __init__(self, score: Callable[[Sequence[int]], np.ndarray], max_length: int | None):
        self._score = score
        self._tokens: list[int] = []
        self._max_length = max_length

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def append(self, tokens: Sequence[int]) -> np.ndarray:
        if self._max_length is not None and len(self._tokens) + len(tokens) > self._max_length:
            raise ValueError(
                f"sequence of {len(self._tokens) + len(tokens)} tokens exceeds the model's "
                f"context of {self._max_length}; shorten the prompt or max_new_tokens"
            )
        rows = []
        for t in tokens:
            self._tokens.append(int(t))
            rows.append(self._score(self._tokens))
        return np.stack(rows)  # [len(tokens), V]

    def rewind(self, length: int) -> None:
        if not 0 <= length <= len(self._tokens):
            raise ValueError(f"cannot rewind to {length}: state holds {len(self._tokens)} tokens")
        del self._tokens[length:]


class TableModel:
    """A model whose logits are a fixed function of the last ``order`` tokens.

    logits: [V] * order + [V] table; contexts shorter than ``order`` are left-padded with
    ``pad_id``. order 0 is a unigram model, 1 a bigram, 2 a trigram.
    """

    def __init__(self, logits: np.ndarray, pad_id: int = 0, max_length: int | None = None):
        logits = np.asarray(logits, dtype=np.float64)
        vocab = logits.shape[-1]
        if any(d != vocab for d in logits.shape):
            raise ValueError(f"table must be [V] * (order + 1), got {logits.shape}")
        self.logits = logits  # [V] * order + [V]
        self.order = logits.ndim - 1
        self.pad_id = pad_id
        self._vocab = vocab
        self._max_length = max_length

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def max_length(self) -> int | None:
        return self._max_length

    def score(self, prefix: Sequence[int]) -> np.ndarray:
        ctx = [self.pad_id] * self.order + list(prefix)
        ctx = ctx[len(ctx) - self.order :] if self.order else []
        return self.logits[tuple(ctx)]  # [V]

    def new_state(self) -> PrefixState:
        return PrefixState(self.score, self._max_length)


class NgramModel:
    """An n-gram model fit on token ids with interpolated add-``k`` smoothing.

    P(x | c_1..c_k) = (count(c, x) + lam * P(x | c_2..c_k)) / (count(c) + lam), down to a
    smoothed unigram. Only contexts seen in training are stored.
    """

    def __init__(self, order: int, vocab_size: int, lam: float = 1.0, add_k: float = 0.1):
        if order < 0:
            raise ValueError("order must be >= 0 (0 is a unigram model)")
        if not 0 < add_k < np.inf:
            raise ValueError(f"add_k must be a finite number > 0 (the unigram's pseudo-count "
                             f"keeps every token possible and its normaliser positive), got "
                             f"{add_k!r}")
        if not 0 <= lam < np.inf:
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if int(vocab_size) != vocab_size or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
        self.order = order  # context length (0 unigram, 1 bigram, ...)
        self.lam = lam  # weight of the lower-order estimate
        self.add_k = add_k  # pseudo-count of the unigram
        self._vocab = vocab_size
        self.counts: list[dict[tuple[int, ...], np.ndarray]] = [{} for _ in range(order + 1)]

    @classmethod
    def fit(cls, ids: Sequence[int], vocab_size: int, order: int, **kw) -> NgramModel:
        model = cls(order, vocab_size, **kw)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError("token ids out of range for vocab_size")
        for k in range(order + 1):
            table = model.counts[k]
            for t in range(k, len(ids)):
                ctx = tuple(ids[t - k : t].tolist())
                row = table.get(ctx)
                if row is None:
                    row = table[ctx] = np.zeros(vocab_size, dtype=np.float64)
                row[ids[t]] += 1
        return model

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def max_length(self) -> int | None:
        return None

    def probs(self, prefix: Sequence[int]) -> np.ndarray:
        unigram = self.counts[0].get((), np.zeros(self._vocab)) + self.add_k  # [V]
        p = unigram / unigram.sum()  # [V]
        for k in range(1, self.order + 1):
            if len(prefix) < k:
                break
            row = self.counts[k].get(tuple(prefix[len(prefix) - k :]))
            if row is None:
                break
            p = (row + self.lam * p) / (row.sum() + self.lam)
        return p

    def score(self, prefix: Sequence[int]) -> np.ndarray:
        return np.log(self.probs(prefix))  # [V]

    def new_state(self) -> PrefixState:
        return PrefixState(self.score, None)


class CharTokenizer:
    """Characters as tokens; characters unseen at construction map to ``unk``."""

    def __init__(self, text: str):
        chars = sorted(set(text))
        self.itos = ["\x00"] + chars  # id 0 is unknown / padding
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(c, 0) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.itos[i] if i else "?" for i in ids)
