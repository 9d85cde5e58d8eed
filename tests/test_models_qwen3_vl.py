"""Qwen3-VL parity with transformers (torch CPU, eager, fp32), checkpoint round trips, greedy
generation parity, and the RL core's gradient-reach check on a Qwen3-VL model."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hf_utils as H  # noqa: E402
from rollouts import GRIDS, ROWS, build_batch, flat  # noqa: E402
from flax import nnx  # noqa: E402
from papo_jax import models  # noqa: E402
from papo_jax.rl.losses import LossConfig  # noqa: E402
from papo_jax.rl.train_step import StepConfig, make_grad_fn  # noqa: E402
from papo_jax.sampling import FINISH_LENGTH, Sampler, SamplingConfig  # noqa: E402

P = 16  # Qwen3-VL patch size

CASES = {
    # 4x4 position table resampled to 10x14 and 8x8 grids; DeepStack into layers 0 and 1 (of 3);
    # left padding (three rows of different lengths, one text-only).
    "two_sizes_and_text_row": dict(kw=dict(tie=True, deepstack=(0, 2)), rows=[[5, "img", 7], [3, "img", 4], [12]],
                                   grids=[(1, 10, 14), (1, 8, 8)]),
    # Two images in one row (a 6x6 table both up- and down-sampled: 12x4 and 4x4 grids); DeepStack into
    # all 4 layers, untied lm_head, MHA, a padded text row.
    "two_images_one_row_untied": dict(kw=dict(tie=False, kv=4, layers=4, depth=5, deepstack=(1, 2, 3, 4), table=36),
                                      rows=[[4, "img", 3, "img", 6], [9]], grids=[(1, 12, 4), (1, 4, 4)]),
}


@functools.lru_cache(maxsize=None)
def _jit_forward(graphdef):
  def fwd(state, ids, mask, pv, grid):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
  return jax.jit(fwd)


def _ours_logits(model, ids, mask, pv, grid):
  graphdef, state = nnx.split(model)
  out = _jit_forward(graphdef)(state, ids, mask, pv if len(grid) else None, grid if len(grid) else None)
  return np.asarray(out, np.float32)


def _hf_dir(hf, path):
  hf.save_pretrained(path)
  return path


@pytest.mark.parametrize("name", list(CASES))
def test_logits_positions_and_vision_features_match_transformers(name, tmp_path):
  case = CASES[name]
  hf = H.tiny_qwen3_hf_model(seed=1, **case["kw"])
  ids, mask, pv, grid = H.make_batch(case["rows"], case["grids"], seed=2, patch=P)
  ref, pos_ref, deltas_ref = H.hf_forward(hf, ids, mask, pv, grid)
  model = models.from_pretrained(_hf_dir(hf, str(tmp_path / "hf")), dtype="float32")
  assert isinstance(model, models.Qwen3VL)
  pos, deltas = model.positions(jnp.asarray(ids), jnp.asarray(grid), jnp.asarray(mask))
  valid = mask.astype(bool)
  np.testing.assert_array_equal(np.asarray(pos)[:, valid], pos_ref[:, valid])
  np.testing.assert_array_equal(np.asarray(deltas), deltas_ref)
  # The vision tower alone: merged features and every DeepStack level.
  with torch.no_grad():
    vis = hf.model.get_image_features(torch.as_tensor(pv), torch.as_tensor(grid), return_dict=True)
  feats, deep = jax.jit(lambda p, g: model.visual(p, g))(pv, grid)
  np.testing.assert_allclose(np.asarray(feats), torch.cat(vis.pooler_output).numpy(), atol=1e-5)
  assert deep.shape[0] == len(case["kw"]["deepstack"])
  for k, level in enumerate(vis.deepstack_features):
    np.testing.assert_allclose(np.asarray(deep[k]), torch.cat(level).numpy(), atol=1e-5)
  err = np.abs(_ours_logits(model, ids, mask, pv, grid) - ref)[valid].max()
  assert err <= 1e-4, f"max |logit diff| {err}"


def test_padded_patch_bucket_and_empty_grid_rows(tmp_path):
  """Extra zero patch rows and zero grid rows (static-shape buckets) leave the logits unchanged."""
  hf = H.tiny_qwen3_hf_model(seed=3)
  ids, mask, pv, grid = H.make_batch([[3, "img", 4], [2, "img", 2]], [(1, 6, 10), (1, 8, 8)], seed=4, patch=P)
  model = models.from_pretrained(_hf_dir(hf, str(tmp_path / "hf")), dtype="float32")
  base = _ours_logits(model, ids, mask, pv, grid)
  pv_pad = np.concatenate([pv, np.zeros((36, pv.shape[1]), np.float32)])
  grid_pad = np.concatenate([grid, np.zeros((2, 3), grid.dtype)])
  valid = mask.astype(bool)
  np.testing.assert_allclose(_ours_logits(model, ids, mask, pv_pad, grid_pad)[valid], base[valid], atol=1e-5)
  # and per-image full attention (rows padded to max_image_patches) gives the same numbers
  per_image = models.from_pretrained(str(tmp_path / "hf"), dtype="float32", max_image_patches=80)
  np.testing.assert_allclose(_ours_logits(per_image, ids, mask, pv_pad, grid_pad)[valid], base[valid], atol=1e-5)


def test_hf_to_ours_to_hf_round_trip(tmp_path):
  """Loaded and saved again: transformers reads back bit-identical tensors in the Qwen3-VL key layout."""
  from safetensors import safe_open
  from transformers import Qwen3VLForConditionalGeneration
  hf = H.tiny_qwen3_hf_model(seed=5, tie=False)
  model = models.from_pretrained(_hf_dir(hf, str(tmp_path / "hf")), dtype="float32")
  out_dir = str(tmp_path / "ours")
  models.save_pretrained(model, out_dir)
  with safe_open(os.path.join(out_dir, "model.safetensors"), "np") as f:
    keys = set(f.keys())
  assert keys == set(hf.state_dict())
  assert all(k.startswith(("model.visual.", "model.language_model.", "lm_head.")) for k in keys)
  back = Qwen3VLForConditionalGeneration.from_pretrained(out_dir, attn_implementation="eager").eval().float()
  src, dst = hf.state_dict(), back.state_dict()
  assert set(src) == set(dst)
  for k in src:
    assert torch.equal(src[k], dst[k]), k
  ids, mask, pv, grid = H.make_batch([[2, "img", 3]], [(1, 8, 12)], seed=6, patch=P)
  a, _, _ = H.hf_forward(back, ids, mask, pv, grid)
  assert np.abs(a - _ours_logits(model, ids, mask, pv, grid)).max() <= 1e-4


def test_random_init_writes_a_nested_config_transformers_loads(tmp_path):
  """init_model -> save_pretrained with our own config.json (the tiny trainer checkpoint path)."""
  from transformers import Qwen3VLForConditionalGeneration
  cfg = models.from_hf_dict(H.tiny_qwen3_hf_config(tie=True).to_dict(), dtype="float32")
  model = models.init_model(cfg.replace(hf_dict=None), seed=0)
  out = str(tmp_path / "fresh")
  models.save_pretrained(model, out)
  with open(os.path.join(out, "config.json")) as f:
    written = json.load(f)
  assert written["model_type"] == "qwen3_vl" and "text_config" in written and "vision_config" in written
  reloaded = models.from_pretrained(out, dtype="float32")
  assert reloaded.config.replace(hf_dict=None) == cfg.replace(hf_dict=None)
  back = Qwen3VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval().float()
  ids, mask, pv, grid = H.make_batch([[3, "img", 2], [7]], [(1, 10, 10)], seed=7, patch=P)
  a, _, _ = H.hf_forward(back, ids, mask, pv, grid)
  b = _ours_logits(reloaded, ids, mask, pv, grid)
  valid = mask.astype(bool)
  assert np.abs(a - b)[valid].max() <= 1e-4
  np.testing.assert_array_equal(b, _ours_logits(model, ids, mask, pv, grid))


def test_config_reads_hub_layout_and_rejects_bad_values():
  """The 4.57-era hub layout (rope_scaling + rope_theta inside text_config) gives the 2B's numbers."""
  hub = {"model_type": "qwen3_vl", "tie_word_embeddings": True, "image_token_id": 151655,
         "text_config": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                         "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 5000000,
                         "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                          "rope_type": "default"},
                         "attention_bias": False, "max_position_embeddings": 262144, "bos_token_id": 151643,
                         "eos_token_id": 151645},
         "vision_config": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                           "out_hidden_size": 2048, "deepstack_visual_indexes": [5, 11, 17],
                           "num_position_embeddings": 2304, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh"}}
  cfg = models.from_hf_dict(hub)
  t, v = cfg.text, cfg.vision
  assert (t.rope_theta, t.mrope_section, t.qk_norm, t.mrope_interleaved, t.attention_bias) == (
      5e6, (24, 20, 20), True, True, False)
  assert (v.patch_size, v.num_position_embeddings, v.deepstack_visual_indexes) == (16, 2304, (5, 11, 17))
  assert cfg.eos_token_id == 151645 and cfg.tie_word_embeddings
  params = sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.split(models.abstract_model(cfg))[1]))
  assert params == 2_127_532_032  # Qwen3-VL-2B (spec qwen_vl.md section 3)
  with pytest.raises(ValueError, match="not a square"):
    models.from_hf_dict({**hub, "vision_config": {**hub["vision_config"], "num_position_embeddings": 2300}})
  with pytest.raises(ValueError, match="deepstack_visual_indexes"):
    models.from_hf_dict({**hub, "vision_config": {**hub["vision_config"], "deepstack_visual_indexes": [5, 30]}})


