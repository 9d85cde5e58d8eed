"""The per-shard vision tower under a mesh runs in a shard_map (so Pallas kernels see local
arrays): same features and weight gradients as without a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import hf_utils as H
from papo_jax import models
from papo_jax.models.vision import SharedImages, encode_shards
from papo_jax.parallel import make_mesh, use_mesh_rules


def test_encode_shards_under_a_mesh_matches_unsharded_values_and_grads():
  hf = H.tiny_hf_config(tie=True)
  model = models.init_model(models.from_hf_dict(hf.to_dict(), dtype="float32").replace(hf_dict=None), seed=0)
  graphdef, params = nnx.split(model.visual)
  mesh = make_mesh(data=2, fsdp=2, tensor=1, devices=jax.devices()[:4])
  pv = jax.random.normal(jax.random.key(1), (4, 64, model.config.vision.patch_dim))
  grid = jnp.asarray([[[1, 8, 8]], [[1, 4, 8]], [[1, 8, 4]], [[1, 8, 8]]], jnp.int32)
  w = jax.random.normal(jax.random.key(2), (4, 16, model.config.text.hidden_size))

  def loss(p, pv, mesh_):
    with use_mesh_rules(mesh_):
      feats = encode_shards(nnx.merge(graphdef, p), SharedImages(pv, grid, jnp.zeros((4,), jnp.int32)))
    return jnp.sum(feats[:, :16] * w), feats

  (l0, f0), g0 = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, None), has_aux=True))(params, pv)
  assert "shard_map" in str(jax.make_jaxpr(lambda p, x: loss(p, x, mesh)[0])(params, pv))
  (l1, f1), g1 = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, mesh), has_aux=True))(params, pv)
  np.testing.assert_allclose(np.asarray(f1), np.asarray(f0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(t)])
  np.testing.assert_allclose(flat(g1), flat(g0), rtol=1e-4, atol=1e-5)   # a per-shard sum order
  assert np.abs(flat(g0)).max() > 0
