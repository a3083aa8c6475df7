"""Tokenizer loading and incremental detokenisation for streaming.

The tokenizer is read with ``tokenizers`` alone (``tokenizer.json``); transformers is not
needed at run time. ``tokenizers.decoders.DecodeStream`` (0.22) is not used: it has no flush
(a tail held back at the end is never returned) and raises "Invalid prefix" when ByteFallback
byte tokens form invalid UTF-8 (Llama-style tokenizers); elsewhere its pieces match ours.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["load_tokenizer", "vocabulary", "StreamDecoder"]

_REPLACEMENT = "\ufffd"  # what a decoder emits for an incomplete UTF-8 sequence


def load_tokenizer(folder: str | os.PathLike):
    """``tokenizers.Tokenizer`` from ``folder/tokenizer.json``, with a clear error if absent."""
    from tokenizers import Tokenizer

    from quickdraft.manifest import folder_file

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the model folder is incomplete (re-export it; the ORT "
            "backend reads the fast tokenizer file)"
        )
    path = folder_file(folder, "tokenizer.json")  # inside the folder, symlinks followed
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception on a bad file
        raise ValueError(f"{path} is not a readable tokenizer file: {e}") from e


def vocabulary(tokenizer) -> dict[str, int]:
    """token -> id over the whole vocabulary, added tokens included."""
    return dict(tokenizer.get_vocab(with_added_tokens=True))


class StreamDecoder:
    """Turn token ids into text pieces as they arrive.

    Byte-level BPE splits multi-byte characters over tokens, so decoding one token at a time
    shows replacement characters. This decoder re-decodes a short window (a few tokens
    already shown plus the new ones) and emits the new text only once it does not end in an
    incomplete character. ``context`` (for example the prompt's ids) seeds the window so
    that decoders which treat the first token specially (leading spaces) see it mid-text.
    The pieces joined equal the decoded text of ``context + tokens`` minus that of
    ``context`` whenever the context decodes to whole characters.
    """

    def __init__(self, tokenizer, context: Sequence[int] = (), *,
                 skip_special_tokens: bool = True, window: int = 6):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(context)[-window:] if window else []
        self._prefix = 0  # start of the decode window
        self._read = len(self._ids)  # ids up to here have been shown

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def push(self, tokens: Sequence[int]) -> str:
        """Add ``tokens``; return the text that is now complete ('' if none yet)."""
        self._ids.extend(int(t) for t in tokens)
        shown = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(shown) or text.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(shown) :]

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end), as it decodes."""
        shown = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(shown) :]
