"""KV-cache rollout generation for the VLM (prefill once per prompt, n samples, while_loop decode)."""

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

__all__ = ["FINISH_EOS", "FINISH_LENGTH", "Rollout", "Sampler", "SamplingConfig", "filter_logits", "generate",
           "sample_tokens"]
