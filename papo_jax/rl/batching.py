"""Host-side assembly of a TrainBatch from prompt groups and their sampled responses (numpy only).

A *group* is one prompt and its n sampled responses (the unit of GRPO advantages and of
DAPO's dynamic sampling). Groups may come from different prompt batches (DAPO refills),
so prompts are re-padded on the left to a common length here.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Group:
  """One prompt and its n responses.

  prompt_ids_Lp / prompt_mask_Lp: the prompt (left padding allowed); pixel_values_PxD /
  masked_pixel_values_PxD: this prompt's image patches (None without images / masking);
  image_grid_thw_Kx3; responses_NxT / response_mask_NxT; advantages_N; plus anything the
  trainer wants to carry (answer, record id).
  """
  prompt_ids: np.ndarray
  prompt_mask: np.ndarray
  pixel_values: np.ndarray | None
  masked_pixel_values: np.ndarray | None
  image_grid_thw: np.ndarray
  responses: np.ndarray
  response_mask: np.ndarray
  advantages: np.ndarray


def split_prompt_batch(input_ids, attention_mask, pixel_values, masked_pixel_values, image_grid_thw, image_counts):
  """Per-prompt (ids, mask, pixels, masked pixels, grid) from a bucketed PromptBatch's arrays."""
  counts = np.asarray(image_counts, np.int64)
  grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  patches = grid.prod(-1)
  img_start = np.concatenate([[0], np.cumsum(counts)])
  patch_start = np.concatenate([[0], np.cumsum(patches)])
  out = []
  for b in range(input_ids.shape[0]):
    i0, i1 = img_start[b], img_start[b + 1]
    p0, p1 = patch_start[i0], patch_start[i1]
    out.append((input_ids[b], attention_mask[b],
                None if pixel_values is None else pixel_values[p0:p1],
                None if masked_pixel_values is None else masked_pixel_values[p0:p1],
                grid[i0:i1]))
  return out


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def assemble_train_batch(groups: list[Group], *, micro_batches: int, pad_id: int, shards: int = 1,
                         patch_multiple: int = 64, image_multiple: int = 4, pixel_dtype="float32") -> dict:
  """Rows r = g * n + k (group-major) split into ``micro_batches`` micro-batches of equal shape.

  Returns numpy arrays with a leading micro-batch axis M for ``TrainBatch(**batch)``:
  input_ids [M, b, Lp + T] (prompt ⊕ response; response padding = pad_id, attention 0),
  attention_mask, response_mask [M, b, T], advantages [M, b], and, with images, the
  per-shard image layout of :class:`~papo_jax.rl.train_step.TrainBatch`: each micro-batch's
  b rows are cut into ``shards`` contiguous shards (the batch mesh axes' size, see
  :func:`papo_jax.parallel.batch_shards`), and shard s holds each distinct image of its rows
  once (the n samples of a prompt share it): pixel_values / masked_pixel_values
  [M, S, N, D] in ``pixel_dtype``, image_grid_thw [M, S, I, 3], row_image_start [M, b];
  N and I are zero-padded up to multiples of ``patch_multiple`` / ``image_multiple``.
  """
  n = groups[0].responses.shape[0]
  rows = len(groups) * n
  if rows % micro_batches:
    raise ValueError(f"{rows} rollouts ({len(groups)} groups x n={n}) do not split into {micro_batches} micro-batches")
  per = rows // micro_batches
  if per % shards:
    raise ValueError(f"micro-batches of {per} rows do not split into {shards} batch shards")
  lp = max(g.prompt_ids.shape[0] for g in groups)
  left = lambda a: np.pad(a, (lp - a.shape[0], 0))
  ids, mask, resp_mask, adv = [], [], [], []
  for g in groups:
    for k in range(n):
      m = g.response_mask[k].astype(np.int32)
      ids.append(np.concatenate([left(g.prompt_ids) if g.prompt_ids.shape[0] < lp else g.prompt_ids,
                                 np.where(m > 0, g.responses[k], pad_id)]))
      mask.append(np.concatenate([left(g.prompt_mask), m]))
      resp_mask.append(m)
      adv.append(g.advantages[k])
  shape = lambda a, dt: np.asarray(a, dt).reshape(micro_batches, per, *np.asarray(a).shape[1:])
  out = dict(input_ids=shape(ids, np.int32), attention_mask=shape(mask, np.int32),
             response_mask=shape(resp_mask, np.int32), advantages=shape(adv, np.float32))
  if all(g.pixel_values is None or len(g.image_grid_thw) == 0 for g in groups):
    return out
  images = shard_images(groups, n=n, micro_batches=micro_batches, shards=shards)
  with_mask = groups[0].masked_pixel_values is not None
  n_max = _round_up(max(p.shape[0] for p in images["pixel_values"]), patch_multiple)
  i_max = _round_up(max(g.shape[0] for g in images["image_grid_thw"]), image_multiple)
  pad = lambda a, k: np.pad(a, [(0, k - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
  stack = lambda parts, k, dt: np.stack([pad(p, k) for p in parts]).astype(dt).reshape(
      micro_batches, shards, k, *parts[0].shape[1:])
  out["pixel_values"] = stack(images["pixel_values"], n_max, pixel_dtype)
  if with_mask:
    out["masked_pixel_values"] = stack(images["masked_pixel_values"], n_max, pixel_dtype)
  out["image_grid_thw"] = stack(images["image_grid_thw"], i_max, np.int32)
  out["row_image_start"] = np.asarray(images["row_image_start"], np.int32).reshape(micro_batches, per)
  return out


def shard_images(groups: list[Group], *, n: int, micro_batches: int, shards: int) -> dict:
  """The distinct images of each (micro-batch, shard), unpadded, in row order.

  Returns lists over M * S shards (micro-batch-major) of pixel_values [Ns, D],
  masked_pixel_values, image_grid_thw [Is, 3], and row_image_start (one per row, in row
  order): the index of the row's first image within its shard's images (0 without images).
  """
  rows = len(groups) * n
  per_shard = rows // (micro_batches * shards)
  dim = next(g.pixel_values.shape[1] for g in groups if g.pixel_values is not None)
  empty = np.zeros((0, dim), np.float32)
  with_mask = groups[0].masked_pixel_values is not None
  out = dict(pixel_values=[], masked_pixel_values=[], image_grid_thw=[], row_image_start=[])
  for s0 in range(0, rows, per_shard):
    first_image: dict[int, int] = {}
    pv, mpv, grid = [], [], []
    count = 0
    for r in range(s0, s0 + per_shard):
      gi = r // n
      if gi not in first_image:   # a new prompt in this shard: its images, once
        g = groups[gi]
        first_image[gi] = count
        g_grid = np.asarray(g.image_grid_thw, np.int64).reshape(-1, 3)
        if g.pixel_values is not None and len(g_grid):
          if g.pixel_values.shape[0] != int(g_grid.prod(-1).sum()):
            raise ValueError(f"group {gi}: pixel_values has {g.pixel_values.shape[0]} patch rows but "
                             f"image_grid_thw {g_grid.tolist()} needs {int(g_grid.prod(-1).sum())}")
          pv.append(g.pixel_values)
          if with_mask:
            mpv.append(g.masked_pixel_values)
          grid.append(g_grid)
          count += len(g_grid)
      out["row_image_start"].append(first_image[gi])
    out["pixel_values"].append(np.concatenate(pv) if pv else empty)
    out["masked_pixel_values"].append(np.concatenate(mpv) if mpv else empty)
    out["image_grid_thw"].append(np.concatenate(grid) if grid else np.zeros((0, 3), np.int64))
  return out
