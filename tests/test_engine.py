"""Continuous-batching engine: HF/static-sampler parity with slot reuse, sampling law, slot independence, pages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hf_utils as H  # noqa: E402
from flax import nnx  # noqa: E402
from papo_jax import models  # noqa: E402
from papo_jax.sampling import (FINISH_EOS, FINISH_LENGTH, ContinuousEngine, EngineConfig, PageAllocator,  # noqa: E402
                               Sampler, SamplingConfig, paged_attention_xla)
from papo_jax.models.layers import softmax_attention  # noqa: E402
from sampling_ref import exact_filtered_probs as _exact_filtered_probs  # noqa: E402

T = 24
NEVER = 64  # a stop id outside the vocabulary: greedy runs to T (transformers gets no eos at all)
# Five prompts (three with images of two sizes, left padded to different lengths), more than the slots.
ROWS = [[5, "img", 7], [3, "img", 4], [12], [2, "img", 9], [6]]
GRIDS = [(1, 10, 14), (1, 8, 8), (1, 6, 10)]
# Few slots, small pages and chunks: slots are reused mid-run, prompts take several chunks and
# pages, and the last prompt page is partial (copy-on-write).
SMALL = EngineConfig(num_slots=2, page_size=4, num_pages=96, prefill_chunk=8, prefill_lanes=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """HF model with scaled-up text weights (greedy output varies instead of repeating one token)."""
  hf = H.tiny_hf_model(seed=1, tie=False)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "visual" not in name and p.ndim == 2:
        p.mul_(5.0)
  path = str(tmp_path_factory.mktemp("hf"))
  hf.save_pretrained(path)
  model = models.from_pretrained(path, dtype="float32")
  graphdef, state = nnx.split(model)
  return hf, graphdef, state, H.make_batch(ROWS, GRIDS, seed=2)


@pytest.fixture(scope="module")
def hf_greedy(tiny):
  hf, _, _, (ids, mask, pv, grid) = tiny
  ti = torch.as_tensor(ids)
  with torch.no_grad():
    out = hf.generate(input_ids=ti, attention_mask=torch.as_tensor(mask), mm_token_type_ids=(ti == H.IMAGE_ID).long(),
                      pixel_values=torch.as_tensor(pv), image_grid_thw=torch.as_tensor(grid), do_sample=False,
                      max_new_tokens=T, eos_token_id=None, pad_token_id=H.PAD_ID)
  ref = out[:, ids.shape[1]:].numpy()
  assert ref.shape == (len(ROWS), T)
  assert len(np.unique(ref)) > 10, "degenerate greedy output makes a weak test"
  return ref


def _assert_same_rollout(a, b, atol=1e-5):
  for f in ("tokens_RxT", "mask_RxT", "finish_reason_R", "lengths_R", "prompt_ids_RxLp", "prompt_mask_RxLp",
            "position_ids_3xRxL", "rope_deltas_Rx1"):
    np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), err_msg=f)
  for f in ("logprobs_RxT", "policy_logprobs_RxT"):
    np.testing.assert_allclose(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), atol=atol, err_msg=f)


def test_page_allocator_refcounts():
  a = PageAllocator(4)
  p = a.alloc(3)
  assert sorted(p) == [0, 1, 2] and a.num_free == 1
  assert a.alloc(2) is None and a.num_free == 1          # nothing taken on failure
  a.share(p[:2])
  a.release(p)
  assert a.num_free == 2 and a.refcount(p[0]) == 1 and a.refcount(p[2]) == 0
  a.release(p[:2])
  assert a.num_free == 4
  with pytest.raises(ValueError, match="double free"):
    a.release([p[0]])


def test_paged_attention_matches_dense():
  """Pages scattered in a pool and read through a page table == dense causal attention on the contiguous keys."""
  rng = np.random.default_rng(0)
  b, q_len, h, kvh, d, page, m = 2, 3, 4, 2, 8, 4, 3
  keys = rng.normal(size=(b, m * page, kvh, d)).astype(np.float32)
  vals = rng.normal(size=(b, m * page, kvh, d)).astype(np.float32)
  q = rng.normal(size=(b, q_len, h, d)).astype(np.float32)
  table = np.array([[5, 0, 3], [1, 6, 2]], np.int32)
  pool = np.zeros((8, page, 2 * kvh, d), np.float32)     # key head j at 2j, value head j at 2j + 1
  for i in range(b):
    for j in range(m):
      pool[table[i, j], :, 0::2] = keys[i, j * page:(j + 1) * page]
      pool[table[i, j], :, 1::2] = vals[i, j * page:(j + 1) * page]
  q_kv = np.array([[4, 5, 6], [9, 10, 11]], np.int32)
  out = paged_attention_xla(jnp.asarray(q), jnp.asarray(pool), jnp.asarray(table), jnp.asarray(q_kv),
                            scale=d ** -0.5)
  mask = np.arange(m * page)[None, None, :] <= q_kv[:, :, None]
  ref = softmax_attention(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(vals), jnp.asarray(mask), d ** -0.5)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def _mixed_lanes(rng, *, num_pages, c, prefill_lanes):
  """Three decode lanes (the last idle) and the first ``prefill_lanes`` of three prefill lanes (a partial
  chunk mid-prompt, a full first chunk, an idle lane), each lane's pages drawn out of order from one pool."""
  perm = iter(rng.permutation(num_pages).tolist())
  take = lambda k: [next(perm) for _ in range(k)]
  dec_kv = np.array([6, 13, 0], np.int32)
  dec_active = np.array([True, True, False])
  dec_pages = np.zeros((3, 5), np.int32)
  dec_pages[0, :2], dec_pages[1, :4] = take(2), take(4)
  pre_kv = np.stack([4 + np.arange(c), np.arange(c), np.zeros(c)]).astype(np.int32)
  pre_valid = np.stack([np.arange(c) < 3, np.ones(c, bool), np.zeros(c, bool)])
  pre_pages = np.zeros((3, 3), np.int32)
  pre_pages[0, :2], pre_pages[1, :2] = take(2), take(2)
  p = prefill_lanes
  return dict(dec_kv_S=dec_kv, dec_active_S=dec_active, dec_pages_SxMs=dec_pages, pre_kv_PxC=pre_kv[:p],
              pre_valid_PxC=pre_valid[:p], pre_pages_PxMp=pre_pages[:p])


