"""Continuous-batching rollout engine with a paged KV cache (Qwen2.5-VL / Qwen3-VL).

    engine = ContinuousEngine(graphdef, SamplingConfig(max_new_tokens=2048),
                              EngineConfig(num_slots=64, page_size=16, num_pages=4096))
    rollout = engine.generate(state, input_ids_BxLp, attention_mask_BxLp, pixel_values_NxP,
                              image_grid_thw_Ix3, n=5, key=jax.random.key(0))

The call and the returned :class:`~papo_jax.sampling.sampler.Rollout` are those of
:class:`~papo_jax.sampling.sampler.Sampler`, so either can serve the trainer.

How it runs:

* **encode** (one jitted call per prompt batch): the vision tower runs once per prompt; the
  prompt embeddings, their 3-D RoPE positions and rope deltas stay on device.
* **step** (one jitted program, static shapes): decode lanes (one token per running sample,
  at most ``num_slots``) and ``prefill_lanes`` lanes of ``prefill_chunk`` prompt tokens are
  run as one flat token batch through the decoder. The decode lanes are the smallest
  power-of-two bucket holding the running samples (``EngineConfig.decode_buckets``), so the
  ramp-up and the long-tailed drain at the end compute few lanes; each bucket is compiled
  twice, with prefill lanes and without (the steps where no prompt is being prefilled). Each
  layer writes its new keys/values into its own page pool
  ``[num_pages, page_size, 2 * kv_heads, head_dim]`` (keys at even, values at odd combined
  heads) in place (donated buffers, one scatter per layer; nothing is stacked or re-sliced)
  and attends over each lane's pages.
  Decode lanes sample their next token; a prefill lane that finishes its prompt samples the
  first token of all ``n`` samples from the last prompt position.
* **host loop** (numpy bookkeeping between steps): the running samples take the first decode
  lanes in slot order; when a sample emits a stop token or reaches ``max_new_tokens`` its
  slot takes the next ready sample, and its pages go back on
  the free list. A prompt is prefilled once; its ``n`` samples share its full pages by
  reference count and each gets a private copy of the last partial page (copy-on-write),
  so the KV layout of every sample is the contiguous ``prompt ⊕ response`` that paged
  kernels expect. When the page pool runs dry the youngest running sample is preempted:
  its pages are freed and it restarts later; since its randomness depends only on its
  sequence id and token index, the restart reproduces the same tokens.

Randomness: sample ``r = b * n + k`` (prompt ``b``, sample ``k``) draws its token ``j``
with ``fold_in(fold_in(key, r), j)``, the static sampler's rule, so a sample depends
neither on the slot it ran in nor on the slot count, and greedy/sampled outputs match
the static sampler's up to float rounding.

Attention over pages (:mod:`papo_jax.sampling.paged_attention`) follows the model's
``attention`` setting: on TPU (``auto`` or ``pallas_tpu``, also when tracing for a TPU under
:func:`papo_jax.models.attention.target_platform`) all decode and prefill lanes of a step
are the sequences of one call of the Pallas ragged paged attention kernel, which reads each
layer's pool directly; elsewhere :func:`paged_attention_xla` gathers each lane's pages and
attends densely (the reference; the kernel has no CPU interpret mode in this JAX).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from papo_jax.models.layers import apply_rope
from papo_jax.models.qwen2_5_vl import mrope_cos_sin
from papo_jax.sampling.paged_attention import paged_attention_xla  # noqa: F401  (re-exported)
from papo_jax.sampling.paged_attention import combine_kv, copy_pages, lane_attention, paged_backend, write_pages
from papo_jax.sampling.sampler import FINISH_EOS, FINISH_LENGTH, Rollout, SamplingConfig, sample_tokens


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Static engine shapes (one compiled step per config, prompt-batch shape and ``n``).

  num_slots:      running samples at most (each a decode lane of the step).
  page_size:      tokens per KV page.
  num_pages:      pages in the pool; KV bytes = 2 * layers * kv_heads * num_pages * page_size
                  * head_dim * itemsize (see :meth:`ContinuousEngine.kv_bytes`).
  prefill_chunk:  prompt tokens per prefill lane per step (long prompts take several steps).
  prefill_lanes:  prompts prefilled concurrently.
  min_decode_lanes: the smallest decode-lane bucket. A step runs as many decode lanes as the
                  smallest power-of-two bucket (or ``num_slots``) holding its running samples, so
                  while few samples run (the ramp-up, and the long-tailed drain at the end) it
                  computes few lanes; one compilation per bucket. ``num_slots`` turns buckets off.
  """
  num_slots: int = 32
  page_size: int = 16
  num_pages: int = 1024
  prefill_chunk: int = 64
  prefill_lanes: int = 1
  min_decode_lanes: int = 1

  def __post_init__(self):
    for name in ("num_slots", "page_size", "num_pages", "prefill_chunk", "prefill_lanes", "min_decode_lanes"):
      if getattr(self, name) < 1:
        raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")

  @property
  def decode_buckets(self) -> tuple[int, ...]:
    """Decode-lane counts a step is compiled for: powers of two from ``min_decode_lanes``, and ``num_slots``."""
    out, b = [], 1
    while b < self.num_slots:
      if b >= self.min_decode_lanes:
        out.append(b)
      b *= 2
    return tuple(out) + (self.num_slots,)

  def decode_lanes(self, running: int) -> int:
    """The smallest bucket holding ``running`` samples."""
    return next(b for b in self.decode_buckets if b >= running)


