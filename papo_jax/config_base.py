"""The config schema every run shares; ``configs/*.py`` start from :func:`base_config`.

Groups (DESIGN.md): model, data, rollout, algo, papo, reward, optim, train, mesh,
checkpoint, log, monitor, eval. Fields are typed by their defaults, so a command-line
override of the wrong type or an unknown field stops at start-up with its name.
"""

from __future__ import annotations

import ml_collections

# Per-run constants of the paper (papo.md §2): eps_high, beta, gamma, eta_ori/eta_mask, dynamic sampling.
VARIANTS = {
    "grpo": dict(algo="grpo", eps_high=0.3, beta=0.01, gamma=0.0, eta=0.0, dynamic=False),
    "papo_g": dict(algo="grpo", eps_high=0.3, beta=0.01, gamma=0.02, eta=0.0, dynamic=False),
    "papo_g_no_ref_kl": dict(algo="grpo", eps_high=0.3, beta=0.0, gamma=0.01, eta=0.03, dynamic=False),
    "dapo": dict(algo="dapo", eps_high=0.28, beta=0.0, gamma=0.0, eta=0.0, dynamic=True),
    "papo_d": dict(algo="dapo", eps_high=0.28, beta=0.0, gamma=0.01, eta=0.03, dynamic=True),
}


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
  c.rollout = dict(n=5, temperature=1.0, top_p=0.99, top_k=0, max_new_tokens=2048, cache_dtype="bfloat16")
  c.algo = dict(name="grpo", eps_low=0.2, eps_high=0.3, dual_clip=3.0, beta=0.01, agg="token",
                dynamic_sampling=False, dapo_acc_low=0.01, dapo_acc_high=0.99, dapo_chunk=128,
                dapo_max_rounds=20)
  c.papo = dict(gamma=0.0, gamma_end=-1.0, eta_ori=0.0, eta_mask=0.0, mask_grad=False,
                kl_prcp_clamp_hi=-1.0, kl_prcp_top_frac=-1.0)
  # overlap: grade in the background while the log-prob pass runs (GRPO with optim.mini_batches > 1).
  # format_mode: think (<think>.*</think>.*\boxed{}) | thinking (.*</think>.*\boxed{}, for chat
  # templates that open <think> themselves: Qwen3-VL "Thinking") | auto (from the chat template).
  c.reward = dict(name="math", timeout_s=5.0, num_workers=2, overlap=True, format_mode="auto")
  c.optim = dict(lr=1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0, mini_batches=3,
                 micro_batches=8, logprob_chunk=512)
  c.train = dict(steps=202, seed=0, warmup_sft_steps=0, warmup_lr=0.0)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.checkpoint = dict(every=10, keep=3, dir="")   # dir: "" = <workdir>/checkpoints; gs:// URLs work
  c.log = dict(every=1, tensorboard=True, wandb_project="")
  c.monitor = dict(kl_prcp_spike=5.0, clipfrac_high_max=0.2, entropy_rise=0.5, window=10,
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
  return apply_variant(c, variant)


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Sets the paper's constants for one of grpo | papo_g | papo_g_no_ref_kl | dapo | papo_d."""
  if variant not in VARIANTS:
    raise ValueError(f"config variant {variant!r} is not one of {sorted(VARIANTS)}")
  v = VARIANTS[variant]
  c.algo.name = v["algo"]
  c.algo.eps_high = v["eps_high"]
  c.algo.beta = v["beta"]
  c.algo.dynamic_sampling = v["dynamic"]
  c.papo.gamma = v["gamma"]
  c.papo.eta_ori = c.papo.eta_mask = v["eta"]
  c.data.mask.enabled = v["gamma"] > 0 or v["eta"] > 0
  return c
