"""Qwen3-VL in Flax NNX: what differs from Qwen2.5-VL, numerically matching transformers.

Shared with :mod:`papo_jax.models.qwen2_5_vl` (unchanged code paths): the decoder skeleton,
GQA attention and its backends, the KV cache, 3-D position ids (``get_rope_index``),
logits, and the vision attention with its 2-D RoPE. Configured by flags in
:class:`~papo_jax.models.config.TextConfig` (no attention biases, qk-norm before RoPE,
interleaved MRoPE). Specific to Qwen3-VL and defined here (spec qwen_vl.md section 5):

* the vision tower: patch embedding with bias; a learned ``side x side`` position table
  resampled to each image's patch grid by bilinear interpolation with align_corners;
  LayerNorm + tanh-GELU blocks, all attending within their image frame (no windows, no
  token reordering); a merger that normalises before the 2x2 shuffle;
* DeepStack: mergers that normalise after the shuffle turn the outputs of vision blocks
  ``deepstack_visual_indexes`` into features added to the hidden states of the image-token
  positions after decoder layers 0, 1, ...

The model class keeps :class:`Qwen25VL`'s interface, so the sampler and the train step
run it unchanged. With images, :meth:`Qwen3VL.embed` returns a :class:`DeepStackEmbeds`
(the usual embeddings plus the DeepStack features) that ``decode_layers`` /
``forward_cached`` accept in place of the ``[B, L, D]`` array.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from papo_jax.models.config import VisionConfig
from papo_jax.models.layers import Dense, param, remat_call, resolve_remat
from papo_jax.models.positions import check_image_tokens, image_token_layout
from papo_jax.models.qwen2_5_vl import Qwen25VL
from papo_jax.models.vision import (AttentionLayout, SharedImages, VisionBlock, check_image_patches, encode_shards,
                                    gather_shard_rows, shared_image_index, vision_rope)
from papo_jax.parallel import constrain

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


def _activation(name: str):
  if name not in _ACTIVATIONS:
    raise ValueError(f"vision_config.hidden_act {name!r} is not one of {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


# -- index arithmetic (pure, jit-friendly) ------------------------------------------------------


def patch_layout(grid_thw_Ix3: jax.Array, num_patches: int, merge: int):
  """Per row of ``pixel_values`` (processor order, merge-unit-major): int32 arrays [N] of

  row_N, col_N: patch-grid coordinates; height_N, width_N: the image's patch grid;
  frame_seg_N: one id per image frame (rows past the images get ids of their own).
  """
  n_merged, _, hm, wm, starts_merged = image_token_layout(grid_thw_Ix3, merge)
  unit = merge * merge
  counts, starts = n_merged * unit, starts_merged * unit
  r = jnp.arange(num_patches, dtype=jnp.int32)
  img = jnp.clip(jnp.searchsorted(jnp.cumsum(counts), r, side="right"), 0, counts.shape[0] - 1)
  real = r < jnp.sum(counts)
  height, width = jnp.maximum(hm[img] * merge, 1), jnp.maximum(wm[img] * merge, 1)
  local = r - starts[img]
  frame, within = local // (height * width), local % (height * width)
  block, sub = within // unit, within % unit
  blocks_w = jnp.maximum(width // merge, 1)
  row = (block // blocks_w) * merge + sub // merge
  col = (block % blocks_w) * merge + sub % merge
  frame_seg = jnp.where(real, starts[img] + frame * height * width, r)
  zero = jnp.zeros_like(r)
  return dict(row_N=jnp.where(real, row, zero), col_N=jnp.where(real, col, zero), height_N=height, width_N=width,
              frame_seg_N=frame_seg)


def _axis_taps(index_N: jax.Array, size_N: jax.Array, side: int):
  """Bilinear align_corners taps along one axis: table indices [N, 2] int32 and weights [N, 2] float32.

  Source coordinate s = i * (side - 1) / (size - 1) (0 when size == 1), taps floor(s) and
  floor(s) + 1 (clamped to the table), weights 1 - |s - tap| (transformers' arithmetic).
  """
  src = index_N.astype(jnp.float32) * (side - 1) / jnp.maximum(size_N - 1, 1).astype(jnp.float32)
  floor = jnp.floor(src)
  raw = floor[:, None] + jnp.arange(2, dtype=jnp.float32)[None, :]
  weights = jnp.maximum(1.0 - jnp.abs(src[:, None] - raw), 0.0)
  return jnp.clip(raw.astype(jnp.int32), 0, side - 1), weights


def position_taps(row_N, col_N, height_N, width_N, side: int):
  """Rows of the ``side x side`` table (row-major) and weights that resample it to each patch: [N, 4] each."""
  th, wh = _axis_taps(row_N, height_N, side)
  tw, ww = _axis_taps(col_N, width_N, side)
  index = (th[:, :, None] * side + tw[:, None, :]).reshape(-1, 4)
  weight = (wh[:, :, None] * ww[:, None, :]).reshape(-1, 4)
  return index, weight


# -- vision tower -------------------------------------------------------------------------------


class LayerNorm(nnx.Module):
  """torch ``nn.LayerNorm``: two-pass variance in float32, affine in float32, cast back to the input dtype."""

  def __init__(self, dim: int, *, eps: float, param_dtype, axis_name: str = "norm"):
    self.weight = param(None, (dim,), param_dtype, (axis_name,), init="ones")
    self.bias = param(None, (dim,), param_dtype, (axis_name,), init="zeros")
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
    y = y * self.weight.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)
    return y.astype(x.dtype)


class PatchEmbed(nnx.Module):
  """Conv3d (kernel == stride, with bias) on pre-patchified rows: one matmul."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
    self.proj = Dense(cfg.patch_dim, cfg.hidden_size, use_bias=True, axes=("patch", "vision_embed"),
                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixel_values_NxP):
    return self.proj(pixel_values_NxP)


class PositionTable(nnx.Module):
  """The learned ``side x side`` position embedding (``pos_embed.weight``, rows r * side + c)."""

  def __init__(self, cfg: VisionConfig, *, param_dtype, rngs):
    self.weight = param(rngs, (cfg.num_position_embeddings, cfg.hidden_size), param_dtype, (None, "vision_embed"))
    self.side = int(round(cfg.num_position_embeddings ** 0.5))

  def __call__(self, index_Nx4: jax.Array, weight_Nx4: jax.Array) -> jax.Array:
    """Interpolated embeddings [N, D] in float32 (weights in float32, as transformers v5)."""
    rows = self.weight.get_value()[index_Nx4].astype(jnp.float32)     # [N, 4, D]
    return jnp.sum(rows * weight_Nx4[:, :, None], axis=1)


class VisionMLP(nnx.Module):

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("vision_embed", "mlp"), **kw)
    self.linear_fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "vision_embed"), **kw)
    _activation(cfg.hidden_act)   # fail at construction on an unknown name
    self.hidden_act = cfg.hidden_act

  def __call__(self, x):
    return self.linear_fc2(_activation(self.hidden_act)(self.linear_fc1(x)))


