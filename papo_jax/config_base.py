"""The config schema every run shares; ``configs/*.py`` start from :func:`base_config`.

Groups (DESIGN.md): model, data, rollout, algo, papo, vppo, reward, optim, train, mesh,
checkpoint, log, monitor, eval. Fields are typed by their defaults, so a command-line
override of the wrong type or an unknown field stops at start-up with its name.
"""

from __future__ import annotations

import glob
import os
from typing import NamedTuple

import ml_collections

# VPPO's released runs (github.com/huaixuheqing/VPPO-RL): examples/configs/train_vppo_7b.sh sets
# top_p_perception_tokens=0.4, advantage_scaling_min=0.9, entropy_penalty_coef=0.06, rollout n=8
# on examples/configs/config.yaml (online_filtering on accuracy in (0.01, 0.99), clip_ratio_high
# 0.28, disable_kl: DAPO's sampling and clip without a reference KL; lr 1e-6, 384 prompts, 3
# updates per step). Their entropy penalty is verl/workers/actor/dp_actor.py's
# `loss + entropy_penalty_coef * -masked_mean(log_probs, response_mask)`: papo.eta_ori exactly.
# Their masked copy (verl/workers/fsdp_workers.py `_process_aug_multi_modal_inputs`) blackens
# 14-px squares with probability 0.5 (verl/workers/perc_utils.py `random_patch_blackening`) of
# the image after the pixel-budget resize (verl/utils/dataset.py `process_image`): our 'patch'
# mode (14-px squares of the resized image).
VPPO_LOSS = dict(top_frac=0.4, adv_scale_min=0.9)
VPPO_ENTROPY_PENALTY = 0.06
VPPO_N = 8
VPPO_MASK = dict(mode="patch", ratio=0.5, patch_size=14, exact_ratio=False)

# Per-run constants of the paper (papo.md §2): eps_high, beta, gamma, eta_ori/eta_mask, dynamic sampling;
# optional: eta_ori / eta_mask apart, vppo (vppo group fields), n (rollout.n), mask (data.mask fields).
VARIANTS = {
    "grpo": dict(algo="grpo", eps_high=0.3, beta=0.01, gamma=0.0, eta=0.0, dynamic=False),
    "papo_g": dict(algo="grpo", eps_high=0.3, beta=0.01, gamma=0.02, eta=0.0, dynamic=False),
    "papo_g_no_ref_kl": dict(algo="grpo", eps_high=0.3, beta=0.0, gamma=0.01, eta=0.03, dynamic=False),
    # NoisyRollout on GRPO / PAPO-G: the constants above plus NOISY_ROLLOUT (rollout.n and the noisy group).
    "noisy_rollout": dict(algo="grpo", eps_high=0.3, beta=0.01, gamma=0.0, eta=0.0, dynamic=False, noisy=True),
    "papo_noisy": dict(algo="grpo", eps_high=0.3, beta=0.01, gamma=0.02, eta=0.0, dynamic=False, noisy=True),
    "dapo": dict(algo="dapo", eps_high=0.28, beta=0.0, gamma=0.0, eta=0.0, dynamic=True),
    "papo_d": dict(algo="dapo", eps_high=0.28, beta=0.0, gamma=0.01, eta=0.03, dynamic=True),
    # VPPO as released: DAPO's sampling and clip, no reference KL, token mask + advantage scale,
    # entropy penalty, 8 rollouts per prompt, their patch blackening.
    "vppo": dict(algo="dapo", eps_high=0.28, beta=0.0, gamma=0.0, eta=0.0, eta_ori=VPPO_ENTROPY_PENALTY,
                 dynamic=True, vppo=VPPO_LOSS, n=VPPO_N, mask=VPPO_MASK),
    # PAPO-G (its sampling, reference KL, gamma, n and masked copy) + VPPO's loss terms
    # (token mask, advantage scale, entropy penalty), the dependency read from PAPO's masked copy.
    "papo_vppo": dict(algo="grpo", eps_high=0.3, beta=0.01, gamma=0.02, eta=0.0, eta_ori=VPPO_ENTROPY_PENALTY,
                      dynamic=False, vppo=VPPO_LOSS),
}

