"""Supervised format warm-up of a random-init tiny policy (the CPU demo's stand-in for an instruct checkpoint)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from papo_jax.parallel import batch_shards, global_train_arrays, pinned_shardings, use_mesh_rules


def format_warmup(c, run, state, mesh):
  """Supervised steps on ``<think></think>\\boxed{answer}`` with a *random* answer of the right kind.

  A random-init tiny model never emits the answer format, so RL would see zero reward
  everywhere; this teaches the format (and the answer vocabulary) without the task:
  accuracy stays at chance, and learning to read the image is left to RL. The loss is the
  PAPO loss with zero advantages and eta_ori = 1, i.e. the mean token NLL. Returns
  ``state`` with the warmed-up parameters (the optimizer state is the RL one, untouched).
  """
  from papo_jax.rl import batching
  from papo_jax.rl.losses import LossConfig
  from papo_jax.rl.train_step import StepConfig, TrainBatch, TrainState, make_optimizer, make_train_step

  rng = np.random.default_rng(c.train.seed + 12345)
  answers_by_kind: dict[str, set] = {}
  tx = make_optimizer(c.train.warmup_lr or c.optim.lr, weight_decay=0.0)
  sft_state = TrainState(step=state.step, params=state.params, opt_state=tx.init(state.params))
  sft_sh = pinned_shardings(sft_state, mesh)
  sft_state = jax.device_put(sft_state, sft_sh)
  sft = jax.jit(make_train_step(run.graphdef, tx, StepConfig(loss=LossConfig(eta_ori=1.0),
                                                             logprob_chunk=c.optim.logprob_chunk)),
                out_shardings=(sft_sh, None))
  # Two random answers per prompt are enough to teach a fixed format; rollout.n would cost
  # n/2 times more on the CPU for nothing.
  t_max, n, eos = c.rollout.max_new_tokens, min(2, c.rollout.n), run.stop_ids[0]
  for i in range(c.train.warmup_sft_steps):
    batch = next(run.it)
    for k, a in zip(batch.kinds, batch.answers):
      answers_by_kind.setdefault(k, set()).add(a)
    parts = batching.split_prompt_batch(batch.input_ids, batch.attention_mask,
                                        batch.pixel_values if batch.num_images else None, None,
                                        batch.image_grid_thw, batch.image_counts)
    groups = []
    for b, kind in enumerate(batch.kinds):
      pool = sorted(answers_by_kind[kind])
      resp = np.full((n, t_max), run.pad_id, np.int64)
      rmask = np.zeros((n, t_max), np.int32)
      for k in range(n):
        text = f"<think></think>\\boxed{{{pool[rng.integers(len(pool))]}}}"
        ids = run.tokenizer.encode(text, add_special_tokens=False)[:t_max - 1] + [eos]
        resp[k, :len(ids)] = ids
        rmask[k, :len(ids)] = 1
      groups.append(batching.Group(*parts[b], responses=resp, response_mask=rmask, advantages=np.zeros(n, np.float32)))
    arrays = batching.assemble_train_batch(groups, micro_batches=c.optim.micro_batches, pad_id=run.pad_id,
                                           shards=batch_shards(mesh, run.rules), pixel_dtype=c.model.dtype)
    with use_mesh_rules(mesh, run.rules):
      sft_state, m = sft(sft_state, None, TrainBatch(**global_train_arrays(arrays, mesh)))
    if (i + 1) % 10 == 0 or i == 0:
      logging.info("format warm-up %d/%d: nll %.3f", i + 1, c.train.warmup_sft_steps, float(m["actor/entropy_ori"]))
  return state.replace(params=sft_state.params)


def starting_policy(c, run, state, state_sh, ref_params, ckpts, start: int, mesh):
  """(state, reference params, whether checkpoints carry the reference) for the first RL step.

  A resumed run restores both from its checkpoint. A new run with a format warm-up starts
  RL from the warmed-up policy, and that policy is also the reference (so kl_ref starts at
  0); it then differs from the checkpoint the run was built from and is saved with the state.
  """
  save_ref = ref_params is not None and c.train.warmup_sft_steps > 0
  if start:
    state, ref_params = ckpts.restore(start, state, run.it, ref_params)
  elif c.train.warmup_sft_steps > 0:
    state = jax.device_put(format_warmup(c, run, state, mesh), state_sh)
    if save_ref:
      ref_params = jax.tree.map(lambda p, r: jnp.array(p, dtype=r.dtype, copy=True), state.params, ref_params)
  return state, ref_params, save_ref
