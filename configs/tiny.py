"""A tiny random Qwen2.5-VL-shaped model on the built-in synthetic vision task, on a CPU.

    python -m papo_jax.train --config=configs/tiny.py --workdir=/tmp/papo_tiny
    python -m papo_jax.train --config=configs/tiny.py:grpo --workdir=/tmp/grpo_tiny

Hardware: a laptop / 2-core CPU, a few minutes. A short supervised warm-up teaches the
answer format with *random* answers of the right kind (so it starts at chance accuracy);
RL must then learn to read the image: mean reward rises from ~0.3-0.4 to well above.
Variants: papo_g (default), grpo, papo_g_no_ref_kl, dapo, papo_d.
"""

from papo_jax.config_base import apply_variant, base_config


def get_config(variant: str = "papo_g"):
  c = base_config()
  c.model.init = "tiny_random"
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.ref_dtype = "float32"
  c.model.remat = False
  c.data.source = "synthetic"
  c.data.min_pixels = 56 * 56
  c.data.max_pixels = 56 * 56
  c.data.max_prompt_length = 256
  c.data.prompt_length_buckets = (128, 256)
  c.data.batch_size = 16
  c.data.num_threads = 2
  c.data.synthetic_num_records = 4096
  c.data.synthetic_image_size = 56
  c.val.source = "synthetic"
  c.val.every = 20
  c.rollout.n = 5
  c.rollout.top_p = 1.0
  c.rollout.max_new_tokens = 16
  c.rollout.cache_dtype = "float32"
  c.reward.name = "synthetic"
  c.reward.num_workers = 1
  c.optim.lr = 1e-3
  c.optim.mini_batches = 1
  c.optim.micro_batches = 1
  c.optim.logprob_chunk = 16
  c.train.steps = 120
  c.train.warmup_sft_steps = 60
  c.train.warmup_lr = 3e-3
  c.checkpoint.every = 10
  c.log.tensorboard = True
  apply_variant(c, variant)
  # Tiny-model scale: a stronger perception push than the paper's 7B/3B values.
  if c.papo.gamma:
    c.papo.gamma = 0.02
  return c
