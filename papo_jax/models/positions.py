"""3-D multimodal RoPE position ids (transformers' ``get_rope_index``), vectorised for jit.

Text tokens advance one position each; an image's tokens sit at
``(cur + f, cur + r, cur + c)`` on its merged grid and the text after it resumes at
``cur + max(t, Hm, Wm)``. Padding (attention_mask == 0) gets position 0 and does not
advance. Images are assigned to ``<|image_pad|>`` runs in row-major (batch, seq) order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def image_token_layout(grid_thw_Ix3: jax.Array, merge: int):
  """Per image: merged tokens (t*Hm*Wm), Hm, Wm, t and the exclusive start in the token stream."""
  grid = jnp.asarray(grid_thw_Ix3, jnp.int32)
  t, hm, wm = grid[:, 0], grid[:, 1] // merge, grid[:, 2] // merge
  n = t * hm * wm
  starts = jnp.cumsum(n) - n
  return n, t, hm, wm, starts


def get_rope_index(input_ids_BxL: jax.Array, image_grid_thw_Ix3: jax.Array | None, attention_mask_BxL: jax.Array | None,
                   *, image_token_id: int, spatial_merge_size: int = 2):
  """Returns (position_ids [3, B, L] int32, rope_deltas [B, 1] int32), equal to transformers'."""
  ids = jnp.asarray(input_ids_BxL)
  b, l = ids.shape
  valid = jnp.ones((b, l), bool) if attention_mask_BxL is None else jnp.asarray(attention_mask_BxL).astype(bool)
  if image_grid_thw_Ix3 is None or image_grid_thw_Ix3.shape[0] == 0:
    is_img = jnp.zeros((b, l), bool)
  else:
    is_img = (ids == image_token_id) & valid
  is_text = valid & ~is_img

  if image_grid_thw_Ix3 is None or image_grid_thw_Ix3.shape[0] == 0:
    f = r = c = jnp.zeros((b, l), jnp.int32)
    last_of_image = jnp.zeros((b, l), bool)
    advance = jnp.zeros((b, l), jnp.int32)
  else:
    n, t, hm, wm, starts = image_token_layout(image_grid_thw_Ix3, spatial_merge_size)
    g = (jnp.cumsum(is_img.reshape(-1)) - 1).reshape(b, l)       # global image-token ordinal
    ends = jnp.cumsum(n)
    img = jnp.clip(jnp.searchsorted(ends, g, side="right"), 0, n.shape[0] - 1)
    local = g - starts[img]
    hw = jnp.maximum(hm[img] * wm[img], 1)
    f = local // hw
    r = (local % hw) // jnp.maximum(wm[img], 1)
    c = local % jnp.maximum(wm[img], 1)
    last_of_image = is_img & (local == n[img] - 1)
    advance = jnp.maximum(jnp.maximum(t[img], hm[img]), wm[img])
  step = jnp.where(is_text, 1, jnp.where(last_of_image, advance, 0)).astype(jnp.int32)
  cur = jnp.cumsum(step, axis=1) - step                            # exclusive: position before this token
  zero = jnp.zeros_like(cur)
  pos_t = jnp.where(is_img, cur + f, jnp.where(valid, cur, zero))
  pos_h = jnp.where(is_img, cur + r, jnp.where(valid, cur, zero))
  pos_w = jnp.where(is_img, cur + c, jnp.where(valid, cur, zero))
  position_ids = jnp.stack([pos_t, pos_h, pos_w]).astype(jnp.int32)
  max_pos = jnp.max(jnp.where(valid[None], position_ids, -1), axis=(0, 2))
  deltas = (max_pos + 1 - jnp.sum(valid, axis=1)).astype(jnp.int32)[:, None]
  return position_ids, deltas


def check_image_tokens(input_ids_BxL, image_grid_thw_Ix3, *, image_token_id: int, spatial_merge_size: int = 2) -> None:
  """Raises a ValueError stating both counts when image tokens and image features disagree."""
  import numpy as np
  ids = np.asarray(input_ids_BxL)
  n_tokens = int((ids == image_token_id).sum())
  if image_grid_thw_Ix3 is None:
    n_feats, n_images = 0, 0
  else:
    grid = np.asarray(image_grid_thw_Ix3).reshape(-1, 3)
    n_feats = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum()) // (spatial_merge_size ** 2)
    n_images = int((grid.prod(-1) > 0).sum())
  if n_tokens != n_feats:
    per_row = (ids == image_token_id).sum(axis=1).tolist()
    raise ValueError(
        f"image tokens and image features do not match: input_ids hold {n_tokens} <|image_pad|> tokens "
        f"(id {image_token_id}; per row {per_row}) but image_grid_thw describes {n_images} image(s) with "
        f"{n_feats} merged features (sum of t*h*w/{spatial_merge_size ** 2}). Each image needs exactly "
        f"t*h*w/{spatial_merge_size ** 2} <|image_pad|> tokens; was the prompt truncated, or were image "
        f"placeholders expanded with a different processor config?")


def shared_positions(input_ids_BxL, images, attention_mask_BxL, *, image_token_id: int, spatial_merge_size: int = 2):
  """:func:`get_rope_index` for a :class:`~papo_jax.models.vision.SharedImages` batch.

  Row b (in shard s = b // (B / S)) reads the grids of its shard from ``row_image_start_B[b]``
  on; its image tokens consume only its own images, so the grids after them are never read.
  """
  b = input_ids_BxL.shape[0]
  grid_SxIx3 = images.image_grid_thw_SxIx3
  s, n_img = grid_SxIx3.shape[:2]
  shard_B = jnp.arange(b) // (b // s)
  take = jnp.clip(images.row_image_start_B[:, None] + jnp.arange(n_img)[None], 0, n_img - 1)
  grid_BxIx3 = grid_SxIx3[shard_B[:, None], take]
  mask = jnp.ones_like(input_ids_BxL) if attention_mask_BxL is None else attention_mask_BxL
  one = lambda ids, m, g: get_rope_index(ids[None], g, m[None], image_token_id=image_token_id,
                                         spatial_merge_size=spatial_merge_size)
  pos, deltas = jax.vmap(one)(input_ids_BxL, mask, grid_BxIx3)      # [B, 3, 1, L], [B, 1, 1]
  return jnp.moveaxis(pos[:, :, 0], 0, 1), deltas[:, 0]
