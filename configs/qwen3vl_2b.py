"""Qwen3-VL-2B-Instruct with PAPO-G on ViRL39K.

    python -m papo_jax.train --config=configs/qwen3vl_2b.py:papo_g --workdir=gs://BUCKET/papo_g_q3vl2b \
        --config.model.path=/ckpt/Qwen3-VL-2B-Instruct --config.data.path=/data/ViRL39K/train.parquet

Variants: papo_g (gamma 0.01, ref KL 0.01, no entropy terms), grpo. Expected (avg@8):
GRPO 46.84 -> PAPO-G 49.30. Requires Qwen3-VL model support in papo_jax.models
(model_type 'qwen3_vl'); until then from_pretrained reports the unsupported model_type.
"""

from papo_jax.config_base import apply_variant, base_config


def get_config(variant: str = "papo_g"):
  c = base_config()
  c.data.source = "parquet"
  c.data.batch_size = 384
  c.data.min_pixels = 200704
  c.data.max_pixels = 1003520
  c.rollout.max_new_tokens = 2048
  c.optim.lr = 1e-6
  c.optim.mini_batches = 3
  c.optim.micro_batches = 16
  c.train.steps = 202
  apply_variant(c, variant)
  if variant == "papo_g":
    c.papo.gamma = 0.01
  return c
