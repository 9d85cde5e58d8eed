"""Tests for papo_jax.rl.losses against a NumPy float64 reference written from papo.md section 2."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from papo_jax.rl import losses

B, T = 8, 48
TOL = 1e-6

# ----------------------------------------------------------------------------------
# Independent float64 reference (spec formulas, nothing shared with the code under test).
# ----------------------------------------------------------------------------------


def ref_agg(x, m, mode):
  x, m = np.asarray(x, np.float64), np.asarray(m, np.float64)
  if mode == 'token':
    return (x * m).sum() / (m.sum() + 1e-8)
  n = m.sum(-1)
  seq = (x * m).sum(-1) / (n + 1e-8)
  has = (n > 0).astype(np.float64)
  return (seq * has).sum() / (has.sum() + 1e-8)


def ref_k3(lp, lp_other):
  x = np.clip(np.float64(lp_other) - np.float64(lp), -20, 20)
  return np.clip(np.exp(x) - x - 1, -10, 10)


def ref_pg(lp, lp_old, a, eps_low, eps_high, c):
  d = np.clip(np.float64(lp) - np.float64(lp_old), -20, 20)
  ratio = np.exp(d)
  cratio = np.exp(np.clip(d, np.log(1 - eps_low), np.log(1 + eps_high)))
  pg = np.maximum(-a * ratio, -a * cratio)
  return np.where(a < 0, np.minimum(pg, -a * c), pg)


def ref_top_mask(score, m, frac):
  out = np.zeros_like(m, dtype=np.float64)
  for i in range(m.shape[0]):
    valid = np.flatnonzero(m[i] > 0)
    n_keep = math.ceil(frac * len(valid) - 1e-4)
    best = valid[np.argsort(-score[i, valid], kind='stable')[:n_keep]]
    out[i, best] = 1.0
  return out


def ref_total(inp, cfg, gamma=None, scale=1.0):
  lp, old, ref, msk, a, m = (inp[k] for k in ('lp', 'old', 'ref', 'mask_lp', 'adv', 'm'))
  a = np.broadcast_to(a[:, None] if a.ndim == 1 else a, lp.shape).astype(np.float64)
  gamma = cfg.gamma if gamma is None else gamma
  agg = lambda x, mm=m: ref_agg(x, mm, cfg.agg)
  k = ref_k3(lp, msk)
  m_prcp = m
  if cfg.kl_prcp_top_frac is not None:
    m_prcp = ref_top_mask(k, m, cfg.kl_prcp_top_frac)
  if cfg.kl_prcp_clamp is not None:
    k = np.clip(k, *cfg.kl_prcp_clamp)
  total = (agg(ref_pg(lp, old, a, cfg.eps_low, cfg.eps_high, cfg.dual_clip))
           + cfg.beta * agg(ref_k3(lp, ref))
           - gamma * agg(k, m_prcp)
           + cfg.eta_ori * scale * agg(-np.float64(lp))
           + cfg.eta_mask * scale * agg(-np.float64(msk)))
  return total


def make_inputs(seed=0, per_token_adv=False):
  """Random inputs on which every clamp of the spec binds somewhere."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, T + 1, size=B)
  lengths[3] = 0  # an empty response (all padding)
  m = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
  lp = -rng.exponential(1.5, size=(B, T))
  d = rng.normal(0, 0.4, size=(B, T))  # ratios on both sides of [1 - eps_low, 1 + eps_high]
  pick = rng.random((B, T))
  d[pick < 0.05] = 24.0   # d beyond +20
  d[(pick >= 0.05) & (pick < 0.1)] = -23.0  # d beyond -20
  old = lp - d
  ref = lp + rng.normal(0, 0.5, size=(B, T))
  ref[pick > 0.93] += 6.0  # k3 > 10
  msk = lp + rng.normal(0, 1.0, size=(B, T))
  msk[pick > 0.9] += 4.0
  msk[pick < 0.02] -= 25.0  # x below -20
  adv = rng.normal(0, 1.5, size=(B, T) if per_token_adv else (B,))
  f32 = lambda x: np.asarray(x, np.float32)
  return {'lp': f32(lp), 'old': f32(old), 'ref': f32(ref), 'mask_lp': f32(msk), 'adv': f32(adv),
          'm': m}


def call(inp, cfg, **kw):
  return losses.papo_loss(inp['lp'], inp['old'], inp['ref'], inp['mask_lp'], inp['adv'],
                          inp['m'], cfg, **kw)