class PatchMerger(nnx.Module):
  """2x2 patch shuffle + MLP; LayerNorm before the shuffle (main merger) or after it (DeepStack)."""

  def __init__(self, cfg: VisionConfig, *, postshuffle_norm: bool, dtype, param_dtype, rngs):
    d = cfg.hidden_size * cfg.spatial_merge_size ** 2
    self.norm = LayerNorm(d if postshuffle_norm else cfg.hidden_size, eps=1e-6, param_dtype=param_dtype)
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_fc1 = Dense(d, d, axes=("mlp", "vision_embed"), **kw)
    self.linear_fc2 = Dense(d, cfg.out_hidden_size, axes=("vision_embed", "embed"), **kw)
    self.unit_dim = d
    self.postshuffle_norm = postshuffle_norm

  def __call__(self, x_NxD):
    if self.postshuffle_norm:
      x = self.norm(x_NxD.reshape(-1, self.unit_dim))
    else:
      x = self.norm(x_NxD).reshape(-1, self.unit_dim)
    return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


class VisionTower(nnx.Module):
  """Qwen3VLVisionModel. Same constructor as the Qwen2.5-VL tower; returns DeepStack features too."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, remat: bool | str = "none", rngs: nnx.Rngs,
               backend: str = "xla", block: int = 512, max_image_patches: int = 0):
    self.cfg = cfg
    self.max_image_patches = max_image_patches
    self.patch_embed = PatchEmbed(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pos_embed = PositionTable(cfg, param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, backend=backend,
                                        block=block, norm=LayerNorm, mlp=VisionMLP) for _ in range(cfg.depth)])
    self.merger = PatchMerger(cfg, postshuffle_norm=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.deepstack_merger_list = nnx.List([
        PatchMerger(cfg, postshuffle_norm=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in cfg.deepstack_visual_indexes])
    self.dtype = dtype
    self.remat = resolve_remat(remat)[1] if isinstance(remat, bool) else remat   # a policy name

  def __call__(self, pixel_values_NxP: jax.Array, image_grid_thw_Ix3: jax.Array):
    """Returns (merged features [N // 4, out], DeepStack features [K, N // 4, out]), raster order per image.

    Rows past the images' patches (padding) produce features the caller ignores.
    """
    cfg = self.cfg
    n = pixel_values_NxP.shape[0]
    unit = cfg.spatial_merge_size ** 2
    if not isinstance(image_grid_thw_Ix3, jax.core.Tracer):
      check_image_patches(image_grid_thw_Ix3, min(self.max_image_patches, n))
    lay = patch_layout(image_grid_thw_Ix3, n, cfg.spatial_merge_size)
    # HF casts pixel values to the tower's dtype before the patch embedding.
    x = self.patch_embed(pixel_values_NxP.astype(self.dtype))
    taps = position_taps(lay["row_N"], lay["col_N"], lay["height_N"], lay["width_N"], self.pos_embed.side)
    x = x + self.pos_embed(*taps).astype(x.dtype)
    cos, sin = vision_rope(lay["row_N"], lay["col_N"], cfg.head_dim, cfg.rope_theta)
    n_img, *_, starts = image_token_layout(image_grid_thw_Ix3, cfg.spatial_merge_size)
    frames = AttentionLayout(frame_seg_N=lay["frame_seg_N"], starts_I=starts * unit, lengths_I=n_img * unit,
                             max_len=min(self.max_image_patches, n))
    x = constrain(x, ("patch", "vision_embed"))
    deepstack = []
    for i, blk in enumerate(self.blocks):
      x = remat_call(self.remat, lambda b, xx, c, s: b(xx, c, s, frames), blk, x, cos, sin)
      if i in cfg.deepstack_visual_indexes:
        deepstack.append(self.deepstack_merger_list[cfg.deepstack_visual_indexes.index(i)](x))
    merged = self.merger(x)
    stacked = jnp.stack(deepstack) if deepstack else jnp.zeros((0,) + merged.shape, merged.dtype)
    return merged, stacked


# -- the model ----------------------------------------------------------------------------------


class DeepStackEmbeds(NamedTuple):
  """Decoder input when images are present.

  x_BxLxD: token embeddings with the merged image features at the ``<|image_pad|>`` positions.
  deepstack_KxMxD: DeepStack features of the M merged image tokens (all images, in order);
    [K, S, M, D] per batch shard for :class:`SharedImages` (rows split into S shards).
  visual_index_BxL: which of the M rows (of its shard's) each position takes (meaningful where visual_mask_BxL).
  visual_mask_BxL: the ``<|image_pad|>`` positions.
  """
  x_BxLxD: jax.Array
  deepstack_KxMxD: jax.Array
  visual_index_BxL: jax.Array
  visual_mask_BxL: jax.Array


class Qwen3VL(Qwen25VL):
  """Qwen3VLForConditionalGeneration. Attribute names mirror the checkpoint keys (see checkpoint.py)."""

  vision_tower_cls = VisionTower

  def embed(self, input_ids_BxL, pixel_values_NxP=None, image_grid_thw_Ix3=None):
    """Token embeddings [B, L, D]; with images a :class:`DeepStackEmbeds` (features scattered in, plus DeepStack)."""
    if pixel_values_NxP is None:
      return super().embed(input_ids_BxL)
    cfg = self.config
    if isinstance(pixel_values_NxP, SharedImages):
      x = self.model.embed_tokens(input_ids_BxL).astype(self.dtype)
      feats_SxMxD, deepstack_SxKxMxD = encode_shards(self.visual, pixel_values_NxP)
      idx = shared_image_index(input_ids_BxL, pixel_values_NxP, image_token_id=cfg.image_token_id,
                               merge=cfg.vision.spatial_merge_size)
      is_img = input_ids_BxL == cfg.image_token_id
      x = jnp.where(is_img[..., None], gather_shard_rows(feats_SxMxD.astype(x.dtype), idx), x)
      return DeepStackEmbeds(x, jnp.moveaxis(deepstack_SxKxMxD, 1, 0).astype(x.dtype), idx, is_img)
    if not isinstance(input_ids_BxL, jax.core.Tracer) and not isinstance(image_grid_thw_Ix3, jax.core.Tracer):
      check_image_tokens(input_ids_BxL, image_grid_thw_Ix3, image_token_id=cfg.image_token_id,
                         spatial_merge_size=cfg.vision.spatial_merge_size)
    x = self.model.embed_tokens(input_ids_BxL).astype(self.dtype)
    feats_MxD, deepstack_KxMxD = self.visual(pixel_values_NxP, image_grid_thw_Ix3)
    is_img = input_ids_BxL == cfg.image_token_id
    idx = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, feats_MxD.shape[0] - 1).reshape(is_img.shape)
    x = jnp.where(is_img[..., None], feats_MxD.astype(x.dtype)[idx], x)
    return DeepStackEmbeds(x, deepstack_KxMxD.astype(x.dtype), idx, is_img)

  def decode_layers(self, x_BxLxD, position_ids_3xBxL, mask, cache=None, cache_index=None, after_layer=None):
    """As :meth:`Qwen25VL.decode_layers`; DeepStack feature k is added at the image positions after layer k."""
    if not isinstance(x_BxLxD, DeepStackEmbeds):
      return super().decode_layers(x_BxLxD, position_ids_3xBxL, mask, cache, cache_index, after_layer)
    emb = x_BxLxD
    k = emb.deepstack_KxMxD.shape[0]

    def add_deepstack(i, h_BxLxD):
      if i < k:
        feats = emb.deepstack_KxMxD[i].astype(h_BxLxD.dtype)
        if feats.ndim == 3:   # per batch shard
          feats_BxLxD = gather_shard_rows(feats, emb.visual_index_BxL)
        else:
          feats_BxLxD = feats[emb.visual_index_BxL]
        h_BxLxD = jnp.where(emb.visual_mask_BxL[..., None], h_BxLxD + feats_BxLxD, h_BxLxD)
      return h_BxLxD if after_layer is None else after_layer(i, h_BxLxD)

    return super().decode_layers(emb.x_BxLxD, position_ids_3xBxL, mask, cache, cache_index, add_deepstack)
