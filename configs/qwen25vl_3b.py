"""Qwen2.5-VL-3B-Instruct with PAPO on ViRL39K (the paper's 3B settings).

    python -m papo_jax.train --config=configs/qwen25vl_3b.py:papo_g --workdir=gs://BUCKET/papo_g_3b \
        --config.model.path=/ckpt/Qwen2.5-VL-3B-Instruct --config.data.path=/data/ViRL39K/train.parquet

Variants (papo.md §2): papo_g (default: gamma 0.02, ref KL 0.01, no entropy terms), grpo,
papo_g_no_ref_kl (gamma 0.01, eta 0.03/0.03), dapo, papo_d (gamma 0.01, eta 0.03/0.03);
noisy_rollout and papo_noisy: grpo and papo_g with NoisyRollout (config_base.NOISY_ROLLOUT: groups of
rollout.n = 12, 6 on the clean image and 6 on a diffusion-noised one, noise step 500 annealed by a sigmoid;
384 x 12 rollouts a step in 48 micro-batches of 32 rows, no more than the 40 of the others);
vppo (VPPO as its authors released it, github.com/huaixuheqing/VPPO-RL
examples/configs/train_vppo_7b.sh: DAPO's sampling and clip, no ref KL, top 40% tokens by visual
dependency, advantage scale from 0.9, entropy penalty 0.06, n=8, 50% patch blackening; with n=8
optim.micro_batches is 32, 32 rows per micro-batch) and papo_vppo (PAPO-G + VPPO's loss terms).
Hardware: the paper used 2 x H100-80G. TPU (docs/tpu.md, measured with ``python -m papo_jax.aot``
on the train step, extrapolated from shortened models): it fits v5p-8 (4 chips; v6e-8 and
v5e-16 are not compiled yet) with these defaults: FSDP over the 4 chips (mesh.fsdp=-1),
model.remat=True, optim.micro_batches=16 (40 rows per micro-batch, 10 per chip): 47.8 of 95 GiB per chip, MFU bound 79%.
v5e-8 fits with --config.optim.micro_batches=80 --config.model.gather_weights=True (one row per
chip per micro-batch, each decoder layer gathering its bf16 weights where it runs): 14.7 GiB per
chip of 16 (--layers=2; MFU bound 59%); micro_batches=40 (two rows per chip) needs 19.5 and does
not. Rollouts run in chunks sized from the free HBM (rollout.chunk_prompts / kv_budget_gb; not
compiled at full depth yet).
The continuous engine's step compiled for one v5e chip (docs/tpu.md, engine_step: bf16 weights,
7.0 GiB, and its own page pool, beside the chip's 6.3 GiB share of the FSDP training state; the
trainer runs the engine on a single device so far, and the static sampler on a mesh): the base config's 64 slots
over 4,096 pages (2.25 GiB) need about 16.5 GiB of a v5e chip's 16 (docs/tpu.md, engine_step):
rollout.num_slots=32 and rollout.kv_pages=2048 (32,768 tokens, 1.13 GiB) fit.
Expected (avg@8 over 8 benchmarks, papo.md §7): GRPO 47.92 -> PAPO-G 49.92;
DAPO 52.40 -> PAPO-D 55.24. 384 prompts x 5 samples per step, 3 updates per step,
2 epochs (~202 steps).
"""

from papo_jax.config_base import paper_config


def get_config(variant: str = "papo_g"):
  # vppo's n=8 makes 1024 rows per update: 32 micro-batches keep them at most the 40 rows of n=5.
  c = paper_config(variant, micro_batches=32 if variant == "vppo" else 16)
  # rollout.engine=continuous, one engine per v5e chip beside the training state (docstring).
  c.rollout.num_slots = 32
  c.rollout.kv_pages = 2048
  return c
