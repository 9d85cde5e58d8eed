"""Images per batch shard: each distinct image encoded once, on the devices of its rows,
with the same logits and gradients as every row carrying its own copy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import hf_utils as H
from papo_jax import models
from papo_jax.models import vision as vision_lib
from papo_jax.models.vision import SharedImages, encode_shards
from papo_jax.parallel import make_mesh, use_mesh_rules
from papo_jax.rl import batching
from papo_jax.rl.losses import LossConfig
from papo_jax.rl.train_step import StepConfig, TrainBatch, make_grad_fn
from rollouts import make_groups

ROWS = [[3, "img", 2], [4, "img", 1]]
GRIDS = [(1, 4, 8), (1, 8, 4)]
N = 3   # samples per prompt


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _model(family="qwen2_5_vl"):
  hf = H.tiny_hf_config(tie=True) if family == "qwen2_5_vl" else H.tiny_qwen3_hf_config(tie=True)
  return models.init_model(models.from_hf_dict(hf.to_dict(), dtype="float32").replace(hf_dict=None), seed=0)


def row_order_batch(groups, n: int) -> TrainBatch:
  """The replicated layout: one micro-batch whose patch list holds every row's images in row order."""
  arrays = batching.assemble_train_batch(groups, micro_batches=1, pad_id=H.PAD_ID)
  rows = [g for g in groups for _ in range(n)]
  pv = np.concatenate([g.pixel_values for g in rows if g.pixel_values is not None])
  mpv = np.concatenate([g.masked_pixel_values for g in rows if g.pixel_values is not None])
  grid = np.concatenate([g.image_grid_thw for g in rows])
  keep = {k: jnp.asarray(v) for k, v in arrays.items()
          if k not in ("pixel_values", "masked_pixel_values", "image_grid_thw", "row_image_start")}
  return TrainBatch(**keep, pixel_values=jnp.asarray(pv)[None], masked_pixel_values=jnp.asarray(mpv)[None],
                    image_grid_thw=jnp.asarray(grid, jnp.int32)[None])


def test_image_shared_by_n_rows_is_encoded_once(monkeypatch):
  model = _model()
  groups = make_groups(model, ROWS, GRIDS, n=N, seed=1)
  arrays = batching.assemble_train_batch(groups, micro_batches=1, pad_id=H.PAD_ID, patch_multiple=1,
                                         image_multiple=1)
  batch = TrainBatch(**{k: jnp.asarray(v) for k, v in arrays.items()})
  seen = []
  call = vision_lib.VisionTower.__call__

  def counting(self, pixel_values_NxP, grid):
    seen.append(pixel_values_NxP.shape[0])
    return call(self, pixel_values_NxP, grid)

  monkeypatch.setattr(vision_lib.VisionTower, "__call__", counting)
  micro = jax.tree.map(lambda a: a[0], batch)
  pv, _ = micro.images()
  jax.eval_shape(lambda: model.embed(micro.input_ids, pv))
  distinct = sum(t * h * w for t, h, w in GRIDS)
  assert seen == [distinct]                      # not N * distinct: one encoding per prompt
  assert batch.pixel_values.shape[:3] == (1, 1, distinct)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_shared_layout_logits_equal_row_order_layout(family):
  model = _model(family)
  groups = make_groups(model, ROWS, GRIDS, n=N, seed=2)
  arrays = batching.assemble_train_batch(groups, micro_batches=1, pad_id=H.PAD_ID, shards=2, patch_multiple=16)
  shared = TrainBatch(**{k: jnp.asarray(v) for k, v in arrays.items()})
  ref = row_order_batch(groups, N)
  run = jax.jit(lambda pv, grid, ids, mask: model(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid))
  a = run(*jax.tree.map(lambda x: x[0], shared).images(), shared.input_ids[0], shared.attention_mask[0])
  b = run(*jax.tree.map(lambda x: x[0], ref).images(), ref.input_ids[0], ref.attention_mask[0])
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_shared_layout_gradient_equals_row_order_layout():
  """Through the joint [original ; masked] path (gradient through both encodings and the gather)."""
  model = _model()
  graphdef, params = nnx.split(model)
  groups = make_groups(model, ROWS, GRIDS, n=N, seed=3)
  arrays = batching.assemble_train_batch(groups, micro_batches=1, pad_id=H.PAD_ID, shards=3, patch_multiple=16)
  shared = TrainBatch(**{k: jnp.asarray(v) for k, v in arrays.items()})
  assert shared.pixel_values.shape[1] == 3
  cfg = StepConfig(loss=LossConfig(gamma=0.05, eta_mask=0.05, eta_ori=0.05), mask_grad=True, logprob_chunk=4)
  grad_fn = jax.jit(make_grad_fn(graphdef, cfg))
  g_shared, l_shared, _ = grad_fn(params, None, shared)
  g_ref, l_ref, _ = grad_fn(params, None, row_order_batch(groups, N))
  np.testing.assert_allclose(float(l_shared), float(l_ref), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(_flat(g_shared), _flat(g_ref), rtol=1e-4, atol=1e-7)
  assert np.abs(_flat(g_ref["visual"])).max() > 0   # the vision tower gets a gradient


def _vision_flops(model, devices: int, shared: bool) -> float:
  """Per-device FLOPs of encoding 8 images (one per row shard) on a data mesh of ``devices``."""
  graphdef, params = nnx.split(model.visual)
  mesh = make_mesh(data=devices, fsdp=1, tensor=1, devices=jax.devices()[:devices])
  pv = jnp.ones((8, 64, model.config.vision.patch_dim))
  grid = jnp.tile(jnp.asarray([[[1, 8, 8]]], jnp.int32), (8, 1, 1))

  def encode(p, pv, grid):
    with use_mesh_rules(mesh):
      tower = nnx.merge(graphdef, p)
      if shared:
        return encode_shards(tower, SharedImages(pv, grid, jnp.zeros((8,), jnp.int32)))
      return tower(pv.reshape(-1, pv.shape[-1]), grid.reshape(-1, 3))   # one replicated patch list

  rows = NamedSharding(mesh, PartitionSpec("data"))
  whole = NamedSharding(mesh, PartitionSpec())
  in_sh = (whole, rows, rows) if shared else (whole, whole, whole)
  compiled = jax.jit(encode, in_shardings=in_sh).lower(params, pv, grid).compile()
  return float(compiled.cost_analysis()["flops"])


def test_per_device_vision_flops_fall_with_devices():
  model = _model()
  flops = {d: _vision_flops(model, d, shared=True) for d in (1, 2, 4, 8)}
  for d in (2, 4, 8):
    np.testing.assert_allclose(flops[d], flops[1] / d, rtol=0.05)
  # The replicated patch list does not scale: every device encodes every image.
  replicated = _vision_flops(model, 8, shared=False)
  assert replicated > 0.9 * flops[1]