# ----------------------------------------------------------------------------------
# Values.
# ----------------------------------------------------------------------------------


def test_inputs_hit_every_clamp():
  inp = make_inputs()
  m = inp['m'] > 0
  d = inp['lp'].astype(np.float64) - inp['old']
  assert (d[m] > 20).any() and (d[m] < -20).any()
  ratio = np.exp(np.clip(d, -20, 20))
  assert (ratio[m] < 0.8).any() and (ratio[m] > 1.3).any()
  for other in ('ref', 'mask_lp'):
    x = inp[other].astype(np.float64) - inp['lp']
    assert (np.exp(x) - x - 1)[m].max() > 10
  a = np.broadcast_to(inp['adv'][:, None], d.shape)
  pg_unclipped = np.maximum(-a * ratio, -a * np.exp(np.clip(d, np.log(0.8), np.log(1.3))))
  assert ((a < 0) & (pg_unclipped > -a * 3.0) & m).any()  # the dual clip binds


@pytest.mark.parametrize('per_token_adv', [False, True])
def test_ppo_term_and_clip_metrics(per_token_adv):
  inp = make_inputs(1, per_token_adv)
  cfg = losses.LossConfig(eps_low=0.2, eps_high=0.28)
  a = np.broadcast_to(inp['adv'][:, None] if inp['adv'].ndim == 1 else inp['adv'], inp['lp'].shape)
  pg_BxT, _ = losses.ppo_dual_clip(inp['lp'], inp['old'], a, 0.2, 0.28, 3.0)
  pg_ref = ref_pg(inp['lp'], inp['old'], a, 0.2, 0.28, 3.0)
  assert np.abs(np.asarray(pg_BxT) - pg_ref).max() <= TOL
  loss, met = call(inp, cfg)
  m = inp['m']
  assert abs(float(met['actor/pg_loss']) - ref_agg(pg_ref, m, 'token')) <= TOL
  assert abs(float(loss) - ref_agg(pg_ref, m, 'token')) <= TOL  # all other coefficients are 0
  d = inp['lp'].astype(np.float64) - inp['old']
  ratio = np.exp(np.clip(d, -20, 20))
  for key, flag in [('actor/clipfrac_high', (a > 0) & (ratio > 1.28)),
                    ('actor/clipfrac_low', (a < 0) & (ratio < 0.8))]:
    assert abs(float(met[key]) - ref_agg(flag, m, 'token')) <= TOL
    assert float(met[key]) > 0
  pg_max = np.maximum(-a * ratio, -a * np.exp(np.clip(d, np.log(0.8), np.log(1.28))))
  dual = (a < 0) & (pg_max > -a * 3.0)
  assert abs(float(met['actor/dual_clip_frac']) - ref_agg(dual, m, 'token')) <= TOL
  assert abs(float(met['actor/ppo_kl']) - ref_agg(inp['old'] - np.float64(inp['lp']), m, 'token')) <= TOL


def test_k3_against_reference():
  inp = make_inputs(2)
  for other in ('ref', 'mask_lp'):
    got = np.asarray(losses.k3(inp['lp'], inp[other]))
    want = ref_k3(inp['lp'], inp[other])
    assert np.abs(got - want).max() <= 2e-6 * np.maximum(1.0, np.abs(want)).max()
    assert np.abs(ref_agg(got, inp['m'], 'token') - ref_agg(want, inp['m'], 'token')) <= TOL


@pytest.mark.parametrize('agg', losses.AGG_MODES)
def test_each_term_and_total_against_reference(agg):
  inp = make_inputs(3)
  m = inp['m']
  cfg = losses.LossConfig(eps_low=0.2, eps_high=0.3, beta=0.01, gamma=0.02, eta_ori=0.05,
                          eta_mask=0.04, agg=agg)
  loss, met = call(inp, cfg)
  lp64 = np.float64(inp['lp'])
  assert abs(float(met['actor/kl_ref']) - ref_agg(ref_k3(lp64, inp['ref']), m, agg)) <= TOL
  kl_prcp = ref_agg(ref_k3(lp64, inp['mask_lp']), m, agg)
  assert kl_prcp > 0 and abs(float(met['actor/kl_prcp']) - kl_prcp) <= TOL  # positive
  assert abs(float(met['actor/entropy_ori']) - ref_agg(-lp64, m, 'token')) <= TOL
  assert abs(float(met['actor/entropy_mask']) - ref_agg(-np.float64(inp['mask_lp']), m, 'token')) <= TOL
  want = ref_total(inp, cfg)
  assert abs(float(loss) - want) <= TOL
  assert abs(float(met['actor/loss']) - want) <= TOL
  # Each term on its own.
  for field, value in [('beta', 0.5), ('gamma', 0.5), ('eta_ori', 0.5), ('eta_mask', 0.5)]:
    c = losses.LossConfig(agg=agg, **{field: value})
    assert abs(float(call(inp, c)[0]) - ref_total(inp, c)) <= TOL, field


