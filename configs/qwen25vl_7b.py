"""Qwen2.5-VL-7B-Instruct with PAPO on ViRL39K (the paper's 7B settings).

    python -m papo_jax.train --config=configs/qwen25vl_7b.py:papo_g --workdir=gs://BUCKET/papo_g_7b \
        --config.model.path=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.path=/data/ViRL39K/train.parquet

Variants: papo_g (default: gamma 0.02, ref KL 0.01, double entropy eta 0.05/0.05), grpo,
papo_g_no_ref_kl, dapo, papo_d. Hardware: the paper used 4 x H100-80G. TPU (docs/tpu.md,
measured with ``python -m papo_jax.aot --config=configs/qwen25vl_7b.py:papo_g --topology=v5p:2x2x1
--layers=1``, extrapolated from 1- and 2-layer compiles): it fits v5p-8 (4 chips, the smallest
v5p slice), with these defaults: FSDP over the 4 chips (mesh.fsdp=-1), model.remat=True,
optim.micro_batches=32 (20 rows per micro-batch, 5 per chip): the update needs 63.6 of 95 GiB
per chip (MFU bound 80%). A 16 GiB chip (v5e) cannot hold its 17.4 GiB per chip of state on
8 chips.
Expected (avg@8): GRPO 58.78 -> PAPO-G 61.66; DAPO 55.01 -> PAPO-D 63.16.
Note: the authors' own 7B "GRPO" script silently ran PAPO with gamma 0.01; here grpo is GRPO.
"""

from papo_jax.config_base import paper_config


def get_config(variant: str = "papo_g"):
  c = paper_config(variant, micro_batches=32)
  if variant == "papo_g":
    c.papo.eta_ori = c.papo.eta_mask = 0.05   # PAPO-G 7B uses double entropy
  return c
