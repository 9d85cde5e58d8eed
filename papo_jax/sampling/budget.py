"""How many prompts one rollout chunk may hold, from a per-chip memory budget.

The sampler's decode keeps a ``[layers, B*n, Lp+T, KVH, D]`` KV cache, sharded over the
batch axes (and KV heads over ``tensor``). Generating all of a step's prompts at once
does not fit a TPU chip at the paper's scale (384 prompts x 5 samples x 6,144 slots of a
3B is ~290 GB of cache), so rollouts run in chunks of ``B`` prompts, each chunk one
prefill + decode. This module sizes ``B`` from a byte budget; it is pure arithmetic
(no JAX), so it is cheap to call every step and easy to test.

    chunk = rollout_chunk_prompts(model_config, n_samples=5, prompt_len=4096, max_new_tokens=2048,
                                  cache_dtype="bfloat16", hbm_bytes_budget=8 * 2**30, n_devices=8,
                                  total_prompts=384, batch_shards=8)
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Decode temporaries per sampled row are dominated by float32 [R, V] logits and the
# sampling filter's copies of them (log-softmax, filtered logits, softmax, top-k).
_LOGIT_COPIES = 6
# Prefill activations of one decoder layer per prompt token, in units of the compute dtype:
# residual + normed input + q/k/v/o (~4 x hidden) and gate/up/act (3 x intermediate).
_PREFILL_HIDDEN_COPIES = 6
_PREFILL_MLP_COPIES = 3


def _nbytes(dtype: str) -> int:
  return int(np.dtype({"bfloat16": np.float16}.get(dtype, dtype)).itemsize)


def kv_bytes_per_token(text_cfg, cache_dtype: str = "bfloat16") -> int:
  """K and V of every layer for one token: layers * 2 * kv_heads * head_dim * bytes."""
  return text_cfg.num_hidden_layers * 2 * text_cfg.num_key_value_heads * text_cfg.head_dim * _nbytes(cache_dtype)


@dataclasses.dataclass(frozen=True)
class RolloutMemory:
  """Global bytes one prompt of a chunk costs (divide by the chips that shard the batch)."""
  decode_cache: int       # n rows x (Lp + T) slots
  prefill_cache: int      # the unrepeated [Lp] cache, live while it is repeated n times
  prefill_activations: int
  logits: int             # float32 [n, V] and the sampler's copies of it
  vision: int = 0         # float32 pixels and one vision block's activations for the prompt's patches

  @property
  def total(self) -> int:
    return self.decode_cache + self.prefill_cache + self.prefill_activations + self.logits + self.vision


def rollout_bytes_per_prompt(model_config, *, n_samples: int, prompt_len: int, max_new_tokens: int,
                             cache_dtype: str = "bfloat16", compute_dtype: str = "bfloat16",
                             patches_per_prompt: int = 0) -> RolloutMemory:
  """The memory one prompt adds to a rollout chunk (an estimate of the largest live set).

  ``patches_per_prompt``: its images' patches (the vision tower runs in the prefill); counted
  as sharded with the prompt's rows like everything else.
  """
  t, v = model_config.text, model_config.vision
  kv = kv_bytes_per_token(t, cache_dtype)
  act = _nbytes(compute_dtype)
  return RolloutMemory(
      decode_cache=n_samples * (prompt_len + max_new_tokens) * kv,
      prefill_cache=prompt_len * kv,
      prefill_activations=prompt_len * (_PREFILL_HIDDEN_COPIES * t.hidden_size
                                        + _PREFILL_MLP_COPIES * t.intermediate_size) * act,
      logits=n_samples * t.vocab_size * 4 * _LOGIT_COPIES,
      vision=patches_per_prompt * (v.patch_dim * 4 + (_PREFILL_HIDDEN_COPIES * v.hidden_size
                                                      + _PREFILL_MLP_COPIES * v.intermediate_size) * act))


def rollout_chunk_prompts(model_config, *, n_samples: int, prompt_len: int, max_new_tokens: int,
                          hbm_bytes_budget: int, n_devices: int, total_prompts: int, batch_shards: int | None = None,
                          cache_dtype: str = "bfloat16", compute_dtype: str = "bfloat16",
                          patches_per_prompt: int = 0) -> int:
  """Prompts per rollout chunk so that one chunk's cache and temporaries fit ``hbm_bytes_budget`` per chip.

  ``hbm_bytes_budget``: bytes per chip left for the rollout (HBM minus the training state
  the sampler keeps alive). ``n_devices``: chips the chunk's rows are spread over (the
  batch-sharding chips; KV heads over ``tensor`` only lower the per-chip cost further).
  ``batch_shards`` (default ``n_devices``): the chunk is a multiple of it, so rows shard
  evenly. Among the chunks that fit, the largest that divides ``total_prompts`` is taken
  (every chunk then has one shape: one compiled program); if none divides it, the largest
  that fits (the caller pads the last chunk). Raises ValueError naming the setting to
  change when not even ``batch_shards`` prompts fit.
  """
  if min(n_samples, prompt_len, max_new_tokens, n_devices, total_prompts) < 1:
    raise ValueError("rollout_chunk_prompts: n_samples, prompt_len, max_new_tokens, n_devices and total_prompts "
                     "must be >= 1")
  step = batch_shards or n_devices
  per_prompt = rollout_bytes_per_prompt(model_config, n_samples=n_samples, prompt_len=prompt_len,
                                        max_new_tokens=max_new_tokens, cache_dtype=cache_dtype,
                                        compute_dtype=compute_dtype, patches_per_prompt=patches_per_prompt).total
  fit = int(hbm_bytes_budget * n_devices // per_prompt)
  fit = min(fit, max(total_prompts, step))
  fit -= fit % step
  if fit < step:
    raise ValueError(
        f"rollout: {step} prompt(s) x {n_samples} samples x {prompt_len + max_new_tokens} slots need "
        f"{step * per_prompt / n_devices / 2**30:.2f} GiB per chip, above the budget of "
        f"{hbm_bytes_budget / 2**30:.2f} GiB; raise rollout.kv_budget_gb, shard wider (mesh.fsdp/data), "
        f"or lower rollout.max_new_tokens / data.max_prompt_length")
  for b in range(fit, step - 1, -step):
    if total_prompts % b == 0:
      return b
  return fit