# NoisyRollout's released scripts (John-AI-Lab/NoisyRollout, training_scripts/qwen2_5_vl_7b_geo3k_noisyrollout.sh):
# rollout.n=6 on the clean image plus 6 on the noisy one, one advantage group of 12 (their GRPO baseline samples
# n=12); gaussian_noise_step 500, decay_mode sigmoid, decay_coef 30, decay_sig_mid_step 40. Their K12 script:
# strength 450, decay_coef 60 (--config.noisy.strength=450 --config.noisy.decay_coef=60).
NOISY_ROLLOUT = dict(n=12, rollouts=6, strength=500, decay_mode="sigmoid", decay_coef=30.0, mid_step=40.0)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = dict(
      path="",                 # local HF checkpoint directory (config.json + safetensors + tokenizer files)
      init="pretrained",       # pretrained | tiny_random (builds a tiny checkpoint in the workdir)
      dtype="bfloat16",        # compute dtype
      param_dtype="float32",   # trained parameters (and AdamW moments)
      ref_dtype="bfloat16",    # frozen reference copy
      remat=True,
      attention="auto",        # auto | xla | cudnn | pallas_tpu (papo_jax/models/attention.py)
      attention_block=512,     # Pallas TPU splash block size
      # FSDP: each decoder layer gathers its bf16 weights where it runs (models/config.py
      # ModelConfig.gather_weights; also splits the log-prob head over the vocabulary): on for few
      # rows per chip (3B on v5e-8), off for many (v5p).
      gather_weights=False,
      # init=tiny_random: family qwen2_5_vl | qwen3_vl (its DeepStack feeds the first layers from
      # vision blocks 0..; a 4x4 position table).
      tiny=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vision_depth=2, vision_hidden_size=32, vision_heads=2,
                vision_intermediate_size=64, seed=0, family="qwen2_5_vl"),
  )
  c.data = dict(
      source="parquet", path="", problem_key="problem", answer_key="answer", images_key="images", kind_key="kind",
      min_pixels=200704, max_pixels=1003520, max_prompt_length=4096,
      prompt_length_buckets=(1024, 2048, 4096), patch_buckets=(), image_buckets=(),
      batch_size=384, seed=0, shuffle=True, num_threads=8, prefetch_batches=2,
      mask=dict(enabled=True, ratio=0.6, patch_size=14, mode="raw_squares", exact_ratio=False),
      synthetic_num_records=2048, synthetic_difficulty=1, synthetic_image_size=56, synthetic_seed=0,
  )
  # Held-out validation every `every` steps (0: off): mean reward/accuracy of one greedy
  # response per prompt over `batches` batches. source "" = the training source's kind;
  # for the synthetic task a different seed gives held-out records.
  c.val = dict(source="", path="", every=0, batches=2, batch_size=0, synthetic_seed=12345)
  # chunk_prompts: prompts per generate call (0 = sized from kv_budget_gb per chip by
  # sampling/budget.py; 0 GB = the device's free memory after the training state, and no
  # chunking where the device reports none, e.g. CPU). top_p_candidates: top-p looks at that
  # many largest logits (lax.top_k) instead of sorting the vocabulary (0 = full sort).
  c.rollout = dict(n=5, temperature=1.0, top_p=0.99, top_k=0, max_new_tokens=2048, cache_dtype="bfloat16",
                   chunk_prompts=0, kv_budget_gb=0.0, top_p_candidates=1024)
  # engine: static (one batch, every row sized prompt + max_new_tokens; the reference path) |
  # continuous (up to num_slots running samples over a paged KV cache of kv_pages pages of
  # page_size tokens; prompts prefilled prefill_chunk tokens at a time, prefill_lanes at once;
  # a step computes the smallest power-of-two bucket of decode lanes, from min_decode_lanes,
  # holding its running samples: one compilation per bucket; one device: on a mesh of several
  # devices the static sampler runs, with a warning). Continuous is the default: on long-tailed
  # response lengths it generates 3x the static sampler's tokens/s in the same KV memory
  # (python -m papo_jax.sampling.bench), with the same samples.
  c.rollout.engine = "continuous"
  c.rollout.num_slots = 64
  c.rollout.page_size = 16
  c.rollout.kv_pages = 4096
  c.rollout.prefill_chunk = 512
  c.rollout.prefill_lanes = 1
  # Below 8 lanes a TPU/GPU decode step costs about the same (reading the weights bounds it).
  c.rollout.min_decode_lanes = 8
  # NoisyRollout (papo_jax/data/noise.py): of each prompt's rollout.n rollouts, the last `rollouts` are sampled
  # on its images distorted by diffusion noise at step int(strength * decay(step)) (decay_mode sigmoid |
  # linear | pow | exp | none, with decay_coef and mid_step), the others on the clean images. rollout.n stays
  # the group size everywhere (one advantage baseline over the mixed group); the update (old, reference and
  # masked log-probs, the loss) sees the clean images only.
  c.noisy = dict(enabled=False, rollouts=0, strength=500, decay_mode="sigmoid", decay_coef=30.0, mid_step=40.0)
  c.algo = dict(name="grpo", eps_low=0.2, eps_high=0.3, dual_clip=3.0, beta=0.01, agg="token",
                dynamic_sampling=False, dapo_acc_low=0.01, dapo_acc_high=0.99, dapo_chunk=128,
                dapo_max_rounds=20)
  # adaptive_gamma: each sample's perception KL weighted by its mean visual dependency over its
  # group's, clipped to [0, adaptive_gamma_max] (rl/vppo.py adaptive_gamma_factor).
  c.papo = dict(gamma=0.0, gamma_end=-1.0, gamma_horizon_frac=0.5, eta_ori=0.0, eta_mask=0.0, mask_grad=False,
                kl_prcp_clamp_hi=-1.0, kl_prcp_top_frac=-1.0, adaptive_gamma=False, adaptive_gamma_max=2.0)
  # VPPO (rl/vppo.py; the variants vppo / papo_vppo): top_frac keeps each response's top
  # fraction of tokens by visual dependency in the policy-gradient term (-1: off);
  # adv_scale_min reweights advantages by the response's mean dependency to [min, max], mean 1
  # (-1: off). minmax_chunk / mean_chunk: 0 = normalise over the whole update batch, else sets
  # of that many consecutive rows (the authors' per-device mini-batch / micro-batch).
  # dependency: k3 (the authors' one-sample estimate from the sampled tokens' log-probs) | full_kl (the
  # exact KL over the vocabulary at each response position, computed chunked in the log-prob pass).
  c.vppo = dict(top_frac=-1.0, adv_scale_min=-1.0, minmax_chunk=0, mean_chunk=0, dependency="k3")
  # overlap: grade in the background while the log-prob pass runs (GRPO with optim.mini_batches > 1).
  # format_mode: think (<think>.*</think>.*\boxed{}) | thinking (.*</think>.*\boxed{}, for chat
  # templates that open <think> themselves: Qwen3-VL "Thinking") | auto (from the chat template).
  c.reward = dict(name="math", timeout_s=5.0, num_workers=2, overlap=True, format_mode="auto")
  c.optim = dict(lr=1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0, mini_batches=3,
                 micro_batches=8, logprob_chunk=512)
  # compilation_cache: JAX's persistent cache of compiled programs, so a resume does not compile again
  # ("auto" = $JAX_COMPILATION_CACHE_DIR or $PAPO_JAX_CACHE/xla; "" = off; else a directory or gs:// URL).
  c.train = dict(steps=202, seed=0, warmup_sft_steps=0, warmup_lr=0.0, compilation_cache="auto")
  # rules: ((logical axis, mesh axis | tuple of axes | None), ...) replacing or adding entries of
  # parallel.DEFAULT_RULES (e.g. (("batch", ("data",)),)); () = the default rules.
  c.mesh = dict(data=-1, fsdp=1, tensor=1, rules=())
  c.checkpoint = dict(every=10, keep=3, dir="")   # dir: "" = <workdir>/checkpoints; gs:// URLs work
  # samples_every: every that many steps, samples_per_step sampled responses with their rewards go to
  # <workdir>/samples.jsonl and TensorBoard text (0: never).
  c.log = dict(every=1, tensorboard=True, wandb_project="", samples_every=5, samples_per_step=4)
  c.monitor = dict(kl_prcp_spike=5.0, pg_clipfrac_higher_max=0.2, entropy_rise=0.5, window=10,
                   action="warn")   # warn | lower_gamma | stop
  # Evaluation (papo_jax/eval.py; papo.md section 7). benchmarks: () = the paper's all;
  # custom: name -> dict(pattern=, group=general|vision, problem=, answer=, images=, closed_form=).
  c.eval = dict(k=8, temperature=1.0, top_p=1.0, top_k=50, max_new_tokens=2048, max_pixels=589824,
                min_pixels=1024, data_dir="", benchmarks=(), batch_size=16, seed=0,
                custom=ml_collections.ConfigDict())
  return c


