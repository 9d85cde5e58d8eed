r"""PAPO / GRPO / DAPO training of a Qwen-VL policy.

    python -m papo_jax.train --config=configs/tiny.py --workdir=/tmp/papo_tiny
    python -m papo_jax.train --config=configs/qwen25vl_3b.py:papo_g --workdir=gs://bucket/run \
        --config.model.path=/ckpt/Qwen2.5-VL-3B-Instruct --config.data.path=/data/virl39k/train.parquet

One RL step (papo.md §1): prompts -> masked copies -> n rollouts (DAPO: refill until
enough informative groups) -> rewards -> group advantages -> fused train step(s) ->
metrics -> checkpoint. Rerunning the same command resumes from the last checkpoint in
--workdir with the data position, PRNG state and optimizer state intact.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  config_flags.DEFINE_config_file("config", None, "Run config (a configs/*.py file, optionally :variant).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here; reruns resume from it.")
  flags.mark_flags_as_required(["config", "workdir"])


# ============================================================================================
# Config validation (before anything is written)
# ============================================================================================

class ConfigError(ValueError):
  pass


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
  if c.data.source != "synthetic":
    need(bool(c.data.path), "data.path", f"is empty for source {c.data.source!r}")
  need(c.rollout.n >= 1, "rollout.n", f"{c.rollout.n} < 1")
  need(c.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", f"{c.rollout.max_new_tokens} < 1")
  need(c.algo.name in ("grpo", "dapo"), "algo.name", f"{c.algo.name!r} is not grpo|dapo")
  need(c.papo.gamma >= 0, "papo.gamma", f"{c.papo.gamma} < 0 (the perception KL is subtracted already)")
  rows = c.data.batch_size * c.rollout.n
  need(rows % (c.optim.mini_batches * c.optim.micro_batches) == 0, "optim.micro_batches",
       f"{rows} rollouts per step do not split into {c.optim.mini_batches} mini x {c.optim.micro_batches} micro batches")
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


# ============================================================================================
# Pieces
# ============================================================================================

def checkpoint_dir(c, workdir: str) -> str:
  """``checkpoint.dir`` (a local path or a ``gs://`` URL, which orbax writes natively) or ``workdir/checkpoints``."""
  if c.checkpoint.get("dir"):
    return c.checkpoint.dir
  return os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir, "checkpoints")


def max_image_patches(c, model_config) -> int:
  """Patches of the largest image the processor emits under ``data.max_pixels``.

  The vision tower's full-attention layers pad each image to this, so their memory is
  linear in the number of images.
  """
  return c.data.max_pixels // model_config.vision.patch_size ** 2


def tiny_checkpoint_once(c, path: str) -> str:
  """Process 0 writes the tiny checkpoint; the others wait for it (a shared workdir)."""
  if jax.process_index() == 0:
    build_tiny_checkpoint(c, path)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("papo_tiny_checkpoint")
  return path


