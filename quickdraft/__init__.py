"""quickdraft: speculative decoding (Leviathan, Kalman & Matias, 2023), exact and fast."""

from quickdraft.sampling import SamplingConfig, adjust_logits
from quickdraft.verification import verify, verify_batch

__version__ = "0.1.0"
__all__ = ["SamplingConfig", "adjust_logits", "verify", "verify_batch", "__version__"]
