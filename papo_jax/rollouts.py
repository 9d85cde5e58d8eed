"""Prompt batch -> sampled responses -> text -> rewards, shared by training, validation and evaluation."""

from __future__ import annotations

import concurrent.futures
import copy
import time
import types

import jax
import numpy as np
from absl import logging

from papo_jax.data.decode import decode_responses


def rollout_key(seed: int, step: int, round_: int, batch_index: int):
  """The sampling key of one generation round: seed -> step -> round -> data batch."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), round_)
  return jax.random.fold_in(key, batch_index)


def graded(texts, answers, reward_fn):
  """(rewards, seconds spent grading)."""
  t = time.perf_counter()
  return reward_fn(texts, answers), time.perf_counter() - t


def done_future(value) -> concurrent.futures.Future:
  """A Future that already holds ``value`` (rewards graded in the foreground)."""
  f = concurrent.futures.Future()
  f.set_result(value)
  return f


def batch_images(batch):
  """(pixel_values, image_grid_thw) of a PromptBatch, or (None, None) when it has no images."""
  if batch.num_images == 0:
    return None, None
  return batch.pixel_values, batch.image_grid_thw


def sample_texts(sampler, params, batch, *, n: int, key, tokenizer, stop_ids, chunk_prompts: int = 0):
  """n responses per prompt: (host tokens [R, T], host mask [R, T], texts [R]), R = B * n, prompt-major.

  ``chunk_prompts`` > 0 and below B generates ``chunk_prompts`` prompts at a time (the KV
  cache and prefill temporaries scale with the chunk; see :func:`rollout_chunk_prompts`) and
  concatenates; chunk i draws with ``fold_in(key, i)``. The continuous engine takes the chunks
  as one stream (``generate_stream``: one chunk's prompts on device at a time, its slots never
  drain between chunks), with the same samples.
  """
  from papo_jax.parallel import to_host
  chunks = prompt_chunks(batch, chunk_prompts)
  if len(chunks) > 1:
    key = jax.random.key(key) if isinstance(key, int) else key
  if hasattr(sampler, "generate_stream"):
    ro = sampler.generate_stream(params, chunks, n=n, key=key)
    toks, mask = to_host((ro.tokens_RxT, ro.mask_RxT))
    return toks, mask, decode_responses(tokenizer, toks, mask, stop_ids)
  toks, mask = [], []
  for i, (ids, am, pv, grid) in enumerate(chunks):
    ro = sampler.generate(params, ids, am, pv, grid, n=n, key=key if len(chunks) == 1 else jax.random.fold_in(key, i))
    t, m = to_host((ro.tokens_RxT, ro.mask_RxT))
    toks.append(t)
    mask.append(m)
  toks, mask = (toks[0], mask[0]) if len(chunks) == 1 else (np.concatenate(toks), np.concatenate(mask))
  return toks, mask, decode_responses(tokenizer, toks, mask, stop_ids)


def sample_group_texts(sampler, params, batch, *, n: int, n_noisy: int = 0, key, tokenizer, stop_ids,
                       chunk_prompts: int = 0):
  """n responses per prompt in groups of n, like :func:`sample_texts`; with NoisyRollout (``n_noisy`` > 0) each
  group is the prompt's ``n - n_noisy`` responses on its clean images, then ``n_noisy`` on its distorted images
  (``batch.noisy_pixel_values``).

  Equal counts: one generate call over 2B prompts (the clean copies, then the noisy ones) with ``key``;
  otherwise two calls, the clean prompts with ``fold_in(key, 0)`` and the noisy ones with
  ``fold_in(key, 1)``. Every sequence draws from its own key either way. Each call is chunked by
  ``chunk_prompts`` as :func:`sample_texts` (chunks are sized for n samples a prompt; these calls
  draw fewer). Returns (tokens [R, T], mask [R, T], texts [R]), R = B * n, prompt-major.
  """
  if n_noisy == 0:
    return sample_texts(sampler, params, batch, n=n, key=key, tokenizer=tokenizer, stop_ids=stop_ids,
                        chunk_prompts=chunk_prompts)
  n_clean = n - n_noisy
  if not 1 <= n_noisy < n:
    raise ValueError(f"sample_group_texts: n_noisy={n_noisy} must be in [1, n - 1] with n={n}")
  if batch.num_images and getattr(batch, "noisy_pixel_values", None) is None:
    raise ValueError("sample_group_texts: n_noisy > 0 but the prompt batch has no noisy_pixel_values "
                     "(the data pipeline's noise config is off)")
  b = batch.input_ids.shape[0]
  key = jax.random.key(key) if isinstance(key, int) else key
  kw = dict(tokenizer=tokenizer, stop_ids=stop_ids, chunk_prompts=chunk_prompts)
  if n_clean == n_noisy:
    parts = [sample_texts(sampler, params, clean_and_noisy_prompts(batch), n=n_clean, key=key, **kw)]
  else:
    parts = [sample_texts(sampler, params, batch, n=n_clean, key=jax.random.fold_in(key, 0), **kw),
             sample_texts(sampler, params, noisy_view(batch), n=n_noisy, key=jax.random.fold_in(key, 1), **kw)]
  t = max(p[0].shape[1] for p in parts)
  widen = lambda a: np.pad(a, ((0, 0), (0, t - a.shape[1])))
  toks = np.concatenate([widen(p[0]) for p in parts])
  mask = np.concatenate([widen(p[1]) for p in parts])
  texts = [x for p in parts for x in p[2]]
  order = group_order(b, n_clean, n_noisy)
  return toks[order], mask[order], [texts[i] for i in order]


def group_order(num_prompts: int, n_clean: int, n_noisy: int) -> np.ndarray:
  """[B * (n_clean + n_noisy)] row indices into [all clean rows (prompt-major) ; all noisy rows] giving
  each prompt's group [its clean rows..., its noisy rows...] (``data.noise.rollout_split``'s layout)."""
  p = np.arange(num_prompts)[:, None]
  clean = p * n_clean + np.arange(n_clean)[None]
  noisy = num_prompts * n_clean + p * n_noisy + np.arange(n_noisy)[None]
  return np.concatenate([clean, noisy], axis=1).reshape(-1)


def noisy_view(batch):
  """The batch's prompts on their distorted images: a shallow copy with pixel_values = noisy_pixel_values."""
  view = copy.copy(batch)
  view.pixel_values = batch.noisy_pixel_values
  return view


