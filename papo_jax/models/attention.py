"""Attention backends: one switch (``ModelConfig.attention``) for the LLM and the vision tower.

* ``xla``: plain einsum softmax attention with a boolean mask (the reference; CPU tests).
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (NVIDIA GPUs, bf16/fp16).
  The LLM's left padding is turned into right padding by rotating each row, so the
  kernel's own causal + sequence-length masking applies and no mask is materialised.
* ``pallas_tpu``: the splash attention kernel of ``jax.experimental.pallas.ops.tpu``
  with segment ids for padding and packed images and a static causal / local mask,
  so whole blocks outside the mask are skipped. Off TPU it runs in interpret mode
  (slow; tests only).
* ``auto``: ``pallas_tpu`` on TPU, ``cudnn`` on GPU, ``xla`` elsewhere.

Three attention shapes are needed, each a function here:

* :func:`causal_attention`: the LLM over left-padded rows (GQA).
* :func:`window_attention`: vision windowed layers. Tokens are in window order, so each
  window is a contiguous run of at most ``window`` tokens; a query then only needs keys
  within ``window - 1`` places of itself. The XLA and cuDNN paths cut the sequence into
  blocks of ``window`` queries that attend to their block and its two neighbours
  (memory ``N * 3 * window``, linear in the number of images); splash uses a local mask.
* :func:`segment_attention`: vision full-attention layers: every token attends to its
  own segment (a frame). The caller lays images out as a batch of per-image rows padded
  to a patch bucket, so memory grows linearly with the number of images.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from papo_jax.models.layers import softmax_attention
from papo_jax.parallel import sharding as sharding_lib

BACKENDS = ("xla", "cudnn", "pallas_tpu")

# The platform the traced program is compiled for; None: the process's default backend.
# Ahead-of-time compiles for a TPU topology on a CPU host set it to "tpu" (papo_jax.aot).
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_platform", default=None)


@contextlib.contextmanager
def target_platform(name: str | None):
  """Traces inside take the attention paths of platform ``name`` (``tpu``, ``gpu``, ``cpu``).

  Used when lowering for a device other than the host's (AOT compiles for a TPU topology):
  ``auto`` then resolves for ``name`` and splash kernels lower through Mosaic instead of
  running in interpret mode. ``None`` restores the default backend.
  """
  token = _TARGET_PLATFORM.set(name)
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


def _platform() -> str:
  """The platform attention is traced for: the :func:`target_platform` in effect, else JAX's default backend."""
  return _TARGET_PLATFORM.get() or jax.default_backend()


def resolve_backend(name: str) -> str:
  """``auto`` -> the platform's fused kernel; anything else is checked and returned."""
  if name == "auto":
    return {"tpu": "pallas_tpu", "gpu": "cudnn", "cuda": "cudnn"}.get(_platform(), "xla")
  if name not in BACKENDS:
    raise ValueError(f"model.attention: {name!r} is not one of auto, {', '.join(BACKENDS)}")
  return name


def _check_cudnn_dtype(x: jax.Array):
  if x.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"model.attention='cudnn' needs model.dtype bfloat16 or float16, got {x.dtype}; "
                     "use attention='xla' for float32")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


# -- the LLM: causal over left-padded rows --------------------------------------------------


def causal_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, valid_BxL, *, scale: float, backend: str = "xla",
                     block: int = 512):
  """Causal self-attention where query i sees keys j <= i with ``valid[j]``.

  Rows of padding (``valid`` False) give outputs the caller ignores (finite).
  The ``cudnn`` path assumes each row's valid tokens are one contiguous run (left
  padding, right padding or both), which holds for prompts and prompt ⊕ response.
  """
  if backend == "xla":
    l = q_BxLxHxD.shape[1]
    mask = jnp.tril(jnp.ones((l, l), bool))[None] & valid_BxL.astype(bool)[:, None, :]
    return softmax_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, mask, scale)
  if backend == "cudnn":
    _check_cudnn_dtype(q_BxLxHxD)
    return rotated_causal_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, valid_BxL, scale=scale, implementation="cudnn")
  if backend == "pallas_tpu":
    seg = valid_BxL.astype(jnp.int32)
    return splash_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, seg, seg, scale=scale, kind="causal", block=block)
  raise ValueError(f"unknown attention backend {backend!r}")