def paper_config(variant: str, *, micro_batches: int) -> ml_collections.ConfigDict:
  """The paper's ViRL39K settings (papo.md §6) with one variant's constants applied."""
  c = base_config()
  c.data.source = "parquet"
  c.data.batch_size = 384
  c.data.min_pixels = 200704
  c.data.max_pixels = 1003520
  c.data.max_prompt_length = 4096
  c.rollout.n = 5
  c.rollout.max_new_tokens = 2048
  c.optim.lr = 1e-6
  c.optim.mini_batches = 3
  c.optim.micro_batches = micro_batches
  c.train.steps = 202
  # Billions of parameters with fp32 AdamW moments do not fit replicated on a TPU chip:
  # shard parameters, gradients and optimizer state over every chip (FSDP); rows shard
  # over the same axis ("batch" -> data x fsdp).
  c.mesh.data = 1
  c.mesh.fsdp = -1
  # Rollouts run in chunks of prompts (papo_jax/sampling/budget.py): chunk_prompts > 0 fixes
  # the chunk; 0 sizes it from kv_budget_gb per chip (0 = HBM left beside the training state).
  c.rollout.chunk_prompts = 0
  c.rollout.kv_budget_gb = 0.0
  apply_variant(c, variant)
  if c.noisy.enabled:   # 12 rollouts a prompt, not 5: more micro-batches, none with more rows than before
    rows, mini = c.data.batch_size * c.rollout.n, c.optim.mini_batches
    per = c.data.batch_size * 5 // (mini * micro_batches)
    c.optim.micro_batches = next(m for m in range(micro_batches, rows + 1)
                                 if rows % (mini * m) == 0 and rows // (mini * m) <= per)
  return c


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Sets the papers' constants for one of :data:`VARIANTS` (grpo | papo_g | papo_g_no_ref_kl |
  dapo | papo_d | vppo | papo_vppo, and noisy_rollout | papo_noisy: GRPO | PAPO-G with NoisyRollout)."""
  if variant not in VARIANTS:
    raise ValueError(f"config variant {variant!r} is not one of {sorted(VARIANTS)}")
  v = VARIANTS[variant]
  if v.get("noisy"):
    apply_noisy_rollout(c)
  c.algo.name = v["algo"]
  c.algo.eps_high = v["eps_high"]
  c.algo.beta = v["beta"]
  c.algo.dynamic_sampling = v["dynamic"]
  c.papo.gamma = v["gamma"]
  c.papo.eta_ori = v.get("eta_ori", v["eta"])
  c.papo.eta_mask = v.get("eta_mask", v["eta"])
  vppo = v.get("vppo", {})
  c.vppo.top_frac = vppo.get("top_frac", -1.0)
  c.vppo.adv_scale_min = vppo.get("adv_scale_min", -1.0)
  if "n" in v:
    c.rollout.n = v["n"]
  for k, val in v.get("mask", {}).items():
    c.data.mask[k] = val
  c.data.mask.enabled = needs_masked_pass(c)
  return c


def apply_noisy_rollout(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """NoisyRollout with its released values (NOISY_ROLLOUT): rollout.n = 12, the last 6 on the noisy image."""
  c.rollout.n = NOISY_ROLLOUT["n"]
  c.noisy.enabled = True
  for k in ("rollouts", "strength", "decay_mode", "decay_coef", "mid_step"):
    c.noisy[k] = NOISY_ROLLOUT[k]
  return c


def noisy_rollouts(c: ml_collections.ConfigDict) -> int:
  """How many of each prompt's rollout.n rollouts see the distorted image (0: NoisyRollout off)."""
  return int(c.noisy.rollouts) if "noisy" in c and c.noisy.enabled else 0