def build_tiny_checkpoint(c, path: str) -> str:
  """Writes a tiny random checkpoint of ``model.tiny.family`` (weights, config, tokenizer, processor) once."""
  from papo_jax import models
  from papo_jax.data import tiny_tokenizer
  if os.path.exists(os.path.join(path, "model.safetensors")):
    return path
  t = c.model.tiny
  ids = tiny_tokenizer.build_tiny_checkpoint_files(path, min_pixels=c.data.min_pixels or None,
                                                   max_pixels=c.data.max_pixels or None, family=t.family)
  hf = dict(model_type="qwen2_5_vl", vocab_size=ids["vocab_size"], hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
            rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=True,
            rope_scaling={"type": "mrope", "mrope_section": _mrope_section(t.hidden_size // t.num_attention_heads)},
            image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
            vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"],
            bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
            vision_config=dict(depth=t.vision_depth, hidden_size=t.vision_hidden_size, num_heads=t.vision_heads,
                               intermediate_size=t.vision_intermediate_size, out_hidden_size=t.hidden_size,
                               fullatt_block_indexes=[t.vision_depth - 1], patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2, window_size=112, tokens_per_second=2))
  if t.family == "qwen3_vl":
    hf = _tiny_qwen3_vl_config(t, ids)
  cfg = models.from_hf_dict(hf, dtype="float32", param_dtype="float32")
  models.save_pretrained(models.init_model(cfg.replace(hf_dict=None), seed=t.seed), path)
  return path


def _tiny_qwen3_vl_config(t, ids) -> dict:
  """config.json of a tiny Qwen3-VL: DeepStack from vision blocks 0.. into as many decoder layers (<= 3)."""
  head_dim = t.hidden_size // t.num_attention_heads
  text = dict(vocab_size=ids["vocab_size"], hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
              num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
              num_key_value_heads=t.num_key_value_heads, head_dim=head_dim, rms_norm_eps=1e-6,
              max_position_embeddings=4096, tie_word_embeddings=True, attention_bias=False,
              rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,
                               "mrope_section": _mrope_section(head_dim)},
              bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
  deepstack = list(range(min(t.vision_depth, t.num_hidden_layers, 3)))
  vision = dict(depth=t.vision_depth, hidden_size=t.vision_hidden_size, num_heads=t.vision_heads,
                intermediate_size=t.vision_intermediate_size, out_hidden_size=t.hidden_size,
                hidden_act="gelu_pytorch_tanh", patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                num_position_embeddings=16, deepstack_visual_indexes=deepstack)
  return dict(model_type="qwen3_vl", tie_word_embeddings=True, text_config=text, vision_config=vision,
              image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
              vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"])


def format_mode(c, processor) -> str:
  """reward.format_mode, with ``auto`` resolved from the chat template (``thinking`` if it opens <think>)."""
  if c.reward.format_mode != "auto":
    return c.reward.format_mode
  mode = "thinking" if processor is not None and processor.thinking else "think"
  logging.info("reward format mode %r (from the chat template)", mode)
  return mode


def _mrope_section(head_dim: int):
  half = head_dim // 2
  t = half // 4
  h = (half - t) // 2
  return [t, h, half - t - h]


class Monitor:
  """Early warnings of KL_prcp hacking (papo.md §8): perception-KL spike, rising high clip, rising entropies."""

  def __init__(self, m):
    self.cfg = m
    self.hist: list[dict] = []

  def check(self, metrics: dict) -> list[str]:
    warnings = []
    h = self.hist[-self.cfg.window:]
    if len(h) >= 3:
      base = np.median([x.get("actor/kl_prcp", 0.0) for x in h])
      kl = metrics.get("actor/kl_prcp", 0.0)
      if base > 0 and kl > self.cfg.kl_prcp_spike * base:
        warnings.append(f"perception KL spiked to {kl:.4g} ({kl / base:.1f}x its recent median)")
      clip = [x.get("actor/clipfrac_high", 0.0) for x in h] + [metrics.get("actor/clipfrac_high", 0.0)]
      if clip[-1] > self.cfg.clipfrac_high_max and all(a <= b for a, b in zip(clip[-4:], clip[-3:])):
        warnings.append(f"high-side clip fraction keeps rising ({clip[-1]:.3f})")
      for k in ("actor/entropy_ori", "actor/entropy_mask"):
        e0 = np.mean([x.get(k, 0.0) for x in h])
        if k in metrics and e0 > 0 and metrics[k] > (1 + self.cfg.entropy_rise) * e0:
          warnings.append(f"{k} rose to {metrics[k]:.3f} from {e0:.3f}")
    self.hist.append(metrics)
    return warnings


class MetricWriter:
  """Console line, JSONL in the workdir, TensorBoard (and W&B when configured); process 0 only."""

  def __init__(self, workdir: str, c):
    self.active = jax.process_index() == 0
    self.jsonl = None
    self.tb = None
    self.wandb = None
    if not self.active:
      return
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if c.log.tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:
        logging.warning("tensorboardX is not installed; TensorBoard logging is off")
    if c.log.wandb_project:
      import wandb  # optional dependency
      self.wandb = wandb.init(project=c.log.wandb_project, config=c.to_dict(), dir=workdir)

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in row.items():
        if k != "step":
          self.tb.add_scalar(k, v, step)
      self.tb.flush()
    if self.wandb is not None:
      self.wandb.log(row, step=step)

  def close(self):
    if self.jsonl:
      self.jsonl.close()
    if self.tb:
      self.tb.close()


def decode_responses(tokenizer, tokens_RxT: np.ndarray, mask_RxT: np.ndarray, stop_ids) -> list[str]:
  out = []
  for toks, m in zip(tokens_RxT, mask_RxT):
    toks = [int(t) for t, k in zip(toks, m) if k and int(t) not in stop_ids]
    out.append(tokenizer.decode(toks, skip_special_tokens=False))
  return out


# ============================================================================================
# Main
# ============================================================================================

def train(c: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the configured training; returns the last step's metrics."""
  import orbax.checkpoint as ocp
  from tqdm import tqdm

  from papo_jax import eval as eval_lib
  from papo_jax import models
  from papo_jax.data import pipeline, remote
  from papo_jax.parallel import allgather_objects, make_mesh, to_host, use_mesh_rules
  from papo_jax.rl import advantages as adv_lib
  from papo_jax.rl import batching, rewards
  from papo_jax.rl.losses import LossConfig, gamma_schedule
  from papo_jax.rl.train_step import (StepConfig, init_train_state, make_logprob_pass, make_optimizer,
                                      make_train_step)
  from papo_jax.sampling import SamplingConfig, Sampler

  validate_config(c)
  # ---------------------------------------------------------------- setup & mesh
  start_distributed()
  os.makedirs(workdir, exist_ok=True)
  primary = jax.process_index() == 0
  with open(os.path.join(workdir, "config.json" if primary else f"config.process{jax.process_index()}.json"), "w") as f:
    f.write(c.to_json_best_effort(indent=2))
  mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  logging.info("mesh %s over %d devices", dict(mesh.shape), jax.device_count())

  # ---------------------------------------------------------------- model & reference
  model_path = (remote.localize(c.model.path) if c.model.init == "pretrained"
                else tiny_checkpoint_once(c, os.path.join(workdir, "model")))
  model = models.from_pretrained(model_path, dtype=c.model.dtype, param_dtype=c.model.param_dtype, mesh=mesh,
                                 remat=c.model.remat, attention=c.model.attention,
                                 attention_block=c.model.attention_block,
                                 max_image_patches=max_image_patches(c, models.load_config(model_path)))
  graphdef, params = nnx.split(model)
  mcfg = model.config
  need_ref = c.algo.beta > 0
  # A copy with its own buffers: the policy state is donated to every update.
  ref_params = jax.tree.map(lambda a: jnp.array(a, dtype=jnp.dtype(c.model.ref_dtype), copy=True), params) if need_ref else None

  # ---------------------------------------------------------------- losses, optimizer, state
  clamp = (0.0, c.papo.kl_prcp_clamp_hi) if c.papo.kl_prcp_clamp_hi > 0 else None
  loss_cfg = LossConfig(eps_low=c.algo.eps_low, eps_high=c.algo.eps_high, dual_clip=c.algo.dual_clip,
                        beta=c.algo.beta, gamma=c.papo.gamma, eta_ori=c.papo.eta_ori, eta_mask=c.papo.eta_mask,
                        agg=c.algo.agg, kl_prcp_clamp=clamp,
                        kl_prcp_top_frac=c.papo.kl_prcp_top_frac if c.papo.kl_prcp_top_frac > 0 else None)
  step_cfg = StepConfig(loss=loss_cfg, mask_grad=c.papo.mask_grad, logprob_chunk=c.optim.logprob_chunk,
                        grad_clip=c.optim.grad_clip)
  tx = make_optimizer(c.optim.lr, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
                      weight_decay=c.optim.weight_decay, grad_clip=c.optim.grad_clip)
  state = init_train_state(params, tx)
  state_sh = pinned_shardings(state, mesh)
  state = jax.device_put(state, state_sh)
  # The state is donated (the update reuses its buffers) and pinned to one sharding, so the
  # program compiles once per batch shape; the sampler reads state.params (no copy).
  train_step = jax.jit(make_train_step(graphdef, tx, step_cfg), donate_argnums=(0,), out_shardings=(state_sh, None))
  logprob_pass = jax.jit(make_logprob_pass(graphdef, step_cfg)) if c.optim.mini_batches > 1 else None

  # ---------------------------------------------------------------- data
  data_cfg = pipeline.DataConfig(**{**c.data.to_dict(), "path": remote.localize(c.data.path) if c.data.path else ""})
  data_cfg.mask = dataclass_replace(data_cfg.mask, enabled=step_cfg.needs_mask)
  local_it = pipeline.make_iterator(data_cfg, ckpt_dir=model_path)
  it = GlobalBatches(local_it, local_it.processor.pad_token_id)
  tokenizer = it.processor.tokenizer if hasattr(it, "processor") else None
  if tokenizer is None:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_path)

  # ---------------------------------------------------------------- restore
  ckpt_dir = checkpoint_dir(c, workdir)
  mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=c.checkpoint.keep, enable_async_checkpointing=True))
  start = 0
  if mngr.latest_step() is not None:
    start = mngr.latest_step()
    restored = mngr.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), meta=ocp.args.JsonRestore()))
    state = restored.state
    per_process = restored.meta.get("data_per_process")
    it.set_state(per_process[jax.process_index()] if per_process else restored.meta["data"])
    logging.info("resumed from step %d in %s", start, ckpt_dir)

  # ---------------------------------------------------------------- sampler & rewards
  stop_ids = tuple(int(t) for t in np.atleast_1d(mcfg.eos_token_id))
  sampler = Sampler(graphdef, SamplingConfig(
      max_new_tokens=c.rollout.max_new_tokens, temperature=c.rollout.temperature, top_p=c.rollout.top_p,
      top_k=c.rollout.top_k, cache_dtype=c.rollout.cache_dtype, stop_token_ids=stop_ids,
      pad_token_id=mcfg.pad_token_id), mesh=mesh)
  reward_kw = {} if c.reward.name == "synthetic" else dict(timeout_s=c.reward.timeout_s,
                                                            num_workers=c.reward.num_workers)
  if ":" not in c.reward.name:   # the built-in rewards grade the format (papo.md §5)
    reward_kw["format_mode"] = format_mode(c, getattr(it, "processor", None))
  reward_fn = rewards.get_reward_fn(c.reward.name, **reward_kw)
  pad_id = mcfg.pad_token_id if mcfg.pad_token_id is not None else 0

  reward_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reward")

  def timed_reward(texts, answers):
    t = time.perf_counter()
    return reward_fn(texts, answers), time.perf_counter() - t

  def rollout_groups(batch, step, overlap=False):
    """Samples n responses per prompt and grades them; returns (rollout, tokens, mask, texts, rewards, timing).

    With ``overlap`` the rewards are a future, graded in the background while the caller
    runs the log-prob pass (which needs only the tokens).
    """
    pv = None if batch.num_images == 0 else batch.pixel_values
    grid = None if batch.num_images == 0 else batch.image_grid_thw
    if grid is not None:
      models.check_image_patches(grid, mcfg.max_image_patches)
    key = jax.random.fold_in(jax.random.key(c.train.seed), step)
    key = jax.random.fold_in(key, int(batch.stats.get("batch_index", 0)))
    t0 = time.perf_counter()
    with use_mesh_rules(mesh):
      ro = sampler.generate(state.params, batch.input_ids, batch.attention_mask, pv, grid, n=c.rollout.n, key=key)
    toks, mask = to_host((ro.tokens_RxT, ro.mask_RxT))
    t1 = time.perf_counter()
    texts = decode_responses(tokenizer, toks, mask, stop_ids)
    answers = [a for a in batch.answers for _ in range(c.rollout.n)]
    if overlap:
      return ro, toks, mask, texts, reward_thread.submit(timed_reward, texts, answers), {"timing/generate": t1 - t0}
    r = reward_fn(texts, answers)
    return ro, toks, mask, texts, r, {"timing/generate": t1 - t0, "timing/reward": time.perf_counter() - t1}

  def to_groups(batch, toks, mask, adv):
    n = c.rollout.n
    parts = batching.split_prompt_batch(batch.input_ids, batch.attention_mask,
                                        batch.pixel_values if batch.num_images else None,
                                        batch.masked_pixel_values if batch.num_images else None,
                                        batch.image_grid_thw, batch.image_counts)
    return [batching.Group(*parts[b], responses=toks[b * n:(b + 1) * n], response_mask=mask[b * n:(b + 1) * n],
                           advantages=adv[b * n:(b + 1) * n]) for b in range(len(parts))]

  val_it, val_sampler = None, None
  if c.val.every > 0:
    val_cfg = pipeline.DataConfig(**{**c.data.to_dict(), "source": c.val.source or c.data.source,
                                     "path": remote.localize(c.val.path) if c.val.path else data_cfg.path,
                                     "shuffle": False,
                                     "batch_size": c.val.batch_size or c.data.batch_size,
                                     "synthetic_seed": c.val.synthetic_seed})
    val_cfg.mask = dataclass_replace(val_cfg.mask, enabled=False)
    val_it = GlobalBatches(pipeline.make_iterator(val_cfg, processor=it.processor), it.processor.pad_token_id)
    val_sampler = Sampler(graphdef, dataclass_replace(sampler.cfg, greedy=True), mesh=mesh)
    val_start = val_it.get_state()

  def validate():
    """Mean reward/accuracy of greedy responses on the held-out split (always the same batches)."""
    val_it.set_state(val_start)
    scores = []
    for _ in range(c.val.batches):
      vb = next(val_it)
      with use_mesh_rules(mesh):
        _, r = eval_lib.score_prompt_batch(val_sampler, state.params, vb, k=1, key=0, reward_fn=reward_fn,
                                           tokenizer=tokenizer, stop_ids=stop_ids)
      scores.append(r)
    return {f"val/{k}": float(np.concatenate([s[k] for s in scores]).mean()) for k in scores[0]}

  # ---------------------------------------------------------------- supervised format warm-up (tiny demo)
  if start == 0 and c.train.warmup_sft_steps > 0:
    state = jax.device_put(format_warmup(c, graphdef, state, it, tokenizer, stop_ids, pad_id, mesh), state_sh)

  # ---------------------------------------------------------------- the loop
  writer = MetricWriter(workdir, c)
  monitor = Monitor(c.monitor)
  gamma_now = c.papo.gamma
  metrics = {}
  bar = tqdm(range(start, c.train.steps), initial=start, total=c.train.steps, desc="train",
             disable=jax.process_index() != 0, dynamic_ncols=True)
  for step in bar:
    timing = {}
    t0 = time.perf_counter()
    groups, kept_rewards, texts_all = [], [], []
    dyn = adv_lib.DynamicSampler(c.data.batch_size, c.algo.dapo_max_rounds) if c.algo.dynamic_sampling else None
    rounds = 0
    mb = c.optim.mini_batches
    # GRPO with a separate log-prob pass: grade in the background while that pass runs.
    overlap = c.reward.overlap and dyn is None and mb > 1
    while True:
      batch = next(it)
      ro, toks, mask, texts, r, t = rollout_groups(batch, step * 1000 + rounds, overlap=overlap)
      for k, v in t.items():
        timing[k] = timing.get(k, 0.0) + v
      if overlap:
        pending_rewards, groups = r, to_groups(batch, toks, mask, np.zeros(toks.shape[0], np.float32))
        texts_all += texts
        rounds += 1
        break
      adv = adv_lib.group_advantages(r["overall"], group_size=c.rollout.n)
      new = to_groups(batch, toks, mask, adv)
      rounds += 1
      texts_all += texts
      if dyn is None:
        groups, kept_rewards = new, [r]
        break
      keep = adv_lib.keep_groups(r["accuracy"].reshape(-1, c.rollout.n), c.algo.dapo_acc_low, c.algo.dapo_acc_high)
      dyn.add([(g, {k: v[i * c.rollout.n:(i + 1) * c.rollout.n] for k, v in r.items()}) for i, g in enumerate(new)],
              keep)
      if dyn.done or dyn.rounds >= c.algo.dapo_max_rounds:
        kept = dyn.result()
        groups = [g for g, _ in kept]
        kept_rewards = [{k: np.concatenate([rr[k] for _, rr in kept]) for k in r}]
        break
    # ---------------------------------------------------------------- update
    tu = time.perf_counter()
    arrays = batching.assemble_train_batch(groups, micro_batches=mb * c.optim.micro_batches, pad_id=pad_id)
    full = device_batch(arrays, mesh)
    if overlap:
      # The log-prob pass is dispatched asynchronously; the rewards are awaited while it runs.
      tl = time.perf_counter()
      with use_mesh_rules(mesh):
        old, masked, ref = logprob_pass(state.params, ref_params, full)
      tw = time.perf_counter()
      r, timing["timing/reward"] = pending_rewards.result()
      timing["timing/reward_exposed"] = time.perf_counter() - tw
      adv = adv_lib.group_advantages(r["overall"], group_size=c.rollout.n)
      for g, a in zip(groups, adv.reshape(len(groups), c.rollout.n)):
        g.advantages = a
      kept_rewards = [r]
      adv_arr = batching.assemble_train_batch(groups, micro_batches=mb * c.optim.micro_batches,
                                              pad_id=pad_id)["advantages"]
      jax.block_until_ready(old)
      timing["timing/logprobs"] = time.perf_counter() - tl
      full = full.replace(advantages=device_batch({"advantages": adv_arr}, mesh, whole=False)["advantages"],
                          old_logp=old, mask_logp=masked, ref_logp=ref)
    rew = {k: np.concatenate([x[k] for x in kept_rewards]) for k in kept_rewards[0]}
    if c.papo.gamma_end >= 0:
      g_now, e_scale = gamma_schedule(step, c.train.steps, c.papo.gamma, c.papo.gamma_end)
    else:
      g_now, e_scale = gamma_now, (gamma_now / c.papo.gamma if c.papo.gamma else 1.0)
    with use_mesh_rules(mesh):
      if mb == 1:
        state, m = train_step(state, ref_params, full, jnp.float32(g_now), jnp.float32(e_scale))
        step_metrics = [m]
      else:
        if not overlap:
          tl = time.perf_counter()
          old, masked, ref = logprob_pass(state.params, ref_params, full)
          jax.block_until_ready(old)
          timing["timing/logprobs"] = time.perf_counter() - tl
          full = full.replace(old_logp=old, mask_logp=masked, ref_logp=ref)
        per = full.input_ids.shape[0] // mb
        step_metrics = []
        for j in range(mb):
          part = jax.tree.map(lambda a: a[j * per:(j + 1) * per], full)
          state, m = train_step(state, None, part, jnp.float32(g_now), jnp.float32(e_scale))
          step_metrics.append(m)
    step_metrics = to_host(step_metrics)
    timing["timing/update"] = time.perf_counter() - tu
    # ---------------------------------------------------------------- metrics
    lengths = np.concatenate([g.response_mask.sum(-1) for g in groups])
    metrics = {k: float(np.mean([sm[k] for sm in step_metrics])) for k in step_metrics[0]}
    metrics.update({
        "reward/overall": float(rew["overall"].mean()), "reward/format": float(rew["format"].mean()),
        "reward/accuracy": float(rew["accuracy"].mean()),
        "response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
        "response_length/clip_ratio": float((lengths >= c.rollout.max_new_tokens).mean()),
        "actor/lr": float(c.optim.lr), "actor/gamma": float(g_now),
        "data/skipped_total": float(sum(batch.stats.get("skipped_total", {}).values()))
        if isinstance(batch.stats.get("skipped_total"), dict) else 0.0,
        "dapo/rounds": float(rounds),
    })
    step_time = time.perf_counter() - t0
    timing["timing/step"] = step_time
    metrics.update(timing)
    tokens = float(sum(g.response_mask.sum() + g.prompt_mask.sum() * g.responses.shape[0] for g in groups))
    metrics["throughput/tokens_per_s_per_device"] = tokens / step_time / jax.device_count()
    for w in monitor.check(metrics):
      logging.warning("step %d: KL_prcp hacking warning: %s", step + 1, w)
      if c.monitor.action == "lower_gamma":
        gamma_now *= 0.5
        logging.warning("lowering gamma to %g", gamma_now)
      elif c.monitor.action == "stop":
        logging.warning("stopping; the last good checkpoint is kept")
        mngr.wait_until_finished()
        return metrics
    if val_it is not None and ((step + 1) % c.val.every == 0 or step + 1 == c.train.steps):
      tv = time.perf_counter()
      metrics.update(validate())
      metrics["timing/validate"] = time.perf_counter() - tv
      logging.info("step %d | validation reward %.3f acc %.3f", step + 1, metrics["val/overall"],
                   metrics["val/accuracy"])
    writer.write(step + 1, metrics)
    if jax.process_index() == 0 and (step + 1) % c.log.every == 0:
      bar.set_postfix(reward=f"{metrics['reward/overall']:.3f}", acc=f"{metrics['reward/accuracy']:.3f}",
                      kl_prcp=f"{metrics.get('actor/kl_prcp', 0.0):.4f}")
      logging.info("step %d | reward %.3f acc %.3f fmt %.3f | len %.1f | kl_prcp %.4f | pg %.4f | gnorm %.3f | %.2fs",
                   step + 1, metrics["reward/overall"], metrics["reward/accuracy"], metrics["reward/format"],
                   metrics["response_length/mean"], metrics.get("actor/kl_prcp", 0.0),
                   metrics.get("actor/pg_loss", 0.0), metrics["actor/grad_norm"], step_time)
    # ---------------------------------------------------------------- checkpoint
    if (step + 1) % c.checkpoint.every == 0 or step + 1 == c.train.steps:
      mngr.save(step + 1, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          meta=ocp.args.JsonSave({"data": it.get_state(), "data_per_process": allgather_objects(it.get_state()),
                                  "step": step + 1})))
  mngr.wait_until_finished()
  writer.close()
  it.close()
  if val_it is not None:
    val_it.close()
  if hasattr(reward_fn, "close"):
    reward_fn.close()
  reward_thread.shutdown()
  return metrics


