"""Rollout generation for the VLM: the static KV-cache sampler and the continuous-batching paged engine."""

from papo_jax.sampling.engine import ContinuousEngine, EngineConfig, PageAllocator, paged_attention_xla
from papo_jax.sampling.factory import make_sampler

from papo_jax.sampling.sampler import (
    FINISH_EOS,
    FINISH_LENGTH,
    Rollout,
    Sampler,
    SamplingConfig,
    filter_logits,
    generate,
    sample_tokens,
)

__all__ = ["ContinuousEngine", "EngineConfig", "FINISH_EOS", "FINISH_LENGTH", "PageAllocator", "Rollout", "Sampler",
           "SamplingConfig", "filter_logits", "generate", "make_sampler", "paged_attention_xla", "sample_tokens"]