@pytest.mark.parametrize("prefill_lanes", [3, 1, 0])
def test_xla_paged_attention_matches_the_ragged_kernel_reference(prefill_lanes):
  """The arguments the engine builds for the ragged kernel (ragged_layout: sequences, kv_lens, cu_q_lens,
  page table, query order) mean what the XLA path computes: ref_ragged_paged_attention on them equals
  lane_attention(backend='xla') on every real query, GQA, pages out of order, decode + prefill lanes
  (a partial chunk, a full one, an idle lane; an idle decode lane), and the kernel's own validation passes."""
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (dynamic_validate_inputs,
                                                                      ref_ragged_paged_attention)
  from papo_jax.sampling.paged_attention import lane_attention, ragged_layout
  rng = np.random.default_rng(0)
  h, kvh, d, page, num_pages, c = 4, 2, 32, 4, 24, 5
  lanes = _mixed_lanes(rng, num_pages=num_pages, c=c, prefill_lanes=prefill_lanes)
  pool = jnp.asarray(rng.normal(size=(num_pages, page, 2 * kvh, d)).astype(np.float32))
  t = 3 + prefill_lanes * c
  q = jnp.asarray(rng.normal(size=(t, h, d)).astype(np.float32))
  want = lane_attention(q, pool, scale=0.3, backend="xla", **lanes)

  lay = ragged_layout(*lanes.values())
  q_kernel = q if lay.src_T is None else q[lay.src_T]
  dynamic_validate_inputs(q_kernel, pool, lay.kv_lens_L, lay.page_indices_LxM, lay.cu_q_lens_L1, lay.num_seqs_1)
  q_lens = np.diff(np.asarray(lay.cu_q_lens_L1))
  assert int(lay.num_seqs_1[0]) == 3 + prefill_lanes and (q_lens >= 1).all() and (np.asarray(lay.kv_lens_L) >= 1).all()
  out = ref_ragged_paged_attention(q_kernel, pool, lay.kv_lens_L, lay.page_indices_LxM, lay.cu_q_lens_L1,
                                   lay.num_seqs_1, sm_scale=0.3)
  got = jnp.zeros_like(q).at[:out.shape[0]].set(out)
  got = got if lay.dst_T is None else got[lay.dst_T]
  real = np.concatenate([lanes["dec_active_S"], lanes["pre_valid_PxC"].reshape(-1)])
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)


