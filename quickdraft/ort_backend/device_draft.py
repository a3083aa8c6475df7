"""A model drafter that samples on the device: only token ids cross to the host.

:class:`DeviceModelDrafter` is :class:`quickdraft.generation.ModelDrafter` for a static
draft model whose logits stay on the device (``append_device``): each sampled token is
drawn by the sampling graph (:class:`~quickdraft.ort_backend.verify_graph.DeviceSampler`)
next to the logits, and the q rows stay in the sampler's buffer, where the verification
graph reads them (``Candidates.rows_on_device``). Greedy drafting is the base class's (the
argmax already comes from the model's graph).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from quickdraft.generation import ModelDrafter, check_uniforms
from quickdraft.ort_backend.verify_graph import DeviceSampler, advance_device, captures_helpers
from quickdraft.protocols import (
    Candidates,
    DecodeState,
    DeviceState,
    SampledChainState,
    catch_up,
    supports,
)
from quickdraft.sampling import SamplingConfig

__all__ = ["DeviceDraw", "DeviceModelDrafter"]


class DeviceModelDrafter(ModelDrafter):
    """Samples ``gamma`` draft tokens with the sampling graph on the draft model's device.

    ``compute``: the sampling graph's arithmetic, which must be the verification graph's
    for it to read the rows in place (float32, as ``Pair.generator``'s default). The
    proposal's rows are valid until the next proposal. ``stop_below`` is not offered: it
    would read each token's probability back to the host. On a
    :class:`~quickdraft.protocols.SampledChainState` with a chain of at least gamma steps
    the whole proposal is one launch (the draw inside the model's run, one wait);
    otherwise each token is a model call and a sampling-graph call.
    """

    def __init__(self, model, sampling: SamplingConfig = SamplingConfig(), gamma: int = 4, *,
                 state: DecodeState | None = None, compute: str = "float32"):
        super().__init__(model, sampling, gamma, state=state)
        if not supports(self.state, DeviceState):
            raise ValueError(
                "device sampling needs a draft whose logits stay on the device (a static "
                "export, --kv-cache static); use ModelDrafter for this model")
        self.compute = compute
        # a state that draws inside its own chain of steps needs no separate sampler
        self.chained = (not sampling.greedy and supports(self.state, SampledChainState)
                        and self.state.max_chain >= self.gamma
                        and self.state.prepare_sampled_chain(sampling, compute))
        self.sampler = None if sampling.greedy or self.chained else DeviceSampler(
            model.vocab_size, sampling, self.gamma, device=model.device,
            logits_dtype=model.manifest.dtype, compute=compute)

    def get_candidates(self, ids: Sequence[int], max_tokens: int,
                       uniforms: np.ndarray) -> Candidates:
        gamma = min(self.gamma, int(max_tokens))
        if gamma < 1 or self.sampling.greedy:
            return super().get_candidates(ids, max_tokens, uniforms)
        check_uniforms(uniforms[:gamma])
        if self.chained:  # gamma steps and their draws in one launch, one wait
            launched = self.state.launch_sampled_chain(
                catch_up(self.state, ids), np.asarray(uniforms[:gamma]), self.sampling,
                self.compute)
            return Candidates(launched.wait(), model_calls=gamma, checked=True,
                              vocab_size=self.model.vocab_size, rows_on_device=launched.rows)
        logits = advance_device(self.state, ids, 1)  # [1, k, V] on the device
        tokens = np.empty(gamma, dtype=np.int64)  # [gamma]
        for i in range(gamma):
            tokens[i] = self.sampler.sample(logits, float(uniforms[i]), i)
            if i + 1 < gamma:
                logits = self.state.append_device([int(tokens[i])])  # [1, 1, V]
        return Candidates(tokens, model_calls=gamma, checked=True,
                          vocab_size=self.model.vocab_size,
                          rows_on_device=self.sampler.rows_view(gamma))


class DeviceDraw:
    """:class:`~quickdraft.protocols.TokenDraw` on the device, for autoregressive sampling
    from a static model: the sampling graph draws next to the logits (``append_device``),
    and only the token id reaches the host. ``cuda_graph``: the draw as a CUDA graph (None:
    when the model runs with them); :meth:`close` keeps it for the next sequence."""

    def __init__(self, model, sampling: SamplingConfig, *, compute: str = "float32",
                 cuda_graph: bool | None = None):
        if cuda_graph is None:
            cuda_graph = captures_helpers(model)
        self.sampler = DeviceSampler.take(model.vocab_size, sampling, 1, device=model.device,
                                          logits_dtype=model.manifest.dtype, compute=compute,
                                          cuda_graph=cuda_graph)

    def close(self) -> None:
        """This sequence is done: its sampler (and captured graph) goes to the next."""
        self.sampler.close()

    def first(self, state: DecodeState, ids: Sequence[int], u: float) -> int:
        return self.sampler.sample(advance_device(state, list(ids), 1), u, 0)

    def next(self, state: DecodeState, token: int, u: float) -> int:
        return self.sampler.sample(state.append_device([int(token)]), u, 0)
