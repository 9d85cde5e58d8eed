"""Qwen2.5-VL-3B-Instruct with PAPO on ViRL39K (the paper's 3B settings).

    python -m papo_jax.train --config=configs/qwen25vl_3b.py:papo_g --workdir=gs://BUCKET/papo_g_3b \
        --config.model.path=/ckpt/Qwen2.5-VL-3B-Instruct --config.data.path=/data/ViRL39K/train.parquet

Variants (papo.md §2): papo_g (default: gamma 0.02, ref KL 0.01, no entropy terms), grpo,
papo_g_no_ref_kl (gamma 0.01, eta 0.03/0.03), dapo, papo_d (gamma 0.01, eta 0.03/0.03).
Hardware: the paper used 2 x H100-80G; smallest sensible TPU slice v5e-8 / v4-8.
Expected (avg@8 over 8 benchmarks, papo.md §7): GRPO 47.92 -> PAPO-G 49.92;
DAPO 52.40 -> PAPO-D 55.24. 384 prompts x 5 samples per step, 3 updates per step,
2 epochs (~202 steps).
"""

from papo_jax.config_base import paper_config


def get_config(variant: str = "papo_g"):
  return paper_config(variant, micro_batches=16)