def test_paged_backend_follows_the_model_attention_setting():
  """auto -> the ragged kernel when tracing for a TPU (head_dim a multiple of 128), XLA otherwise."""
  from papo_jax.models.attention import target_platform
  from papo_jax.sampling.paged_attention import paged_backend
  assert paged_backend("auto", 128) == paged_backend("pallas_tpu", 128) == "xla"    # CPU: no interpret mode
  with target_platform("tpu"):
    assert paged_backend("auto", 128) == paged_backend("pallas_tpu", 256) == "pallas_tpu"
    assert paged_backend("auto", 64) == paged_backend("xla", 128) == "xla"
    with pytest.raises(ValueError, match="multiple of 128"):
      paged_backend("pallas_tpu", 64)
  with target_platform("gpu"):
    assert paged_backend("auto", 128) == "xla"


def test_cache_is_one_pool_per_layer_in_the_kernel_layout(tiny):
  _, graphdef, state, _ = tiny
  mc = nnx.merge(graphdef, state).config
  engine = ContinuousEngine(graphdef, SamplingConfig(cache_dtype="bfloat16"), SMALL)
  cache = engine._get_cache(mc)
  t = mc.text
  assert len(cache.pages) == t.num_hidden_layers
  assert all(a.shape == (SMALL.num_pages, SMALL.page_size, 2 * t.num_key_value_heads, t.head_dim) for a in cache.pages)
  assert engine.kv_bytes(mc) == sum(a.nbytes for a in cache.pages) == (
      2 * t.num_hidden_layers * t.num_key_value_heads * SMALL.num_pages * SMALL.page_size * t.head_dim * 2)


def test_greedy_matches_transformers_and_static_with_slot_reuse(tiny, hf_greedy):
  """5 prompts through 2 slots: greedy tokens == HF generate and == the static sampler, field by field."""
  _, graphdef, state, (ids, mask, pv, grid) = tiny
  cfg = SamplingConfig(max_new_tokens=T, greedy=True, cache_dtype="float32", stop_token_ids=(NEVER,))
  engine = ContinuousEngine(graphdef, cfg, SMALL)
  ro = jax.device_get(engine.generate(state, ids, mask, pv, grid, n=1))
  np.testing.assert_array_equal(ro.tokens_RxT, hf_greedy)
  np.testing.assert_array_equal(ro.finish_reason_R, [FINISH_LENGTH] * len(ROWS))
  static = jax.device_get(Sampler(graphdef, cfg).generate(state, ids, mask, pv, grid, n=1))
  _assert_same_rollout(ro, static)
  assert engine.stats["steps"] >= len(ROWS) * T // SMALL.num_slots


