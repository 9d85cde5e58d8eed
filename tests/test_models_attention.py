"""Attention backends agree with the XLA reference; vision attention memory is linear in images.

The Pallas TPU splash kernels run in interpret mode here (CPU); cuDNN runs only where a GPU is
present, but its left-to-right-padding rotation is checked through ``jax.nn``'s XLA path.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from papo_jax import models
from papo_jax.models import attention as A
from papo_jax.models.config import VisionConfig
from papo_jax.models.layers import softmax_attention
from papo_jax.models.vision import AttentionLayout, VisionTower, vision_layout

torch = pytest.importorskip("torch")
import hf_utils as H  # noqa: E402


def _qkv(key, b, l, h, kvh, d, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(key, 3)
  return (jax.random.normal(kq, (b, l, h, d), dtype), jax.random.normal(kk, (b, l, kvh, d), dtype),
          jax.random.normal(kv, (b, l, kvh, d), dtype))


def _valid_rows(l):
  """Left padding, right padding, both, and none: the layouts prompts and prompt ⊕ response have."""
  spans = [(30, l), (0, l - 20), (10, l - 40), (0, l)]
  return jnp.asarray([[lo <= i < hi for i in range(l)] for lo, hi in spans])


def _loss_and_grads(fn, q, k, v, weight, valid):
  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(jnp.where(valid[..., None, None], out * weight, 0.0))
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v), fn(q, k, v)


@pytest.mark.parametrize("backend", ["cudnn_rotation_via_xla", "pallas_tpu"])
def test_causal_attention_left_padding_gqa(backend):
  b, l, h, kvh, d = 4, 128, 4, 2, 16
  q, k, v = _qkv(jax.random.key(0), b, l, h, kvh, d)
  valid = _valid_rows(l)
  weight = jax.random.normal(jax.random.key(1), (b, l, h, d))
  ref = functools.partial(A.causal_attention, valid_BxL=valid, scale=d ** -0.5, backend="xla")
  if backend == "pallas_tpu":
    got = functools.partial(A.causal_attention, valid_BxL=valid, scale=d ** -0.5, backend="pallas_tpu", block=128)
  else:
    got = functools.partial(A.rotated_causal_attention, valid_BxL=valid, scale=d ** -0.5, implementation="xla")
  (l_ref, g_ref), o_ref = _loss_and_grads(jax.jit(ref), q, k, v, weight, valid)
  (l_got, g_got), o_got = _loss_and_grads(jax.jit(got), q, k, v, weight, valid)
  m = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(o_got)[m], np.asarray(o_ref)[m], atol=2e-5)
  np.testing.assert_allclose(float(l_got), float(l_ref), rtol=1e-5)
  for a, r in zip(g_got, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=5e-5)
  # The test can fail: attending to padding changes the real rows.
  bad = A.causal_attention(q, k, v, jnp.ones_like(valid), scale=d ** -0.5, backend="xla")
  assert np.abs(np.asarray(bad)[m] - np.asarray(o_ref)[m]).max() > 1e-2


def test_decode_attention_lengths_path_matches_dense():
  """The cuDNN decode path (per-row key lengths, run here through jax.nn's XLA implementation)."""
  b, s, h, kvh, d = 3, 40, 4, 2, 16
  q = jax.random.normal(jax.random.key(7), (b, 1, h, d))
  _, k, v = _qkv(jax.random.key(8), b, s, h, kvh, d)
  lengths = jnp.asarray([1, 17, 40])
  ref = A.decode_attention(q, k, v, lengths, scale=d ** -0.5, backend="xla")
  got = A.decode_attention(q, k, v, lengths, scale=d ** -0.5, implementation="xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-6)
  # keys past a row's length do not matter
  k2 = k.at[0, 1:].set(100.0)
  np.testing.assert_allclose(np.asarray(A.decode_attention(q, k2, v, lengths, scale=d ** -0.5))[0],
                             np.asarray(ref)[0], atol=1e-6)


def _window_case():
  """Window-ordered segment ids of three images whose grids leave partial windows, plus bucket padding."""
  grid = jnp.asarray([(1, 10, 14), (1, 8, 8), (1, 6, 10)])
  n = 140 + 64 + 60 + 24
  lay = vision_layout(grid, n, 2, 4)
  win = lay["window_index_K"]
  return jnp.repeat(lay["window_seg_K"][win], 4), jnp.repeat(lay["frame_seg_K"][win], 4), grid, n


@pytest.mark.parametrize("backend", ["xla", "pallas_tpu"])
def test_window_attention_matches_dense_segments(backend):
  seg, _, _, n = _window_case()
  h, d = 2, 16
  q, k, v = (x[0] for x in _qkv(jax.random.key(2), 1, n, h, h, d))
  weight = jax.random.normal(jax.random.key(3), (n, h, d))
  dense = lambda q, k, v: softmax_attention(q[None], k[None], v[None], (seg[:, None] == seg[None, :])[None],
                                            d ** -0.5)[0]
  band = lambda q, k, v: A.window_attention(q, k, v, seg, window=64, scale=d ** -0.5, backend=backend, block=128)
  everything = jnp.ones((n,), bool)
  (l_ref, g_ref), o_ref = _loss_and_grads(jax.jit(dense), q, k, v, weight, everything)
  (l_got, g_got), o_got = _loss_and_grads(jax.jit(band), q, k, v, weight, everything)
  np.testing.assert_allclose(np.asarray(o_got), np.asarray(o_ref), atol=2e-5)
  for a, r in zip(g_got, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=5e-5)


@pytest.mark.parametrize("backend", ["xla", "pallas_tpu"])
def test_per_image_full_attention_matches_one_sequence(backend):
  _, frame_seg, grid, n = _window_case()
  h, d = 2, 16
  q, k, v = (x[0] for x in _qkv(jax.random.key(4), 1, n, h, h, d))
  weight = jax.random.normal(jax.random.key(5), (n, h, d))
  counts = jnp.asarray([140, 64, 60])
  starts = jnp.cumsum(counts) - counts
  attend = lambda q_, k_, v_, s_: A.segment_attention(q_, k_, v_, s_, scale=d ** -0.5, backend=backend, block=128)
  whole = AttentionLayout(frame_seg_N=frame_seg)
  per_image = AttentionLayout(frame_seg_N=frame_seg, starts_I=starts, lengths_I=counts, max_len=160)
  real = jnp.arange(n) < 264   # bucket padding rows: ignored by the caller
  (_, g_ref), o_ref = _loss_and_grads(jax.jit(lambda *a: whole.per_image(attend, *a)), q, k, v, weight, real)
  (_, g_got), o_got = _loss_and_grads(jax.jit(lambda *a: per_image.per_image(attend, *a)), q, k, v, weight, real)
  np.testing.assert_allclose(np.asarray(o_got)[:264], np.asarray(o_ref)[:264], atol=2e-5)
  for a, r in zip(g_got, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=5e-5)


@functools.lru_cache(maxsize=None)
def _hf_case(tmp_dir):
  hf = H.tiny_hf_model(seed=11, fullatt=(1,), depth=3)
  ids, mask, pv, grid = H.make_batch([[5, "img", 7], [3, "img", 4, "img", 2], [12]],
                                     [(1, 10, 14), (1, 8, 8), (1, 6, 10)], seed=12)
  hf.save_pretrained(tmp_dir)
  ref, _, _ = H.hf_forward(hf, ids, mask, pv, grid)
  return ids, mask, pv, grid, ref


@pytest.mark.parametrize("attention,max_image_patches", [("xla", 160), ("pallas_tpu", 0), ("pallas_tpu", 160)])
def test_model_backends_match_transformers_and_xla_gradient(attention, max_image_patches, tmp_path_factory):
  tmp_dir = str(tmp_path_factory.getbasetemp() / "attn_hf")
  ids, mask, pv, grid, ref = _hf_case(tmp_dir)
  ref_model = models.from_pretrained(tmp_dir, dtype="float32")
  model = models.from_pretrained(tmp_dir, dtype="float32", attention=attention)
  model.config = model.config.replace(max_image_patches=max_image_patches)
  model.visual.max_image_patches = max_image_patches
  args = tuple(jnp.asarray(a) for a in (ids, mask, pv, grid))
  valid = mask.astype(bool)

  def loss_and_logits(m):
    graphdef, state = nnx.split(m)

    def f(state):
      logits = nnx.merge(graphdef, state)(args[0], attention_mask=args[1], pixel_values=args[2], image_grid_thw=args[3])
      return jnp.sum(jnp.where(args[1][..., None] > 0, jax.nn.log_softmax(logits) * 0.01, 0.0)), logits
    (loss, logits), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(state)
    return loss, np.asarray(logits), grads

  _, ours_ref, g_ref = loss_and_logits(ref_model)
  _, ours, g = loss_and_logits(model)
  assert np.abs(ours - ref)[valid].max() <= 1e-4
  assert np.abs(ours - ours_ref)[valid].max() <= 1e-4
  for (path, a), (_, b) in zip(nnx.to_flat_state(g), nnx.to_flat_state(g_ref)):
    np.testing.assert_allclose(np.asarray(a.get_value()), np.asarray(b.get_value()), atol=2e-5,
                               err_msg=str(path))


def test_sampler_prefill_uses_the_backend_and_matches_xla(tmp_path_factory):
  from papo_jax.sampling.sampler import Sampler, SamplingConfig
  tmp_dir = str(tmp_path_factory.getbasetemp() / "attn_hf")
  ids, mask, pv, grid, _ = _hf_case(tmp_dir)
  outs = []
  for attention in ("xla", "pallas_tpu"):
    model = models.from_pretrained(tmp_dir, dtype="float32", attention=attention)
    graphdef, state = nnx.split(model)
    sampler = Sampler(graphdef, SamplingConfig(max_new_tokens=6, greedy=True, cache_dtype="float32",
                                               stop_token_ids=(H.EOS_ID,), pad_token_id=H.PAD_ID))
    ro = sampler.generate(state, ids, mask, pv, grid, n=1, key=jax.random.key(0))
    outs.append((np.asarray(ro.tokens_RxT), np.asarray(ro.logprobs_RxT)))
  np.testing.assert_array_equal(outs[0][0], outs[1][0])
  np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-4)


def _tower_temp_bytes(images: int, max_image_patches: int, block: int = 512) -> int:
  cfg = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                     fullatt_block_indexes=(1,))
  tower = nnx.eval_shape(lambda: VisionTower(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0),
                                             max_image_patches=max_image_patches, block=block))
  graphdef, state = nnx.split(tower)
  side = 16   # 16 x 16 patches (224 px) per image
  pv = jax.ShapeDtypeStruct((images * side * side, cfg.patch_dim), jnp.float32)
  grid = jax.ShapeDtypeStruct((images, 3), jnp.int32)
  fwd = jax.jit(lambda s, p, g: nnx.merge(graphdef, s)(p, g))
  return fwd.lower(state, pv, grid).compile().memory_analysis().temp_size_in_bytes