# ============================================================================================
# γ and what follows from it
# ============================================================================================

class PerceptionTerms(NamedTuple):
  """The perception-KL weight of one step and what follows from it."""
  gamma: float            # γ now: annealed (papo.gamma_end >= 0), halved once per monitor lowering
  entropy_scale: float    # scale of the double-entropy terms: γ now / papo.gamma (1 without γ)
  needs_mask: bool        # the step runs the masked-image pass (data makes masked copies)


def needs_masked_pass(c: ml_collections.ConfigDict) -> bool:
  """The masked-image forward is needed by the perception KL (γ), the masked entropy (eta_mask) or
  the visual dependency (VPPO, adaptive γ): the train step's own rule (``StepConfig.needs_mask``,
  i.e. ``rl.train_step.needs_masked_images``), so the data pipeline masks exactly when the step
  reads the copies."""
  return step_config(c).needs_mask


def perception_terms(c: ml_collections.ConfigDict, step: int = 0, gamma_halvings: int = 0) -> PerceptionTerms:
  """γ at ``step`` (0-based): the schedule of ``papo.gamma`` -> ``papo.gamma_end`` (when >= 0,
  ``losses.gamma_schedule``), times 0.5 per lowering by the KL_prcp monitor; the entropy
  terms are scaled with it."""
  from papo_jax.rl.losses import gamma_schedule
  if c.papo.gamma_end >= 0:
    gamma, scale = (float(x) for x in gamma_schedule(step, c.train.steps, c.papo.gamma, c.papo.gamma_end,
                                                        horizon_frac=c.papo.gamma_horizon_frac))
  else:
    gamma, scale = float(c.papo.gamma), 1.0
  lowered = 0.5 ** gamma_halvings
  return PerceptionTerms(gamma * lowered, scale * lowered if c.papo.gamma else 1.0, needs_masked_pass(c))


