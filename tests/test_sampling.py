"""Rollout engine: greedy parity with transformers generate, log-probs, sampling law, EOS, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hf_utils as H  # noqa: E402
from flax import nnx  # noqa: E402
from papo_jax import models  # noqa: E402
from papo_jax.parallel import make_mesh, shard_state  # noqa: E402
from papo_jax.sampling import (FINISH_EOS, FINISH_LENGTH, Sampler, SamplingConfig, filter_logits,  # noqa: E402
                               sample_tokens)
from sampling_ref import exact_filtered_probs as _exact_filtered_probs  # noqa: E402

T = 40
NEVER = 3   # a stop id greedy never emits on this model/batch (asserted below)
# Two image sizes (left padded to different lengths) and a text-only row.
ROWS, GRIDS = [[5, "img", 7], [3, "img", 4], [12]], [(1, 10, 14), (1, 8, 8)]
IMG_OF_ROW = [[0], [1], []]


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
  return hf, model, graphdef, state, H.make_batch(ROWS, GRIDS, seed=2)


@pytest.fixture(scope="module")
def greedy_ref(tiny):
  _, _, graphdef, state, (ids, mask, pv, grid) = tiny
  sampler = Sampler(graphdef, SamplingConfig(max_new_tokens=T, greedy=True, cache_dtype="float32",
                                             stop_token_ids=(NEVER,)))
  return jax.device_get(sampler.generate(state, ids, mask, pv, grid, n=1))


def test_greedy_matches_transformers_generate(tiny, greedy_ref):
  hf, _, _, _, (ids, mask, pv, grid) = tiny
  ti = torch.as_tensor(ids)
  with torch.no_grad():
    out = hf.generate(input_ids=ti, attention_mask=torch.as_tensor(mask), mm_token_type_ids=(ti == H.IMAGE_ID).long(),
                      pixel_values=torch.as_tensor(pv), image_grid_thw=torch.as_tensor(grid), do_sample=False,
                      max_new_tokens=T, min_new_tokens=T, eos_token_id=NEVER, pad_token_id=H.PAD_ID)
  ref = out[:, ids.shape[1]:].numpy()
  assert ref.shape == (3, T) and not (ref == NEVER).any()
  assert len(np.unique(ref)) > 10, "degenerate greedy output makes a weak test"
  np.testing.assert_array_equal(greedy_ref.tokens_RxT, ref)
  np.testing.assert_array_equal(greedy_ref.lengths_R, [T] * 3)
  np.testing.assert_array_equal(greedy_ref.finish_reason_R, [FINISH_LENGTH] * 3)
  assert (greedy_ref.mask_RxT == 1).all() and (greedy_ref.logprobs_RxT == 0).all()


def test_eos_stops_rows_independently(tiny, greedy_ref):
  """Stop ids chosen from the greedy output: row 0 stops at 6, row 1 at its first 'b', row 2 runs to T."""
  _, _, graphdef, state, (ids, mask, pv, grid) = tiny
  ref = greedy_ref.tokens_RxT
  a = int(ref[0, 5])
  b = next(int(t) for t in ref[1] if t not in ref[2] and t != a)
  assert a not in ref[2]
  cfg = SamplingConfig(max_new_tokens=T, greedy=True, cache_dtype="float32", stop_token_ids=(a, b), pad_token_id=0)
  ro = jax.device_get(Sampler(graphdef, cfg).generate(state, ids, mask, pv, grid, n=1))
  for r in range(3):
    hits = np.flatnonzero(np.isin(ref[r], [a, b]))
    length = hits[0] + 1 if len(hits) else T
    assert ro.lengths_R[r] == length
    assert ro.finish_reason_R[r] == (FINISH_EOS if len(hits) else FINISH_LENGTH)
    np.testing.assert_array_equal(ro.tokens_RxT[r, :length], ref[r, :length])
    assert (ro.tokens_RxT[r, length:] == 0).all()
    np.testing.assert_array_equal(ro.mask_RxT[r], np.arange(T) < length)
    assert (ro.policy_logprobs_RxT[r, length:] == 0).all()
  assert ro.lengths_R[0] == 6 and ro.finish_reason_R[2] == FINISH_LENGTH


def _repeat_images(pv, grid, n):
  """Pixel rows and grid rows for the prompt batch repeated n times (prompt-major), as the rollout's rows."""
  sizes = grid.prod(-1)
  starts = np.cumsum(sizes) - sizes
  pv_rows, grid_rows = [], []
  for imgs in IMG_OF_ROW:
    for _ in range(n):
      for i in imgs:
        pv_rows.append(pv[starts[i]:starts[i] + sizes[i]])
        grid_rows.append(grid[i])
  return np.concatenate(pv_rows), np.stack(grid_rows)


