"""The settings of one server (``quickdraft serve``): plain data, no web framework needed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from quickdraft.ort_backend.device import DEFAULT_ATTENTION, check_attention

__all__ = ["ServeSettings", "BUNDLED_MODEL_NAME", "MAX_AUTO_LANES"]

BUNDLED_MODEL_NAME = "quickdraft-default"  # the served name of the bundled pair
MAX_AUTO_LANES = 16  # lanes=None: at most this many (each holds a stream's caches up front)


def _check_gamma(gamma) -> None:
    if gamma == "auto":
        return
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma must be an integer >= 1 or auto, got {gamma!r}")


@dataclass(frozen=True)
class ServeSettings:
    """What ``quickdraft serve`` was started with.

    ``model_dir`` None serves the bundled pair (on the CPU with ``device`` "auto", as
    ``quickdraft generate`` does). ``gamma`` None: the CLI's default (2 for the bundled
    pair, else 5). ``timeout`` None: no per-request limit.
    """

    model_dir: str | None = None
    model_name: str | None = None  # None: "quickdraft-default" or the folder's name
    device: str = "auto"
    attention: str = DEFAULT_ATTENTION  # CUDA: GroupQueryAttention's kernel (ATTENTION_KERNELS)
    gamma: int | str | None = None
    drafter: str = "model"
    max_concurrency: int = 8  # streams decoded at once (each its own Generator and caches)
    max_queue: int = 64  # requests waiting for a stream; more get 429
    # streams whose proposals one target call verifies (a static export's lanes); None:
    # max_concurrency, at most MAX_AUTO_LANES, for a static export; 0: each stream alone
    lanes: int | None = None
    # with lanes: the draft runs the greedy streams' proposals as one chain of its own lanes
    draft_lanes: bool = True
    timeout: float | None = None  # seconds per request (queue wait included)
    shutdown_timeout: float = 10.0  # seconds to finish in-flight requests on shutdown
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        from quickdraft.drafters import DRAFTERS

        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        check_attention(self.attention)
        if self.gamma is not None:
            _check_gamma(self.gamma)
        if self.drafter not in DRAFTERS:
            raise ValueError(f"drafter must be one of {', '.join(DRAFTERS)}, got "
                             f"{self.drafter!r}")
        for name in ("max_concurrency", "max_queue", "lanes"):
            value = getattr(self, name)
            if value is None and name == "lanes":
                continue
            low = 1 if name == "max_concurrency" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.timeout is not None and not (isinstance(self.timeout, (int, float))
                                             and self.timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {self.timeout!r}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout!r}")
        if self.model_dir is not None and not Path(self.model_dir).is_dir():
            raise FileNotFoundError(f"model folder {self.model_dir} does not exist")

    @property
    def bundled(self) -> bool:
        return self.model_dir is None

    def resolved_model_dir(self) -> Path:
        from quickdraft.ort_backend.cli import default_model_dir

        return default_model_dir() if self.bundled else Path(self.model_dir)

    def resolved_device(self) -> str:
        return "cpu" if self.bundled and self.device == "auto" else self.device

    def resolved_gamma(self) -> int | str:
        from quickdraft.ort_backend.cli import BUNDLED_GAMMA

        if self.gamma is not None:
            return self.gamma
        return BUNDLED_GAMMA if self.bundled else 5

    def resolved_lanes(self) -> int:
        """Lanes to load the target with: 0 for a dynamic export or one stream at a time."""
        from quickdraft.manifest import load_manifest

        static = load_manifest(self.resolved_model_dir() / "target").kv_cache == "static"
        if not static or self.max_concurrency < 2:
            if self.lanes and self.lanes > 1 and not static:
                raise ValueError("lanes need a static export (--kv-cache static); serve "
                                 "this one with --lanes 0")
            return 0
        lanes = MAX_AUTO_LANES if self.lanes is None else self.lanes
        lanes = min(lanes, self.max_concurrency)  # an idle lane still runs in every call
        return lanes if lanes > 1 else 0

    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.bundled:
            return BUNDLED_MODEL_NAME
        return Path(os.path.abspath(self.model_dir)).name
