"""Qwen2.5-VL (vision tower + Qwen2 decoder) in Flax NNX, numerically matching transformers.

Call it like transformers' model::

    logits_BxLxV = model(input_ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)

For RL, :meth:`Qwen25VL.hidden_states` returns the final normed hidden states and
:meth:`Qwen25VL.logits` projects any slice of them, so log-probs can be computed in
chunks without materialising [B, L, V] float32 logits. Decoding uses a preallocated
KV cache (:meth:`Qwen25VL.init_cache`) written at ``cache_index``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from papo_jax.models.attention import causal_attention, decode_attention, resolve_backend
from papo_jax.models.config import ModelConfig, TextConfig
from papo_jax.models.layers import Dense, RMSNorm, apply_rope, remat_call, resolve_remat, softmax_attention
from papo_jax.models.positions import check_image_tokens, get_rope_index, shared_positions
from papo_jax.models.vision import SharedImages, VisionTower, encode_shards, gather_shard_rows, shared_image_index
from papo_jax.parallel import constrain, constrain_split


class KVCache(NamedTuple):
  """Per-layer key/value caches [num_layers, B, S, KVH, D]."""
  k: jax.Array
  v: jax.Array


def mrope_owner(cfg: TextConfig) -> jax.Array:
  """Which position row (0 T, 1 H, 2 W) each of the head_dim/2 frequencies reads.

  Chunked (Qwen2.5-VL): consecutive runs of ``mrope_section`` sizes. Interleaved (Qwen3-VL):
  frequency j reads H if j % 3 == 1 and j < 3 * section[1], W if j % 3 == 2 and
  j < 3 * section[2], else T.
  """
  if not cfg.mrope_interleaved:
    return jnp.concatenate([jnp.full((s,), i, jnp.int32) for i, s in enumerate(cfg.mrope_section)])
  j = jnp.arange(cfg.head_dim // 2, dtype=jnp.int32)
  _, sec_h, sec_w = cfg.mrope_section
  return jnp.where((j % 3 == 1) & (j < 3 * sec_h), 1, jnp.where((j % 3 == 2) & (j < 3 * sec_w), 2, 0))


def mrope_cos_sin(position_ids_3xBxL: jax.Array, cfg: TextConfig, dtype):
  """Multimodal RoPE: frequency j reads row T, H or W (:func:`mrope_owner`).

  cos/sin are computed in float32 and cast to the activation dtype (as HF does).
  Returns cos, sin of shape [B, L, head_dim].
  """
  half = cfg.head_dim // 2
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / cfg.head_dim))
  owner = mrope_owner(cfg)
  pos = position_ids_3xBxL.astype(jnp.float32)[owner]            # [half, B, L]
  ang = jnp.moveaxis(pos, 0, -1) * inv_freq                        # [B, L, half]
  emb = jnp.concatenate([ang, ang], -1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs, backend: str = "xla", block: int = 512,
               gather: bool = False):
    d, h, kvh, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, gather=gather)
    bias = cfg.attention_bias
    self.q_proj = Dense(d, h * hd, use_bias=bias, axes=("embed", "heads"), **kw)
    self.k_proj = Dense(d, kvh * hd, use_bias=bias, axes=("embed", "kv_heads"), **kw)
    self.v_proj = Dense(d, kvh * hd, use_bias=bias, axes=("embed", "kv_heads"), **kw)
    self.o_proj = Dense(h * hd, d, use_bias=False, axes=("heads", "embed"), **kw)
    # Qwen3-VL: RMSNorm over head_dim on q and k, before RoPE.
    self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=param_dtype) if cfg.qk_norm else None
    self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=param_dtype) if cfg.qk_norm else None
    self.h, self.kvh, self.hd = h, kvh, hd
    self.backend, self.block = backend, block

  def __call__(self, x_BxLxD, cos, sin, mask: "AttnMask", cache_kv=None, cache_index=None):
    b, l, _ = x_BxLxD.shape
    q = self.q_proj(x_BxLxD).reshape(b, l, self.h, self.hd)
    k = self.k_proj(x_BxLxD).reshape(b, l, self.kvh, self.hd)
    v = self.v_proj(x_BxLxD).reshape(b, l, self.kvh, self.hd)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, cos[:, :, None, :], sin[:, :, None, :])
    k = apply_rope(k, cos[:, :, None, :], sin[:, :, None, :])
    if cache_kv is not None:
      k_cache, v_cache = cache_kv
      if jnp.ndim(cache_index) == 1:   # decode: one new token per row, each at its own slot
        rows = jnp.arange(b)
        k = k_cache.at[rows, cache_index].set(k[:, 0].astype(k_cache.dtype))
        v = v_cache.at[rows, cache_index].set(v[:, 0].astype(v_cache.dtype))
      else:
        k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), cache_index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, axis=1)
      new_cache = (k, v)
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    else:
      new_cache = None
    if mask.kv_lengths_B is not None:  # decode against a zero-aligned cache: the configured kernel
      out = decode_attention(q, k, v, mask.kv_lengths_B, scale=self.hd ** -0.5, backend=self.backend)
    elif mask.dense_BxLxS is not None:   # a few queries against the whole cache
      out = softmax_attention(q, k, v, mask.dense_BxLxS, self.hd ** -0.5)
    else:                               # whole sequence (training, prefill): the configured kernel
      q_new = q
      k_new, v_new = (k[:, :l], v[:, :l]) if cache_kv is not None else (k, v)
      out = causal_attention(q_new, k_new, v_new, mask.valid_BxL, scale=self.hd ** -0.5, backend=self.backend,
                             block=self.block)
    return self.o_proj(out.reshape(b, l, self.h * self.hd)), new_cache


class AttnMask(NamedTuple):
  """Which keys each query sees: causal over ``valid_BxL`` (whole sequences, any backend) or
  an explicit ``dense_BxLxS`` (decode steps against a cache; XLA)."""
  valid_BxL: jax.Array | None = None
  dense_BxLxS: jax.Array | None = None
  kv_lengths_B: jax.Array | None = None   # decode: row b sees cache slots [0, kv_lengths_B[b])


class MLP(nnx.Module):

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs, gather: bool = False):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs, gather=gather)
    self.gate_proj = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.up_proj = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
    self.down_proj = Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs, backend: str = "xla", block: int = 512,
               gather: bool = False):
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, backend=backend, block=block,
                               gather=gather)
    self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, gather=gather)

  def __call__(self, x, cos, sin, mask, cache_kv=None, cache_index=None):
    h, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_kv, cache_index)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return constrain(x, ("batch", "length", "embed")), new_cache


class TextModel(nnx.Module):

  def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs, backend: str = "xla", block: int = 512,
               gather: bool = False):
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                  embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.embed_tokens.embedding.set_metadata("logical_axes", ("vocab", "embed"))
    self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, backend=backend,
                                         block=block, gather=gather)
                            for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)


def _dtype(name: str):
  return jnp.dtype(name)


class Qwen25VL(nnx.Module):
  """Qwen2_5_VLForConditionalGeneration. Attribute names mirror the official checkpoint keys."""

  vision_tower_cls = VisionTower   # Qwen3VL swaps in its own tower

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    dtype, pdtype = _dtype(config.dtype), _dtype(config.param_dtype)
    self.config = config
    backend = resolve_backend(config.attention)
    self.remat_text, remat_vision = resolve_remat(config.remat)
    self.visual = self.vision_tower_cls(config.vision, dtype=dtype, param_dtype=pdtype, remat=remat_vision,
                                        rngs=rngs, backend=backend, block=config.attention_block,
                                        max_image_patches=config.max_image_patches)
    self.model = TextModel(config.text, dtype=dtype, param_dtype=pdtype, rngs=rngs, backend=backend,
                           block=config.attention_block, gather=config.gather_weights)
    if config.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = Dense(config.text.hidden_size, config.text.vocab_size, use_bias=False, axes=("embed", "vocab"),
                           dtype=dtype, param_dtype=pdtype, rngs=rngs)
    self.dtype = dtype

  # -- pieces ---------------------------------------------------------------------------

  def embed(self, input_ids_BxL, pixel_values_NxP=None, image_grid_thw_Ix3=None):
    """Token embeddings with image features scattered into the ``<|image_pad|>`` positions.

    ``pixel_values_NxP`` may be a :class:`SharedImages` (each distinct image once per batch
    shard; ``image_grid_thw_Ix3`` is then unused).
    """
    cfg = self.config
    x = self.model.embed_tokens(input_ids_BxL).astype(self.dtype)
    if pixel_values_NxP is None:
      return x
    if isinstance(pixel_values_NxP, SharedImages):
      feats_SxKxD = encode_shards(self.visual, pixel_values_NxP)
      idx_BxL = shared_image_index(input_ids_BxL, pixel_values_NxP, image_token_id=cfg.image_token_id,
                                   merge=cfg.vision.spatial_merge_size)
      is_img = input_ids_BxL == cfg.image_token_id
      return jnp.where(is_img[..., None], gather_shard_rows(feats_SxKxD.astype(x.dtype), idx_BxL), x)
    if not isinstance(input_ids_BxL, jax.core.Tracer) and not isinstance(image_grid_thw_Ix3, jax.core.Tracer):
      check_image_tokens(input_ids_BxL, image_grid_thw_Ix3, image_token_id=cfg.image_token_id,
                         spatial_merge_size=cfg.vision.spatial_merge_size)
    feats = self.visual(pixel_values_NxP, image_grid_thw_Ix3).astype(x.dtype)
    is_img = input_ids_BxL == cfg.image_token_id
    idx = jnp.clip(jnp.cumsum(is_img.reshape(-1)) - 1, 0, feats.shape[0] - 1).reshape(is_img.shape)
    return jnp.where(is_img[..., None], feats[idx], x)

  def positions(self, input_ids_BxL, image_grid_thw_Ix3=None, attention_mask_BxL=None):
    """(position_ids [3, B, L], rope_deltas [B, 1]) as transformers' get_rope_index.

    ``image_grid_thw_Ix3`` may be a :class:`SharedImages`: each row then reads its own images.
    """
    if isinstance(image_grid_thw_Ix3, SharedImages):
      return shared_positions(input_ids_BxL, image_grid_thw_Ix3, attention_mask_BxL,
                              image_token_id=self.config.image_token_id,
                              spatial_merge_size=self.config.vision.spatial_merge_size)
    return get_rope_index(input_ids_BxL, image_grid_thw_Ix3, attention_mask_BxL,
                          image_token_id=self.config.image_token_id,
                          spatial_merge_size=self.config.vision.spatial_merge_size)

  def decode_layers(self, x_BxLxD, position_ids_3xBxL, mask: AttnMask, cache: KVCache | None = None, cache_index=None,
                    after_layer=None):
    """Runs the decoder stack; returns (final normed hidden [B, L, D], new cache or None).

    ``after_layer(i, x_BxLxD) -> x_BxLxD``, if given, runs on the output of layer i (Qwen3-VL's DeepStack).
    """
    cos, sin = mrope_cos_sin(position_ids_3xBxL, self.config.text, x_BxLxD.dtype)
    x = constrain(x_BxLxD, ("batch", "length", "embed"))
    new_k, new_v = [], []
    for i, layer in enumerate(self.model.layers):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      if cache is None:
        x, _ = remat_call(self.remat_text, lambda lyr, *a: lyr(*a), layer, x, cos, sin, mask)
      else:
        x, kv = layer(x, cos, sin, mask, kv, cache_index)
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
      if after_layer is not None:
        x = after_layer(i, x)
    x = self.model.norm(x)
    return x, (None if cache is None else KVCache(jnp.stack(new_k), jnp.stack(new_v)))

  def logits(self, hidden_BxLxD, dtype=None, vocab_split: bool = False):
    """lm_head (tied to the embedding when configured); ``dtype`` sets the output precision.

    ``vocab_split`` (under a mesh): every device takes all rows and a slice of the vocabulary, so
    the [V, D] weight is never gathered whole nor its gradient formed whole per device (the
    training head); the logits come out split over the vocabulary.
    """
    out_dtype = hidden_BxLxD.dtype if dtype is None else dtype
    tied = self.lm_head is None
    w = (self.model.embed_tokens.embedding if tied else self.lm_head.kernel).get_value().astype(hidden_BxLxD.dtype)
    if vocab_split:
      hidden_BxLxD = constrain(hidden_BxLxD, (None,) * hidden_BxLxD.ndim)
      w = constrain_split(w, 0 if tied else 1)
    out = jnp.einsum("bld,vd->blv" if tied else "bld,dv->blv", hidden_BxLxD, w,
                     preferred_element_type=out_dtype).astype(out_dtype)
    return constrain_split(out, 2) if vocab_split else out

  # -- full forward -----------------------------------------------------------------------

  def hidden_states(self, input_ids_BxL, attention_mask_BxL=None, pixel_values_NxP=None, image_grid_thw_Ix3=None,
                    position_ids_3xBxL=None):
    """Final normed hidden states [B, L, D] for a whole (left-padded) sequence, causal."""
    b, l = input_ids_BxL.shape
    if attention_mask_BxL is None:
      attention_mask_BxL = jnp.ones((b, l), jnp.int32)
    if position_ids_3xBxL is None:
      grid = pixel_values_NxP if isinstance(pixel_values_NxP, SharedImages) else image_grid_thw_Ix3
      position_ids_3xBxL, _ = self.positions(input_ids_BxL, grid, attention_mask_BxL)
    x = self.embed(input_ids_BxL, pixel_values_NxP, image_grid_thw_Ix3)
    h, _ = self.decode_layers(x, position_ids_3xBxL, AttnMask(valid_BxL=attention_mask_BxL.astype(bool)))
    return h

  def __call__(self, input_ids_BxL, attention_mask_BxL=None, pixel_values_NxP=None, image_grid_thw_Ix3=None,
               position_ids_3xBxL=None, *, attention_mask=None, pixel_values=None, image_grid_thw=None,
               position_ids=None):
    """logits [B, L, V] in the compute dtype (keyword names as in transformers are accepted)."""
    am = attention_mask_BxL if attention_mask is None else attention_mask
    pv = pixel_values_NxP if pixel_values is None else pixel_values
    grid = image_grid_thw_Ix3 if image_grid_thw is None else image_grid_thw
    pos = position_ids_3xBxL if position_ids is None else position_ids
    return self.logits(self.hidden_states(input_ids_BxL, am, pv, grid, pos))

  # -- KV cache -------------------------------------------------------------------------

  def init_cache(self, batch: int, length: int, dtype=jnp.bfloat16) -> KVCache:
    t = self.config.text
    shape = (t.num_hidden_layers, batch, length, t.num_key_value_heads, t.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  def decode_step(self, x_Bx1xD, position_ids_3xBx1, cache: KVCache, write_slot_B):
    """One token per row into a zero-aligned cache (row b's tokens at slots ``[0, write_slot_B[b]]``).

    The token is written at ``write_slot_B[b]`` and attends to every slot up to it, through
    the configured decode kernel. Returns (hidden [B, 1, D], new cache).
    """
    mask = AttnMask(kv_lengths_B=write_slot_B + 1)
    return self.decode_layers(x_Bx1xD, position_ids_3xBx1, mask, cache, write_slot_B)

  def forward_cached(self, x_BxLxD, position_ids_3xBxL, kv_mask_BxS, cache: KVCache, cache_index):
    """Runs L new tokens (embeddings) at cache slots [cache_index, cache_index + L).

    ``kv_mask_BxS`` marks which cache slots hold real tokens (after this write);
    queries attend causally by slot. A prefill (``cache_index`` the literal 0, L > 1) needs only
    the new keys, so it runs the configured attention kernel; later steps attend to the cache
    densely. Returns (hidden [B, L, D], new cache).
    """
    l = position_ids_3xBxL.shape[2]   # (x may be a Qwen3-VL embedding tuple)
    s = cache.k.shape[2]
    if isinstance(cache_index, int) and cache_index == 0 and l > 1:
      mask = AttnMask(valid_BxL=kv_mask_BxS[:, :l].astype(bool))
      return self.decode_layers(x_BxLxD, position_ids_3xBxL, mask, cache, cache_index)
    q_slot = cache_index + jnp.arange(l)
    mask = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & kv_mask_BxS.astype(bool)[:, None, :]
    return self.decode_layers(x_BxLxD, position_ids_3xBxL, AttnMask(dense_BxLxS=mask), cache, cache_index)