def test_logprobs_match_full_forward(tiny):
  """Raw-policy log-probs == log_softmax of a full forward over prompt ⊕ response; sampling log-probs ==
  the filtered distribution at those logits; returned positions == model.positions of the sequence."""
  _, model, graphdef, state, (ids, mask, pv, grid) = tiny
  n = 2
  cfg = SamplingConfig(max_new_tokens=24, temperature=0.8, top_k=20, top_p=0.9, cache_dtype="float32",
                       stop_token_ids=(H.EOS_ID, 40))
  ro = Sampler(graphdef, cfg).generate(state, ids, mask, pv, grid, n=n, key=jax.random.key(7))
  seq_ids, seq_mask = ro.sequences()
  pv_n, grid_n = _repeat_images(pv, grid, n)

  @jax.jit
  def forward(state, seq_ids, seq_mask, pv_n, grid_n):
    m = nnx.merge(graphdef, state)
    pos, _ = m.positions(seq_ids, grid_n, seq_mask)
    return m.logits(m.hidden_states(seq_ids, seq_mask, pv_n, grid_n), dtype=jnp.float32), pos

  logits, pos = jax.device_get(forward(state, seq_ids, seq_mask, pv_n, grid_n))
  lp = ids.shape[1]
  resp_logits = logits[:, lp - 1:-1]                            # logits predicting each response token
  tok = np.asarray(ro.tokens_RxT)
  m = np.asarray(ro.mask_RxT).astype(bool)
  assert m.sum() > 40 and len(np.unique(tok[m])) > 5
  raw = np.take_along_axis(jax.nn.log_softmax(resp_logits, -1), tok[..., None], -1)[..., 0]
  err = np.abs(np.where(m, raw - np.asarray(ro.policy_logprobs_RxT), 0)).max()
  assert err <= 1e-4, f"raw-policy log-prob max |diff| {err}"
  banned = resp_logits.copy()
  banned[..., [H.IMAGE_ID, H.VIDEO_ID]] = -np.inf
  filt = filter_logits(jnp.asarray(banned.reshape(-1, banned.shape[-1])), temperature=0.8, top_k=20, top_p=0.9)
  samp = np.take_along_axis(np.asarray(jax.nn.log_softmax(filt, -1)).reshape(banned.shape), tok[..., None], -1)[..., 0]
  err = np.abs(np.where(m, samp - np.asarray(ro.logprobs_RxT), 0)).max()
  assert err <= 1e-4, f"sampling log-prob max |diff| {err}"
  valid = np.asarray(seq_mask).astype(bool)
  np.testing.assert_array_equal(np.asarray(ro.position_ids_3xRxL)[:, valid], pos[:, valid])
  # the n samples of a prompt share its prompt and differ in their draws
  np.testing.assert_array_equal(np.asarray(ro.prompt_ids_RxLp), np.repeat(ids, n, 0))
  assert (tok[0] != tok[1]).any()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 6, 0.7)])
def test_sampling_law(temperature, top_k, top_p):
  """20k vectorised draws: total variation from the exact filtered law <= 0.02 (expected ~0.006), and
  filtered-out / banned tokens are never drawn; returned log-probs are the exact ones."""
  draws, v = 20_000, 16
  logits = np.random.default_rng(0).normal(size=v).astype(np.float32) * 1.5
  banned = (3,)
  logits[3] = logits.max() + 1.0             # the most likely token, but banned (like <|image_pad|>)
  exact = _exact_filtered_probs(logits, temperature, top_k, top_p, banned)
  keys = jax.random.split(jax.random.key(123), draws)
  fn = jax.jit(lambda l, k: sample_tokens(l, k, temperature=temperature, top_k=top_k, top_p=top_p, banned_ids=banned))
  tok, lp, raw = jax.device_get(fn(jnp.broadcast_to(jnp.asarray(logits), (draws, v)), keys))
  freq = np.bincount(tok, minlength=v) / draws
  assert (freq[exact == 0] == 0).all()
  tv = 0.5 * np.abs(freq - exact).sum()
  assert tv <= 0.02, f"total variation {tv}"
  np.testing.assert_allclose(lp, np.log(exact[tok]), atol=1e-5)
  np.testing.assert_allclose(raw, jax.nn.log_softmax(logits)[tok], atol=1e-5)


def _nucleus_size(logits_BxV, top_p):
  p = np.sort(np.asarray(jax.nn.softmax(logits_BxV, axis=-1)), axis=-1)[:, ::-1]
  return ((np.cumsum(p, axis=-1) - p) < top_p).sum(-1)


@pytest.mark.parametrize("top_p,scale,peak", [(0.9, 4.0, False), (0.99, 6.0, False), (0.99, 1.0, True)])
def test_top_p_partial_sort_equals_full_sort(top_p, scale, peak):
  """lax.top_k over 64 candidates keeps exactly the full-sort nucleus whenever it has <= 64 tokens,
  including top_p=0.99 on a peaked law (the paper's setting); the filtered logits are identical."""
  v = 4096
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(8, v)).astype(np.float32) * scale)
  if peak:   # a handful of tokens hold almost all the mass
    logits = logits.at[:, :5].add(12.0)
  sizes = _nucleus_size(logits, top_p)
  ref = np.asarray(filter_logits(logits, temperature=1.0, top_p=top_p, top_p_candidates=0))
  part = np.asarray(filter_logits(logits, temperature=1.0, top_p=top_p, top_p_candidates=64))
  fits = sizes <= 64
  assert fits.any() and (sizes > 1).any()
  np.testing.assert_array_equal(part[fits], ref[fits])
  np.testing.assert_array_equal(np.isfinite(ref[fits]).sum(-1), sizes[fits])


