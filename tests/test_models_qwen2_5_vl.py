"""Qwen2.5-VL parity with transformers (torch CPU, eager, fp32) and checkpoint round trips."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hf_utils as H  # noqa: E402
from papo_jax import models  # noqa: E402
from papo_jax.parallel import make_mesh, shard_state, use_mesh_rules  # noqa: E402
from flax import nnx  # noqa: E402

CASES = {
    # batch of 2 different image sizes (grids not divisible by the window) + left-padded text-only row
    "two_sizes_and_text_row": dict(kw=dict(tie=True), rows=[[5, "img", 7], [3, "img", 4], [12]],
                                   grids=[(1, 10, 14), (1, 8, 8)]),
    # two images in one sequence, untied lm_head, window-divisible grid (Hm = 8) and a partial one
    "two_images_one_row_untied": dict(kw=dict(tie=False, fullatt=(0, 2)), rows=[[4, "img", 3, "img", 6], [9]],
                                      grids=[(1, 16, 16), (1, 6, 10)]),
    # no GQA grouping, deeper vision, a tall image and a wide image in separate rows
    "mha_tall_wide": dict(kw=dict(tie=True, heads=4, kv=4, depth=4, fullatt=(3,), layers=3),
                          rows=[["img", 2], [6, "img"]], grids=[(1, 20, 6), (1, 4, 18)]),
}


def _save_hf(hf, path):
  hf.save_pretrained(path)
  return path


@functools.lru_cache(maxsize=None)
def _jit_forward(graphdef):
  def fwd(state, ids, mask, pv, grid):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
  return jax.jit(fwd)


def _ours_logits(model, ids, mask, pv, grid):
  """Jitted forward (eager NNX dispatches op by op, which is slow on CPU)."""
  models.check_image_tokens(ids, grid, image_token_id=model.config.image_token_id)
  graphdef, state = nnx.split(model)
  out = _jit_forward(graphdef)(state, ids, mask, pv if len(grid) else None, grid if len(grid) else None)
  return np.asarray(out, np.float32)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_positions_match_transformers(name, tmp_path):
  case = CASES[name]
  hf = H.tiny_hf_model(seed=1, **case["kw"])
  ids, mask, pv, grid = H.make_batch(case["rows"], case["grids"], seed=2)
  ref, pos_ref, deltas_ref = H.hf_forward(hf, ids, mask, pv, grid)
  model = models.from_pretrained(_save_hf(hf, str(tmp_path / "hf")), dtype="float32")
  pos, deltas = model.positions(jnp.asarray(ids), jnp.asarray(grid), jnp.asarray(mask))
  valid = mask.astype(bool)
  np.testing.assert_array_equal(np.asarray(pos)[:, valid], pos_ref[:, valid])
  np.testing.assert_array_equal(np.asarray(deltas), deltas_ref)
  ours = _ours_logits(model, ids, mask, pv, grid)
  err = np.abs(ours - ref)[valid].max()
  assert err <= 1e-4, f"max |logit diff| {err}"


def test_eager_forward_matches_jitted(tmp_path):
  hf = H.tiny_hf_model(seed=3)
  ids, mask, pv, grid = H.make_batch([[5, "img", 7], [12]], [(1, 10, 14)], seed=4)
  model = models.from_pretrained(_save_hf(hf, str(tmp_path / "hf")), dtype="float32")
  graphdef, state = nnx.split(model)

  @jax.jit
  def fwd(state, ids, mask, pv, grid):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)

  a = np.asarray(fwd(state, ids, mask, pv, grid))
  b = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(pv),
                       image_grid_thw=jnp.asarray(grid)))
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_padded_patch_bucket_and_empty_grid_rows(tmp_path):
  """Extra zero patch rows and zero grid rows (static-shape buckets) leave the logits unchanged."""
  hf = H.tiny_hf_model(seed=5)
  ids, mask, pv, grid = H.make_batch([[3, "img", 4], [2, "img", 2]], [(1, 6, 10), (1, 8, 8)], seed=6)
  model = models.from_pretrained(_save_hf(hf, str(tmp_path / "hf")), dtype="float32")
  base = _ours_logits(model, ids, mask, pv, grid)
  pv_pad = np.concatenate([pv, np.zeros((36, pv.shape[1]), np.float32)])
  grid_pad = np.concatenate([grid, np.zeros((2, 3), grid.dtype)])
  padded = _ours_logits(model, ids, mask, pv_pad, grid_pad)
  valid = mask.astype(bool)
  np.testing.assert_allclose(padded[valid], base[valid], atol=1e-5)


def test_hf_to_ours_to_hf_round_trip(tmp_path):
  from transformers import Qwen2_5_VLForConditionalGeneration
  hf = H.tiny_hf_model(seed=7, tie=False)
  model = models.from_pretrained(_save_hf(hf, str(tmp_path / "hf")), dtype="float32")
  out_dir = str(tmp_path / "ours")
  models.save_pretrained(model, out_dir)
  back = Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir, attn_implementation="eager").eval().float()
  src, dst = hf.state_dict(), back.state_dict()
  assert set(src) == set(dst)
  for k in src:
    assert torch.equal(src[k], dst[k]), k
  ids, mask, pv, grid = H.make_batch([[2, "img", 3]], [(1, 8, 12)], seed=8)
  a, _, _ = H.hf_forward(back, ids, mask, pv, grid)
  b = _ours_logits(model, ids, mask, pv, grid)
  assert np.abs(a - b).max() <= 1e-4


def test_ours_flat_config_loads_in_transformers(tmp_path):
  """A randomly initialised model written with the flat hub-style config.json loads in transformers."""
  from transformers import Qwen2_5_VLForConditionalGeneration
  hf_cfg = H.tiny_hf_config(tie=True)
  cfg = models.from_hf_dict(hf_cfg.to_dict(), dtype="float32")
  model = models.init_model(cfg.replace(hf_dict=None), seed=0)
  out = str(tmp_path / "flat")
  models.save_pretrained(model, out)
  with open(os.path.join(out, "config.json")) as f:
    assert "text_config" not in json.load(f)  # flat layout, as on the Hub
  back = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval().float()
  reloaded = models.from_pretrained(out, dtype="float32")
  ids, mask, pv, grid = H.make_batch([[3, "img", 2], [7]], [(1, 10, 10)], seed=9)
  a, _, _ = H.hf_forward(back, ids, mask, pv, grid)
  b = _ours_logits(reloaded, ids, mask, pv, grid)
  c = _ours_logits(model, ids, mask, pv, grid)
  valid = mask.astype(bool)
  assert np.abs(a - b)[valid].max() <= 1e-4
  np.testing.assert_array_equal(b, c)


def test_sharded_checkpoint_and_v5_keys(tmp_path):
  """Index-sharded files and the v5 key layout (model.visual.*, model.language_model.*) load identically."""
  from safetensors.numpy import save_file
  hf = H.tiny_hf_model(seed=10)
  base = models.from_pretrained(_save_hf(hf, str(tmp_path / "hf")), dtype="float32")
  sharded = str(tmp_path / "sharded")
  models.save_pretrained(base, sharded, max_shard_bytes=200_000)
  assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
  v5 = str(tmp_path / "v5")
  os.makedirs(v5)
  renamed = {}
  for k, t in models.checkpoint.iter_hf_tensors(base):
    k = "model.visual." + k[len("visual."):] if k.startswith("visual.") else k
    k = "model.language_model." + k[len("model."):] if k.startswith("model.") and not k.startswith("model.visual") else k
    renamed[k] = t
  save_file(renamed, os.path.join(v5, "model.safetensors"))
  with open(os.path.join(str(tmp_path / "hf"), "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(v5, "config.json"), "w") as f:
    json.dump(cfg, f)
  ids, mask, pv, grid = H.make_batch([[3, "img", 2]], [(1, 8, 8)], seed=11)
  ref = _ours_logits(base, ids, mask, pv, grid)
  for d in (sharded, v5):
    np.testing.assert_array_equal(_ours_logits(models.from_pretrained(d, dtype="float32"), ids, mask, pv, grid), ref)


def test_image_token_mismatch_error_states_both_counts(tmp_path):
  hf = H.tiny_hf_model(seed=12)
  model = models.from_pretrained(_save_hf(hf, str(tmp_path / "hf")), dtype="float32")
  ids, mask, pv, grid = H.make_batch([[3, "img", 2]], [(1, 8, 8)], seed=13)
  ids = ids[:, :-4]  # drop 2 image tokens... and the tail
  ids = np.concatenate([ids[:, :5], ids[:, 7:]], axis=1)
  mask = np.ones_like(ids)
  n_tok = int((ids == H.IMAGE_ID).sum())
  with pytest.raises(ValueError, match=rf"{n_tok} <\|image_pad\|> tokens.*16 merged features"):
    model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(pv),
          image_grid_thw=jnp.asarray(grid))


def test_sharded_8_devices_same_logits(tmp_path):
  assert jax.device_count() >= 8, "run with --xla_force_host_platform_device_count=8 (tests/conftest.py)"
  hf = H.tiny_hf_model(seed=14)
  model = models.from_pretrained(_save_hf(hf, str(tmp_path / "hf")), dtype="float32")
  ids, mask, pv, grid = H.make_batch([[5, "img", 7], [3, "img", 4], [12], [8, "img"]],
                                     [(1, 10, 14), (1, 8, 8), (1, 6, 6)], seed=15)
  ref = _ours_logits(model, ids, mask, pv, grid)
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  graphdef, state = nnx.split(model)
  state = shard_state(state, mesh)
  # some parameters really are split across devices
  assert any(len(v.get_value().sharding.device_set) == 8 and not v.get_value().sharding.is_fully_replicated
             for _, v in nnx.to_flat_state(state))

  @jax.jit
  def fwd(state, ids, mask, pv, grid):
    with use_mesh_rules(mesh):
      return nnx.merge(graphdef, state)(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)

  out = np.asarray(fwd(state, ids, mask, pv, grid))
  np.testing.assert_allclose(out, ref, atol=2e-5)
  # loading straight into the mesh gives the same arrays
  direct = models.from_pretrained(str(tmp_path / "hf"), dtype="float32", mesh=mesh)
  out2 = np.asarray(fwd(nnx.split(direct)[1], ids, mask, pv, grid))
  np.testing.assert_allclose(out2, ref, atol=2e-5)

  # model.gather_weights: the decoder gathers its weights explicitly; same logits and gradient
  gathered = models.from_pretrained(str(tmp_path / "hf"), dtype="float32", mesh=mesh, gather_weights=True)
  g_graphdef, g_state = nnx.split(gathered)
  probe = jax.random.normal(jax.random.key(0), ref.shape)

  def loss(graphdef_, state_):
    with use_mesh_rules(mesh):
      out = nnx.merge(graphdef_, state_)(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
    return jnp.sum(out * probe)

  fns = {g: jax.jit(jax.value_and_grad(lambda st, g=g: loss(g, st))) for g in (graphdef, g_graphdef)}
  (v0, g0), (v1, g1) = fns[graphdef](nnx.split(direct)[1]), fns[g_graphdef](g_state)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  for (path, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
    np.testing.assert_allclose(np.asarray(b.get_value()), np.asarray(a.get_value()), atol=1e-5, err_msg=str(path))
  assert "optimization_barrier" in fns[g_graphdef].lower(g_state).as_text()
  assert "optimization_barrier" not in fns[graphdef].lower(nnx.split(direct)[1]).as_text()

  # ... and the log-prob head split over the vocabulary (values and gradient)
  from papo_jax.rl.train_step import chunked_token_logprobs
  h = jax.random.normal(jax.random.key(1), (4, 12, model.config.text.hidden_size))
  y = jax.random.randint(jax.random.key(2), (4, 12), 0, model.config.text.vocab_size)

  def head(graphdef_, state_):
    with use_mesh_rules(mesh):
      return jnp.sum(chunked_token_logprobs(nnx.merge(graphdef_, state_), h, y, 4) * probe[:, :12, 0])

  (v0, g0) = jax.jit(jax.value_and_grad(lambda st: head(graphdef, st)))(nnx.split(direct)[1])
  (v1, g1) = jax.jit(jax.value_and_grad(lambda st: head(g_graphdef, st)))(g_state)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  for (path, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
    np.testing.assert_allclose(np.asarray(b.get_value()), np.asarray(a.get_value()), atol=1e-5, err_msg=str(path))


def test_bf16_close_to_transformers_bf16(tmp_path):
  """bf16 weights and activations on both sides.

  The two implementations round at different points inside fused ops (XLA fuses
  elementwise chains, torch rounds every op to bf16), so logits differ by a few bf16
  ulps of the activations: we require the max diff to be within 4% of the logit range
  and small relative to the fp32-vs-bf16 error of HF itself.
  """
  hf = H.tiny_hf_model(seed=16)
  d = _save_hf(hf, str(tmp_path / "hf"))
  ids, mask, pv, grid = H.make_batch([[5, "img", 7], [12]], [(1, 10, 14)], seed=17)
  ref32, _, _ = H.hf_forward(hf, ids, mask, pv, grid)
  hf16 = hf.to(torch.bfloat16)
  ref16, _, _ = H.hf_forward(hf16, ids, mask, pv, grid)
  model = models.from_pretrained(d, dtype="bfloat16")
  ours = _ours_logits(model, ids, mask, pv, grid)
  valid = mask.astype(bool)
  diff = np.abs(ours - ref16)[valid].max()
  hf_own = np.abs(ref16 - ref32)[valid].max()
  scale = np.abs(ref32[valid]).max()
  assert diff <= 0.04 * scale, (diff, scale)
  assert diff <= 2.0 * hf_own + 1e-3, (diff, hf_own)
