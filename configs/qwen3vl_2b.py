"""Qwen3-VL-2B-Instruct with PAPO-G on ViRL39K.

    python -m papo_jax.train --config=configs/qwen3vl_2b.py:papo_g --workdir=gs://BUCKET/papo_g_q3vl2b \
        --config.model.path=/ckpt/Qwen3-VL-2B-Instruct --config.data.path=/data/ViRL39K/train.parquet

Variants: papo_g (gamma 0.01, ref KL 0.01, no entropy terms), grpo. Expected (avg@8):
GRPO 46.84 -> PAPO-G 49.30. Requires Qwen3-VL model support in papo_jax.models
(model_type 'qwen3_vl'); until then from_pretrained reports the unsupported model_type.
"""

from papo_jax.config_base import paper_config


def get_config(variant: str = "papo_g"):
  c = paper_config(variant, micro_batches=16)
  if variant == "papo_g":
    c.papo.gamma = 0.01
  return c
