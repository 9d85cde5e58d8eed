"""Rematerialisation: the functional checkpoint works inside traced code and changes no number."""

import jax
import numpy as np
import pytest
from flax import nnx

import hf_utils as H
from papo_jax import models
from papo_jax.models.layers import resolve_remat
from papo_jax.rl.losses import LossConfig
from papo_jax.rl.train_step import StepConfig, make_grad_fn, make_logprob_pass
from rollouts import GRIDS, ROWS, build_batch


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _models(family: str, remat):
  hf = H.tiny_hf_config(tie=True) if family == "qwen2_5_vl" else H.tiny_qwen3_hf_config(tie=True)
  cfg = models.from_hf_dict(hf.to_dict(), dtype="float32").replace(hf_dict=None)
  on = models.init_model(cfg.replace(remat=remat), seed=0)
  off = models.init_model(cfg.replace(remat=False), seed=0)
  return on, off


def test_resolve_remat():
  assert resolve_remat(True) == ("full", "full")
  assert resolve_remat(False) == ("none", "none")
  assert resolve_remat("dots_saveable") == ("dots_saveable", "dots_saveable")
  assert resolve_remat("text=dots_saveable,vision=full") == ("dots_saveable", "full")
  assert resolve_remat("vision=full") == ("none", "full")
  with pytest.raises(ValueError, match="model.remat"):
    resolve_remat("text=fastest")
  with pytest.raises(ValueError, match="model.remat"):
    resolve_remat("audio=full")


@pytest.mark.parametrize("family,remat", [("qwen2_5_vl", True), ("qwen3_vl", "text=dots_saveable,vision=full")])
def test_remat_train_step_and_logprob_pass_equal_no_remat(family, remat):
  """remat on, through the fused step (scan body, masked path, reference model) and the
  log-prob pass (lax.map): the merge inside traced code used to raise TraceContextError."""
  on, off = _models(family, remat)
  g_on, p_on = nnx.split(on)
  g_off, p_off = nnx.split(off)
  batch = build_batch(off, ROWS, GRIDS, micro=2, seed=11)
  cfg = StepConfig(loss=LossConfig(beta=0.01, gamma=0.02, eta_ori=0.01), logprob_chunk=4)
  grads_on, loss_on, _ = jax.jit(make_grad_fn(g_on, cfg))(p_on, p_on, batch)
  grads_off, loss_off, _ = jax.jit(make_grad_fn(g_off, cfg))(p_off, p_off, batch)
  np.testing.assert_allclose(float(loss_on), float(loss_off), rtol=1e-6, atol=1e-8)
  a, b = _flat(grads_on), _flat(grads_off)
  assert np.abs(b).max() > 0
  # Recomputation may fuse and round differently (f32): every entry agrees to 1e-5 of the
  # largest gradient entry and the whole vector to 1e-6 relative; a remat bug is O(1).
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
  assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(b)
  lp_on = jax.jit(make_logprob_pass(g_on, cfg))(p_on, p_on, batch)
  lp_off = jax.jit(make_logprob_pass(g_off, cfg))(p_off, p_off, batch)
  for a, b in zip(lp_on[:3], lp_off[:3]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_remat_with_mask_grad_equals_no_remat():
  on, off = _models("qwen2_5_vl", True)
  batch = build_batch(off, ROWS, GRIDS, micro=1, seed=12)
  cfg = StepConfig(loss=LossConfig(gamma=0.02, eta_mask=0.05), mask_grad=True, logprob_chunk=4)
  (g_on, p_on), (g_off, p_off) = nnx.split(on), nnx.split(off)
  a = jax.jit(make_grad_fn(g_on, cfg))(p_on, None, batch)[0]
  b = jax.jit(make_grad_fn(g_off, cfg))(p_off, None, batch)[0]
  np.testing.assert_allclose(_flat(a), _flat(b), rtol=1e-5, atol=1e-7)


def test_remat_policy_changes_the_program():
  """The checkpoint is really applied: the rematerialised backward recomputes the forward."""
  on, off = _models("qwen2_5_vl", True)
  ids, mask, pv, grid = H.make_batch(ROWS, GRIDS, seed=0)

  def loss(model_params, graphdef):
    m = nnx.merge(graphdef, model_params)
    return m(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid).sum()

  def jaxpr_text(model):
    g, p = nnx.split(model)
    return str(jax.make_jaxpr(jax.grad(lambda q: loss(q, g)))(p))

  assert "remat" in jaxpr_text(on) or "checkpoint" in jaxpr_text(on)
  assert "remat" not in jaxpr_text(off) and "checkpoint" not in jaxpr_text(off)
