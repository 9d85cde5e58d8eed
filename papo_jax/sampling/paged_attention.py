"""Attention over the continuous engine's paged KV cache: an XLA reference and the Pallas TPU ragged kernel.

Cache layout (one array per decoder layer, the layout of
``jax.experimental.pallas.ops.tpu.ragged_paged_attention``)::

    pages_NxPx2KxD[page, slot, 2 * j]      key of KV head j
    pages_NxPx2KxD[page, slot, 2 * j + 1]  value of KV head j

A step's flat token batch is ``S`` decode lanes (one query each) followed by ``P`` prefill
lanes of ``C`` queries (a prompt chunk; its valid tokens are a prefix of the chunk). Every
lane's keys are the contiguous slots ``0 ..`` of its page table, and its query ``i``
attends to the slots up to its own (``q_kv``), this step's keys included.

* :func:`paged_attention_xla` gathers each lane's pages and attends densely (float32
  softmax): CPU / GPU and the reference.
* :func:`ragged_attention_pallas` hands all lanes to the ragged kernel as the sequences of
  one flat query batch (:func:`ragged_layout` builds its arguments).

:func:`lane_attention` picks one by backend (``xla`` | ``pallas_tpu``), and
:func:`paged_backend` picks the backend from the model's ``attention`` setting.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from absl import logging

from papo_jax.models import attention as attention_lib
from papo_jax.models.layers import NEG_INF

# The kernel's defaults when no tuned table applies (its own table is looked up from the
# devices of the running process, which on a host compiling for a TPU are CPUs).
KV_PAGES_PER_BLOCK = 128
QUERIES_PER_BLOCK = 32


# -- cache layout ---------------------------------------------------------------------------------


def combine_kv(k_TxKxD: jax.Array, v_TxKxD: jax.Array) -> jax.Array:
  """``[T, 2K, D]`` with key head j at ``2j`` and value head j at ``2j + 1`` (the kernel's layout)."""
  t, kvh, d = k_TxKxD.shape
  return jnp.stack([k_TxKxD, v_TxKxD], axis=2).reshape(t, 2 * kvh, d)


def split_kv(pages_NxPx2KxD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Keys and values ``[N, P, K, D]`` of a combined page pool."""
  return pages_NxPx2KxD[:, :, 0::2], pages_NxPx2KxD[:, :, 1::2]


def write_pages(pages_NxPx2KxD: jax.Array, page_T: jax.Array, offset_T: jax.Array, kv_Tx2KxD: jax.Array):
  """Token t's keys/values into ``(page_T[t], offset_T[t])``; a page of N (out of bounds) drops the write."""
  return pages_NxPx2KxD.at[page_T, offset_T].set(kv_Tx2KxD.astype(pages_NxPx2KxD.dtype), mode="drop")


def copy_pages(pages_NxPx2KxD: jax.Array, src_X: jax.Array, dst_X: jax.Array):
  """Page ``src_X[x]`` copied onto ``dst_X[x]`` (copy-on-write; a dst of N is no copy)."""
  return pages_NxPx2KxD.at[dst_X].set(pages_NxPx2KxD[src_X], mode="drop")


# -- XLA reference --------------------------------------------------------------------------------


def paged_attention_xla(q_BxQxHxD, pages_NxPx2KxD, page_table_BxM, q_kv_BxQ, *, scale: float):
  """Query ``(b, i)`` attends to keys ``0 .. q_kv_BxQ[b, i]`` of lane b's pages (causal, contiguous).

  ``page_table_BxM[b, m]`` is the page holding lane b's key slots ``[m * P, (m + 1) * P)``.
  Gathers the lane's pages (``[B, M * P, K, D]``) and attends densely; softmax in float32.
  """
  b, q_len, h, d = q_BxQxHxD.shape
  _, p, kv2, _ = pages_NxPx2KxD.shape
  kvh, m = kv2 // 2, page_table_BxM.shape[1]
  lane_BxSx2KxD = pages_NxPx2KxD[page_table_BxM].reshape(b, m * p, kv2, d).astype(q_BxQxHxD.dtype)
  k, v = lane_BxSx2KxD[:, :, 0::2], lane_BxSx2KxD[:, :, 1::2]
  q = q_BxQxHxD.reshape(b, q_len, kvh, h // kvh, d)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
  mask_BxQxS = jnp.arange(m * p)[None, None, :] <= q_kv_BxQ[:, :, None]
  scores = jnp.where(mask_BxQxS[:, None, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
  return out.reshape(b, q_len, h, d)


# -- the ragged kernel's arguments ----------------------------------------------------------------


class RaggedLayout(NamedTuple):
  """The step's lanes as the ragged kernel's sequences (``L = S + P``), all int32.

  Sequence ``l`` owns kernel queries ``[cu_q_lens_L1[l], cu_q_lens_L1[l + 1])``, the last
  of its ``kv_lens_L[l]`` keys. ``src_T[j]``: the engine token at kernel query j;
  ``dst_T[t]``: the kernel query of engine token t (a permutation; None when it is the
  identity, i.e. with at most one prefill lane).
  """
  kv_lens_L: jax.Array
  page_indices_LxM: jax.Array
  cu_q_lens_L1: jax.Array
  num_seqs_1: jax.Array
  src_T: jax.Array | None
  dst_T: jax.Array | None


def ragged_layout(dec_kv_S, dec_active_S, dec_pages_SxMs, pre_kv_PxC, pre_valid_PxC, pre_pages_PxMp) -> RaggedLayout:
  """The kernel's arguments for ``S`` decode lanes and ``P`` prefill lanes of ``C`` tokens.

  Every sequence gets at least one query and one key: the kernel prefetches the next
  sequence's first page while finishing one, and a sequence with no key (or a trailing
  one with no query) would leave that copy unconsumed. So an idle decode lane and an
  idle prefill lane each run one query over key 0 of their (zero) page table; its output
  is discarded. A prefill lane's queries are the prefix of its chunk: its valid tokens,
  or one padding token when idle. The other padding queries go after all sequences,
  where the kernel does not compute them.
  """
  s = dec_kv_S.shape[0]
  p, c = pre_valid_PxC.shape
  i32 = lambda a: jnp.asarray(a, jnp.int32)
  count_P = jnp.sum(pre_valid_PxC, axis=1).astype(jnp.int32)
  q_len_P = jnp.maximum(count_P, 1)
  kv_len_P = jnp.maximum(i32(pre_kv_PxC[:, 0]) + count_P, 1)      # chunk start + valid tokens
  kv_len_S = jnp.where(dec_active_S, i32(dec_kv_S) + 1, 1)
  kv_lens_L = jnp.concatenate([kv_len_S, jnp.where(count_P > 0, kv_len_P, 1)])
  cu_q_lens_L1 = jnp.concatenate([jnp.arange(s + 1, dtype=jnp.int32), s + jnp.cumsum(q_len_P, dtype=jnp.int32)])
  m = max(dec_pages_SxMs.shape[1], pre_pages_PxMp.shape[1])
  widen = lambda a: jnp.pad(i32(a), ((0, 0), (0, m - a.shape[1])))
  page_indices_LxM = jnp.concatenate([widen(dec_pages_SxMs), widen(pre_pages_PxMp)])
  num_seqs_1 = jnp.full((1,), s + p, jnp.int32)
  if p <= 1:              # one lane's padding already follows its queries
    return RaggedLayout(kv_lens_L, page_indices_LxM, cu_q_lens_L1, num_seqs_1, None, None)
  # Prefill tokens: the kernel's queries of each lane packed after the decode lanes, padding last.
  kern = (jnp.arange(c)[None, :] < q_len_P[:, None]).reshape(-1)
  packed = jnp.cumsum(kern, dtype=jnp.int32) - 1
  padding = jnp.sum(kern, dtype=jnp.int32) + jnp.cumsum(~kern, dtype=jnp.int32) - 1
  dst_T = jnp.concatenate([jnp.arange(s, dtype=jnp.int32), s + jnp.where(kern, packed, padding)])
  src_T = jnp.zeros_like(dst_T).at[dst_T].set(jnp.arange(s + p * c, dtype=jnp.int32), unique_indices=True)
  return RaggedLayout(kv_lens_L, page_indices_LxM, cu_q_lens_L1, num_seqs_1, src_T, dst_T)


# -- the Pallas TPU kernel ------------------------------------------------------------------------


def kernel_block_sizes(num_tokens: int, pages_per_seq: int) -> tuple[int, int]:
  """(KV pages, queries) per kernel block: the kernel's untuned defaults, clipped to the shapes."""
  return min(pages_per_seq, KV_PAGES_PER_BLOCK), min(num_tokens, QUERIES_PER_BLOCK)


def ragged_attention_pallas(q_TxHxD, pages_NxPx2KxD, layout: RaggedLayout, *, scale: float):
  """The ragged paged attention kernel over the engine's flat token batch (engine order in and out).

  Queries are cast to the cache's dtype (the kernel's inputs share one).
  """
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention
  t = q_TxHxD.shape[0]
  kv_blk, q_blk = kernel_block_sizes(t, layout.page_indices_LxM.shape[1])
  q = q_TxHxD.astype(pages_NxPx2KxD.dtype)
  if layout.src_T is not None:
    q = q[layout.src_T]

  out = ragged_paged_attention(q, pages_NxPx2KxD, layout.kv_lens_L, layout.page_indices_LxM, layout.cu_q_lens_L1,
                               layout.num_seqs_1, sm_scale=scale, num_kv_pages_per_block=kv_blk,
                               num_queries_per_block=q_blk)
  if layout.dst_T is not None:
    out = out[layout.dst_T]
  return out.astype(q_TxHxD.dtype)


# -- one switch -----------------------------------------------------------------------------------


def paged_backend(name: str, head_dim: int) -> str:
  """``pallas_tpu`` or ``xla`` for the model's ``attention`` setting, resolved like the rest of the model.

  The kernel runs only when tracing for a TPU (it has no CPU interpret mode in this JAX, so
  ``pallas_tpu`` elsewhere takes the XLA path) and needs ``head_dim`` a multiple of 128 (its
  lane width): with ``auto`` a smaller head takes the XLA path, with ``pallas_tpu`` it is an error.
  """
  backend = attention_lib.resolve_backend(name)
  if backend != "pallas_tpu":
    return "xla"
  if attention_lib._platform() != "tpu":
    return "xla"
  if head_dim % 128:
    if name == "pallas_tpu":
      raise ValueError(f"model.attention='pallas_tpu': the ragged paged attention kernel needs head_dim a multiple "
                       f"of 128, got {head_dim}; use attention='auto' or 'xla'")
    logging.warning("paged attention: head_dim %d is not a multiple of 128; the engine attends with XLA", head_dim)
    return "xla"
  return "pallas_tpu"


def lane_attention(q_TxHxD, pages_NxPx2KxD, *, dec_kv_S, dec_active_S, dec_pages_SxMs, pre_kv_PxC, pre_valid_PxC,
                   pre_pages_PxMp, scale: float, backend: str = "xla"):
  """Attention of the step's ``S + P * C`` tokens over their lanes' pages (engine order, ``[T, H, D]``).

  ``backend``: ``xla`` (:func:`paged_attention_xla`, decode lanes and prefill lanes as two
  batches) or ``pallas_tpu`` (:func:`ragged_attention_pallas`, one kernel call). Outputs of
  idle lanes and padding tokens are meaningless (the kernel leaves padding rows unwritten,
  possibly not finite); nothing may read them but their own token's row.
  """
  s = dec_kv_S.shape[0]
  p, c = pre_valid_PxC.shape
  t, h, d = q_TxHxD.shape
  if backend == "pallas_tpu":
    layout = ragged_layout(dec_kv_S, dec_active_S, dec_pages_SxMs, pre_kv_PxC, pre_valid_PxC, pre_pages_PxMp)
    return ragged_attention_pallas(q_TxHxD, pages_NxPx2KxD, layout, scale=scale)
  if backend != "xla":
    raise ValueError(f"lane_attention: backend {backend!r} is not xla or pallas_tpu")
  dec_q_kv_Sx1 = jnp.where(dec_active_S, dec_kv_S, 0)[:, None]
  out = paged_attention_xla(q_TxHxD[:s, None], pages_NxPx2KxD, dec_pages_SxMs, dec_q_kv_Sx1, scale=scale)
  out = out.reshape(s, h, d)
  if p:
    pre_q_kv_PxC = jnp.where(pre_valid_PxC, pre_kv_PxC, 0)
    out_pre = paged_attention_xla(q_TxHxD[s:].reshape(p, c, h, d), pages_NxPx2KxD, pre_pages_PxMp, pre_q_kv_PxC,
                                  scale=scale)
    out = jnp.concatenate([out, out_pre.reshape(p * c, h, d)])
  return out
