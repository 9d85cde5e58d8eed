"""A tiny random Qwen2.5-VL-shaped model on the built-in synthetic vision task, on a CPU.

    python -m papo_jax.train --config=configs/tiny.py --workdir=/tmp/papo_tiny
    python -m papo_jax.train --config=configs/tiny.py:grpo --workdir=/tmp/grpo_tiny
    python -m papo_jax.train --config=configs/tiny.py:vppo --workdir=/tmp/vppo_tiny

Hardware: a laptop / 2-core CPU, a few minutes. The task is the synthetic "What colour is
the shape?" (one large red/green/blue/yellow shape on a pale tint of its colour, 112 px): the question text never
changes, so a model that ignores the image stays at chance (1 in 4). A short supervised
warm-up teaches the answer format with *random* colours (so RL starts at chance accuracy);
RL must then learn to read the image. Held-out accuracy: 256 unseen images, greedy.
Variants: papo_g (default), grpo, papo_g_no_ref_kl, dapo, papo_d, vppo (VPPO's released recipe:
DAPO sampling, top 40% tokens by visual dependency, advantage scale, entropy penalty),
papo_vppo (PAPO-G + VPPO's loss terms), noisy_rollout and papo_noisy
(GRPO / PAPO-G with NoisyRollout: 4 of each prompt's 8 rollouts on a noisy image); a ``qwen3_`` prefix (or just
``qwen3``, i.e. qwen3_papo_g) swaps in a tiny random Qwen3-VL (DeepStack, interleaved MRoPE,
qk-norm; patch 16, so the 112 px synthetic images are resized to 128 px = 16 image tokens):

    python -m papo_jax.train --config=configs/tiny.py:qwen3 --workdir=/tmp/papo_tiny_qwen3
"""

from papo_jax.config_base import apply_variant, base_config


def get_config(variant: str = "papo_g"):
  family = "qwen2_5_vl"
  if variant == "qwen3" or variant.startswith("qwen3_"):
    family, variant = "qwen3_vl", variant[len("qwen3_"):] or "papo_g"
  c = base_config()
  c.model.init = "tiny_random"
  c.model.tiny.family = family
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.ref_dtype = "float32"
  c.model.remat = False
  c.data.source = "synthetic"
  # 112 px = 16 image tokens: with 4 (56 px) the image is too small a share of the ~90-token
  # prompt and RL did not leave chance in 90 steps.
  c.data.min_pixels = 112 * 112
  c.data.max_pixels = 112 * 112
  c.data.max_prompt_length = 128           # the colour question's prompt is 82 tokens
  c.data.prompt_length_buckets = (96,)
  c.data.batch_size = 16
  c.data.num_threads = 2
  c.data.synthetic_num_records = 4096
  c.data.synthetic_image_size = 112
  c.data.synthetic_kinds = ("color",)
  c.val.source = "synthetic"
  c.val.every = 25
  c.val.batches = 4
  c.val.batch_size = 64
  c.rollout.n = 8
  c.rollout.top_p = 1.0
  c.rollout.max_new_tokens = 12            # "<think></think>\\boxed{yellow}" + end is 12 tokens
  c.rollout.cache_dtype = "float32"
  # Answers of ~12 tokens have no long tail to schedule around: the static sampler is 1.2x the
  # continuous engine here and compiles fewer programs (both give the same samples and curve).
  c.rollout.engine = "static"
  c.reward.name = "synthetic"
  c.reward.num_workers = 1
  # Adam's first step moves every parameter by ~lr (m/sqrt(v) = sign(g)): at 3e-3 the first
  # RL update wiped out the warmed-up format (format reward 0.93 -> 0.09); 1e-3 keeps it.
  c.optim.lr = 1e-3
  c.optim.mini_batches = 1
  c.optim.micro_batches = 1
  c.optim.logprob_chunk = 16
  c.train.steps = 150
  c.train.warmup_sft_steps = 40
  c.train.warmup_lr = 6e-3
  c.checkpoint.every = 25
  c.log.tensorboard = True
  if family == "qwen3_vl":   # factor 32: 128 x 128 px, the same 16 image tokens per image as 112 x 112 at factor 28
    c.data.min_pixels = c.data.max_pixels = 128 * 128
  apply_variant(c, variant)
  if c.noisy.enabled:   # NoisyRollout's half-and-half split at the tiny demo's group size
    c.rollout.n, c.noisy.rollouts = 8, 4
  # Tiny-model scale: a stronger perception push than the paper's 7B/3B values.
  if c.papo.gamma:
    c.papo.gamma = 0.02
  return c
