r"""PAPO / GRPO / DAPO training of a Qwen-VL policy.

    python -m papo_jax.train --config=configs/tiny.py --workdir=/tmp/papo_tiny   # the paper's runs: README.md

One RL step (papo.md §1):

    collect_groups   prompts (+ masked copies) -> n rollouts each -> rewards
                     (DAPO: refill in algo.dapo_chunk-prompt chunks until enough groups survive)
    update           group advantages -> [log-prob pass] -> one optimizer update per mini-batch
    report           metrics, samples, monitor, validation -> checkpoint

Rerunning the same command resumes from the last checkpoint in --workdir with the data
position, PRNG state and optimizer state intact; a finished run says so and stops.
SIGTERM (a preempted spot VM) or Ctrl-C ends the run after the current step with a
checkpoint and exit status 0. --workdir may be gs:// or any fsspec URL.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from papo_jax import metrics as metrics_lib
from papo_jax.config_base import ConfigError, mesh_rules, optimizer, perception_terms, step_config, validate_config
from papo_jax.parallel import (DEFAULT_RULES, GlobalBatches, batch_shards, first_process_then_sync, global_train_arrays,
                               pinned_shardings, start_distributed, to_host, use_mesh_rules)
from papo_jax.rollouts import (done_future, graded, groups_from_batch, make_validator, repeat_answers,
                               rollout_chunk_prompts, rollout_key, sample_group_texts)

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  config_flags.DEFINE_config_file("config", None, "Run config (a configs/*.py file, optionally :variant).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here; reruns resume from it.")
  flags.mark_flags_as_required(["config", "workdir"])


@dataclasses.dataclass
class Run:
  """Everything one RL step reads; built once by :func:`setup`."""
  c: ml_collections.ConfigDict
  mesh: Any
  graphdef: Any
  model_config: Any
  it: GlobalBatches             # training prompts (DAPO: algo.dapo_chunk per batch)
  tokenizer: Any
  sampler: Any
  reward_fn: Any
  grader: concurrent.futures.ThreadPoolExecutor
  train_step: Any
  logprob_pass: Any | None     # old/masked/ref log-probs (and full-KL dependency) before the first update
  stop_ids: tuple
  pad_id: int
  rules: tuple = DEFAULT_RULES  # logical-axis sharding rules (config_base.mesh_rules)
  rollout_chunk: int = 0        # prompts per generate call (0: the whole batch); rollouts.rollout_chunk_prompts

  def close(self):
    for closable in (self.it, self.reward_fn):
      if hasattr(closable, "close"):
        closable.close()
    self.grader.shutdown()


# ============================================================================================
# Collect: prompts -> rollouts -> rewards
# ============================================================================================

class Collected(NamedTuple):
  groups: list                  # batching.Group per kept prompt; advantages set by update()
  rewards: concurrent.futures.Future   # -> (rewards dict of [R] arrays, seconds spent grading)
  graded_in_background: bool    # the rewards are still being graded while update() starts
  samples: list                 # (prompt, answer, response) of the kept rows, row order
  rounds: int                   # generation rounds (DAPO refills)
  seconds_generating: float
  stats: dict                   # data pipeline stats of the last prompt batch
  padded_groups: int = 0        # DAPO: filtered groups that filled the batch after algo.dapo_max_rounds


def collect_groups(run: Run, params, step: int) -> Collected:
  """Prompt groups with n responses each and their rewards, the same way for GRPO, DAPO and overlap.

  GRPO with several mini-batches and ``reward.overlap`` grades in the background (the
  log-prob pass needs only the tokens); DAPO grades each chunk at once to keep the
  groups whose accuracy is neither all 0 nor all 1, until ``data.batch_size`` survive.
  NoisyRollout: the last ``noisy.rollouts`` responses of each group are sampled on the
  prompt's distorted images; the groups (hence the update) carry the clean images only.
  """
  from papo_jax import models
  from papo_jax.config_base import noisy_rollouts
  from papo_jax.rl import advantages as adv_lib
  c, n, n_noisy = run.c, run.c.rollout.n, noisy_rollouts(run.c)
  dapo = adv_lib.DynamicSampler(c.data.batch_size, c.algo.dapo_max_rounds) if c.algo.dynamic_sampling else None
  background = c.reward.overlap and dapo is None and c.optim.mini_batches > 1
  seconds_gen = seconds_grade = 0.0
  for round_ in range(c.algo.dapo_max_rounds if dapo else 1):
    batch = next(run.it)
    if batch.num_images:
      models.check_image_patches(batch.image_grid_thw, run.model_config.max_image_patches)
    t = time.perf_counter()
    with use_mesh_rules(run.mesh, run.rules):
      toks, mask, texts = sample_group_texts(run.sampler, params, batch, n=n, n_noisy=n_noisy, key=rollout_key(
          c.train.seed, step, round_, int(batch.stats.get("batch_index", 0))), tokenizer=run.tokenizer,
          stop_ids=run.stop_ids, chunk_prompts=run.rollout_chunk)
    seconds_gen += time.perf_counter() - t
    answers = repeat_answers(batch.answers, n)
    groups = groups_from_batch(batch, toks, mask, n)
    samples = list(zip(repeat_answers(batch.problems, n), answers, texts))
    if background:
      return Collected(groups, run.grader.submit(graded, texts, answers, run.reward_fn), True, samples, 1,
                       seconds_gen, batch.stats)
    rewards, seconds = graded(texts, answers, run.reward_fn)
    seconds_grade += seconds
    if dapo is None:
      return Collected(groups, done_future((rewards, seconds)), False, samples, 1, seconds_gen, batch.stats)
    per_group = [(g, {k: v[i * n:(i + 1) * n] for k, v in rewards.items()}, samples[i * n:(i + 1) * n])
                 for i, g in enumerate(groups)]
    dapo.add(per_group, adv_lib.keep_groups(rewards["accuracy"].reshape(-1, n), c.algo.dapo_acc_low,
                                            c.algo.dapo_acc_high))
    if dapo.done:
      break
  kept = dapo.result()
  rewards = {k: np.concatenate([r[k] for _, r, _ in kept]) for k in kept[0][1]}
  return Collected([g for g, _, _ in kept], done_future((rewards, seconds_grade)), False,
                   [s for _, _, ss in kept for s in ss], dapo.rounds, seconds_gen, batch.stats, dapo.padded_groups)


# ============================================================================================
# Update: advantages -> log-prob pass -> one optimizer update per mini-batch
# ============================================================================================

def update(run: Run, state, ref_params, col: Collected, gamma: float, entropy_scale: float,
           sample_step: bool = False):
  """Returns (state, per-update metrics, rewards, timing, perception).

  ``perception``: on a sample step with masked copies, the visual dependency of every
  response token under the pre-update policy (:mod:`papo_jax.diagnostics`); else None.
  """
  from papo_jax import diagnostics
  from papo_jax.rl import advantages as adv_lib
  from papo_jax.rl import batching
  from papo_jax.rl.train_step import TrainBatch
  c = run.c
  mini, micro = c.optim.mini_batches, c.optim.mini_batches * c.optim.micro_batches
  timing, t0 = {"timing/generate": col.seconds_generating}, time.perf_counter()
  batch = TrainBatch(**global_train_arrays(
      batching.assemble_train_batch(col.groups, micro_batches=micro, pad_id=run.pad_id,
                                     shards=batch_shards(run.mesh, run.rules), pixel_dtype=c.model.dtype), run.mesh))
  t_logp = time.perf_counter()
  if run.logprob_pass is not None:   # dispatched asynchronously: background grading finishes meanwhile
    with use_mesh_rules(run.mesh, run.rules):
      logps = run.logprob_pass(state.params, ref_params, batch)
  t_wait = time.perf_counter()
  rewards, timing["timing/reward"] = col.rewards.result()
  if col.graded_in_background:
    timing["timing/reward_exposed"] = time.perf_counter() - t_wait
  adv_R = adv_lib.group_advantages(rewards["overall"], group_size=c.rollout.n)
  batch = batch.replace(advantages=global_train_arrays({"advantages": adv_R.reshape(micro, -1)}, run.mesh)
                        ["advantages"])
  if run.logprob_pass is not None:
    jax.block_until_ready(logps[0])
    timing["timing/logprobs"] = time.perf_counter() - t_logp
    batch = batch.replace(old_logp=logps[0], mask_logp=logps[1], ref_logp=logps[2], dependency=logps[3])
  perception = diagnostics.step_perception(run, state.params, batch, col.groups, sample_step)   # before donation
  g, s, per = jnp.float32(gamma), jnp.float32(entropy_scale), batch.input_ids.shape[0] // mini
  step_metrics = []
  with use_mesh_rules(run.mesh, run.rules):   # one optimizer update per mini-batch (micro-batches accumulate inside)
    for j in range(mini):
      part = batch if mini == 1 else jax.tree.map(lambda a: a[j * per:(j + 1) * per], batch)
      state, m = run.train_step(state, ref_params if run.logprob_pass is None else None, part, g, s)
      step_metrics.append(m)
  step_metrics = to_host(step_metrics)
  timing["timing/update"] = time.perf_counter() - t0
  return state, step_metrics, rewards, timing, perception


# ============================================================================================
# Setup
# ============================================================================================

def train_data_config(c):
  """The training prompts: masked copies when the step needs them, distorted copies for NoisyRollout
  (their strength follows the RL step: ``data.noise.batch_step``); DAPO reads ``algo.dapo_chunk``
  prompts per batch and refills until ``data.batch_size`` groups survive (papo.md §4)."""
  from papo_jax.config_base import noisy_rollouts
  from papo_jax.data import noise, pipeline, remote
  cfg = pipeline.DataConfig(**{**c.data.to_dict(), "path": remote.localize(c.data.path) if c.data.path else ""})
  cfg.mask = dataclasses.replace(cfg.mask, enabled=perception_terms(c).needs_mask)
  cfg.noise = noise.NoiseConfig(enabled=noisy_rollouts(c) > 0, strength=c.noisy.strength,
                                decay_mode=c.noisy.decay_mode, decay_coef=c.noisy.decay_coef, mid_step=c.noisy.mid_step,
                                total_steps=c.train.steps, prompts_per_step=c.data.batch_size,
                                warmup_batches=c.train.warmup_sft_steps)   # warmup.format_warmup reads as many
  if c.algo.dynamic_sampling:
    cfg.batch_size = min(c.algo.dapo_chunk, c.data.batch_size)
  return cfg


def setup(c, workdir: str, mesh):
  """(Run, train state, its shardings, the initial policy as the reference (None without beta), data config)."""
  from papo_jax import models
  from papo_jax.data import pipeline, remote
  from papo_jax.models.limits import max_image_patches
  from papo_jax.models.tiny import build_tiny_checkpoint
  from papo_jax.rl import rewards
  from papo_jax.rl.train_step import init_train_state, make_logprob_pass, make_train_step
  from papo_jax.sampling import SamplingConfig, make_sampler
  if c.model.init == "pretrained":
    model_path = remote.localize(c.model.path)
  else:
    model_path = os.path.join(workdir, "model")
    first_process_then_sync(lambda: build_tiny_checkpoint(model_path, c.model.tiny, min_pixels=c.data.min_pixels,
                                                          max_pixels=c.data.max_pixels), "papo_tiny_checkpoint")
  patch, rules = models.load_config(model_path).vision.patch_size, mesh_rules(c)
  model = models.from_pretrained(model_path, dtype=c.model.dtype, param_dtype=c.model.param_dtype, mesh=mesh,
                                 rules=rules, remat=c.model.remat, attention=c.model.attention,
                                 attention_block=c.model.attention_block, gather_weights=c.model.gather_weights,
                                 max_image_patches=max_image_patches(c.data.max_pixels, patch))
  graphdef, params = nnx.split(model)
  mcfg = model.config
  step_cfg, tx = step_config(c), optimizer(c)
  # A copy with its own buffers: the policy state is donated to every update.
  initial = jax.tree.map(lambda a: jnp.array(a, dtype=jnp.dtype(c.model.ref_dtype), copy=True),
                         params) if c.algo.beta > 0 else None
  state = init_train_state(params, tx)
  state_sh = pinned_shardings(state, mesh)
  state = jax.device_put(state, state_sh)
  # Donated and pinned to one sharding: one compile per batch shape; the sampler reads state.params.
  train_step = jax.jit(make_train_step(graphdef, tx, step_cfg), donate_argnums=(0,), out_shardings=(state_sh, None))

  data_cfg = train_data_config(c)
  local_it = pipeline.make_iterator(data_cfg, ckpt_dir=model_path)
  it = GlobalBatches(local_it, local_it.processor.pad_token_id)
  stop_ids = tuple(int(t) for t in np.atleast_1d(mcfg.eos_token_id))
  sampler = make_sampler(graphdef, SamplingConfig(
      max_new_tokens=c.rollout.max_new_tokens, temperature=c.rollout.temperature, top_p=c.rollout.top_p,
      top_k=c.rollout.top_k, cache_dtype=c.rollout.cache_dtype, stop_token_ids=stop_ids,
      pad_token_id=mcfg.pad_token_id, top_p_candidates=c.rollout.top_p_candidates), c.rollout, mesh, rules)
  # Sized after the training state is on the devices: their free memory is the budget.
  chunk = rollout_chunk_prompts(c, mcfg, mesh, total_prompts=data_cfg.batch_size)
  if chunk:
    logging.info("rollouts: %d prompts per generate call (of %d)", chunk, data_cfg.batch_size)
  run = Run(c=c, mesh=mesh, graphdef=graphdef, model_config=mcfg, it=it, tokenizer=it.processor.tokenizer,
            sampler=sampler, reward_fn=rewards.make_reward_fn(c.reward, it.processor),
            grader=concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reward"), train_step=train_step,
            logprob_pass=(jax.jit(make_logprob_pass(graphdef, step_cfg))
                          if c.optim.mini_batches > 1 or step_cfg.needs_logprob_pass else None),
            stop_ids=stop_ids, pad_id=mcfg.pad_token_id if mcfg.pad_token_id is not None else 0,
            rules=rules, rollout_chunk=chunk)
  return run, state, state_sh, initial, data_cfg


# ============================================================================================
# Main
# ============================================================================================

def train(c: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the configured training; returns the last step's metrics.

  ``workdir``: a local path, ``gs://`` or any fsspec URL (see :mod:`papo_jax.workdir`;
  checkpoints need a local or ``gs://`` ``checkpoint.dir``). SIGTERM/SIGINT end the run
  after the current step with a checkpoint (:mod:`papo_jax.preemption`); a run that
  completes all its steps leaves ``<workdir>/DONE``.
  """
  from tqdm import tqdm
  from papo_jax import workdir as workdir_lib
  from papo_jax.checkpointing import checked_checkpoint_dir, finished_run, open_run
  from papo_jax.parallel import make_mesh
  from papo_jax.preemption import PreemptionGuard
  from papo_jax.warmup import starting_policy

  validate_config(c)
  checked_checkpoint_dir(c, workdir)   # before any work: a workdir URL orbax cannot write fails here
  metrics_lib.quiet_orbax()
  t_start = time.perf_counter()
  # ---------------------------------------------------------------- setup & mesh
  start_distributed()
  cache = workdir_lib.use_compilation_cache(c.train.compilation_cache)
  logging.info("compiled programs cached in %s", cache or "(nowhere: train.compilation_cache is empty)")
  ckpts, start = open_run(c, workdir)
  if start >= c.train.steps:
    return finished_run(c, workdir, ckpts)
  mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  logging.info("mesh %s over %d devices", dict(mesh.shape), jax.device_count())
  # The tiny random model is built locally: <workdir>/model, or a per-host cache for a URL workdir.
  run, state, state_sh, ref_params, data_cfg = setup(c, workdir_lib.local_root(workdir, c), mesh)

  # ---------------------------------------------------------------- restore, or format warm-up (tiny demo)
  state, ref_params, save_ref = starting_policy(c, run, state, state_sh, ref_params, ckpts, start, mesh)
  validate, val_it = make_validator(c, graphdef=run.graphdef, sampling_cfg=run.sampler.cfg, mesh=mesh,
                                    processor=run.it.processor, train_data_path=data_cfg.path,
                                    reward_fn=run.reward_fn, stop_ids=run.stop_ids) if c.val.every > 0 else (None, None)

  # ---------------------------------------------------------------- the loop
  writer = metrics_lib.MetricWriter(workdir, c, start)
  monitor = metrics_lib.Monitor(c.monitor)
  monitor.restore(ckpts.restored_monitor)
  metrics = {}
  step, monitor_stop, stop_line = start - 1, False, None
  bar = tqdm(range(start, c.train.steps), initial=start, total=c.train.steps, desc="train",
             disable=jax.process_index() != 0, dynamic_ncols=True)
  with metrics_lib.logs_above_progress_bar(), PreemptionGuard() as guard:
    if validate is not None and start == 0:   # held-out scores of the policy RL starts from
      writer.write(0, validate(state.params, 0))
    for step in bar:
      t0 = time.perf_counter()
      terms = perception_terms(c, step, monitor.gamma_halvings)
      col = collect_groups(run, state.params, step)
      state, step_metrics, rewards, timing, perception = update(
          run, state, ref_params, col, terms.gamma, terms.entropy_scale, metrics_lib.is_sample_step(c, step + 1))
      extra = {**timing, "dapo/rounds": col.rounds, "dapo/padded_groups": col.padded_groups}
      metrics = metrics_lib.step_row(step_metrics, rewards, col.groups, extra, col.stats, c, terms.gamma,
                                     time.perf_counter() - t0)
      if monitor.should_stop(step + 1, metrics):
        monitor_stop = True
        break
      metrics.update(validate(state.params, step + 1) if validate else {})
      metrics_lib.log_step(writer, c, step + 1, metrics, col.samples, rewards, bar, perception)
      # -------------------------------------------------------------- checkpoint
      saved = (step + 1) % c.checkpoint.every == 0 or step + 1 == c.train.steps
      if saved:
        ckpts.save(step + 1, state, run.it, ref_params if save_ref else None, monitor.state())
      # -------------------------------------------------------------- SIGTERM/SIGINT: every host stops here
      if guard.should_stop(step):
        if not saved:
          ckpts.save(step + 1, state, run.it, ref_params if save_ref else None, monitor.state())
        ckpts.wait()
        stop_line = guard.stop_message(step)
        logging.info("%s", stop_line)
        break
  bar.close()
  for closable in (ckpts, writer, run, val_it):
    if closable is not None:
      closable.close()
  metrics_lib.end_of_run(c, workdir, ckpts.dir, writer, start=start, step=step, seconds=time.perf_counter() - t_start,
                         completed=not monitor_stop and step + 1 == c.train.steps, stop_line=stop_line)
  return metrics


def main(argv):
  del argv
  from papo_jax.checkpointing import checked_checkpoint_dir
  c = FLAGS.config
  try:
    validate_config(c)
    checked_checkpoint_dir(c, FLAGS.workdir)
  except ConfigError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  train(c, FLAGS.workdir)   # returns after a SIGTERM/SIGINT stop too: exit 0, a rerun resumes


if __name__ == "__main__":
  define_flags()
  app.run(main)
