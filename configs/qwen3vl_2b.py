r"""Qwen3-VL-2B-Instruct with PAPO-G on ViRL39K.

    python -m papo_jax.train --config=configs/qwen3vl_2b.py:papo_g --workdir=gs://BUCKET/papo_g_q3vl2b \
        --config.model.path=/ckpt/Qwen3-VL-2B-Instruct --config.data.path=/data/ViRL39K/train.parquet

Variants (papo.md §2): papo_g (default: gamma 0.01, ref KL 0.01, no entropy terms), grpo; with
NoisyRollout (config_base.NOISY_ROLLOUT) noisy_rollout and papo_noisy (its gamma 0.01 too).
Expected (avg@8 over 8 benchmarks, papo.md §7): GRPO 46.84 -> PAPO-G 49.30. Unlike the
authors' Qwen3-VL branch, the perception KL really reaches the gradient here
(tests/test_models_qwen3_vl.py). Hardware: none is published for this run; 2.13 B parameters
make 26 GB of fp32 weights + AdamW moments and a 4 GB bf16 reference, so 2 x H100-80G (the
paper's 3B setting). TPU (docs/tpu.md, measured with
``python -m papo_jax.aot --config=configs/qwen3vl_2b.py:papo_g --topology=v5e:2x4 --layers=1
--config.optim.micro_batches=80``, extrapolated from 1- and 2-layer compiles): it fits v5e-8
(the smallest slice compiled), with FSDP over the 8 chips (mesh.fsdp=-1, the default here), model.remat=True
and optim.micro_batches=80 (8 rows per micro-batch, 1 per chip): the update needs 11.4 of 16
GiB per chip. The default micro_batches=16 (5 rows per chip) is not compiled there; on v5p-8
(8.9 GiB of state per chip of 95) it fits by the 3B's measurement. Images of up to 3,920
patches of 16 px.
The checkpoint's files set the rest: Qwen3-VL's processor (patch 16, 32 px resize factor,
mean/std 0.5) and chat template (no default system prompt); the reward's format check
follows the template (reward.format_mode "auto": a "Thinking" checkpoint's template opens
<think> itself, so responses are graded with .*</think>.*\boxed{}.*).
"""

from papo_jax.config_base import paper_config


def get_config(variant: str = "papo_g"):
  c = paper_config(variant, micro_batches=16)
  if variant in ("papo_g", "papo_noisy"):
    c.papo.gamma = 0.01
  return c
