"""Qwen2.5-VL-7B-Instruct with PAPO on ViRL39K (the paper's 7B settings).

    python -m papo_jax.train --config=configs/qwen25vl_7b.py:papo_g --workdir=gs://BUCKET/papo_g_7b \
        --config.model.path=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.path=/data/ViRL39K/train.parquet

Variants: papo_g (default: gamma 0.02, ref KL 0.01, double entropy eta 0.05/0.05), grpo,
papo_g_no_ref_kl, dapo, papo_d; noisy_rollout and papo_noisy (grpo and papo_g, double entropy included,
with NoisyRollout: 6 clean + 6 noisy rollouts a prompt, config_base.NOISY_ROLLOUT; 96 micro-batches keep
16 rows each); vppo (VPPO-7B as its authors trained it on 8 x H800,
github.com/huaixuheqing/VPPO-RL examples/configs/train_vppo_7b.sh: DAPO's sampling and clip, no ref
KL, top 40% tokens by visual dependency, advantage scale from 0.9, entropy penalty 0.06, n=8, 50%
patch blackening; optim.micro_batches 64 = 16 rows per micro-batch) and papo_vppo (PAPO-G with
VPPO's loss terms; entropy penalty 0.06 on the original only, not the double entropy of papo_g).
Hardware: the paper used 4 x H100-80G. TPU (docs/tpu.md,
measured with ``python -m papo_jax.aot --config=configs/qwen25vl_7b.py:papo_g --topology=v5p:2x2x1
--layers=1``, extrapolated from 1- and 2-layer compiles): it fits v5p-8 (4 chips, the smallest
v5p slice), with these defaults: FSDP over the 4 chips (mesh.fsdp=-1), model.remat=True,
optim.micro_batches=32 (20 rows per micro-batch, 5 per chip): the update needs 63.6 of 95 GiB
per chip (MFU bound 80%). A 16 GiB chip (v5e) cannot hold its 17.4 GiB per chip of state on
8 chips.
Expected (avg@8): GRPO 58.78 -> PAPO-G 61.66; DAPO 55.01 -> PAPO-D 63.16. VPPO's own Table 1
(avg@8 over their 8 benchmarks, a different set; VPPO-RL assets/results.png): GRPO 53.1, DAPO 55.0
-> VPPO 57.5.
Note: the authors' own 7B "GRPO" script silently ran PAPO with gamma 0.01; here grpo is GRPO.
"""

from papo_jax.config_base import paper_config


def get_config(variant: str = "papo_g"):
  # vppo's n=8 makes 1024 rows per update: 64 micro-batches keep them at most the 20 rows of n=5.
  c = paper_config(variant, micro_batches=64 if variant == "vppo" else 32)
  if variant in ("papo_g", "papo_noisy"):
    c.papo.eta_ori = c.papo.eta_mask = 0.05   # PAPO-G 7B uses double entropy
  return c