def rotated_causal_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, valid_BxL, *, scale: float,
                             implementation: str = "cudnn"):
  """``jax.nn.dot_product_attention`` with causal + length masking on rows rotated to right padding.

  Rotating row b left by its first valid slot puts its ``n_b`` real tokens at
  ``[0, n_b)``; RoPE was applied before, so positions are unaffected.
  """
  b, l = valid_BxL.shape
  valid = valid_BxL.astype(bool)
  lengths = jnp.maximum(jnp.sum(valid, axis=1), 1).astype(jnp.int32)
  first = jnp.argmax(valid, axis=1).astype(jnp.int32)
  fwd = (jnp.arange(l, dtype=jnp.int32)[None] + first[:, None]) % l      # rotated slot -> original slot
  back = (jnp.arange(l, dtype=jnp.int32)[None] - first[:, None]) % l     # original slot -> rotated slot
  take = lambda a, idx: jnp.take_along_axis(a, idx[:, :, None, None], axis=1)
  out = jax.nn.dot_product_attention(take(q_BxLxHxD, fwd), take(k_BxLxKxD, fwd), take(v_BxLxKxD, fwd),
                                     scale=scale, is_causal=True, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths, implementation=implementation)
  out = take(out, back)
  return jnp.where(valid[:, :, None, None], out, 0).astype(q_BxLxHxD.dtype)


# -- decode: one query per row against a zero-aligned KV cache -------------------------------


def decode_attention(q_Bx1xHxD, k_BxSxKxD, v_BxSxKxD, kv_lengths_B, *, scale: float, backend: str = "xla",
                     implementation: str | None = None):
  """Row b's query attends to cache slots ``[0, kv_lengths_B[b])``.

  ``cudnn`` runs the fused kernel with key/value sequence lengths (no mask array);
  ``xla`` and ``pallas_tpu`` attend densely over the cache (the Pallas TPU paged kernels
  expect a paged cache layout, which this cache does not use). ``implementation``
  overrides the ``jax.nn`` implementation of the length path (tests run it with ``xla``).
  """
  if backend == "cudnn" or implementation is not None:
    if implementation is None:
      _check_cudnn_dtype(q_Bx1xHxD)
    ones = jnp.ones(q_Bx1xHxD.shape[:1], jnp.int32)
    return jax.nn.dot_product_attention(q_Bx1xHxD, k_BxSxKxD, v_BxSxKxD, scale=scale, query_seq_lengths=ones,
                                        key_value_seq_lengths=kv_lengths_B.astype(jnp.int32),
                                        implementation=implementation or "cudnn")
  s = k_BxSxKxD.shape[1]
  mask = (jnp.arange(s)[None, :] < kv_lengths_B[:, None])[:, None, :]
  return softmax_attention(q_Bx1xHxD, k_BxSxKxD, v_BxSxKxD, mask, scale)


# -- vision: windows and whole images -------------------------------------------------------