# -- generation -------------------------------------------------------------------------------


def test_greedy_generation_matches_transformers_generate(tmp_path):
  """Sampler (prefill with DeepStack, KV-cache decode) == HF generate, two image sizes + a text row."""
  t_new, never = 24, 3
  hf = H.tiny_qwen3_hf_model(seed=8, tie=False)
  with torch.no_grad():  # larger text weights: greedy output varies instead of repeating one token
    for name, p in hf.named_parameters():
      if "visual" not in name and p.ndim == 2:
        p.mul_(5.0)
  model = models.from_pretrained(_hf_dir(hf, str(tmp_path / "hf")), dtype="float32")
  graphdef, state = nnx.split(model)
  ids, mask, pv, grid = H.make_batch([[5, "img", 7], [3, "img", 4], [12]], [(1, 10, 14), (1, 8, 8)], seed=9, patch=P)
  cfg = SamplingConfig(max_new_tokens=t_new, greedy=True, cache_dtype="float32", stop_token_ids=(never,))
  ro = jax.device_get(Sampler(graphdef, cfg).generate(state, ids, mask, pv, grid, n=1))
  ti = torch.as_tensor(ids)
  with torch.no_grad():
    out = hf.generate(input_ids=ti, attention_mask=torch.as_tensor(mask), mm_token_type_ids=(ti == H.IMAGE_ID).long(),
                      pixel_values=torch.as_tensor(pv), image_grid_thw=torch.as_tensor(grid), do_sample=False,
                      max_new_tokens=t_new, min_new_tokens=t_new, eos_token_id=never, pad_token_id=H.PAD_ID,
                      suppress_tokens=[H.IMAGE_ID, H.VIDEO_ID])   # the sampler never emits these
  ref = out[:, ids.shape[1]:].numpy()
  assert not (ref == never).any() and len(np.unique(ref)) > 8, "degenerate greedy output makes a weak test"
  np.testing.assert_array_equal(ro.tokens_RxT, ref)
  np.testing.assert_array_equal(ro.finish_reason_R, [FINISH_LENGTH] * 3)


