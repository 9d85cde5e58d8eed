"""The fused train step: log-probs, every loss term reaching the gradient, accumulation, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_utils as H
from rollouts import GRIDS, ROWS, T, build_batch
from rollouts import flat as _flat
from papo_jax import models
from papo_jax.parallel import make_mesh, shard_state, use_mesh_rules
from papo_jax.rl.losses import LossConfig, papo_loss, sequence_factors
from papo_jax.rl.train_step import (StepConfig, init_train_state, make_grad_fn, make_logprob_pass,
                                    make_optimizer, make_train_step, response_logprobs)


def tiny_model(seed=0):
  cfg = models.from_hf_dict(H.tiny_hf_config(tie=True).to_dict(), dtype="float32").replace(hf_dict=None)
  return models.init_model(cfg, seed=seed)


@pytest.fixture(scope="module")
def setup():
  model = tiny_model(0)
  graphdef, params = nnx.split(model)
  ref_params = nnx.split(tiny_model(1))[1]
  return model, graphdef, params, ref_params


def test_fused_logprobs_equal_separate_forwards(setup):
  model, graphdef, params, ref_params = setup
  batch = build_batch(model, ROWS, GRIDS, micro=1)
  cfg = StepConfig(loss=LossConfig(beta=0.01, gamma=0.02))
  old, masked, ref, dep = jax.jit(make_logprob_pass(graphdef, cfg))(params, ref_params, batch)
  assert dep is None                       # k3: the loss takes the dependency from the two log-probs
  micro = jax.tree.map(lambda a: a[0], batch)

  def separate(p, masked):
    m = nnx.merge(graphdef, p)
    pv, grid = micro.images(masked)
    return response_logprobs(m, micro.input_ids, micro.attention_mask, micro.position_ids, pv, grid, T, 4)

  sep = jax.jit(separate, static_argnums=1)
  np.testing.assert_allclose(old[0], sep(params, False), atol=1e-5)
  np.testing.assert_allclose(masked[0], sep(params, True), atol=1e-5)
  np.testing.assert_allclose(ref[0], sep(ref_params, False), atol=1e-5)
  # and against full logits from the model's plain forward, on the rows' images in row order
  ids_np, _, pv_np, grid_np = H.make_batch(ROWS, GRIDS, seed=0, patch=model.config.vision.patch_size)
  logits = jax.jit(lambda p: nnx.merge(graphdef, p)(micro.input_ids, attention_mask=micro.attention_mask,
                                                     pixel_values=jnp.asarray(pv_np),
                                                     image_grid_thw=jnp.asarray(grid_np)))(params)
  lp_full = jax.nn.log_softmax(logits[:, -T - 1:-1].astype(jnp.float32))
  lp_full = jnp.take_along_axis(lp_full, micro.input_ids[:, -T:, None], -1)[..., 0]
  valid = np.asarray(micro.response_mask, bool)
  np.testing.assert_allclose(np.asarray(old[0])[valid], np.asarray(lp_full)[valid], atol=1e-5)
  assert np.abs(np.asarray(masked[0]) - np.asarray(old[0]))[valid].max() > 1e-4  # pixels matter


def _grads(graphdef, params, ref_params, batch, **loss_kw):
  mask_grad = loss_kw.pop("mask_grad", False)
  cfg = StepConfig(loss=LossConfig(**loss_kw), mask_grad=mask_grad, logprob_chunk=4)
  g, loss, metrics = jax.jit(make_grad_fn(graphdef, cfg))(params, ref_params, batch)
  return _flat(g), float(loss), metrics


@pytest.mark.parametrize("term,base,changed", [
    ("beta", dict(beta=0.01), dict(beta=0.5)),
    ("gamma", dict(gamma=0.02), dict(gamma=0.5)),
    ("eta_ori", dict(eta_ori=0.05), dict(eta_ori=0.5)),
    ("eta_mask(mask_grad)", dict(eta_mask=0.05, gamma=0.01, mask_grad=True), dict(eta_mask=0.5, gamma=0.01, mask_grad=True)),
])
def test_every_term_reaches_the_parameter_gradient(setup, term, base, changed):
  """Changing only one coefficient changes the parameter gradient (the PAPO terms are not lost)."""
  model, graphdef, params, ref_params = setup
  batch = build_batch(model, ROWS, GRIDS, micro=1, seed=3)
  # Non-trivial ratios: old log-probs from another model so the PPO term is not the whole story.
  g0, _, _ = _grads(graphdef, params, ref_params, batch, **base)
  g1, _, _ = _grads(graphdef, params, ref_params, batch, **changed)
  rel = np.linalg.norm(g1 - g0) / np.linalg.norm(g0)
  assert rel > 1e-3, f"{term}: gradient unchanged (relative change {rel:.2e})"


def test_mask_grad_false_gradient_ignores_eta_mask(setup):
  model, graphdef, params, ref_params = setup
  batch = build_batch(model, ROWS, GRIDS, micro=1, seed=4)
  g0, l0, _ = _grads(graphdef, params, ref_params, batch, gamma=0.02, eta_mask=0.0)
  g1, l1, _ = _grads(graphdef, params, ref_params, batch, gamma=0.02, eta_mask=0.5)
  np.testing.assert_array_equal(g0, g1)
  assert l1 != l0  # the masked entropy still shows in the logged loss


def test_perception_kl_term_matches_finite_difference_of_gamma(setup):
  """The gradient is linear in gamma (the perception KL's coefficient); gamma is a runtime
  scalar, so one compiled grad function serves every value."""
  model, graphdef, params, ref_params = setup
  batch = build_batch(model, ROWS, GRIDS, micro=1, seed=5)
  cfg = StepConfig(loss=LossConfig(gamma=0.2), logprob_chunk=4)
  grad_fn = jax.jit(make_grad_fn(graphdef, cfg))
  run = lambda gamma: grad_fn(params, ref_params, batch, jnp.float32(gamma))
  (g_a, _, m_a), (g_0, _, _), (g_b, _, _) = run(0.1), run(0.2), run(0.3)
  assert grad_fn._cache_size() == 1
  g_a, g_0, g_b = _flat(g_a), _flat(g_0), _flat(g_b)
  np.testing.assert_allclose(g_b - g_0, g_0 - g_a, atol=1e-6, rtol=1e-3)  # linear in gamma
  assert np.linalg.norm(g_b - g_a) > 1e-3 * np.linalg.norm(g_0)           # and gamma matters
  assert float(m_a["actor/kl_prcp"]) > 0


def test_micro_batch_accumulation_equals_one_batch(setup):
  model, graphdef, params, ref_params = setup
  kw = dict(beta=0.01, gamma=0.02, eta_ori=0.03)
  one = build_batch(model, ROWS, GRIDS, micro=1, seed=6)
  two = build_batch(model, ROWS, GRIDS, micro=2, seed=6)
  g1, l1, m1 = _grads(graphdef, params, ref_params, one, **kw)
  g2, l2, m2 = _grads(graphdef, params, ref_params, two, **kw)
  np.testing.assert_allclose(l2, l1, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g2, g1, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(float(m2["actor/kl_prcp"]), float(m1["actor/kl_prcp"]), rtol=1e-5)


def test_train_step_update_and_nonfinite_skip(setup):
  model, graphdef, params, ref_params = setup
  tx = make_optimizer(1e-3)
  cfg = StepConfig(loss=LossConfig(beta=0.01, gamma=0.02), logprob_chunk=4)
  step = jax.jit(make_train_step(graphdef, tx, cfg))
  state = init_train_state(params, tx)
  new, metrics = step(state, ref_params, build_batch(model, ROWS, GRIDS, micro=2, seed=7))
  assert int(new.step) == 1 and float(metrics["actor/skipped_nonfinite"]) == 0
  assert np.abs(_flat(new.params) - _flat(params)).max() > 0
  bad, metrics = step(new, ref_params, build_batch(model, ROWS, GRIDS, micro=2, seed=7, nan_adv=True))
  assert float(metrics["actor/skipped_nonfinite"]) == 1 and int(bad.step) == 1
  np.testing.assert_array_equal(_flat(bad.params), _flat(new.params))
  np.testing.assert_array_equal(_flat(bad.opt_state), _flat(new.opt_state))


def test_grpo_skips_masked_forward(setup):
  """gamma = 0 and no entropy terms: no masked pixels are needed at all (the masked forward is skipped)."""
  model, graphdef, params, ref_params = setup
  batch = build_batch(model, ROWS, GRIDS, micro=1, seed=8)
  batch = batch.replace(masked_pixel_values=None)
  g, loss, metrics = _grads(graphdef, params, ref_params, batch, beta=0.01)
  assert np.isfinite(g).all() and "actor/kl_prcp" not in metrics


def test_precomputed_minibatch_path_matches_fused(setup):
  """With old/mask/ref log-probs from the fused no-grad pass, the first mini-batch's gradient equals the fused step's."""
  model, graphdef, params, ref_params = setup
  kw = dict(beta=0.01, gamma=0.02)
  batch = build_batch(model, ROWS, GRIDS, micro=2, seed=9)
  cfg = StepConfig(loss=LossConfig(**kw), logprob_chunk=4)
  old, masked, ref, _ = jax.jit(make_logprob_pass(graphdef, cfg))(params, ref_params, batch)
  pre = batch.replace(old_logp=old, mask_logp=masked, ref_logp=ref)
  g_f, l_f, _ = _grads(graphdef, params, ref_params, batch, **kw)
  g_p, l_p, _ = _grads(graphdef, params, None, pre, **kw)
  np.testing.assert_allclose(l_p, l_f, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_p, g_f, rtol=1e-4, atol=1e-7)


def test_sharded_update_equals_single_device(setup):
  """8 fake devices (data x fsdp x tensor = 2x2x2): same gradient, same update."""
  model, graphdef, params, ref_params = setup
  tx = make_optimizer(1e-3)
  cfg = StepConfig(loss=LossConfig(beta=0.01, gamma=0.02, eta_ori=0.01), logprob_chunk=4)
  batch = build_batch(model, ROWS, GRIDS, micro=2, seed=10)
  step = make_train_step(graphdef, tx, cfg)
  grad_fn = make_grad_fn(graphdef, cfg)
  g_ref, _, _ = jax.jit(grad_fn)(params, ref_params, batch)
  ref_state, _ = jax.jit(step)(init_train_state(params, tx), ref_params, batch)
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  p_sh, r_sh = shard_state(params, mesh), shard_state(ref_params, mesh)

  def sharded(fn):
    def run(*args):
      with use_mesh_rules(mesh):
        return fn(*args)
    return jax.jit(run)

  g_sh, _, _ = sharded(grad_fn)(p_sh, r_sh, batch)
  np.testing.assert_allclose(_flat(g_sh), _flat(g_ref), atol=1e-6, rtol=1e-4)
  out, _ = sharded(step)(init_train_state(p_sh, tx), r_sh, batch)
  a, b, g = _flat(out.params), _flat(ref_state.params), _flat(g_ref)
  # Entries with a clear gradient get the same update.
  clear = np.abs(g) > 1e-5
  np.testing.assert_allclose(a[clear], b[clear], atol=2e-6)
  assert clear.mean() > 0.5
  # Everywhere, each update is the exact first AdamW step of its own gradient (clipped to
  # global norm 1): p - lr * (g / (|g| + eps) + wd * p). Near-zero entries, where
  # g / (|g| + eps) turns rounding into a different step, are checked against their own g.
  p0 = _flat(params)

  def first_adamw_step(g):
    gc = g * min(1.0, 1.0 / np.linalg.norm(g))
    return p0 - 1e-3 * (gc / (np.abs(gc) + 1e-8) + 0.01 * p0)

  np.testing.assert_allclose(b, first_adamw_step(g), atol=2e-6)
  np.testing.assert_allclose(a, first_adamw_step(_flat(g_sh)), atol=2e-6)


# -- VPPO / adaptive gamma: per-sequence factors over the whole update batch ------------------

# Every option on; gamma large enough that the adaptive factor moves the gradient clearly.
VPPO_KW = dict(gamma=0.3, eta_ori=0.06, vppo_top_frac=0.4, vppo_adv_scale_min=0.9, adaptive_gamma=True, group_size=2)


@pytest.fixture(scope="module")
def vppo_case(setup):
  """8 rows (4 prompts x n=2) as one and as two micro-batches, with old and masked-image log-probs
  from the no-grad pass of another policy (non-trivial ratios and dependencies)."""
  model, graphdef, params, ref_params = setup
  cfg = StepConfig(loss=LossConfig(**VPPO_KW), logprob_chunk=4)
  one = build_batch(model, ROWS, GRIDS, micro=1, n=2, seed=11)
  old, masked, _, _ = jax.jit(make_logprob_pass(graphdef, cfg))(ref_params, None, one)
  one = one.replace(old_logp=old, mask_logp=masked)
  two = build_batch(model, ROWS, GRIDS, micro=2, n=2, seed=11)   # the same rows, group-major
  two = two.replace(old_logp=old.reshape(2, 4, T), mask_logp=masked.reshape(2, 4, T))
  step = lambda c, b: jax.jit(make_grad_fn(graphdef, c))(params, None, b, jnp.float32(VPPO_KW["gamma"]))
  g1, l1, m1 = step(cfg, one)
  g2, l2, _ = step(cfg, two)
  micro = jax.tree.map(lambda a: a[0], one)
  pv, grid = micro.images()

  @jax.jit
  def reference(p, adv_scale_B, gamma_factor_B):
    """papo_loss on all 8 rows at once with the given per-sequence factors: (grads, loss)."""
    def loss(p):
      lp = response_logprobs(nnx.merge(graphdef, p), micro.input_ids, micro.attention_mask, micro.position_ids,
                             pv, grid, T, 4)
      return papo_loss(lp, micro.old_logp, None, micro.mask_logp, micro.advantages, micro.response_mask, cfg.loss,
                       adv_scale_B=adv_scale_B, gamma_factor_B=gamma_factor_B)[0]
    l, g = jax.value_and_grad(loss)(p)
    return g, l

  return dict(cfg=cfg, one=one, two=two, g1=_flat(g1), l1=float(l1), m1=m1, g2=_flat(g2), l2=float(l2),
              reference=lambda a, f: tuple(np.asarray(x) if i else _flat(x)
                                           for i, x in enumerate(reference(params, a, f))), step=step)


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_vppo_step_equals_whole_batch_reference_for_any_micro_batch_split(vppo_case):
  """The step's gradient is papo_loss's on all rows with factors normalised over all rows, for M=1 and
  M=2; factors normalised per micro-batch, or with a sign/scale error, would be told apart."""
  case = vppo_case
  one = case["one"]
  fac = sequence_factors(case["cfg"].loss, one.old_logp, one.mask_logp, one.response_mask)
  adv_s, gam_f = np.asarray(fac["adv_scale"][0]), np.asarray(fac["gamma_factor"][0])
  assert np.ptp(adv_s) > 0.05 and np.ptp(gam_f) > 0.3   # the factors are not trivially 1
  g_ref, l_ref = case["reference"](adv_s, gam_f)
  tol = 1e-5
  assert _rel(case["g1"], g_ref) < tol and _rel(case["g2"], g_ref) < tol
  np.testing.assert_allclose([case["l1"], case["l2"]], float(l_ref), rtol=1e-5)
  # What the check would catch: each micro-batch normalising its own rows ...
  two = case["two"]
  per_micro = [sequence_factors(case["cfg"].loss, two.old_logp[i], two.mask_logp[i], two.response_mask[i])
               for i in range(2)]
  g_pm, _ = case["reference"](*(np.concatenate([f[k] for f in per_micro]) for k in ("adv_scale", "gamma_factor")))
  assert _rel(g_pm, g_ref) > 100 * tol
  # ... the advantage scale mirrored about 1 or stretched, the gamma factor scaled.
  for a, f in ((2.0 - adv_s, gam_f), (1.0 + 1.5 * (adv_s - 1.0), gam_f), (adv_s, 1.5 * gam_f)):
    assert _rel(case["reference"](a, f)[0], g_ref) > 100 * tol


def test_vppo_terms_reach_the_step_gradient(vppo_case, setup):
  """The advantage scale and the adaptive gamma factor move the step's gradient (it equals the reference
  with them, which differs from the reference with factors 1), and so does the token mask."""
  case = vppo_case
  ones = np.ones(8, np.float32)
  one = case["one"]
  fac = sequence_factors(case["cfg"].loss, one.old_logp, one.mask_logp, one.response_mask)
  g_ref, _ = case["reference"](np.asarray(fac["adv_scale"][0]), np.asarray(fac["gamma_factor"][0]))
  assert _rel(case["reference"](ones, np.asarray(fac["gamma_factor"][0]))[0], g_ref) > 1e-3   # adv_scale_min
  assert _rel(case["reference"](np.asarray(fac["adv_scale"][0]), ones)[0], g_ref) > 1e-3      # adaptive_gamma
  no_mask = StepConfig(loss=LossConfig(**{**VPPO_KW, "vppo_top_frac": None}), logprob_chunk=4)
  g_nm, _, _ = case["step"](no_mask, one)
  assert _rel(_flat(g_nm), case["g1"]) > 1e-3                                                 # top_frac
  m = case["m1"]
  assert 0.4 <= float(m["vppo/token_frac"]) < 0.7 and float(m["papo/gamma_factor_mean"]) > 0
  assert abs(float(m["vppo/adv_scale_mean"]) - 1.0) < 0.2


def test_vppo_factors_need_the_logprob_pass(setup):
  """Whole-batch factors without precomputed log-probs are refused; the token mask alone runs fused."""
  model, graphdef, params, ref_params = setup
  batch = build_batch(model, ROWS, GRIDS, micro=1, n=2, seed=12)
  for kw in (dict(vppo_adv_scale_min=0.9), dict(gamma=0.02, adaptive_gamma=True, group_size=2)):
    cfg = StepConfig(loss=LossConfig(**kw), logprob_chunk=4)
    assert cfg.needs_mask and cfg.needs_logprob_pass
    with pytest.raises(ValueError, match="make_logprob_pass"):
      jax.eval_shape(make_grad_fn(graphdef, cfg), params, None, batch)
  cfg = StepConfig(loss=LossConfig(vppo_top_frac=0.4), logprob_chunk=4)
  assert cfg.needs_mask and not cfg.needs_logprob_pass
  assert not StepConfig(loss=LossConfig()).needs_mask


def test_full_kl_dependency_comes_from_the_pass_and_reaches_the_gradient(setup):
  """vppo_dependency='full_kl': the log-prob pass returns KL(pi(.|image) || pi(.|masked image)) over the
  whole vocabulary at every response position (float64 reference from full logits), and the step's
  token mask and advantage scale read it: another dependency gives another gradient."""
  from papo_jax.rl.train_step import with_masked_copy
  model, graphdef, params, ref_params = setup
  kw = dict(vppo_top_frac=0.4, vppo_adv_scale_min=0.9, vppo_dependency="full_kl", group_size=2)
  cfg = StepConfig(loss=LossConfig(**kw), logprob_chunk=4)
  assert cfg.needs_logprob_pass and StepConfig(loss=LossConfig(vppo_top_frac=0.4, vppo_dependency="full_kl")
                                               ).needs_logprob_pass   # the token mask alone needs it too
  batch = build_batch(model, ROWS, GRIDS, micro=1, n=2, seed=13)
  old, masked, ref, dep = jax.jit(make_logprob_pass(graphdef, cfg))(params, None, batch)
  assert ref is None and dep.shape == old.shape
  micro = jax.tree.map(lambda a: a[0], batch)
  ids, am, pos, pv, grid = with_masked_copy(model, micro)
  logits = np.asarray(jax.jit(lambda p: nnx.merge(graphdef, p)(ids, attention_mask=am, pixel_values=pv,
                                                              image_grid_thw=grid, position_ids=pos))(params),
                      np.float64)[:, -T - 1:-1]
  b = micro.input_ids.shape[0]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  kl_ref = (np.exp(logp[:b]) * (logp[:b] - logp[b:])).sum(-1)
  valid = np.asarray(micro.response_mask, bool)
  np.testing.assert_allclose(np.asarray(dep[0])[valid], kl_ref[valid], rtol=1e-3, atol=1e-6)
  assert kl_ref[valid].max() > 1e-4                                    # the masked image matters
  full = batch.replace(old_logp=old, mask_logp=masked, dependency=dep)
  grad = jax.jit(make_grad_fn(graphdef, cfg))
  g_full = _flat(grad(params, None, full)[0])
  g_other = _flat(grad(params, None, full.replace(dependency=dep[..., ::-1]))[0])
  assert _rel(g_other, g_full) > 1e-3
