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


def assemble_train_batch(groups: list[Group], *, micro_batches: int, pad_id: int, patch_multiple: int = 64,
                         image_multiple: int = 4) -> dict:
  """Rows r = g * n + k (group-major) split into ``micro_batches`` micro-batches of equal shape.

  Returns numpy arrays with a leading micro-batch axis M for ``TrainBatch(**batch)``:
  input_ids [M, b, Lp + T] (prompt ⊕ response; response padding = pad_id, attention 0),
  attention_mask, response_mask [M, b, T], advantages [M, b], and each row's images (its
  prompt's, repeated per sample) as pixel_values / masked_pixel_values [M, Nm, D] and
  image_grid_thw [M, Im, 3], zero-padded to multiples of ``patch_multiple`` / ``image_multiple``.
  """
  n = groups[0].responses.shape[0]
  rows = len(groups) * n
  if rows % micro_batches:
    raise ValueError(f"{rows} rollouts ({len(groups)} groups x n={n}) do not split into {micro_batches} micro-batches")
  per = rows // micro_batches
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
  row_group = [gi for gi in range(len(groups)) for _ in range(n)]
  pv_parts, mpv_parts, grid_parts = [], [], []
  with_mask = groups[0].masked_pixel_values is not None
  dim = next(g.pixel_values.shape[1] for g in groups if g.pixel_values is not None)
  empty = np.zeros((0, dim), np.float32)
  for mi in range(micro_batches):
    sel = [groups[row_group[r]] for r in range(mi * per, (mi + 1) * per)]
    pv_parts.append(np.concatenate([g.pixel_values if g.pixel_values is not None else empty for g in sel]))
    if with_mask:
      mpv_parts.append(np.concatenate([g.masked_pixel_values if g.masked_pixel_values is not None else empty
                                       for g in sel]))
    grid_parts.append(np.concatenate([np.asarray(g.image_grid_thw).reshape(-1, 3) for g in sel]))
  n_max = _round_up(max(p.shape[0] for p in pv_parts), patch_multiple)
  i_max = _round_up(max(g.shape[0] for g in grid_parts), image_multiple)
  pad = lambda a, k: np.pad(a, [(0, k - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
  out["pixel_values"] = np.stack([pad(p, n_max) for p in pv_parts]).astype(np.float32)
  if with_mask:
    out["masked_pixel_values"] = np.stack([pad(p, n_max) for p in mpv_parts]).astype(np.float32)
  out["image_grid_thw"] = np.stack([pad(g, i_max) for g in grid_parts]).astype(np.int32)
  return out