class PagedKVCache(NamedTuple):
  """One page pool per decoder layer, each ``[num_pages, page_size, 2 * kv_heads, head_dim]``
  (key head j at ``2j``, value head j at ``2j + 1``: the ragged kernel's layout)."""
  pages: tuple[jax.Array, ...]


# -- host-side page bookkeeping -------------------------------------------------------------------


class PageAllocator:
  """Free list with reference counts; a page returns to the free list when its count drops to 0."""

  def __init__(self, num_pages: int):
    self.num_pages = num_pages
    self._free = collections.deque(range(num_pages))
    self._refs = np.zeros(num_pages, np.int32)

  @property
  def num_free(self) -> int:
    return len(self._free)

  def alloc(self, count: int) -> list[int] | None:
    """``count`` fresh pages (reference 1), or None (nothing taken) if fewer are free."""
    if count > len(self._free):
      return None
    pages = [self._free.popleft() for _ in range(count)]
    self._refs[pages] = 1
    return pages

  def share(self, pages) -> None:
    for p in pages:
      if self._refs[p] < 1:
        raise ValueError(f"PageAllocator.share: page {p} is not allocated")
      self._refs[p] += 1

  def release(self, pages) -> None:
    for p in pages:
      if self._refs[p] < 1:
        raise ValueError(f"PageAllocator.release: page {p} is not allocated (double free)")
      self._refs[p] -= 1
      if self._refs[p] == 0:
        self._free.append(p)

  def refcount(self, page: int) -> int:
    return int(self._refs[page])


# -- device programs ------------------------------------------------------------------------------


class PromptBuffer(NamedTuple):
  """Encoded prompts, flattened over ``(b, slot)`` of the left-padded ``[B, Lp]`` batch."""
  x_NxD: jax.Array            # embeddings with image features scattered in
  pos_3xN: jax.Array          # 3-D RoPE positions
  deepstack_KxMxD: jax.Array  # Qwen3-VL DeepStack features (K = 0 otherwise)
  visual_index_N: jax.Array   # which DeepStack row each position takes
  visual_mask_N: jax.Array    # image positions


class StepInputs(NamedTuple):
  """Per-step lane descriptions (host-built numpy; a few kB)."""
  dec_token_S: np.ndarray     # token fed by each decode lane
  dec_kv_S: np.ndarray        # its key slot in the sequence (prompt_len + index)
  dec_pos_S: np.ndarray       # its RoPE position
  dec_active_S: np.ndarray    # lane runs a sample
  dec_pages_SxM: np.ndarray   # page table
  dec_seq_S: np.ndarray       # sample id (for its key)
  dec_tidx_S: np.ndarray      # index of the token sampled this step
  dec_chunk_S: np.ndarray     # prompt chunk of the sample (its key)
  pre_src_PxC: np.ndarray     # flat PromptBuffer index of each prefill token
  pre_kv_PxC: np.ndarray      # its key slot (zero-aligned prompt)
  pre_valid_PxC: np.ndarray
  pre_pages_PxMp: np.ndarray
  pre_last_P: np.ndarray      # chunk index of the lane's last valid token
  pre_seq0_P: np.ndarray      # id of sample 0 of the lane's prompt
  pre_chunk_P: np.ndarray     # prompt chunk of the lane's prompt
  copy_src_X: np.ndarray      # copy-on-write: page copies done before the step (dst == num_pages: none)
  copy_dst_X: np.ndarray


LogitsProcessor = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _stop_pad_banned(model_config, cfg: SamplingConfig):
  stops = cfg.stop_token_ids
  if stops is None:
    eos = model_config.eos_token_id
    stops = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
  if not stops:
    raise ValueError("ContinuousEngine: no stop tokens (SamplingConfig.stop_token_ids is None and the model config "
                     "has no eos_token_id)")
  pad = cfg.pad_token_id
  if pad is None:
    pad = model_config.pad_token_id if model_config.pad_token_id is not None else stops[0]
  banned = tuple(i for i in (model_config.image_token_id, model_config.video_token_id)
                 if i is not None and i < model_config.text.vocab_size)
  return tuple(int(s) for s in stops), int(pad), banned