def window_attention(q_NxHxD, k_NxHxD, v_NxHxD, seg_N, *, window: int, scale: float, backend: str = "xla",
                     block: int = 512):
  """Attention within segments that are contiguous runs of at most ``window`` tokens."""
  if backend == "pallas_tpu":
    out = splash_attention(q_NxHxD[None], k_NxHxD[None], v_NxHxD[None], seg_N[None], seg_N[None], scale=scale,
                           kind="local", window=window, block=block)
    return out[0]
  if backend not in ("xla", "cudnn"):
    raise ValueError(f"unknown attention backend {backend!r}")
  n, h, d = q_NxHxD.shape
  nb = -(-n // window)
  pad = nb * window - n
  # Padded queries get segment -1 (they see only each other); the halo blocks get -2 (never matched).
  seg = jnp.pad(seg_N.astype(jnp.int32), (0, pad), constant_values=-1)
  blocks = lambda a: jnp.pad(a, ((0, pad), (0, 0), (0, 0))).reshape(nb, window, h, d)
  q_b = blocks(q_NxHxD)

  def neighbours(a_bxW):
    halo = jnp.zeros((1,) + a_bxW.shape[1:], a_bxW.dtype)
    a = jnp.concatenate([halo, a_bxW, halo])
    return jnp.concatenate([a[:-2], a[1:-1], a[2:]], axis=1)              # [nb, 3 * window, ...]

  k_b, v_b = neighbours(blocks(k_NxHxD)), neighbours(blocks(v_NxHxD))
  seg_q = seg.reshape(nb, window)
  halo_seg = jnp.full((1, window), -2, jnp.int32)
  seg_k = jnp.concatenate([halo_seg, seg_q, halo_seg])
  seg_k = jnp.concatenate([seg_k[:-2], seg_k[1:-1], seg_k[2:]], axis=1)
  mask = seg_q[:, :, None] == seg_k[:, None, :]                          # [nb, window, 3 * window]
  out = _masked(q_b, k_b, v_b, mask, scale, backend)
  return out.reshape(nb * window, h, d)[:n]


def segment_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, seg_BxL, *, scale: float, backend: str = "xla",
                      block: int = 512):
  """Every token attends to the tokens of its row with the same segment id (non-causal)."""
  if backend == "pallas_tpu":
    return splash_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, seg_BxL, seg_BxL, scale=scale, kind="full", block=block)
  if backend not in ("xla", "cudnn"):
    raise ValueError(f"unknown attention backend {backend!r}")
  if backend == "xla" and q_BxLxHxD.shape[1] > block:
    return query_chunked_segment_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, seg_BxL, scale=scale, chunk=block)
  mask = seg_BxL[:, :, None] == seg_BxL[:, None, :]
  return _masked(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, mask, scale, backend)