# -- the RL core ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rl_setup():
  # DeepStack into layers 0 and 1 of 3 (what is added after the last layer never reaches a response token).
  cfg = models.from_hf_dict(H.tiny_qwen3_hf_config(layers=3, depth=2, deepstack=(0, 1)).to_dict(), dtype="float32")
  model = models.init_model(cfg.replace(hf_dict=None), seed=0)
  graphdef, params = nnx.split(model)
  return model, graphdef, params, nnx.split(models.init_model(cfg.replace(hf_dict=None), seed=1))[1]


def test_every_papo_term_reaches_the_qwen3_gradient(rl_setup):
  """test_rl_train_step's check on Qwen3-VL: each term's coefficient (or input) changes the parameter gradient.

  Two compiled programs: gamma and the entropy scale are run-time scalars, and the reference-KL term is
  seen by swapping the reference parameters (they enter the loss only through it; with ref == policy its
  gradient is zero). The DeepStack mergers, the position table and qk-norm get gradients.
  """
  model, graphdef, params, ref_params = rl_setup
  batch = build_batch(model, ROWS, GRIDS, micro=1, seed=3)

  def grad_fn(**loss):
    return jax.jit(make_grad_fn(graphdef, StepConfig(loss=LossConfig(**loss), mask_grad=loss.get("eta_mask", 0) > 0,
                                                     logprob_chunk=4)))

  def changed(g, g0):
    return np.linalg.norm(flat(g) - flat(g0)) / np.linalg.norm(flat(g0))

  fn = grad_fn(beta=0.01, gamma=0.02, eta_ori=0.05)
  g0, _, metrics = fn(params, ref_params, batch, jnp.float32(0.02), jnp.float32(1.0))
  assert float(metrics["actor/kl_prcp"]) > 0
  terms = {
      "gamma": fn(params, ref_params, batch, jnp.float32(0.5), jnp.float32(1.0))[0],
      "eta_ori": fn(params, ref_params, batch, jnp.float32(0.02), jnp.float32(10.0))[0],
      "beta": fn(params, params, batch, jnp.float32(0.02), jnp.float32(1.0))[0],
  }
  fn_mask = grad_fn(gamma=0.01, eta_mask=0.05)   # the masked forward under gradient (mask_grad)
  g1 = fn_mask(params, ref_params, batch, jnp.float32(0.01), jnp.float32(1.0))[0]
  for term, g in terms.items():
    assert changed(g, g0) > 1e-3, f"{term}: gradient unchanged (relative change {changed(g, g0):.2e})"
  g_mask = fn_mask(params, ref_params, batch, jnp.float32(0.01), jnp.float32(10.0))[0]
  assert changed(g_mask, g1) > 1e-3, f"eta_mask(mask_grad): gradient unchanged ({changed(g_mask, g1):.2e})"
  named = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g0)}
  for part in ("visual.pos_embed.weight", "visual.deepstack_merger_list.1.linear_fc2.kernel",
               "visual.deepstack_merger_list.0.norm.bias", "model.layers.0.self_attn.q_norm.weight",
               "model.layers.1.self_attn.k_norm.weight"):
    assert np.abs(named[part]).max() > 0, f"{part} gets no gradient"


def test_sharded_8_devices_same_logits(tmp_path):
  """(data, fsdp, tensor) = (2, 2, 2): the position table, LayerNorms, qk-norm and DeepStack shard and agree."""
  from papo_jax.parallel import make_mesh, shard_state, use_mesh_rules
  assert jax.device_count() >= 8, "run with --xla_force_host_platform_device_count=8 (tests/conftest.py)"
  hf = H.tiny_qwen3_hf_model(seed=10)
  model = models.from_pretrained(_hf_dir(hf, str(tmp_path / "hf")), dtype="float32")
  ids, mask, pv, grid = H.make_batch([[5, "img", 7], [3, "img", 4], [12], [8, "img"]],
                                     [(1, 10, 14), (1, 8, 8), (1, 6, 6)], seed=11, patch=P)
  ref = _ours_logits(model, ids, mask, pv, grid)
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  graphdef, state = nnx.split(model)
  state = shard_state(state, mesh)

  @jax.jit
  def fwd(state, ids, mask, pv, grid):
    with use_mesh_rules(mesh):
      return nnx.merge(graphdef, state)(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)

  np.testing.assert_allclose(np.asarray(fwd(state, ids, mask, pv, grid)), ref, atol=2e-5)