def test_eos_at_very_different_lengths_reuses_slots(tiny, hf_greedy):
  """Stop ids picked from the greedy output so rows end at very different steps; 2 slots, n=2 sharing the prompt."""
  _, graphdef, state, (ids, mask, pv, grid) = tiny
  ref = hf_greedy
  a = int(ref[0, 2])                       # row 0 stops at 3 tokens
  b = next(int(t) for t in ref[3] if (ref[0, :3] != t).all() and t != a)
  stops = (a, b)
  expect = []
  for r in range(len(ROWS)):
    hits = np.flatnonzero(np.isin(ref[r], stops))
    expect.append(hits[0] + 1 if len(hits) else T)
  assert len(set(expect)) >= 3 and min(expect) <= 3 and max(expect) == T, expect
  cfg = SamplingConfig(max_new_tokens=T, greedy=True, cache_dtype="float32", stop_token_ids=stops, pad_token_id=0)
  n = 2
  ro = jax.device_get(ContinuousEngine(graphdef, cfg, SMALL).generate(state, ids, mask, pv, grid, n=n))
  static = jax.device_get(Sampler(graphdef, cfg).generate(state, ids, mask, pv, grid, n=n))
  _assert_same_rollout(ro, static)
  for r in range(len(ROWS)):
    for k in range(n):
      row = r * n + k
      length = expect[r]
      assert ro.lengths_R[row] == length
      assert ro.finish_reason_R[row] == (FINISH_EOS if length < T or ref[r, T - 1] in stops else FINISH_LENGTH)
      np.testing.assert_array_equal(ro.tokens_RxT[row, :length], ref[r, :length])
      assert (ro.tokens_RxT[row, length:] == 0).all()
      np.testing.assert_array_equal(ro.mask_RxT[row], np.arange(T) < length)


def test_sampled_matches_static_and_ignores_slots_and_preemption(tiny):
  """Sampling keyed per sequence: the same tokens with 2 or 5 slots, with a tight page pool that forces
  preemption (restarted samples redo the same draws), and as the static sampler."""
  _, graphdef, state, (ids, mask, pv, grid) = tiny
  cfg = SamplingConfig(max_new_tokens=T, temperature=0.9, top_p=0.95, cache_dtype="float32",
                       stop_token_ids=(H.EOS_ID, 40, 41))
  n = 2
  static = jax.device_get(Sampler(graphdef, cfg).generate(state, ids, mask, pv, grid, n=n, key=5))
  lengths = static.lengths_R
  assert len(set(lengths.tolist())) >= 3, lengths
  runs, stats = {}, {}
  for name, ec in [("2 slots", SMALL),
                   ("tight pages", EngineConfig(num_slots=5, page_size=4, num_pages=40, prefill_chunk=8,
                                                prefill_lanes=2)),
                   ("8 slots, lane buckets", EngineConfig(num_slots=8, page_size=4, num_pages=96, prefill_chunk=8)),
                   ("8 slots, all lanes", EngineConfig(num_slots=8, page_size=4, num_pages=96, prefill_chunk=8,
                                                       min_decode_lanes=8))]:
    engine = ContinuousEngine(graphdef, cfg, ec)
    runs[name] = jax.device_get(engine.generate(state, ids, mask, pv, grid, n=n, key=5))
    stats[name] = engine.stats
    _assert_same_rollout(runs[name], static)
    if name == "tight pages":
      assert engine.stats["preemptions"] > 0
  # Same schedule, fewer lanes computed: the drain runs in the small buckets.
  bucketed, full = stats["8 slots, lane buckets"], stats["8 slots, all lanes"]
  assert bucketed["steps"] == full["steps"] and full["lane_steps"] == 8 * full["steps"]
  assert bucketed["lane_steps"] < full["lane_steps"]
  assert bucketed["slot_utilisation"] > full["slot_utilisation"]
  # the n samples of a prompt differ
  tok = static.tokens_RxT
  assert any((tok[2 * r] != tok[2 * r + 1]).any() for r in range(len(ROWS)))