def clean_and_noisy_prompts(batch):
  """2B prompts for one generate call: the B prompts on their clean images, then the same B on the noisy.

  The pixel and grid rows of both copies are packed first and keep the batch's padding twice, so the
  shapes stay within twice the buckets.
  """
  pv, grid = batch_images(batch)
  ids = np.concatenate([batch.input_ids, batch.input_ids])
  am = np.concatenate([batch.attention_mask, batch.attention_mask])
  counts = np.concatenate([batch.image_counts, batch.image_counts])
  if pv is None:
    return types.SimpleNamespace(input_ids=ids, attention_mask=am, pixel_values=None, image_grid_thw=None,
                                 image_counts=counts, num_images=0)
  pv, npv, grid = np.asarray(pv), np.asarray(batch.noisy_pixel_values), np.asarray(grid)
  n_img = int(batch.num_images)
  n_patch = int(grid[:n_img].astype(np.int64).prod(-1).sum())
  pv2 = np.zeros((2 * pv.shape[0],) + pv.shape[1:], pv.dtype)
  pv2[:n_patch], pv2[n_patch:2 * n_patch] = pv[:n_patch], npv[:n_patch]
  grid2 = np.zeros((2 * grid.shape[0], 3), grid.dtype)
  grid2[:n_img], grid2[n_img:2 * n_img] = grid[:n_img], grid[:n_img]
  return types.SimpleNamespace(input_ids=ids, attention_mask=am, pixel_values=pv2, image_grid_thw=grid2,
                               image_counts=counts, num_images=2 * n_img)