def test_gamma_is_subtracted():
  inp = make_inputs(4)
  base = float(call(inp, losses.LossConfig())[0])
  with_g = float(call(inp, losses.LossConfig(gamma=0.1))[0])
  kl = ref_agg(ref_k3(inp['lp'], inp['mask_lp']), inp['m'], 'token')
  assert abs((with_g - base) - (-0.1 * kl)) <= TOL and with_g < base


def test_guards_against_reference():
  inp = make_inputs(5)
  for clamp, frac in [((0.0, 0.2), None), (None, 0.2), ((0.0, 0.2), 0.2), ((0.05, 1.0), 0.5)]:
    cfg = losses.LossConfig(gamma=0.02, beta=0.01, kl_prcp_clamp=clamp, kl_prcp_top_frac=frac)
    loss, met = call(inp, cfg)
    assert abs(float(loss) - ref_total(inp, cfg)) <= TOL, (clamp, frac)
    k = ref_k3(inp['lp'], inp['mask_lp'])
    m_prcp = ref_top_mask(k, inp['m'], frac) if frac else inp['m']
    k = np.clip(k, *clamp) if clamp else k
    assert abs(float(met['actor/kl_prcp_guarded']) - ref_agg(k, m_prcp, 'token')) <= TOL
  mask = np.asarray(losses.top_frac_mask(k, inp['m'], 0.2))
  np.testing.assert_array_equal(mask.sum(-1), [math.ceil(0.2 * n - 1e-4) for n in inp['m'].sum(-1)])


# ----------------------------------------------------------------------------------
# Gradients: every term reaches the gradient (the authors' Qwen3 branch lost them).
# ----------------------------------------------------------------------------------


def _grads(inp, cfg, argnums=0, **kw):
  def f(lp, mask_lp):
    return losses.papo_loss(lp, inp['old'], inp['ref'], mask_lp, inp['adv'], inp['m'], cfg, **kw)[0]
  return np.asarray(jax.grad(f, argnums=argnums)(jnp.asarray(inp['lp']), jnp.asarray(inp['mask_lp'])))


@pytest.mark.parametrize('field,argnum', [('beta', 0), ('gamma', 0), ('eta_ori', 0),
                                          ('gamma', 1), ('eta_mask', 1)])
def test_each_term_reaches_the_gradient(field, argnum):
  inp = make_inputs(6)
  base = dict(beta=0.01, gamma=0.02, eta_ori=0.03, eta_mask=0.03)
  g = {}
  for c in (0.0, 0.05, 0.1):
    g[c] = _grads(inp, losses.LossConfig(**{**base, field: c}), argnum)
  diff = g[0.1] - g[0.05]
  assert np.abs(diff).max() > 1e-4, field  # changes with the coefficient
  np.testing.assert_allclose(g[0.05] - g[0.0], diff, atol=1e-6)  # linearly
  assert np.abs(g[0.05]).max() > 0
  assert np.all(diff[inp['m'] == 0] == 0)  # padding gets no gradient


def test_pg_gradient_nonzero_and_clipped_tokens_have_none():
  inp = make_inputs(7)
  g = _grads(inp, losses.LossConfig())
  assert np.abs(g).max() > 1e-4
  d = np.clip(np.float64(inp['lp']) - inp['old'], -20, 20)
  a = np.broadcast_to(inp['adv'][:, None], d.shape)
  cut = (a > 0) & (d > np.log(1.3)) | (np.abs(np.float64(inp['lp']) - inp['old']) > 20)
  assert np.all(g[cut] == 0)