def mesh_rules(c: ml_collections.ConfigDict):
  """The logical-axis sharding rules of a run: ``parallel.DEFAULT_RULES`` with ``mesh.rules`` applied."""
  from papo_jax.parallel import make_rules
  return make_rules(c.mesh.rules)


def step_config(c: ml_collections.ConfigDict):
  """The train step's static switches (loss constants, masked-path gradient, log-prob chunk) from a run config.

  VPPO's groups are the rollout groups (``group_size = rollout.n``); ``vppo.*`` values of -1
  (or 0 for the chunks) are off (None).
  """
  from papo_jax.rl.losses import LossConfig
  from papo_jax.rl.train_step import StepConfig
  loss = LossConfig(eps_low=c.algo.eps_low, eps_high=c.algo.eps_high, dual_clip=c.algo.dual_clip, beta=c.algo.beta,
                    gamma=c.papo.gamma, eta_ori=c.papo.eta_ori, eta_mask=c.papo.eta_mask, agg=c.algo.agg,
                    kl_prcp_clamp=(0.0, c.papo.kl_prcp_clamp_hi) if c.papo.kl_prcp_clamp_hi > 0 else None,
                    kl_prcp_top_frac=c.papo.kl_prcp_top_frac if c.papo.kl_prcp_top_frac > 0 else None,
                    vppo_top_frac=c.vppo.top_frac if c.vppo.top_frac > 0 else None,
                    vppo_adv_scale_min=c.vppo.adv_scale_min if c.vppo.adv_scale_min >= 0 else None,
                    vppo_minmax_chunk=c.vppo.minmax_chunk or None, vppo_mean_chunk=c.vppo.mean_chunk or None,
                    vppo_dependency=c.vppo.dependency, adaptive_gamma=bool(c.papo.adaptive_gamma),
                    adaptive_gamma_max=c.papo.adaptive_gamma_max, group_size=c.rollout.n)
  return StepConfig(loss=loss, mask_grad=c.papo.mask_grad, logprob_chunk=c.optim.logprob_chunk)


def optimizer(c: ml_collections.ConfigDict):
  """AdamW with global-norm clipping at ``optim.grad_clip`` (the one place gradients are clipped)."""
  from papo_jax.rl.train_step import make_optimizer
  return make_optimizer(c.optim.lr, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
                        weight_decay=c.optim.weight_decay, grad_clip=c.optim.grad_clip)


# ============================================================================================
# Validation (before anything is built or written)
# ============================================================================================

class ConfigError(ValueError):
  """A config field that cannot run; the message names the field."""


def checkpoint_dir(c: ml_collections.ConfigDict, workdir: str) -> str:
  """``checkpoint.dir`` (a local path or a ``gs://`` URL, which orbax writes natively) or ``workdir/checkpoints``."""
  if c.checkpoint.get("dir"):
    return c.checkpoint.dir
  return os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir, "checkpoints")


