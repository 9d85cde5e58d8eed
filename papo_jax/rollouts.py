"""Prompt batch -> sampled responses -> text -> rewards, shared by training, validation and evaluation."""

from __future__ import annotations

import time

import numpy as np
from absl import logging

from papo_jax.data.decode import decode_responses


def batch_images(batch):
  """(pixel_values, image_grid_thw) of a PromptBatch, or (None, None) when it has no images."""
  if batch.num_images == 0:
    return None, None
  return batch.pixel_values, batch.image_grid_thw


def sample_texts(sampler, params, batch, *, n: int, key, tokenizer, stop_ids):
  """n responses per prompt: (host tokens [R, T], host mask [R, T], texts [R]), R = B * n, prompt-major."""
  from papo_jax.parallel import to_host
  pv, grid = batch_images(batch)
  ro = sampler.generate(params, batch.input_ids, batch.attention_mask, pv, grid, n=n, key=key)
  toks, mask = to_host((ro.tokens_RxT, ro.mask_RxT))
  return toks, mask, decode_responses(tokenizer, toks, mask, stop_ids)


def repeat_answers(answers, n: int) -> list[str]:
  """Each prompt's reference answer once per sampled response (prompt-major)."""
  return [a for a in answers for _ in range(n)]


def score_prompt_batch(sampler, params, batch, *, k: int, key, reward_fn, tokenizer, stop_ids, rows: int | None = None):
  """k responses per prompt of a PromptBatch, graded; returns (texts [R], scores dict of [R] arrays).

  ``rows``: only the first ``rows`` prompts are graded (the rest pad the last batch).
  """
  rows = batch.batch_size if rows is None else rows
  _, _, texts = sample_texts(sampler, params, batch, n=k, key=key, tokenizer=tokenizer, stop_ids=stop_ids)
  texts = texts[:rows * k]
  return texts, reward_fn(texts, repeat_answers(batch.answers[:rows], k))


def groups_from_batch(batch, tokens_RxT: np.ndarray, mask_RxT: np.ndarray, n: int) -> list:
  """One :class:`~papo_jax.rl.batching.Group` per prompt with its n responses (advantages 0 until graded)."""
  from papo_jax.rl import batching
  pv, _ = batch_images(batch)
  mpv = batch.masked_pixel_values if pv is not None else None
  parts = batching.split_prompt_batch(batch.input_ids, batch.attention_mask, pv, mpv, batch.image_grid_thw,
                                      batch.image_counts)
  return [batching.Group(*parts[b], responses=tokens_RxT[b * n:(b + 1) * n],
                         response_mask=mask_RxT[b * n:(b + 1) * n], advantages=np.zeros(n, np.float32))
          for b in range(len(parts))]


def make_validator(c, *, graphdef, sampling_cfg, mesh, processor, train_data_path: str, reward_fn, stop_ids):
  """(``validate(params, step) -> {val/overall, val/format, val/accuracy, timing/validate}``, its iterator).

  The mean reward of one greedy response per prompt over ``val.batches`` held-out
  batches, always the same ones (``val.source``/``val.path``; the synthetic task's
  held-out records come from ``val.synthetic_seed``). ``step`` is the number of finished
  steps: it runs before the first step (0), every ``val.every`` steps and after the last,
  and returns {} otherwise.
  """
  import dataclasses

  from papo_jax.data import pipeline, remote
  from papo_jax.parallel import GlobalBatches, use_mesh_rules
  from papo_jax.sampling import make_sampler
  val_cfg = pipeline.DataConfig(**{**c.data.to_dict(), "source": c.val.source or c.data.source,
                                   "path": remote.localize(c.val.path) if c.val.path else train_data_path,
                                   "shuffle": False, "batch_size": c.val.batch_size or c.data.batch_size,
                                   "synthetic_seed": c.val.synthetic_seed})
  val_cfg.mask = dataclasses.replace(val_cfg.mask, enabled=False)
  val_it = GlobalBatches(pipeline.make_iterator(val_cfg, processor=processor), processor.pad_token_id)
  sampler = make_sampler(graphdef, dataclasses.replace(sampling_cfg, greedy=True), c.rollout, mesh)
  start = val_it.get_state()

  def validate(params, step: int) -> dict:
    if step % c.val.every and step != c.train.steps:
      return {}
    t = time.perf_counter()
    val_it.set_state(start)
    scores = []
    for _ in range(c.val.batches):
      with use_mesh_rules(mesh):
        scores.append(score_prompt_batch(sampler, params, next(val_it), k=1, key=0, reward_fn=reward_fn,
                                         tokenizer=processor.tokenizer, stop_ids=stop_ids)[1])
    out = {f"val/{k}": float(np.concatenate([s[k] for s in scores]).mean()) for k in scores[0]}
    logging.info("step %d | val/overall %.3f | val/accuracy %.3f", step, out["val/overall"], out["val/accuracy"])
    return {**out, "timing/validate": time.perf_counter() - t}
  return validate, val_it
