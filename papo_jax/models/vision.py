"""Qwen2.5-VL vision tower: patch embed, 2-D RoPE, windowed/full attention, patch merger.

All images of a batch are processed at once. Which tokens may attend to which is
expressed as *segment ids* computed from ``image_grid_thw`` with vectorised index
arithmetic (no Python loop over images, so it runs inside jit with traced grids):
a window segment per 4x4-merged-token window and a frame segment per image frame.
Rows of ``pixel_values`` beyond the images' patches (bucket padding) form their own
segments and are dropped by the caller.

Memory is linear in the number of images: windowed layers attend within bands of
neighbouring windows, full layers per image padded to ``max_image_patches``
(see :mod:`papo_jax.models.attention`); no ``[N, N]`` array is formed then.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from papo_jax.models.config import VisionConfig
from papo_jax.models.attention import segment_attention, window_attention
from papo_jax.models.layers import Dense, RMSNorm, apply_rope, remat_call, resolve_remat
from papo_jax.models.positions import image_token_layout
from papo_jax.parallel import constrain, use_mesh_rules
from papo_jax.parallel.sharding import current_mesh_rules, logical_to_mesh_spec


class SharedImages(NamedTuple):
  """The images of a batch of B rows laid out per batch shard, each distinct image once.

  Rows are split into S contiguous shards of B / S rows (the batch mesh axes' split), and
  shard s holds the distinct images of its rows only, so each device encodes its own rows'
  images, and the n samples of a prompt (rows sharing an image) share one encoding.

  pixel_values_SxNxP: shard s's distinct images' patch rows (processor order, zero padded);
  image_grid_thw_SxIx3: their grids (zero rows pad); row_image_start_B: which of its
  shard's images is row b's first (a row's images are consecutive; rows without images
  have no image tokens, so theirs is never read).
  """
  pixel_values_SxNxP: jax.Array
  image_grid_thw_SxIx3: jax.Array
  row_image_start_B: jax.Array


def shared_image_index(input_ids_BxL, images: SharedImages, *, image_token_id: int, merge: int) -> jax.Array:
  """For each position, the row of its shard's merged image features it takes ([B, L] int32)."""
  n_SxI, *_ = jax.vmap(lambda g: image_token_layout(g, merge))(images.image_grid_thw_SxIx3)
  starts_SxI = jnp.cumsum(n_SxI, axis=1) - n_SxI
  b = input_ids_BxL.shape[0]
  s = n_SxI.shape[0]
  shard_B = jnp.arange(b) // (b // s)
  first_B = starts_SxI[shard_B, images.row_image_start_B]
  is_img = input_ids_BxL == image_token_id
  return first_B[:, None] + jnp.cumsum(is_img, axis=1) - 1


def gather_shard_rows(feats_SxKxD: jax.Array, index_BxL: jax.Array) -> jax.Array:
  """[B, L, D]: position (b, l) takes ``feats[b // (B / S), index[b, l]]`` (clipped).

  Gathered per shard (vmap), so with rows and shards split over the same devices the
  gather stays local; its gradient scatters back onto the shared encodings.
  """
  s, k, _ = feats_SxKxD.shape
  b, l = index_BxL.shape
  idx = jnp.clip(index_BxL, 0, k - 1).reshape(s, b // s, l)
  out = jax.vmap(lambda f_KxD, i_bxL: f_KxD[i_bxL])(feats_SxKxD, idx)
  return out.reshape(b, l, -1)


def encode_shards(tower, images: SharedImages):
  """Runs the vision tower on each shard's images: the tower's outputs with a leading S axis.

  Under a mesh (:func:`papo_jax.parallel.use_mesh_rules`) whose batch axes split S, the
  tower runs per device in a ``shard_map`` over those axes (its weights replicated into it,
  their gradient summed back by the transpose), so each device encodes only its own shards
  and Pallas kernels inside (splash attention, which cannot be auto-partitioned) see local
  arrays. Otherwise the shard axis is only pinned to the batch axes and the tower runs
  unconstrained under a vmap.
  """
  pv = constrain(images.pixel_values_SxNxP, ("batch", None, None))
  grid = images.image_grid_thw_SxIx3
  if not isinstance(grid, jax.core.Tracer):
    check_image_patches(np.asarray(grid).reshape(-1, 3), min(tower.max_image_patches, pv.shape[1]))
  axes = _shard_axes(pv.shape[0])
  if axes is None:
    with use_mesh_rules(None):
      out = jax.vmap(tower)(pv, grid)
    return jax.tree.map(lambda a: constrain(a, ("batch",) + (None,) * (a.ndim - 1)), out)
  mesh, spec = axes
  graphdef, state = nnx.split(tower)

  def local(state, pv, grid):
    with use_mesh_rules(None):
      return jax.vmap(nnx.merge(graphdef, state))(pv, grid)

  return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(spec), PartitionSpec(spec)),
                       out_specs=PartitionSpec(spec), check_vma=False)(state, pv, grid)