def test_k3_upper_clip_zeroes_gradient():
  inp = make_inputs(8)
  g = _grads(inp, losses.LossConfig(beta=1.0))
  g0 = _grads(inp, losses.LossConfig())
  x = np.float64(inp['ref']) - inp['lp']
  over = (np.exp(x) - x - 1 > 10.5) & (inp['m'] > 0)
  assert over.any()
  np.testing.assert_allclose(g[over], g0[over], atol=1e-7)


def test_guard_gradients():
  inp = make_inputs(9)
  g0 = _grads(inp, losses.LossConfig(gamma=0.0))
  g = _grads(inp, losses.LossConfig(gamma=0.5, kl_prcp_clamp=(0.0, 2.0), kl_prcp_top_frac=0.5))
  k = ref_k3(inp['lp'], inp['mask_lp'])
  sel = ref_top_mask(k, inp['m'], 0.5) > 0
  moved = np.abs(g - g0) > 1e-9
  assert moved.any()
  assert not moved[~sel].any()  # unselected tokens get no perception-KL gradient
  assert not moved[sel & (k > 2.0 + 1e-4)].any()  # clamped tokens neither
  inside = sel & (k < 2.0 - 1e-4) & (k > 1e-4)
  assert inside.any() and moved[inside].all()


def test_gamma_step_increases_perception_kl():
  inp = make_inputs(10)
  cfg = losses.LossConfig(gamma=1.0)
  lp = jnp.asarray(inp['lp'])
  kl = lambda lp: call({**inp, 'lp': lp}, cfg)[1]['actor/kl_prcp']
  only_kl = lambda lp: call({**inp, 'lp': lp}, cfg)[0] - call({**inp, 'lp': lp}, losses.LossConfig())[0]
  lp_new = lp - 0.1 * jax.grad(only_kl)(lp)  # a gradient-descent step on -gamma * KL
  assert float(kl(lp_new)) > float(kl(lp))


def test_static_skips_and_missing_inputs():
  inp = make_inputs(11)
  cfg = losses.LossConfig(beta=0.0, gamma=0.02)
  def f(ref):
    return losses.papo_loss(inp['lp'], inp['old'], ref, inp['mask_lp'], inp['adv'], inp['m'], cfg)[0]
  assert np.all(np.asarray(jax.grad(f)(jnp.asarray(inp['ref']))) == 0)
  loss, met = losses.papo_loss(inp['lp'], inp['old'], None, None, inp['adv'], inp['m'],
                               losses.LossConfig(beta=0.01, gamma=0.02, eta_mask=0.1))
  assert 'actor/kl_ref' not in met and 'actor/kl_prcp' not in met and 'actor/entropy_mask' not in met
  assert abs(float(loss) - float(met['actor/pg_loss'])) <= TOL
  with pytest.raises(ValueError, match='advantages shape'):
    losses.papo_loss(inp['lp'], inp['old'], None, None, np.zeros(3), inp['m'], losses.LossConfig())
  with pytest.raises(ValueError, match='agg'):
    losses.LossConfig(agg='sum')
  with pytest.raises(ValueError, match='kl_prcp_top_frac'):
    losses.LossConfig(kl_prcp_top_frac=1.5)


# ----------------------------------------------------------------------------------
# Annealing: traced gamma / entropy_scale, one compilation.
# ----------------------------------------------------------------------------------


def test_gamma_schedule_values():
  for step, want in [(0, 0.02), (50, 0.015), (100, 0.01), (150, 0.01)]:
    g, s = losses.gamma_schedule(step, 100, 0.02, 0.01)
    assert abs(float(g) - want) < 1e-8 and abs(float(s) - want / 0.02) < 1e-6


def test_traced_gamma_and_entropy_scale_do_not_recompile():
  inp = make_inputs(12)
  cfg = losses.LossConfig(beta=0.01, gamma=0.02, eta_ori=0.03, eta_mask=0.03)
  traces = []

  @jax.jit
  def step(lp, step_i):
    traces.append(1)
    gamma, scale = losses.gamma_schedule(step_i, 100, 0.02, 0.0)
    return call({**inp, 'lp': lp}, cfg, gamma=gamma, entropy_scale=scale)

  for i in (0, 30, 60):
    loss, met = step(jnp.asarray(inp['lp']), i)
    gamma, scale = 0.02 * (1 - i / 100), 1 - i / 100
    assert abs(float(loss) - ref_total(inp, cfg, gamma=gamma, scale=scale)) <= TOL
    assert abs(float(met['actor/gamma']) - gamma) < 1e-8
  assert len(traces) == 1