def query_chunked_segment_attention(q_BxLxHxD, k_BxLxHxD, v_BxLxHxD, seg_BxL, *, scale: float, chunk: int):
  """:func:`segment_attention` on XLA with memory bounded by ``chunk`` queries at a time.

  Queries are cut into chunks that each attend to all keys (scores [B, H, chunk, L], never
  [B, H, L, L]); each chunk is rematerialised in the backward pass, so only one chunk's
  scores are live at once in either direction. Padded queries get segment -1 and are dropped.
  """
  b, l, h, d = q_BxLxHxD.shape
  n = -(-l // chunk)
  pad = n * chunk - l
  q = jnp.pad(q_BxLxHxD, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, chunk, h, d).swapaxes(0, 1)
  seg_q = jnp.pad(seg_BxL, ((0, 0), (0, pad)), constant_values=-1).reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(q_BxCxHxD, seg_BxC):
    mask_BxCxL = seg_BxC[:, :, None] == seg_BxL[:, None, :]
    return softmax_attention(q_BxCxHxD, k_BxLxHxD, v_BxLxHxD, mask_BxCxL, scale)

  out = jax.lax.map(lambda xs: one(*xs), (q, seg_q))                 # [n, B, chunk, H, D]
  return out.swapaxes(0, 1).reshape(b, n * chunk, h, d)[:, :l]


def _masked(q, k, v, mask_BxLxS, scale, backend):
  if backend == "cudnn":
    _check_cudnn_dtype(q)
    return jax.nn.dot_product_attention(q, k, v, mask=mask_BxLxS[:, None], scale=scale, implementation="cudnn")
  return softmax_attention(q, k, v, mask_BxLxS, scale)


# -- Pallas TPU splash attention ------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _splash_kernel(kind: str, length: int, heads: int, window: int, block_q: int, block_kv: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  shape = (length, length)
  if kind == "causal":
    one = sm.CausalMask(shape)
  elif kind == "local":
    one = sm.LocalMask(shape, window_size=(window - 1, window - 1), offset=0)
  else:
    one = sm.FullMask(shape)
  sizes = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                        block_q_dq=block_q, block_kv_dq=block_kv)
  # Built eagerly (the mask metadata are concrete arrays) so the cached kernel holds no tracers.
  with jax.ensure_compile_time_eval():
    kernel = sk.make_splash_mqa(sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
  return kernel, sk.SegmentIds


def splash_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, q_seg_BxL, kv_seg_BxL, *, scale: float, kind: str,
                     window: int = 0, block: int = 512):
  """Splash attention (GQA as one MQA kernel per KV head) with segment ids; L padded to the block.

  ``kind``: ``causal``, ``local`` (|i - j| < window) or ``full``. Under a mesh
  (:func:`papo_jax.parallel.use_mesh_rules`) the kernel runs per shard via shard_map:
  batch over the batch axes, KV heads over the tensor axis when they divide it.
  """
  b, l, h, d = q_BxLxHxD.shape
  kvh = k_BxLxKxD.shape[2]
  g = h // kvh
  blk = min(block, _round_up(l, 128))
  lp = _round_up(l, blk)
  interpret = _platform() != "tpu"
  kernel, segment_ids = _splash_kernel(kind, lp, g, window, blk, blk, interpret)

  def run(q, k, v, qs, ks):
    # q [b, L, H, D] -> [b, KVH, G, Lp, D]; k, v [b, L, KVH, D] -> [b, KVH, Lp, D]
    pad = ((0, 0), (0, lp - l), (0, 0), (0, 0))
    bb = q.shape[0]
    kv_heads = k.shape[2]
    q = jnp.pad(q * jnp.asarray(scale, q.dtype), pad).reshape(bb, lp, kv_heads, g, d).transpose(0, 2, 3, 1, 4)
    k = jnp.pad(k, pad).transpose(0, 2, 1, 3)
    v = jnp.pad(v, pad).transpose(0, 2, 1, 3)
    qs = jnp.pad(qs.astype(jnp.int32), ((0, 0), (0, lp - l)), constant_values=-1)
    ks = jnp.pad(ks.astype(jnp.int32), ((0, 0), (0, lp - l)), constant_values=-1)
    per_head = lambda qh, kh, vh, sq, sk_: kernel(qh, kh, vh, segment_ids=segment_ids(sq, sk_))
    per_row = jax.vmap(per_head, in_axes=(0, 0, 0, None, None))                  # over KV heads
    out = jax.vmap(per_row)(q, k, v, qs, ks)                                      # over batch
    return out.transpose(0, 3, 1, 2, 4).reshape(bb, lp, kv_heads * g, d)[:, :l].astype(q_BxLxHxD.dtype)

  ctx = sharding_lib.current_mesh_rules()
  if ctx is None:
    return run(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, q_seg_BxL, kv_seg_BxL)
  mesh, rules = ctx
  batch_axes = sharding_lib.logical_to_mesh_spec(("batch",), rules, mesh)[0]
  if batch_axes is not None and b % math.prod(mesh.shape[a] for a in
                                              (batch_axes if isinstance(batch_axes, tuple) else (batch_axes,))):
    batch_axes = None
  head_axis = sharding_lib.logical_to_mesh_spec(("kv_heads",), rules, mesh)[0]
  if head_axis is not None and kvh % math.prod(mesh.shape[a] for a in
                                               (head_axis if isinstance(head_axis, tuple) else (head_axis,))):
    head_axis = None
  x_spec = PartitionSpec(batch_axes, None, head_axis, None)
  s_spec = PartitionSpec(batch_axes, None)
  return jax.shard_map(run, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, s_spec, s_spec), out_specs=x_spec,
                       check_vma=False)(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, q_seg_BxL, kv_seg_BxL)