def test_vision_tower_memory_grows_linearly_with_images():
  linear = {i: _tower_temp_bytes(i, max_image_patches=256) for i in (1, 2, 4, 8)}
  # Linear growth: each doubling adds about twice the previous increment (4x for quadratic).
  ratio = (linear[8] - linear[4]) / (linear[4] - linear[2])
  assert ratio < 2.6, (ratio, linear)
  assert linear[8] < 10 * linear[1], linear
  # The same measure flags the one-sequence full attention with dense [N, N] scores (a
  # query block larger than N) as quadratic ...
  dense = {i: _tower_temp_bytes(i, max_image_patches=0, block=1 << 20) for i in (2, 4, 8)}
  assert (dense[8] - dense[4]) / (dense[4] - dense[2]) > 3.0, dense
  # ... and the query-chunked XLA path over the same one sequence as linear.
  chunked = {i: _tower_temp_bytes(i, max_image_patches=0, block=128) for i in (2, 4, 8)}
  assert (chunked[8] - chunked[4]) / (chunked[4] - chunked[2]) < 2.6, chunked
  assert chunked[8] < dense[8] / 4, (chunked, dense)


def test_query_chunked_segment_attention_matches_dense():
  """Values and gradients equal the dense masked softmax (chunk not dividing L, padded rows)."""
  b, l, h, d = 2, 200, 2, 16
  q, k, v = _qkv(jax.random.key(7), b, l, h, h, d)
  seg = jnp.asarray(np.repeat([[0, 1, 2, 3], [5, 5, 6, 7]], [50, 70, 60, 20], axis=1), jnp.int32)
  weight = jax.random.normal(jax.random.key(8), (b, l, h, d))
  dense = lambda q_, k_, v_: softmax_attention(q_, k_, v_, seg[:, :, None] == seg[:, None, :], d ** -0.5)
  chunked = lambda q_, k_, v_: A.query_chunked_segment_attention(q_, k_, v_, seg, scale=d ** -0.5, chunk=64)
  switch = lambda q_, k_, v_: A.segment_attention(q_, k_, v_, seg, scale=d ** -0.5, backend="xla", block=64)
  valid = jnp.ones((b, l), bool)
  (_, g_ref), o_ref = _loss_and_grads(jax.jit(dense), q, k, v, weight, valid)
  for fn in (chunked, switch):
    (_, g_got), o_got = _loss_and_grads(jax.jit(fn), q, k, v, weight, valid)
    np.testing.assert_allclose(np.asarray(o_got), np.asarray(o_ref), atol=1e-5)
    for a, r in zip(g_got, g_ref):
      np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_matches_xla_bf16():
  b, l, h, kvh, d = 2, 256, 8, 2, 64
  q, k, v = _qkv(jax.random.key(6), b, l, h, kvh, d, jnp.bfloat16)
  valid = _valid_rows(l)[:b]
  ref = A.causal_attention(q, k, v, valid, scale=d ** -0.5, backend="xla")
  got = A.causal_attention(q, k, v, valid, scale=d ** -0.5, backend="cudnn")
  m = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(got, np.float32)[m], np.asarray(ref, np.float32)[m], atol=3e-2)
  lengths = jnp.asarray([7, 256])
  ref = A.decode_attention(q[:, :1], k, v, lengths, scale=d ** -0.5, backend="xla")
  got = A.decode_attention(q[:, :1], k, v, lengths, scale=d ** -0.5, backend="cudnn")
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=3e-2)


def test_backend_names_are_checked():
  assert A.resolve_backend("auto") == "xla"   # CPU
  with pytest.raises(ValueError, match="model.attention"):
    A.resolve_backend("flash")
