"""Read ``.safetensors`` checkpoints with NumPy alone.

The format (https://github.com/huggingface/safetensors) is simple enough to read by hand:

    [8 bytes]  N, the header length, unsigned little-endian
    [N bytes]  a JSON object: {name: {"dtype": "F32", "shape": [..], "data_offsets": [b, e]},
               optionally "__metadata__": {str: str}}
    [rest]     the raw little-endian tensor bytes; a tensor occupies [b, e) of this buffer

NumPy has no bfloat16, so BF16 tensors are widened to float32 exactly: a bfloat16 is the
top 16 bits of a float32, so ``uint16 -> uint32 << 16`` viewed as float32 is the value.

Sharded checkpoints (``model.safetensors.index.json`` with a ``weight_map`` from tensor
name to shard file) are read by :func:`load_checkpoint`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = [
    "SAFETENSORS_DTYPES",
    "SafetensorsError",
    "read_header",
    "load_safetensors",
    "load_checkpoint",
    "checkpoint_files",
]

# safetensors dtype name -> NumPy dtype of the stored bytes (little-endian)
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to float32 on load
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsError(ValueError):
    """A ``.safetensors`` file that is malformed or uses something this reader lacks."""


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Return (header, data_start): the JSON header and the byte offset of the buffer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(
                f"{path}: header length {n} is impossible for a file of {size} bytes "
                "(not a safetensors file, or truncated)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object")
    return header, 8 + n


def _decode(f, start: int, size: int, info: dict, name: str, path: Path) -> np.ndarray:
    """Read one tensor from the open file f (buffer at ``start``, ``size`` bytes) -> a NumPy
    array in native byte order (BF16 widened to float32)."""
    try:
        dtype_name = info["dtype"]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{path}: malformed header entry for {name!r}: {info}") from None
    if dtype_name not in SAFETENSORS_DTYPES:
        raise SafetensorsError(
            f"{path}: tensor {name!r} has dtype {dtype_name}, which this reader does not "
            f"support (supported: {', '.join(SAFETENSORS_DTYPES)})"
        )
    dtype = SAFETENSORS_DTYPES[dtype_name]
    count = int(np.prod(shape, dtype=np.int64))
    if not (0 <= begin <= end <= size) or end - begin != count * dtype.itemsize:
        raise SafetensorsError(
            f"{path}: tensor {name!r} ({dtype_name}, shape {list(shape)}) has data offsets "
            f"[{begin}, {end}) that do not fit its size or the {size}-byte buffer"
        )
    f.seek(start + begin)
    arr = np.frombuffer(f.read(end - begin), dtype=dtype, count=count).reshape(shape)
    if dtype_name == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)  # exact widening
    return arr.astype(dtype.newbyteorder("="), copy=True)  # writable, native order


def load_safetensors(
    path: str | os.PathLike, names: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """Load the tensors of one ``.safetensors`` file (all of them, or only ``names``).

    Returns {name: array}; BF16 becomes float32, other dtypes keep their NumPy equivalent.
    """
    path = Path(path)
    header, start = read_header(path)
    header.pop("__metadata__", None)
    wanted = list(header) if names is None else list(names)
    missing = [n for n in wanted if n not in header]
    if missing:
        raise KeyError(f"{path}: no tensor named {', '.join(map(repr, missing[:5]))}")
    size = path.stat().st_size - start  # bytes in the data buffer
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for n in wanted:
            out[n] = _decode(f, start, size, header[n], n, path)
    return out


def checkpoint_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Map each tensor name of a Hugging Face checkpoint folder to the file holding it.

    Reads ``model.safetensors.index.json`` when present (sharded checkpoints), else
    ``model.safetensors``, else the folder's only ``*.safetensors`` file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SafetensorsError(
                f"{index}: not a valid index (needs a weight_map): {e}"
            ) from None
        files = {name: folder / fname for name, fname in weight_map.items()}
        absent = sorted({str(p) for p in files.values() if not p.is_file()})
        if absent:
            raise FileNotFoundError(
                f"{index} names shard files that are missing: {', '.join(absent[:5])}"
            )
        return files
    single = folder / SINGLE_FILE
    candidates = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    if len(candidates) != 1:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.pt*")
        )
        hint = (
            f"; found {', '.join(others)}: re-save with save_pretrained(safe_serialization=True)"
            if others else ""
        )
        what = "no" if not candidates else "several unindexed"
        raise FileNotFoundError(
            f"{what} safetensors weights in {folder} (expected {SINGLE_FILE} or "
            f"{INDEX_FILE} with its shards){hint}"
        )
    header, _ = read_header(candidates[0])
    return {name: candidates[0] for name in header if name != "__metadata__"}


def load_checkpoint(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every tensor of a Hugging Face safetensors checkpoint folder, sharded or not."""
    files = checkpoint_files(folder)
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    out: dict[str, np.ndarray] = {}
    for path, names in by_file.items():
        out.update(load_safetensors(path, names))
    return out