def prompt_chunks(batch, chunk_prompts: int, *, patch_multiple: int = 64, image_multiple: int = 4) -> list[tuple]:
  """(input_ids, attention_mask, pixel_values, image_grid_thw) per chunk of ``chunk_prompts`` prompts.

  The whole batch when ``chunk_prompts`` is 0 or not below B. Each chunk's pixel rows are its
  prompts' images (cut by ``image_counts``), zero-padded, like its grid rows, to one size for
  all chunks (the largest, rounded up), so equal-sized chunks share one compiled program.
  """
  b = batch.input_ids.shape[0]
  pv_all, grid_all = batch_images(batch)
  if chunk_prompts <= 0 or chunk_prompts >= b:
    return [(batch.input_ids, batch.attention_mask, pv_all, grid_all)]
  bounds = list(range(0, b, chunk_prompts)) + [b]
  if pv_all is None:
    return [(batch.input_ids[a:e], batch.attention_mask[a:e], None, None) for a, e in zip(bounds, bounds[1:])]
  counts = np.asarray(batch.image_counts, np.int64)
  grid = np.asarray(grid_all, np.int64).reshape(-1, 3)
  img_start = np.concatenate([[0], np.cumsum(counts)])
  patch_start = np.concatenate([[0], np.cumsum(grid[:img_start[-1]].prod(-1))])
  spans = [(img_start[a], img_start[e]) for a, e in zip(bounds, bounds[1:])]
  round_up = lambda x, m: max(m, -(-int(x) // m) * m)
  n_max = round_up(max(patch_start[i1] - patch_start[i0] for i0, i1 in spans), patch_multiple)
  i_max = round_up(max(i1 - i0 for i0, i1 in spans), image_multiple)
  pv_all = np.asarray(pv_all)
  out = []
  for (a, e), (i0, i1) in zip(zip(bounds, bounds[1:]), spans):
    pv = np.zeros((n_max, pv_all.shape[1]), pv_all.dtype)
    pv[:patch_start[i1] - patch_start[i0]] = pv_all[patch_start[i0]:patch_start[i1]]
    g = np.zeros((i_max, 3), np.int32)
    g[:i1 - i0] = grid[i0:i1]
    out.append((batch.input_ids[a:e], batch.attention_mask[a:e], pv, g))
  return out


def rollout_chunk_prompts(c, model_config, mesh, *, total_prompts: int) -> int:
  """Prompts per generate call for a run: ``rollout.chunk_prompts`` when set, else sized by
  :func:`papo_jax.sampling.budget.rollout_chunk_prompts` from ``rollout.kv_budget_gb`` per
  chip, or (0 GB) from the free memory the devices report after the training state is
  placed (90% of it); 0 (no chunking) when they report none (CPU)."""
  from papo_jax.config_base import mesh_rules
  from papo_jax.parallel import batch_shards
  from papo_jax.sampling import budget
  if c.rollout.chunk_prompts > 0:
    return int(c.rollout.chunk_prompts)
  if c.rollout.kv_budget_gb > 0:
    per_chip = c.rollout.kv_budget_gb * 2**30
  else:
    free = [s["bytes_limit"] - s["bytes_in_use"] for s in
            (d.memory_stats() or {} for d in (mesh.devices.flat if mesh is not None else jax.local_devices())
             if d.process_index == jax.process_index())   # only this host's devices report memory
            if "bytes_limit" in s and "bytes_in_use" in s]
    if not free:
      return 0
    per_chip = 0.9 * min(free)
  shards = batch_shards(mesh, mesh_rules(c))
  patch = model_config.vision.patch_size
  return budget.rollout_chunk_prompts(
      model_config, n_samples=c.rollout.n, prompt_len=max(tuple(c.data.prompt_length_buckets) or
                                                          (c.data.max_prompt_length,)),
      max_new_tokens=c.rollout.max_new_tokens, hbm_bytes_budget=per_chip, n_devices=shards,
      total_prompts=total_prompts, batch_shards=shards, cache_dtype=c.rollout.cache_dtype,
      compute_dtype=c.model.dtype, patches_per_prompt=c.data.max_pixels // patch ** 2 if c.data.max_pixels else 0)


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
  from papo_jax.config_base import mesh_rules
  from papo_jax.parallel import GlobalBatches, use_mesh_rules
  from papo_jax.sampling import make_sampler
  val_cfg = pipeline.DataConfig(**{**c.data.to_dict(), "source": c.val.source or c.data.source,
                                   "path": remote.localize(c.val.path) if c.val.path else train_data_path,
                                   "shuffle": False, "batch_size": c.val.batch_size or c.data.batch_size,
                                   "synthetic_seed": c.val.synthetic_seed})
  val_cfg.mask = dataclasses.replace(val_cfg.mask, enabled=False)
  val_it = GlobalBatches(pipeline.make_iterator(val_cfg, processor=processor), processor.pad_token_id)
  rules = mesh_rules(c)
  sampler = make_sampler(graphdef, dataclasses.replace(sampling_cfg, greedy=True), c.rollout, mesh, rules)
  start = val_it.get_state()

  def validate(params, step: int) -> dict:
    if step % c.val.every and step != c.train.steps:
      return {}
    t = time.perf_counter()
    val_it.set_state(start)
    scores = []
    for _ in range(c.val.batches):
      with use_mesh_rules(mesh, rules):
        scores.append(score_prompt_batch(sampler, params, next(val_it), k=1, key=0, reward_fn=reward_fn,
                                         tokenizer=processor.tokenizer, stop_ids=stop_ids)[1])
    out = {f"val/{k}": float(np.concatenate([s[k] for s in scores]).mean()) for k in scores[0]}
    logging.info("step %d | val/overall %.3f | val/accuracy %.3f", step, out["val/overall"], out["val/accuracy"])
    return {**out, "timing/validate": time.perf_counter() - t}
  return validate, val_it