def pinned_shardings(tree, mesh):
  """Each leaf's current sharding, with single-device leaves replicated over ``mesh``."""
  from jax.sharding import NamedSharding, PartitionSpec
  def sh(x):
    s = getattr(x, "sharding", None)
    return s if isinstance(s, NamedSharding) else NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(sh, tree)


def start_distributed() -> None:
  """Joins the other processes of a multi-host run (TPU pods and clusters are auto-detected).

  ``PAPO_DISTRIBUTED=1`` asks for it; ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` +
  ``JAX_PROCESS_ID`` give the processes explicitly (any platform, CPU included).
  """
  env = os.environ
  if not (env.get("PAPO_DISTRIBUTED") or int(env.get("JAX_NUM_PROCESSES", "1")) > 1):
    return
  if jax.distributed.is_initialized():
    return
  kw = {}
  if env.get("JAX_NUM_PROCESSES"):
    kw = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=int(env["JAX_NUM_PROCESSES"]),
              process_id=int(env["JAX_PROCESS_ID"]))
    if jax.config.jax_platforms in (None, "", "cpu") and "cpu" in (env.get("JAX_PLATFORMS") or "cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kw)
  logging.info("process %d of %d", jax.process_index(), jax.process_count())


class GlobalBatches:
  """This process's data shard, joined with the other processes' into one global batch.

  Every process reads only its own records; each ``next`` exchanges the local batches
  so all processes hold the same global PromptBatch (one process: the local batch).
  ``get_state``/``set_state`` are this process's own position.
  """

  def __init__(self, local_iterator, pad_id: int):
    self.local, self.pad_id = local_iterator, pad_id

  def __iter__(self):
    return self

  def __next__(self):
    from papo_jax.data.pipeline import concat_batches
    from papo_jax.parallel import allgather_objects
    return concat_batches(allgather_objects(next(self.local)), self.pad_id)

  def __getattr__(self, name):   # processor, get_state, set_state, close, ...
    return getattr(self.local, name)


def device_batch(arrays: dict, mesh, whole: bool = True):
  """Host arrays (the same on every process) -> global device arrays of a TrainBatch.

  Row-indexed fields [M, b, ...] are sharded over the batch axes; the images of a
  micro-batch ([M, N, ...], consumed by the vision tower whole) are replicated.
  """
  from papo_jax.parallel import global_array
  from papo_jax.rl.train_step import TrainBatch
  whole_image = ("pixel_values", "masked_pixel_values", "image_grid_thw")
  out = {k: global_array(v, mesh, None if k in whole_image else (None, "batch")) for k, v in arrays.items()}
  return TrainBatch(**out) if whole else out


def dataclass_replace(obj, **kw):
  import dataclasses
  return dataclasses.replace(obj, **kw)


def format_warmup(c, graphdef, state, it, tokenizer, stop_ids, pad_id, mesh):
  """Supervised steps on ``<think>…</think>\\boxed{answer}`` with a *random* answer of the right kind.

  A random-init tiny model never emits the answer format, so RL would see zero reward
  everywhere; this teaches the format (and the answer vocabulary) without the task:
  accuracy stays at chance, and learning to read the image is left to RL. It is the
  tiny-model stand-in for starting RL from an instruct checkpoint. The loss is the
  PAPO loss with zero advantages and eta_ori = 1, i.e. the mean token NLL.
  """
  from papo_jax.parallel import use_mesh_rules
  from papo_jax.rl import batching
  from papo_jax.rl.losses import LossConfig
  from papo_jax.rl.train_step import StepConfig, TrainState, make_optimizer, make_train_step

  rng = np.random.default_rng(c.train.seed + 12345)
  answers_by_kind: dict[str, set] = {}
  tx = make_optimizer(c.train.warmup_lr or c.optim.lr, weight_decay=0.0)
  sft_state = TrainState(step=state.step, params=state.params, opt_state=tx.init(state.params))
  sft_sh = pinned_shardings(sft_state, mesh)
  sft_state = jax.device_put(sft_state, sft_sh)
  sft = jax.jit(make_train_step(graphdef, tx, StepConfig(loss=LossConfig(eta_ori=1.0), logprob_chunk=c.optim.logprob_chunk)),
                out_shardings=(sft_sh, None))
  t_max = c.rollout.max_new_tokens
  eos = stop_ids[0]
  for i in range(c.train.warmup_sft_steps):
    batch = next(it)
    for k, a in zip(batch.kinds, batch.answers):
      answers_by_kind.setdefault(k, set()).add(a)
    n = c.rollout.n
    groups = []
    parts = batching.split_prompt_batch(batch.input_ids, batch.attention_mask,
                                        batch.pixel_values if batch.num_images else None, None,
                                        batch.image_grid_thw, batch.image_counts)
    for b, kind in enumerate(batch.kinds):
      pool = sorted(answers_by_kind[kind])
      resp = np.full((n, t_max), pad_id, np.int64)
      rmask = np.zeros((n, t_max), np.int32)
      for k in range(n):
        text = f"<think></think>\\boxed{{{pool[rng.integers(len(pool))]}}}"
        ids = tokenizer.encode(text, add_special_tokens=False)[:t_max - 1] + [eos]
        resp[k, :len(ids)] = ids
        rmask[k, :len(ids)] = 1
      groups.append(batching.Group(*parts[b], responses=resp, response_mask=rmask, advantages=np.zeros(n, np.float32)))
    arrays = batching.assemble_train_batch(groups, micro_batches=c.optim.micro_batches, pad_id=pad_id)
    with use_mesh_rules(mesh):
      sft_state, m = sft(sft_state, None, device_batch(arrays, mesh))
    if (i + 1) % 10 == 0 or i == 0:
      logging.info("format warm-up %d/%d: nll %.3f", i + 1, c.train.warmup_sft_steps, float(m["actor/entropy_ori"]))
  return state.replace(params=sft_state.params)


def main(argv):
  del argv
  c = FLAGS.config
  try:
    validate_config(c)
  except ConfigError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  train(c, FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