def _shard_axes(num_shards: int):
  """(mesh, batch mesh axes) when the enclosing mesh rules split ``num_shards`` evenly over them, else None."""
  ctx = current_mesh_rules()
  if ctx is None:
    return None
  mesh, rules = ctx
  spec = logical_to_mesh_spec(("batch",), rules, mesh)[0]
  if spec is None:
    return None
  size = math.prod(mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec))
  return (mesh, spec) if size > 1 and num_shards % size == 0 else None


def vision_layout(grid_thw_Ix3: jax.Array, num_patches: int, merge: int, window: int):
  """Index arithmetic for the vision tower, for ``num_patches`` rows of pixel_values.

  Returns a dict of int32 arrays (K = num_patches // merge**2 merged slots):
    window_index_K: merged slot in window order -> merged slot in raster order
    rank_K: raster slot -> window-order slot (the reverse permutation)
    window_seg_K, frame_seg_K: segment ids per merged slot in *raster* order
    row_N, col_N: patch-grid coordinates of each patch row (processor order)
  """
  unit = merge * merge
  k_slots = num_patches // unit
  n, _, hm, wm, starts = image_token_layout(grid_thw_Ix3, merge)
  total = jnp.sum(n)
  k = jnp.arange(k_slots, dtype=jnp.int32)
  img = jnp.clip(jnp.searchsorted(jnp.cumsum(n), k, side="right"), 0, n.shape[0] - 1)
  real = k < total
  hm_k, wm_k = jnp.maximum(hm[img], 1), jnp.maximum(wm[img], 1)
  local = k - starts[img]
  fsz = hm_k * wm_k
  f, rem = local // fsz, local % fsz
  r, c = rem // wm_k, rem % wm_k
  wr, wc = r // window, c // window
  win_h = jnp.minimum(window, hm_k - window * wr)
  win_w = jnp.minimum(window, wm_k - window * wc)
  frame_start = starts[img] + f * fsz
  win_start = frame_start + wr * window * wm_k + win_h * window * wc
  rank = win_start + (r % window) * win_w + (c % window)
  rank = jnp.where(real, rank, k)
  window_index = jnp.zeros_like(k).at[rank].set(k)
  # Padding slots get unique ids >= total, so they never share a segment with real tokens.
  window_seg = jnp.where(real, win_start, k)
  frame_seg = jnp.where(real, frame_start, k)
  # Patch coordinates for the 2-D RoPE, in processor (merge-unit-major) order.
  sub = jnp.arange(unit, dtype=jnp.int32)
  row = (r[:, None] * merge + sub[None, :] // merge).reshape(-1)
  col = (c[:, None] * merge + sub[None, :] % merge).reshape(-1)
  return dict(window_index_K=window_index, rank_K=rank, window_seg_K=window_seg, frame_seg_K=frame_seg,
              row_N=row, col_N=col)


def vision_rope(row_N: jax.Array, col_N: jax.Array, head_dim: int, theta: float):
  """cos/sin [N, head_dim] in float32: half the frequencies on rows, half on columns."""
  quarter = head_dim // 4
  inv_freq = 1.0 / (theta ** (jnp.arange(0, quarter, dtype=jnp.float32) * 2.0 / (head_dim // 2)))
  ang = jnp.concatenate([row_N[:, None].astype(jnp.float32) * inv_freq, col_N[:, None].astype(jnp.float32) * inv_freq], -1)
  emb = jnp.concatenate([ang, ang], -1)
  return jnp.cos(emb), jnp.sin(emb)


class VisionAttention(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs, backend: str = "xla", block: int = 512):
    d = cfg.hidden_size
    self.backend, self.block = backend, block
    self.window_tokens = (cfg.window_merged * cfg.spatial_merge_size) ** 2
    self.qkv = Dense(d, 3 * d, use_bias=True, axes=("vision_embed", "heads"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj = Dense(d, d, use_bias=True, axes=("heads", "vision_embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = cfg.num_heads
    self.head_dim = cfg.head_dim

  def __call__(self, x_NxD, cos_NxH, sin_NxH, layout: "AttentionLayout"):
    n = x_NxD.shape[0]
    qkv = self.qkv(x_NxD).reshape(n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    # HF upcasts q and k to float32 for the rotation.
    cos, sin = cos_NxH[:, None, :], sin_NxH[:, None, :]
    q = apply_rope(q.astype(jnp.float32), cos, sin).astype(x_NxD.dtype)
    k = apply_rope(k.astype(jnp.float32), cos, sin).astype(x_NxD.dtype)
    kw = dict(scale=self.head_dim ** -0.5, backend=self.backend, block=self.block)
    if layout.window_seg_N is not None:
      out = window_attention(q, k, v, layout.window_seg_N, window=self.window_tokens, **kw)
    else:
      out = layout.per_image(lambda q_, k_, v_, seg_: segment_attention(q_, k_, v_, seg_, **kw), q, k, v)
    return self.proj(out.reshape(n, -1))


def check_image_patches(image_grid_thw_Ix3, max_image_patches: int) -> None:
  """Raises if an image has more patches than the per-image rows of the full-attention layers."""
  if max_image_patches <= 0:
    return
  patches = np.prod(np.asarray(image_grid_thw_Ix3).reshape(-1, 3), axis=1)
  if patches.size and patches.max() > max_image_patches:
    raise ValueError(f"an image has {int(patches.max())} patches but the model's max_image_patches is "
                     f"{max_image_patches}; raise it (set from data.max_pixels) or lower the pixel cap")


class AttentionLayout:
  """Which tokens of the (window-ordered) patch sequence attend to which, in one layer kind.

  Windowed layers: ``window_seg_N``. Full layers: ``frame_seg_N``, gathered into rows of
  ``max_len`` patches per image (``starts_I``/``lengths_I`` in patches) when ``max_len`` > 0,
  else one sequence over all patches.
  """

  def __init__(self, *, window_seg_N=None, frame_seg_N=None, starts_I=None, lengths_I=None, max_len: int = 0):
    self.window_seg_N, self.frame_seg_N = window_seg_N, frame_seg_N
    self.starts_I, self.lengths_I, self.max_len = starts_I, lengths_I, max_len

  def per_image(self, attend, q_NxHxD, k_NxHxD, v_NxHxD):
    """Runs ``attend(q_BxLxHxD, k, v, seg_BxL)`` per image (padded rows) and scatters back to [N, H, D]."""
    n = q_NxHxD.shape[0]
    if self.max_len <= 0:
      return attend(q_NxHxD[None], k_NxHxD[None], v_NxHxD[None], self.frame_seg_N[None])[0]
    p = self.max_len
    local = jnp.arange(p, dtype=jnp.int32)
    real_IxP = local[None] < self.lengths_I[:, None]
    rows_IxP = jnp.clip(self.starts_I[:, None] + local[None], 0, n - 1)
    seg_IxP = jnp.where(real_IxP, self.frame_seg_N[rows_IxP], -1)
    out_IxPxHxD = attend(q_NxHxD[rows_IxP], k_NxHxD[rows_IxP], v_NxHxD[rows_IxP], seg_IxP)
    # Back to rows: row r belongs to image img_r at offset r - start; rows past every image stay 0.
    r = jnp.arange(n, dtype=jnp.int32)
    ends = self.starts_I + self.lengths_I
    img = jnp.clip(jnp.searchsorted(ends, r, side="right"), 0, self.starts_I.shape[0] - 1)
    off = r - self.starts_I[img]
    inside = (off >= 0) & (off < self.lengths_I[img])
    out = out_IxPxHxD[img, jnp.clip(off, 0, p - 1)]
    return jnp.where(inside[:, None, None], out, 0).astype(q_NxHxD.dtype)


class VisionMLP(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
    d, i = cfg.hidden_size, cfg.intermediate_size
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Dense(d, i, axes=("vision_embed", "mlp"), **kw)
    self.up_proj = Dense(d, i, axes=("vision_embed", "mlp"), **kw)
    self.down_proj = Dense(i, d, axes=("mlp", "vision_embed"), **kw)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
  """Pre-norm attention + MLP. ``norm`` and ``mlp`` build the parts that differ between
  families (Qwen2.5-VL: RMSNorm and a gated SiLU MLP; Qwen3-VL: LayerNorm and a plain MLP)."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs, backend: str = "xla", block: int = 512,
               norm=RMSNorm, mlp=None):
    self.norm1 = norm(cfg.hidden_size, eps=1e-6, param_dtype=param_dtype)
    self.norm2 = norm(cfg.hidden_size, eps=1e-6, param_dtype=param_dtype)
    self.attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, backend=backend, block=block)
    self.mlp = (mlp or VisionMLP)(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, cos, sin, layout: AttentionLayout):
    x = x + self.attn(self.norm1(x), cos, sin, layout)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
    d = cfg.hidden_size * cfg.spatial_merge_size ** 2
    self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6, param_dtype=param_dtype)
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp_0 = Dense(d, d, axes=("mlp", "vision_embed"), **kw)
    self.mlp_2 = Dense(d, cfg.out_hidden_size, axes=("vision_embed", "embed"), **kw)
    self.unit_dim = d

  def __call__(self, x_NxD):
    x = self.ln_q(x_NxD).reshape(-1, self.unit_dim)
    return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


class PatchEmbed(nnx.Module):
  """Conv3d with kernel == stride on pre-patchified rows is exactly one matmul."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
    self.proj = Dense(cfg.patch_dim, cfg.hidden_size, use_bias=False, axes=("patch", "vision_embed"),
                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixel_values_NxP):
    return self.proj(pixel_values_NxP)


class VisionTower(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, remat: bool | str = "none", rngs: nnx.Rngs,
               backend: str = "xla", block: int = 512, max_image_patches: int = 0):
    self.cfg = cfg
    self.max_image_patches = max_image_patches
    self.patch_embed = PatchEmbed(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, backend=backend,
                                        block=block) for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.remat = resolve_remat(remat)[1] if isinstance(remat, bool) else remat   # a policy name

  def __call__(self, pixel_values_NxP: jax.Array, image_grid_thw_Ix3: jax.Array) -> jax.Array:
    """Returns merged image features [N // 4, out_hidden_size] in raster order per image.

    Rows past the images' patches (padding) produce features the caller ignores.
    """
    cfg = self.cfg
    n = pixel_values_NxP.shape[0]
    unit = cfg.spatial_merge_size ** 2
    if not isinstance(image_grid_thw_Ix3, jax.core.Tracer):
      check_image_patches(image_grid_thw_Ix3, min(self.max_image_patches, n))
    lay = vision_layout(image_grid_thw_Ix3, n, cfg.spatial_merge_size, cfg.window_merged)
    # HF casts pixel values to the tower's dtype before the patch embedding.
    x = self.patch_embed(pixel_values_NxP.astype(self.dtype))
    cos, sin = vision_rope(lay["row_N"], lay["col_N"], cfg.head_dim, cfg.rope_theta)
    win = lay["window_index_K"]
    to_window = lambda a: a.reshape(n // unit, unit, -1)[win].reshape(n, -1)
    x, cos, sin = to_window(x), to_window(cos), to_window(sin)
    n_img, *_, starts = image_token_layout(image_grid_thw_Ix3, cfg.spatial_merge_size)
    windows = AttentionLayout(window_seg_N=jnp.repeat(lay["window_seg_K"][win], unit))
    frames = AttentionLayout(frame_seg_N=jnp.repeat(lay["frame_seg_K"][win], unit), starts_I=starts * unit,
                             lengths_I=n_img * unit, max_len=min(self.max_image_patches, n))
    x = constrain(x, ("patch", "vision_embed"))
    for i, block in enumerate(self.blocks):
      layout = frames if i in cfg.fullatt_block_indexes else windows
      x = remat_call(self.remat, lambda blk, xx, c, s: blk(xx, c, s, layout), block, x, cos, sin)
    merged = self.merger(x)
    return merged[lay["rank_K"]]