def test_text_only_and_bad_config(tiny):
  hf, graphdef, state, _ = tiny
  ids, mask, _, _ = H.make_batch([[9], [4], [12]], [], seed=4)
  cfg = SamplingConfig(max_new_tokens=16, greedy=True, cache_dtype="float32", stop_token_ids=(NEVER,))
  ro = jax.device_get(ContinuousEngine(graphdef, cfg, SMALL).generate(state, ids, mask, None, None, n=1))
  ti = torch.as_tensor(ids)
  with torch.no_grad():
    out = hf.generate(input_ids=ti, attention_mask=torch.as_tensor(mask), do_sample=False, max_new_tokens=16,
                      eos_token_id=None, pad_token_id=H.PAD_ID)
  np.testing.assert_array_equal(ro.tokens_RxT, out[:, ids.shape[1]:].numpy())
  with pytest.raises(ValueError, match="num_pages"):
    ContinuousEngine(graphdef, cfg, EngineConfig(num_pages=4, page_size=4)).generate(state, ids, mask, n=1)
  with pytest.raises(ValueError, match="num_slots"):
    EngineConfig(num_slots=0)
  with pytest.raises(ValueError, match="min_decode_lanes"):
    EngineConfig(min_decode_lanes=0)


def test_decode_lane_buckets():
  assert EngineConfig(num_slots=64).decode_buckets == (1, 2, 4, 8, 16, 32, 64)
  assert EngineConfig(num_slots=48, min_decode_lanes=8).decode_buckets == (8, 16, 32, 48)
  assert EngineConfig(num_slots=8, min_decode_lanes=8).decode_buckets == (8,)
  ec = EngineConfig(num_slots=48, min_decode_lanes=4)
  assert [ec.decode_lanes(r) for r in (0, 1, 4, 5, 17, 33, 48)] == [4, 4, 4, 8, 32, 48, 48]


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 6, 0.7),
    pytest.param(1.0, 0, 1.0, marks=pytest.mark.slow),
    pytest.param(0.7, 5, 1.0, marks=pytest.mark.slow),
    pytest.param(1.3, 0, 0.8, marks=pytest.mark.slow)])
def test_sampling_law_through_the_engine(tiny, temperature, top_k, top_p):
  """The engine's logits are replaced by a fixed law (16 live tokens, the likeliest banned): 20k draws
  (5000 samples x 4 tokens, through slots and the prefill lanes) have total variation <= 0.02 from the
  exact filtered law, never a filtered-out token, and the exact log-probs."""
  _, graphdef, state, _ = tiny
  v = 64
  law = np.full(v, -np.inf, np.float32)
  law[24:40] = np.random.default_rng(0).normal(size=16).astype(np.float32) * 1.5
  law[H.IMAGE_ID] = np.nanmax(law[24:40]) + 1.0          # the most likely token, but banned (<|image_pad|>)
  exact = _exact_filtered_probs(law, temperature, top_k, top_p, (H.IMAGE_ID, H.VIDEO_ID))
  fixed = jnp.asarray(law)
  cfg = SamplingConfig(max_new_tokens=4, temperature=temperature, top_k=top_k, top_p=top_p, cache_dtype="float32",
                       stop_token_ids=(NEVER,))
  engine = ContinuousEngine(graphdef, cfg, EngineConfig(num_slots=512, page_size=8, num_pages=2048, prefill_chunk=8),
                            logits_processor=lambda l, s, j: l * 0 + fixed)   # not a constant: no folding
  ids, mask, _, _ = H.make_batch([[5]], [], seed=3)
  ro = jax.device_get(engine.generate(state, ids, mask, n=5000, key=11))
  tok, lp, raw = ro.tokens_RxT.reshape(-1), ro.logprobs_RxT.reshape(-1), ro.policy_logprobs_RxT.reshape(-1)
  assert (ro.lengths_R == 4).all()
  freq = np.bincount(tok, minlength=v) / tok.size
  assert (freq[exact == 0] == 0).all()
  tv = 0.5 * np.abs(freq - exact).sum()
  assert tv <= 0.02, f"total variation {tv}"
  np.testing.assert_allclose(lp, np.log(exact[tok]), atol=1e-5)
  np.testing.assert_allclose(raw, jax.nn.log_softmax(fixed)[tok], atol=1e-5)
  # draws are independent across token positions (first vs last token of a sample)
  t0, t3 = ro.tokens_RxT[:, 0], ro.tokens_RxT[:, 3]
  assert abs(np.mean(t0 == t3) - np.sum(exact ** 2)) < 0.03