def _check_data_path(need, field: str, source: str, path: str) -> None:
  """A path where the source reads one (an existing local file, directory or matching glob), none otherwise."""
  if source == "synthetic":
    need(not path, field, f"{path!r} is given but source 'synthetic' reads no files; leave it empty")
    return
  need(bool(path), field, f"is empty for source {source!r}")
  if "://" in path and not path.startswith("file://"):
    return   # remote: checked when it is copied
  local = path[len("file://"):] if path.startswith("file://") else path
  if source == "hf_datasets":
    need(os.path.isfile(os.path.join(local, "state.json")), field,
         f"{path!r} is not a datasets directory (no state.json)")
  elif source == "jsonl":
    need(os.path.isfile(local), field, f"{path!r} is not a file")
  else:
    need(os.path.isfile(local) or os.path.isdir(local) or bool(glob.glob(local)), field,
         f"{path!r} is no file, directory or matching glob")


def validate_config(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the field for anything that cannot run."""
  def need(cond, field, msg):
    if not cond:
      raise ConfigError(f"config field {field}: {msg}")
  need(c.model.init in ("pretrained", "tiny_random"), "model.init", f"{c.model.init!r} is not pretrained|tiny_random")
  if c.model.init == "pretrained":
    need(bool(c.model.path), "model.path", "is empty; give a local checkpoint directory")
    if "://" not in c.model.path:
      need(os.path.isdir(c.model.path), "model.path", f"{c.model.path!r} is not a directory")
      need(os.path.exists(os.path.join(c.model.path, "config.json")), "model.path",
           f"{c.model.path!r} has no config.json")
  for f in ("dtype", "param_dtype", "ref_dtype"):
    need(c.model[f] in ("float32", "bfloat16", "float16"), f"model.{f}", f"{c.model[f]!r} is not a float dtype")
  need(c.data.source in ("parquet", "jsonl", "hf_datasets", "synthetic"), "data.source", f"{c.data.source!r} unknown")
  _check_data_path(need, "data.path", c.data.source, c.data.path)
  if c.val.every > 0:
    val_source = c.val.source or c.data.source
    need(val_source in ("parquet", "jsonl", "hf_datasets", "synthetic"), "val.source", f"{val_source!r} unknown")
    if c.val.path or val_source != c.data.source:
      _check_data_path(need, "val.path", val_source, c.val.path)
  need(c.rollout.n >= 1, "rollout.n", f"{c.rollout.n} < 1")
  need(c.rollout.engine in ("static", "continuous"), "rollout.engine",
       f"{c.rollout.engine!r} is not static|continuous")
  for f in ("num_slots", "page_size", "kv_pages", "prefill_chunk", "prefill_lanes", "min_decode_lanes"):
    need(c.rollout[f] >= 1, f"rollout.{f}", f"{c.rollout[f]} < 1")
  need(c.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", f"{c.rollout.max_new_tokens} < 1")
  need(c.rollout.chunk_prompts >= 0, "rollout.chunk_prompts", f"{c.rollout.chunk_prompts} < 0 (0 = from the budget)")
  need(c.rollout.kv_budget_gb >= 0, "rollout.kv_budget_gb", f"{c.rollout.kv_budget_gb} < 0 (0 = free device memory)")
  need(c.rollout.top_p_candidates >= 0, "rollout.top_p_candidates",
       f"{c.rollout.top_p_candidates} < 0 (0 = sort the whole vocabulary)")
  try:
    mesh_rules(c)
  except ValueError as e:
    need(False, "mesh.rules", str(e))
  if c.noisy.enabled:
    from papo_jax.data import noise
    need(1 <= c.noisy.rollouts < c.rollout.n, "noisy.rollouts",
         f"{c.noisy.rollouts} must be in [1, rollout.n - 1 = {c.rollout.n - 1}]: each group needs clean and "
         "noisy rollouts (rollout.n is the whole group)")
    need(0 <= c.noisy.strength < noise.NUM_STEPS, "noisy.strength",
         f"{c.noisy.strength} is not a diffusion step in [0, {noise.NUM_STEPS - 1}]")
    need(c.noisy.decay_mode in noise.DECAY_MODES, "noisy.decay_mode",
         f"{c.noisy.decay_mode!r} is not one of {'|'.join(noise.DECAY_MODES)}")
  need(c.algo.name in ("grpo", "dapo"), "algo.name", f"{c.algo.name!r} is not grpo|dapo")
  need(c.algo.dapo_chunk >= 1, "algo.dapo_chunk", f"{c.algo.dapo_chunk} < 1")
  need(c.algo.dapo_max_rounds >= 1, "algo.dapo_max_rounds", f"{c.algo.dapo_max_rounds} < 1")
  if c.algo.dynamic_sampling:   # the rounds must generate a full batch, filtered or not (DynamicSampler)
    chunk = min(c.algo.dapo_chunk, c.data.batch_size)
    need(chunk * c.algo.dapo_max_rounds >= c.data.batch_size, "algo.dapo_max_rounds",
         f"{c.algo.dapo_max_rounds} rounds of {chunk} prompts cannot fill data.batch_size={c.data.batch_size}")
  need(c.papo.gamma >= 0, "papo.gamma", f"{c.papo.gamma} < 0 (the perception KL is subtracted already)")
  rows = c.data.batch_size * c.rollout.n
  need(rows % (c.optim.mini_batches * c.optim.micro_batches) == 0, "optim.micro_batches",
       f"{rows} rollouts per step do not split into {c.optim.mini_batches} mini x "
       f"{c.optim.micro_batches} micro batches")
  _check_vppo(need, c, rows // max(c.optim.mini_batches, 1))
  need(c.monitor.action in ("warn", "lower_gamma", "stop"), "monitor.action", f"{c.monitor.action!r} unknown")
  need(c.train.steps >= 1, "train.steps", f"{c.train.steps} < 1")
  need(c.model.attention in ("auto", "xla", "cudnn", "pallas_tpu"), "model.attention",
       f"{c.model.attention!r} is not auto|xla|cudnn|pallas_tpu")
  need(not (c.model.attention == "cudnn" and c.model.dtype == "float32"), "model.attention",
       "cudnn needs model.dtype bfloat16 or float16")
  need(c.model.tiny.family in ("qwen2_5_vl", "qwen3_vl"), "model.tiny.family",
       f"{c.model.tiny.family!r} is not qwen2_5_vl|qwen3_vl")
  need(c.reward.format_mode in ("auto", "think", "thinking"), "reward.format_mode",
       f"{c.reward.format_mode!r} is not auto|think|thinking")
  need(c.log.samples_every >= 0 and c.log.samples_per_step >= 0, "log.samples_every",
       "log.samples_every and log.samples_per_step must be >= 0")


def _check_vppo(need, c: ml_collections.ConfigDict, rows_per_update: int) -> None:
  """The vppo group and adaptive γ: ranges, and the row sets they normalise over within one update."""
  v = c.vppo
  need(v.top_frac == -1 or 0 < v.top_frac <= 1, "vppo.top_frac", f"{v.top_frac} is not -1 (off) or in (0, 1]")
  need(v.adv_scale_min == -1 or 0 <= v.adv_scale_min <= 1, "vppo.adv_scale_min",
       f"{v.adv_scale_min} is not -1 (off) or in [0, 1]")
  need(v.dependency in ("k3", "full_kl"), "vppo.dependency", f"{v.dependency!r} is not k3|full_kl")
  need(v.minmax_chunk >= 0 and (v.minmax_chunk == 0 or rows_per_update % v.minmax_chunk == 0), "vppo.minmax_chunk",
       f"{v.minmax_chunk}: must be 0 (the whole update) or divide the {rows_per_update} rows of an update")
  minmax = v.minmax_chunk or rows_per_update
  need(v.mean_chunk >= 0 and (v.mean_chunk == 0 or minmax % v.mean_chunk == 0), "vppo.mean_chunk",
       f"{v.mean_chunk}: must be 0 (= vppo.minmax_chunk) or divide its {minmax} rows")
  need(c.papo.adaptive_gamma_max > 0, "papo.adaptive_gamma_max", f"{c.papo.adaptive_gamma_max} <= 0")
  if c.papo.adaptive_gamma:
    need(c.papo.gamma > 0 or c.papo.gamma_end > 0, "papo.adaptive_gamma",
         "scales the perception KL, which is off (papo.gamma = 0 and no papo.gamma_end > 0)")
    need(rows_per_update % c.rollout.n == 0, "papo.adaptive_gamma",
         f"compares each response with its group's, but the {rows_per_update} rows of an update "
         f"(optim.mini_batches={c.optim.mini_batches}) cut groups of rollout.n={c.rollout.n}")