class ContinuousEngine:
  """Slot-scheduled generation over a paged KV cache; ``generate`` returns the static sampler's Rollout.

  ``logits_processor(logits_NxV, seq_id_N, token_index_N) -> logits_NxV`` (optional, traced)
  edits the float32 logits before sampling (tests and benchmarks force lengths with it).
  """

  def __init__(self, graphdef, cfg: SamplingConfig, engine_cfg: EngineConfig = EngineConfig(), *,
               logits_processor: LogitsProcessor | None = None):
    self.graphdef = graphdef
    self.cfg = cfg
    self.engine_cfg = engine_cfg
    self.logits_processor = logits_processor
    self._encode = jax.jit(self._encode_impl)
    self._step = jax.jit(self._step_impl, static_argnames=("n",), donate_argnames=("cache",))
    self._cache: PagedKVCache | None = None
    self._seen: set = set()
    self.stats: dict = {}

  # -- shapes ------------------------------------------------------------------------------

  def cache_shape(self, model_config) -> tuple[int, ...]:
    """One layer's page pool: ``(num_pages, page_size, 2 * kv_heads, head_dim)``."""
    t, e = model_config.text, self.engine_cfg
    return (e.num_pages, e.page_size, 2 * t.num_key_value_heads, t.head_dim)

  def kv_bytes(self, model_config) -> int:
    """Bytes of all layers' page pools (keys and values)."""
    layers = model_config.text.num_hidden_layers
    return layers * math.prod(self.cache_shape(model_config)) * jnp.dtype(self.cfg.cache_dtype).itemsize

  def _get_cache(self, model_config) -> PagedKVCache:
    shape, layers = self.cache_shape(model_config), model_config.text.num_hidden_layers
    if self._cache is None or len(self._cache.pages) != layers or self._cache.pages[0].shape != shape:
      dt = jnp.dtype(self.cfg.cache_dtype)
      self._cache = PagedKVCache(tuple(jnp.zeros(shape, dt) for _ in range(layers)))
    return self._cache

  # -- encode: vision tower once per prompt -----------------------------------------------

  def _encode_impl(self, state, input_ids_BxLp, attention_mask_BxLp, pixel_values_NxP, image_grid_thw_Ix3):
    model = nnx.merge(self.graphdef, state)
    b, lp = input_ids_BxLp.shape
    mask = attention_mask_BxLp.astype(jnp.int32)
    pos_3xBxLp, deltas_Bx1 = model.positions(input_ids_BxLp, image_grid_thw_Ix3, mask)
    emb = model.embed(input_ids_BxLp, pixel_values_NxP, image_grid_thw_Ix3)
    d = model.config.text.hidden_size
    if hasattr(emb, "deepstack_KxMxD"):      # Qwen3-VL with images
      x, ds = emb.x_BxLxD, emb.deepstack_KxMxD
      vidx, vmask = emb.visual_index_BxL.reshape(-1), emb.visual_mask_BxL.reshape(-1)
    else:
      x, ds = emb, jnp.zeros((0, 1, d), emb.dtype)
      vidx, vmask = jnp.zeros((b * lp,), jnp.int32), jnp.zeros((b * lp,), bool)
    buf = PromptBuffer(x.reshape(b * lp, d), pos_3xBxLp.reshape(3, b * lp), ds, vidx.astype(jnp.int32), vmask)
    return buf, deltas_Bx1[:, 0]

  # -- step: decode lanes + prefill lanes in one flat token batch --------------------------

  def _step_impl(self, state, cache: PagedKVCache, prompts: PromptBuffer, inp: StepInputs, chunk_keys_C,
                 chunk_first_seq_C, *, n: int):
    model = nnx.merge(self.graphdef, state)
    tc = model.config.text
    _, _, banned = _stop_pad_banned(model.config, self.cfg)
    num_pages, page = cache.pages[0].shape[:2]
    s = inp.dec_token_S.shape[0]
    p, c = inp.pre_src_PxC.shape
    t = s + p * c
    h, kvh, hd = tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim
    backend = paged_backend(model.config.attention, hd)

    src = inp.pre_src_PxC.reshape(-1)
    x_dec = model.model.embed_tokens(inp.dec_token_S).astype(model.dtype)
    x = jnp.concatenate([x_dec, prompts.x_NxD[src].astype(model.dtype)], axis=0)[None]       # [1, T, D]
    pos_3xT = jnp.concatenate([jnp.broadcast_to(inp.dec_pos_S[None], (3, s)), prompts.pos_3xN[:, src]], axis=1)
    cos, sin = mrope_cos_sin(pos_3xT[:, None, :], tc, x.dtype)                                # [1, T, hd]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]

    # Where each token's key/value goes; inactive lanes write out of bounds (dropped).
    dec_page_S = jnp.take_along_axis(inp.dec_pages_SxM, (inp.dec_kv_S // page)[:, None], axis=1)[:, 0]
    pre_page_PxC = jnp.take_along_axis(
        inp.pre_pages_PxMp, jnp.minimum(inp.pre_kv_PxC // page, inp.pre_pages_PxMp.shape[1] - 1), axis=1)
    write_page_T = jnp.concatenate([jnp.where(inp.dec_active_S, dec_page_S, num_pages),
                                    jnp.where(inp.pre_valid_PxC, pre_page_PxC, num_pages).reshape(-1)])
    write_off_T = jnp.concatenate([inp.dec_kv_S % page, (inp.pre_kv_PxC % page).reshape(-1)])
    lanes = dict(dec_kv_S=inp.dec_kv_S, dec_active_S=inp.dec_active_S, dec_pages_SxMs=inp.dec_pages_SxM,
                 pre_kv_PxC=inp.pre_kv_PxC, pre_valid_PxC=inp.pre_valid_PxC, pre_pages_PxMp=inp.pre_pages_PxMp)

    n_ds = prompts.deepstack_KxMxD.shape[0]
    pre_vmask_T = jnp.concatenate([jnp.zeros((s,), bool), prompts.visual_mask_N[src]])
    pre_vidx_T = jnp.concatenate([jnp.zeros((s,), jnp.int32), prompts.visual_index_N[src]])
    scale = hd ** -0.5
    pools = []
    for i, layer in enumerate(model.model.layers):
      attn = layer.self_attn
      y = layer.input_layernorm(x)
      q = attn.q_proj(y).reshape(1, t, h, hd)
      k = attn.k_proj(y).reshape(1, t, kvh, hd)
      v = attn.v_proj(y).reshape(1, t, kvh, hd)
      if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
      q, k = apply_rope(q, cos, sin)[0], apply_rope(k, cos, sin)[0]
      # This layer's pool, updated in place (donated buffer): copy-on-write of shared partial
      # prompt pages before anything reads them, then one scatter of this step's keys/values.
      pool = copy_pages(cache.pages[i], inp.copy_src_X, inp.copy_dst_X)
      pool = write_pages(pool, write_page_T, write_off_T, combine_kv(k, v[0]))
      out = lane_attention(q, pool, scale=scale, backend=backend, **lanes)
      pools.append(pool)
      x = x + attn.o_proj(out.reshape(1, t, h * hd))
      x = x + layer.mlp(layer.post_attention_layernorm(x))
      if i < n_ds:                            # Qwen3-VL DeepStack at the prompt's image positions
        feats = prompts.deepstack_KxMxD[i].astype(x.dtype)[pre_vidx_T]
        x = jnp.where(pre_vmask_T[None, :, None], x + feats[None], x)
    x = model.model.norm(x)[0]

    last_P = x[s:].reshape(p, c, x.shape[-1])[jnp.arange(p), inp.pre_last_P]
    logits = model.logits(jnp.concatenate([x[:s], last_P])[None], dtype=jnp.float32)[0]      # [S + P, V]
    # Decode lanes draw token dec_tidx of their sample; prefill lanes draw token 0 of n samples.
    seq_N = jnp.concatenate([inp.dec_seq_S, (inp.pre_seq0_P[:, None] + jnp.arange(n)[None]).reshape(-1)])
    tidx_N = jnp.concatenate([inp.dec_tidx_S, jnp.zeros((p * n,), jnp.int32)])
    logits_N = jnp.concatenate([logits[:s], jnp.repeat(logits[s:], n, axis=0)])
    if self.logits_processor is not None:
      logits_N = self.logits_processor(logits_N, seq_N, tidx_N)
    # sample r of chunk c draws token j with fold_in(fold_in(chunk key, r - chunk's first sample id), j)
    chunk_N = jnp.concatenate([inp.dec_chunk_S, jnp.repeat(inp.pre_chunk_P, n)])
    keys_N = jax.vmap(lambda c_, q_, j: jax.random.fold_in(jax.random.fold_in(chunk_keys_C[c_], q_), j))(
        chunk_N, seq_N - chunk_first_seq_C[chunk_N], tidx_N)
    c_ = self.cfg
    tok_N, lp_N, raw_N = sample_tokens(logits_N, keys_N, temperature=c_.temperature, top_k=c_.top_k, top_p=c_.top_p,
                                       greedy=c_.greedy, banned_ids=banned, top_p_candidates=c_.top_p_candidates)
    return PagedKVCache(tuple(pools)), (tok_N, lp_N, raw_N)

  # -- host loop ---------------------------------------------------------------------------

  def generate(self, state, input_ids_BxLp, attention_mask_BxLp, pixel_values_NxP=None, image_grid_thw_Ix3=None, *,
               n: int = 1, key: jax.Array | int = 0, max_new_tokens: int | None = None) -> Rollout:
    """Samples ``n`` responses per left-padded prompt; same arguments and result as ``Sampler.generate``."""
    return self.generate_stream(state, [(input_ids_BxLp, attention_mask_BxLp, pixel_values_NxP, image_grid_thw_Ix3)],
                                n=n, key=key, max_new_tokens=max_new_tokens)

  def generate_stream(self, state, chunks, *, n: int = 1, key: jax.Array | int = 0,
                      max_new_tokens: int | None = None) -> Rollout:
    """``n`` samples per prompt of a stream of prompt chunks, in one scheduling run.

    ``chunks``: ``(input_ids_BxLp, attention_mask_BxLp, pixel_values_NxP | None, image_grid_thw_Ix3 | None)``
    per chunk, all with the same ``Lp`` (``rollouts.prompt_chunks``). A chunk is encoded (vision
    tower, embeddings) when its first prompt is admitted and dropped once its prompts are
    prefilled, so device memory holds one chunk's prompts, while the slots run samples of
    any chunks: nothing drains between chunks. Rows of the Rollout are prompt-major over all
    chunks. Chunk i draws with ``fold_in(key, i)`` (the key itself when there is one chunk), the
    rule of ``rollouts.sample_texts`` over the static sampler, so the samples are those of
    generating the chunks one by one.
    """
    if isinstance(key, int):
      key = jax.random.key(key)
    elif not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.wrap_key_data(key)
    chunks = list(chunks)
    if not chunks:
      raise ValueError("ContinuousEngine.generate_stream: no prompt chunks")
    for ids_c, _, pv_c, grid_c in chunks:
      if pv_c is not None and grid_c is None:
        raise ValueError("ContinuousEngine.generate: pixel_values given without image_grid_thw")
    t_max = self.cfg.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    if n < 1 or t_max < 1:
      raise ValueError(f"ContinuousEngine.generate: n and max_new_tokens must be >= 1, got {n}, {t_max}")
    ec = self.engine_cfg
    model_config = nnx.merge(self.graphdef, state).config
    stops, pad, _ = _stop_pad_banned(model_config, self.cfg)
    stop_set = set(stops)

    ids_c = [np.asarray(c[0]).astype(np.int32) for c in chunks]
    lp = ids_c[0].shape[1]
    if any(a.shape[1] != lp for a in ids_c):
      raise ValueError(f"ContinuousEngine.generate_stream: chunks differ in prompt length "
                       f"({sorted({a.shape[1] for a in ids_c})}); pad them to one")
    ids_np = np.concatenate(ids_c)
    mask_np = np.concatenate([np.asarray(c[1]).astype(np.int32) for c in chunks])
    b_count = ids_np.shape[0]
    chunk_sizes = np.array([a.shape[0] for a in ids_c], np.int64)
    chunk_start = np.concatenate([[0], np.cumsum(chunk_sizes)])
    chunk_of_B = np.repeat(np.arange(len(chunks)), chunk_sizes)
    prompt_len_B = mask_np.sum(axis=1)
    if (prompt_len_B < 1).any() or (mask_np[:, -1] != 1).any():
      raise ValueError("ContinuousEngine.generate: attention_mask must be left padded with at least one real token "
                       "per row (the last slot of every row real)")
    first_B = lp - prompt_len_B
    page = ec.page_size
    max_pages_seq = -(-(lp + t_max) // page)
    max_pages_prompt = -(-lp // page)
    need = max_pages_seq + max_pages_prompt
    if ec.num_pages < need:
      raise ValueError(f"EngineConfig.num_pages={ec.num_pages} is too small: one prompt of {lp} tokens with "
                       f"max_new_tokens={t_max} needs {max_pages_seq} pages of {page} as headroom plus "
                       f"{max_pages_prompt} for a prompt ({need} in all)")
    # Per chunk: its key and first sample id (a sample's key is fold_in(chunk key, id within the chunk)).
    chunk_keys = key[None] if len(chunks) == 1 else jax.vmap(lambda i: jax.random.fold_in(key, i))(
        jnp.arange(len(chunks)))
    chunk_first_seq = jnp.asarray(chunk_start[:-1] * n, jnp.int32)

    deltas_B = np.zeros(b_count, np.int64)
    pos_prompt_3xBxLp = np.zeros((3, b_count, lp), np.int32)
    bufs: dict[int, PromptBuffer] = {}
    unprefilled = chunk_sizes.copy()                      # per chunk: prompts not yet prefilled
    buf = None                                            # the buffer the step reads (the prefilling chunk's)

    def encode(ci):
      _, am_, pv_, grid_ = chunks[ci]
      shape = (ids_c[ci].shape[0], lp, None if pv_ is None else tuple(np.shape(pv_)), t_max, n)
      if shape not in self._seen:
        self._seen.add(shape)
        logging.info("engine: compiling for prompts (%d, %d), pixels %s, max_new_tokens %d, n %d", *shape)
      b_, d_ = self._encode(state, jnp.asarray(ids_c[ci]), jnp.asarray(np.asarray(am_).astype(np.int32)),
                            None if pv_ is None else jnp.asarray(pv_),
                            None if grid_ is None else jnp.asarray(grid_, jnp.int32))
      sl = slice(chunk_start[ci], chunk_start[ci + 1])
      deltas_B[sl] = np.asarray(jax.device_get(d_)).astype(np.int64)
      pos_prompt_3xBxLp[:, sl] = np.asarray(jax.device_get(b_.pos_3xN)).reshape(3, -1, lp)
      bufs[ci] = b_

    cache = self._get_cache(model_config)
    self._cache = None                                    # donated below; re-kept at the end

    r_count = b_count * n
    s_n, p_n, c_n, np_ = ec.num_slots, ec.prefill_lanes, ec.prefill_chunk, ec.num_pages
    tokens = np.full((r_count, t_max), pad, np.int32)
    logp = np.zeros((r_count, t_max), np.float32)
    raw = np.zeros((r_count, t_max), np.float32)
    gen = np.zeros(r_count, np.int64)                     # tokens generated so far per sample
    finish = np.full(r_count, FINISH_LENGTH, np.int32)
    done = np.zeros(r_count, bool)
    alloc = PageAllocator(np_)
    prompt_pages: dict[int, list[int]] = {}
    prompt_refs = np.zeros(b_count, np.int64)
    own_pages: dict[int, list[int]] = {}                  # a running sample's private pages
    shared_pages: dict[int, list[int]] = {}               # the prompt's full pages it references
    slot_seq = np.full(s_n, -1, np.int64)
    slot_start = np.zeros(s_n, np.int64)                  # step at which the slot took its sample
    lane_prompt = np.full(p_n, -1, np.int64)
    lane_done = np.zeros(p_n, np.int64)                   # prompt tokens prefilled
    waiting = collections.deque(range(b_count))
    ready: collections.deque[int] = collections.deque()
    steps = active_slot_steps = lane_steps = preemptions = 0
    t0 = time.perf_counter()

    def drop_pages(r):
      alloc.release(shared_pages.pop(r, []))
      alloc.release(own_pages.pop(r, []))

    def finish_sample(r):
      done[r] = True
      drop_pages(r)
      b = r // n
      prompt_refs[b] -= 1
      if prompt_refs[b] == 0:
        alloc.release(prompt_pages.pop(b))

    def preempt(slot):
      r = slot_seq[slot]
      drop_pages(r)
      gen[r] = 1                                          # keep token 0 (drawn at prefill); redo the rest
      slot_seq[slot] = -1
      ready.appendleft(r)

    while not done.all():
      # 1. admit prompts to idle prefill lanes while too few samples are ready for the slots; the
      # prefill lanes of a step read one chunk's buffer, so a new chunk waits for the lanes to empty
      for lane in range(p_n):
        in_flight = int((lane_prompt >= 0).sum()) * n
        if lane_prompt[lane] >= 0 or not waiting or len(ready) + in_flight >= s_n:
          continue
        b = waiting[0]
        busy = lane_prompt[lane_prompt >= 0]
        if len(busy) and chunk_of_B[busy[0]] != chunk_of_B[b]:
          break
        count = -(-int(prompt_len_B[b]) // page)
        # Prompt pages stay below num_pages - max_pages_seq, so the oldest running sample can
        # always finish by preempting the others (no deadlock on held prompt pages).
        if alloc.num_free - count < max_pages_seq:
          break
        pages = alloc.alloc(count)
        waiting.popleft()
        if chunk_of_B[b] not in bufs:
          encode(chunk_of_B[b])
        buf = bufs[chunk_of_B[b]]
        prompt_pages[b], prompt_refs[b] = pages, n
        lane_prompt[lane], lane_done[lane] = b, 0
      # 2. free slots take ready samples (partial last prompt page copied on write)
      copies = []
      for slot in np.flatnonzero(slot_seq < 0):
        if not ready:
          break
        r = ready[0]
        b = r // n
        full, partial = divmod(int(prompt_len_B[b]), page)
        mine = []
        if partial:
          mine = alloc.alloc(1)
          if mine is None:
            break
          copies.append((prompt_pages[b][full], mine[0], r))
        ready.popleft()
        shared_pages[r] = prompt_pages[b][:full]
        alloc.share(shared_pages[r])
        own_pages[r] = mine
        slot_seq[slot], slot_start[slot] = r, steps
      # 3. every running sample needs the page its next key lands in; preempt the youngest if none is free
      for slot in np.argsort(slot_start, kind="stable"):
        r = slot_seq[slot]
        if r < 0:
          continue
        b = r // n
        full = int(prompt_len_B[b]) // page
        kv = int(prompt_len_B[b]) + gen[r] - 1
        while slot_seq[slot] >= 0 and kv // page >= full + len(own_pages[r]):
          got = alloc.alloc(1)
          if got is not None:
            own_pages[r].extend(got)
            continue
          running = np.flatnonzero(slot_seq >= 0)
          victim = running[np.argmax(slot_start[running])]
          preempt(victim)
          preemptions += 1
      active = slot_seq >= 0
      # a sample preempted right after admission needs no copy (its page may be someone else's now)
      copies = [(a, d) for a, d, r in copies if r in own_pages and own_pages[r][:1] == [d]]
      if not active.any() and not (lane_prompt >= 0).any():
        raise RuntimeError(f"ContinuousEngine: no progress possible with {np_} pages ({alloc.num_free} free, "
                           f"{len(ready)} samples ready, {len(waiting)} prompts waiting); raise "
                           "EngineConfig.num_pages")

      # running samples take the first decode lanes of the smallest bucket that holds them
      running = np.flatnonzero(active)
      lanes = ec.decode_lanes(len(running))
      inp = self._build_inputs(running, lanes, slot_seq, gen, tokens, prompt_len_B, first_B, deltas_B, prompt_pages,
                               own_pages, lane_prompt, lane_done, copies, chunk_of_B, chunk_start, n=n, lp=lp,
                               max_pages_seq=max_pages_seq, max_pages_prompt=max_pages_prompt)
      cache, out = self._step(state, cache, buf, inp, chunk_keys, chunk_first_seq, n=n)
      tok_N, lp_N, raw_N = (np.asarray(a) for a in jax.device_get(out))
      steps += 1
      lane_steps += lanes
      active_slot_steps += len(running)

      # 4. decode lanes: record the token; finished samples free their slot and pages
      for i, slot in enumerate(running):
        r = slot_seq[slot]
        j = gen[r]
        tokens[r, j], logp[r, j], raw[r, j] = tok_N[i], lp_N[i], raw_N[i]
        gen[r] = j + 1
        if int(tok_N[i]) in stop_set or j + 1 >= t_max:
          finish[r] = FINISH_EOS if int(tok_N[i]) in stop_set else FINISH_LENGTH
          slot_seq[slot] = -1
          finish_sample(r)
      # 5. prefill lanes: a finished prompt's n samples get token 0 and become ready
      for lane in range(p_n):
        b = lane_prompt[lane]
        if b < 0:
          continue
        lane_done[lane] += c_n
        if lane_done[lane] < prompt_len_B[b]:
          continue
        lane_prompt[lane] = -1
        unprefilled[chunk_of_B[b]] -= 1
        if unprefilled[chunk_of_B[b]] == 0 and len(bufs) > 1:
          del bufs[chunk_of_B[b]]                         # its prompts are in the KV pages now
        for k_ in range(n):
          r, i = b * n + k_, lanes + lane * n + k_
          tokens[r, 0], logp[r, 0], raw[r, 0] = tok_N[i], lp_N[i], raw_N[i]
          gen[r] = 1
          if int(tok_N[i]) in stop_set or t_max == 1:
            finish[r] = FINISH_EOS if int(tok_N[i]) in stop_set else FINISH_LENGTH
            finish_sample(r)
          else:
            ready.append(r)

    self._cache = cache
    wall = time.perf_counter() - t0
    # utilisation: decode lanes that ran a sample / decode lanes computed
    self.stats = dict(steps=steps, slot_utilisation=active_slot_steps / max(lane_steps, 1), lane_steps=lane_steps,
                      preemptions=preemptions, tokens=int(gen.sum()), wall_s=wall,
                      kv_bytes=self.kv_bytes(model_config))
    return self._rollout(tokens, logp, raw, gen, finish, pad, ids_np, mask_np, pos_prompt_3xBxLp, prompt_len_B,
                         deltas_B, n=n, t_max=t_max)

  def _build_inputs(self, running, lanes, slot_seq, gen, tokens, prompt_len_B, first_B, deltas_B, prompt_pages,
                    own_pages, lane_prompt, lane_done, copies, chunk_of_B, chunk_start, *, n, lp, max_pages_seq,
                    max_pages_prompt) -> StepInputs:
    """Decode lane i runs the sample of slot ``running[i]``; lanes past ``len(running)`` are inactive."""
    ec = self.engine_cfg
    s_n, c_n, page = lanes, ec.prefill_chunk, ec.page_size
    # No prompt in flight: zero prefill lanes, a second (decode-only) compiled program.
    p_n = ec.prefill_lanes if (lane_prompt >= 0).any() else 0
    i32 = lambda a: np.asarray(a, np.int32)
    dec_token, dec_kv, dec_pos = np.zeros(s_n, np.int64), np.zeros(s_n, np.int64), np.zeros(s_n, np.int64)
    dec_pages = np.zeros((s_n, max_pages_seq), np.int64)
    dec_seq, dec_tidx, dec_chunk = np.zeros(s_n, np.int64), np.zeros(s_n, np.int64), np.zeros(s_n, np.int64)
    active = np.arange(s_n) < len(running)
    for lane, slot in enumerate(running):
      r = slot_seq[slot]
      b = r // n
      j = gen[r]                                   # feed token j-1, draw token j
      plen = int(prompt_len_B[b])
      dec_token[lane] = tokens[r, j - 1]
      dec_kv[lane] = plen + j - 1
      dec_pos[lane] = plen + deltas_B[b] + j - 1
      table = prompt_pages[b][:plen // page] + own_pages[r]
      dec_pages[lane, :len(table)] = table
      dec_seq[lane], dec_tidx[lane], dec_chunk[lane] = r, j, chunk_of_B[b]
    pre_src = np.zeros((p_n, c_n), np.int64)
    pre_kv = np.zeros((p_n, c_n), np.int64)
    pre_valid = np.zeros((p_n, c_n), bool)
    pre_pages = np.zeros((p_n, max_pages_prompt), np.int64)
    pre_last, pre_seq0, pre_chunk = np.zeros(p_n, np.int64), np.zeros(p_n, np.int64), np.zeros(p_n, np.int64)
    for lane in range(p_n):
      b = lane_prompt[lane]
      if b < 0:
        continue
      start = int(lane_done[lane])
      count = min(c_n, int(prompt_len_B[b]) - start)
      kv = start + np.arange(c_n)
      pre_kv[lane] = kv
      pre_valid[lane] = np.arange(c_n) < count
      # the step reads the buffer of b's chunk, where b is row b - chunk_start
      pre_src[lane] = (b - chunk_start[chunk_of_B[b]]) * lp + first_B[b] + np.minimum(kv, prompt_len_B[b] - 1)
      pre_pages[lane, :len(prompt_pages[b])] = prompt_pages[b]
      pre_last[lane], pre_seq0[lane], pre_chunk[lane] = count - 1, b * n, chunk_of_B[b]
    copy_src = np.zeros(ec.num_slots, np.int64)
    copy_dst = np.full(ec.num_slots, ec.num_pages, np.int64)
    for i, (a, d) in enumerate(copies):
      copy_src[i], copy_dst[i] = a, d
    return StepInputs(i32(dec_token), i32(dec_kv), i32(dec_pos), np.asarray(active, bool), i32(dec_pages),
                      i32(dec_seq), i32(dec_tidx), i32(dec_chunk), i32(pre_src), i32(pre_kv), pre_valid,
                      i32(pre_pages), i32(pre_last), i32(pre_seq0), i32(pre_chunk), i32(copy_src), i32(copy_dst))

  def _rollout(self, tokens, logp, raw, gen, finish, pad, ids_np, mask_np, pos_prompt_3xBxLp, prompt_len_B, deltas_B,
               *, n, t_max) -> Rollout:
    r_count = tokens.shape[0]
    mask = (np.arange(t_max)[None, :] < gen[:, None]).astype(np.int32)
    tokens = np.where(mask.astype(bool), tokens, pad).astype(np.int32)
    pos_prompt = pos_prompt_3xBxLp
    next_pos_R = np.repeat(prompt_len_B + deltas_B, n)
    resp_pos = np.where(mask.astype(bool), next_pos_R[:, None] + np.arange(t_max)[None, :], 0)
    position_ids = np.concatenate([np.repeat(pos_prompt, n, axis=1),
                                   np.broadcast_to(resp_pos[None], (3, r_count, t_max))], axis=2).astype(np.int32)
    return Rollout(
        tokens_RxT=jnp.asarray(tokens), mask_RxT=jnp.asarray(mask),
        logprobs_RxT=jnp.asarray(np.where(mask.astype(bool), logp, 0.0).astype(np.float32)),
        policy_logprobs_RxT=jnp.asarray(np.where(mask.astype(bool), raw, 0.0).astype(np.float32)),
        finish_reason_R=jnp.asarray(finish.astype(np.int32)), lengths_R=jnp.asarray(gen.astype(np.int32)),
        prompt_ids_RxLp=jnp.asarray(np.repeat(ids_np, n, axis=0)),
        prompt_mask_RxLp=jnp.asarray(np.repeat(mask_np, n, axis=0)),
        position_ids_3xRxL=jnp.asarray(position_ids),
        rope_deltas_Rx1=jnp.asarray(np.repeat(deltas_B, n)[:, None].astype(np.int32)))