def test_top_p_partial_sort_fallback_is_top_candidates():
  """A flat law whose nucleus outgrows the candidates samples from exactly the top candidates (documented)."""
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 4096)).astype(np.float32))
  assert (_nucleus_size(logits, 0.9) > 64).all()
  part = np.asarray(filter_logits(logits, top_p=0.9, top_p_candidates=64))
  np.testing.assert_array_equal(np.isfinite(part).sum(-1), 64)
  top64 = np.sort(np.asarray(logits), axis=-1)[:, -64:]
  np.testing.assert_array_equal(np.sort(part, axis=-1)[:, -64:], top64)


def test_top_p_partial_sort_with_top_k_and_temperature():
  """With top_k the top-k survivors are the candidates; the result equals the full sort at any candidate count."""
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(4, 512)).astype(np.float32) * 2)
  ref = filter_logits(logits, temperature=0.7, top_k=40, top_p=0.95, top_p_candidates=0)
  for cands in (8, 40, 1024):
    np.testing.assert_array_equal(np.asarray(filter_logits(logits, temperature=0.7, top_k=40, top_p=0.95,
                                                           top_p_candidates=cands)), np.asarray(ref))


def test_text_only_greedy_matches_transformers(tiny):
  """pixel_values=None goes through the same prefill/decode programs (no vision tower)."""
  hf, _, graphdef, state, _ = tiny
  ids, mask, _, _ = H.make_batch([[9], [4], [12]], [], seed=4)
  cfg = SamplingConfig(max_new_tokens=32, greedy=True, cache_dtype="float32", stop_token_ids=(NEVER,))
  ro = jax.device_get(Sampler(graphdef, cfg).generate(state, ids, mask, None, None, n=1))
  ti = torch.as_tensor(ids)
  with torch.no_grad():
    out = hf.generate(input_ids=ti, attention_mask=torch.as_tensor(mask), do_sample=False, max_new_tokens=32,
                      min_new_tokens=32, eos_token_id=NEVER, pad_token_id=H.PAD_ID)
  np.testing.assert_array_equal(ro.tokens_RxT, out[:, ids.shape[1]:].numpy())
  # default bf16 cache, n=3 greedy samples from one shared prefill: identical within a prompt, and
  # the same as the fp32-cache run for the first tokens
  cfg = SamplingConfig(max_new_tokens=32, greedy=True, stop_token_ids=(NEVER,))
  ro3 = jax.device_get(Sampler(graphdef, cfg).generate(state, ids, mask, None, None, n=3))
  tok3 = ro3.tokens_RxT.reshape(3, 3, 32)
  assert (tok3 == tok3[:, :1]).all()
  np.testing.assert_array_equal(tok3[:, 0, :4], ro.tokens_RxT[:, :4])
  np.testing.assert_array_equal(ro3.prompt_ids_RxLp, np.repeat(ids, 3, 0))


def test_sharded_8_devices_same_rollout(tiny):
  """4 prompts (2 with images) x n=2, sampled, on a (data=2, fsdp=2, tensor=2) mesh == one device."""
  assert jax.device_count() >= 8, "run with --xla_force_host_platform_device_count=8 (tests/conftest.py)"
  _, _, graphdef, state, _ = tiny
  ids, mask, pv, grid = H.make_batch([[5, "img", 3], [4], [2, "img", 6], [9]], [(1, 8, 8), (1, 6, 10)], seed=5)
  cfg = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.95, cache_dtype="float32")
  ref = jax.device_get(Sampler(graphdef, cfg).generate(state, ids, mask, pv, grid, n=2, key=3))
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  sharded = Sampler(graphdef, cfg, mesh=mesh).generate(shard_state(state, mesh), ids, mask, pv, grid, n=2, key=3)
  assert sharded.tokens_RxT.sharding.spec[0] == ("data", "fsdp")
  out = jax.device_get(sharded)
  np.testing.assert_array_equal(out.tokens_RxT, ref.tokens_RxT)
  np.testing.assert_array_equal(out.mask_RxT, ref.mask_RxT)
  np.testing.assert_array_equal(out.finish_reason_R, ref.finish_reason_R)
  np.testing.assert_allclose(out.policy_logprobs_RxT, ref.policy_logprobs_RxT, atol=2e-5)
  np.testing.assert_allclose(out.logprobs_RxT, ref.logprobs_RxT, atol=2e-5)
  assert ref.mask_RxT.sum() > 30
