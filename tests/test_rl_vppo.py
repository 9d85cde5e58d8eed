"""Tests for papo_jax.rl.vppo and the VPPO / adaptive-gamma options of papo_jax.rl.losses.

References are float64 NumPy transcriptions of the definitions in VPPO-RL's
verl/workers/actor/dp_actor.py (update_policy) and verl/trainer/core_algos.py
(compute_policy_loss with loss_token_mask), written independently of the code under test.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from papo_jax.rl import losses
from papo_jax.rl import vppo

B, T = 16, 24
TOL = 1e-6


def make_inputs(seed=0, b=B, t=T):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, t + 1, size=b)
  lengths[5] = 0  # a padding row
  m = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
  lp = -rng.exponential(1.2, size=(b, t))
  old = lp + rng.normal(0, 0.1, size=(b, t))  # ratios near 1, a few clipped
  x = rng.normal(0, 0.8, size=(b, t)) * rng.exponential(1.0, size=(b, 1))
  # |x| >= 0.05 keeps dependencies clear of float32 cancellation (k3 ~ x^2 / 2), so the
  # top-fraction order is the same in float32 (the code, and theirs) and float64.
  mask_lp = old + x + np.sign(x) * 0.05
  mask_lp[rng.random((b, t)) < 0.02] += 30.0  # x > 20 and k3 > 10 somewhere
  adv = rng.normal(0, 1.0, size=b)
  f32 = lambda x: np.asarray(x, np.float32)
  return {'lp': f32(lp), 'old': f32(old), 'mask_lp': f32(mask_lp), 'adv': f32(adv), 'm': m}


# ----------------------------------------------------------------------------------
# float64 references of their definitions.
# ----------------------------------------------------------------------------------


def ref_dependency(old, aug):
  x = np.clip(np.float64(aug) - np.float64(old), -20, 20)
  return np.clip(np.exp(x) - x - 1, 0.0, 10.0)


def ref_score(dep, m):
  return (dep * m).sum(1) / np.maximum(m.sum(1), 1)


def ref_top_mask(dep, m, top_p):
  out = np.zeros_like(dep)
  for i in range(dep.shape[0]):
    k = math.ceil(np.float32(m[i].sum()) * np.float32(top_p))
    valid = np.flatnonzero(m[i] > 0)
    order = valid[np.argsort(-dep[i, valid], kind='stable')]
    out[i, order[:k]] = 1.0
  return out


def ref_adv_scale(score, valid, tmin, mini=None, micro=None):
  """Their loops: min/max over each mini-batch's valid rows, mu over each micro-batch's."""
  n = len(score)
  mini = mini or n
  micro = micro or mini
  out = np.ones(n)
  for a in range(0, n, mini):
    s_mb, v_mb = score[a:a + mini], valid[a:a + mini]
    vs = s_mb[v_mb]
    if vs.size <= 1:
      continue
    lo, hi = vs.min(), vs.max()
    if not hi - lo > 1e-6:
      continue
    for c in range(a, a + mini, micro):
      s, v = score[c:c + micro], valid[c:c + micro]
      if not v.any():
        continue
      norm = np.clip((s[v] - lo) / (hi - lo), 0, 1)
      mu = norm.mean()
      tmax = tmin + (1 - tmin) / (mu + 1e-8)
      scale = np.ones(len(s))
      scale[v] = tmin + norm * (tmax - tmin)
      out[c:c + micro] = scale
  return out


def ref_gamma_factor(score, valid, n, f_max):
  f = np.ones(len(score))
  for g in range(0, len(score), n):
    s, v = score[g:g + n], valid[g:g + n]
    mean = s[v].mean() if v.any() else 0.0
    if mean > 1e-8:
      f[g:g + n] = np.where(v, s / mean, 1.0)
  return np.clip(f, 0, f_max)


def ref_pg(lp, old, a, eps_low, eps_high, c):
  d = np.clip(np.float64(lp) - np.float64(old), -20, 20)
  ratio = np.exp(d)
  cratio = np.exp(np.clip(d, np.log(1 - eps_low), np.log(1 + eps_high)))
  pg = np.maximum(-a * ratio, -a * cratio)
  return np.where(a < 0, np.minimum(pg, -a * c), pg)


def ref_k3(lp, other):
  x = np.clip(np.float64(other) - np.float64(lp), -20, 20)
  return np.clip(np.exp(x) - x - 1, -10, 10)


def tokmean(x, m):
  return (x * m).sum() / (m.sum() + 1e-8)


def ref_vppo_loss(inp, cfg, gamma_factor=None):
  """VPPO's update_policy loss (+ PAPO's perception term when gamma != 0), float64."""
  lp, old, aug, m = inp['lp'], inp['old'], inp['mask_lp'], inp['m']
  dep = ref_dependency(old, aug)
  a = np.float64(inp['adv'])
  if cfg.vppo_adv_scale_min is not None:
    a = a * ref_adv_scale(ref_score(dep, m), m.sum(1) > 0, cfg.vppo_adv_scale_min,
                          cfg.vppo_minmax_chunk, cfg.vppo_mean_chunk)
  pg = ref_pg(lp, old, np.broadcast_to(a[:, None], lp.shape), cfg.eps_low, cfg.eps_high, cfg.dual_clip)
  if cfg.vppo_top_frac is not None:
    pg = pg * ref_top_mask(dep, m, cfg.vppo_top_frac)
  k = ref_k3(lp, aug)
  if gamma_factor is not None:
    k = k * gamma_factor[:, None]
  return tokmean(pg, m) - cfg.gamma * tokmean(k, m) + cfg.eta_ori * tokmean(-np.float64(lp), m)


def call(inp, cfg, **kw):
  return losses.papo_loss(inp['lp'], inp['old'], None, inp['mask_lp'], inp['adv'], inp['m'], cfg, **kw)


def grads(inp, cfg, **kw):
  f = lambda lp: losses.papo_loss(lp, inp['old'], None, inp['mask_lp'], inp['adv'], inp['m'], cfg, **kw)[0]
  return np.asarray(jax.grad(f)(jnp.asarray(inp['lp'])))


# ----------------------------------------------------------------------------------
# Formulas.
# ----------------------------------------------------------------------------------


def test_token_dependency_against_reference():
  inp = make_inputs(0)
  got = np.asarray(vppo.token_dependency(inp['old'], inp['mask_lp']))
  want = ref_dependency(inp['old'], inp['mask_lp'])
  assert (want == 10.0).any() and (want < 2e-3).any()
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=5e-7)  # float32 exp(x) - x - 1, as theirs
  # No gradient reaches either input.
  g = jax.grad(lambda a, b: vppo.token_dependency(a, b).sum(), argnums=(0, 1))(
      jnp.asarray(inp['old']), jnp.asarray(inp['mask_lp']))
  assert all(np.all(np.asarray(x) == 0) for x in g)


def test_top_fraction_mask_against_reference_and_torch():
  inp = make_inputs(1)
  dep = ref_dependency(inp['old'], inp['mask_lp'])
  for frac in (0.2, 0.4, 1.0):
    got = np.asarray(losses.top_frac_mask(np.float32(dep), inp['m'], frac))
    np.testing.assert_array_equal(got, ref_top_mask(dep, inp['m'], frac))
    np.testing.assert_array_equal(got.sum(1), np.ceil(inp['m'].sum(1) * np.float32(frac)))
  torch = pytest.importorskip('torch')
  # Their construction: -inf on padding, sort descending, rank < ceil(n * top_p), scatter back.
  d = torch.tensor(np.float32(dep))
  rm = torch.tensor(inp['m'])
  d[~rm.bool()] = -torch.inf
  k = torch.ceil(rm.sum(1) * 0.4).int()
  _, idx = torch.sort(d, dim=1, descending=True)
  rank_mask = torch.arange(T).expand_as(d) < k.unsqueeze(1)
  theirs = torch.zeros_like(d, dtype=torch.bool).scatter_(1, idx, rank_mask) & rm.bool()
  np.testing.assert_array_equal(np.asarray(losses.top_frac_mask(np.float32(dep), inp['m'], 0.4)),
                                theirs.numpy().astype(np.float32))


@pytest.mark.parametrize('chunks', [(None, None), (8, None), (8, 4), (4, 2)])
def test_advantage_scale_against_reference(chunks):
  rng = np.random.default_rng(2)
  score = rng.exponential(0.3, size=B)
  valid = np.ones(B, bool)
  valid[[5, 9, 10]] = False  # padding rows
  score[12:16] = 0.7  # a chunk of four equal scores: no range there
  valid[4:8] = [True, False, False, False]  # a chunk with a single valid row
  mini, micro = chunks
  got = np.asarray(vppo.advantage_scale(np.float32(score), valid, 0.9, minmax_chunk=mini, mean_chunk=micro))
  want = ref_adv_scale(np.float32(score).astype(np.float64), valid, 0.9, mini, micro)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
  assert np.all(got[~valid] == 1.0)
  assert (np.abs(got - 1.0) > 1e-3).any()
  # The scale averages 1 over the valid rows of each mean set.
  micro = micro or mini or B
  for c in range(0, B, micro):
    v = valid[c:c + micro]
    if v.sum() > 1 and np.ptp(got[c:c + micro][v]) > 0:
      assert abs(got[c:c + micro][v].mean() - 1.0) < 1e-5
  if mini is None:
    assert got[valid].min() == pytest.approx(0.9, abs=1e-6)


def test_advantage_scale_rejects_bad_chunks():
  with pytest.raises(ValueError, match='minmax_chunk'):
    vppo.advantage_scale(np.ones(6), np.ones(6, bool), 0.9, minmax_chunk=4)
  with pytest.raises(ValueError, match='mean_chunk'):
    vppo.advantage_scale(np.ones(8), np.ones(8, bool), 0.9, minmax_chunk=4, mean_chunk=3)


def test_adaptive_gamma_factor_against_reference():
  rng = np.random.default_rng(3)
  score = rng.exponential(0.5, size=B)
  valid = np.ones(B, bool)
  valid[[1, 6]] = False
  score[8:12] = 0.0  # a group without any dependency: f = 1
  score[[0, 2, 3]] = [3.0, 0.1, 0.1]  # f_0 = 2.8 before the clip
  got = np.asarray(vppo.adaptive_gamma_factor(np.float32(score), valid, 4, f_max=2.0))
  want = ref_gamma_factor(np.float32(score).astype(np.float64), valid, 4, 2.0)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  assert (got == 2.0).any() and np.all(got[8:12] == 1.0)
  unclipped = np.asarray(vppo.adaptive_gamma_factor(np.float32(score), valid, 4, f_max=1e9))
  for g in (0, 4, 12):
    v = valid[g:g + 4]
    assert abs(unclipped[g:g + 4][v].mean() - 1.0) < 1e-5  # mean-preserving per group
  with pytest.raises(ValueError, match='group_size'):
    vppo.adaptive_gamma_factor(np.ones(6), np.ones(6, bool), 4)


def test_full_kl_against_reference_and_chunking():
  rng = np.random.default_rng(4)
  r, t, d, v = 3, 7, 5, 11
  w = rng.normal(0, 1.0, size=(d, v)).astype(np.float32)
  h = rng.normal(0, 1.0, size=(r, t, d)).astype(np.float32)
  hm = h + rng.normal(0, 0.7, size=(r, t, d)).astype(np.float32)
  logits = lambda x: np.float64(x) @ np.float64(w)
  def ref(la, lb, temp):
    la, lb = la / temp, lb / temp
    lp = la - np.log(np.exp(la - la.max(-1, keepdims=True)).sum(-1, keepdims=True)) - la.max(-1, keepdims=True)
    lq = lb - np.log(np.exp(lb - lb.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lb.max(-1, keepdims=True)
    return (np.exp(lp) * (lp - lq)).sum(-1)
  for temp in (1.0, 0.7):
    want = ref(logits(h), logits(hm), temp)
    assert (want > 0.01).all()
    got = np.asarray(vppo.full_kl_from_logits(np.float32(logits(h)), np.float32(logits(hm)), temp))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    fn = lambda x: jnp.einsum('rcd,dv->rcv', x, jnp.asarray(w))
    for chunk in (1, 3, 7, 64):
      got_c = np.asarray(vppo.full_kl_chunked(fn, h, hm, chunk, temp))
      np.testing.assert_allclose(got_c, want, rtol=1e-4, atol=1e-6)
  # One sample k3 estimates the same KL: E_{y~p}[k3] = KL(p || q) (checked on one position).
  la, lb = logits(h)[0, 0], logits(hm)[0, 0]
  lp = la - np.log(np.exp(la).sum())
  lq = lb - np.log(np.exp(lb).sum())
  x = lq - lp
  assert abs((np.exp(lp) * (np.exp(x) - x - 1)).sum() - ref(la[None], lb[None], 1.0)[0]) < 1e-9


# ----------------------------------------------------------------------------------
# The loss options.
# ----------------------------------------------------------------------------------


VPPO_7B = dict(eps_high=0.28, eta_ori=0.06, vppo_top_frac=0.4, vppo_adv_scale_min=0.9)


@pytest.mark.parametrize('kw', [
    VPPO_7B,
    dict(vppo_top_frac=0.4),
    dict(vppo_adv_scale_min=0.8),
    dict(VPPO_7B, vppo_minmax_chunk=8, vppo_mean_chunk=4),
    dict(VPPO_7B, gamma=0.02),  # PAPO-G + VPPO
])
def test_vppo_loss_against_reference(kw):
  inp = make_inputs(5)
  cfg = losses.LossConfig(**kw)
  loss, met = call(inp, cfg)
  assert abs(float(loss) - ref_vppo_loss(inp, cfg)) <= TOL
  dep = ref_dependency(inp['old'], inp['mask_lp'])
  assert abs(float(met['vppo/dependency']) - tokmean(dep, inp['m'])) <= TOL
  if cfg.vppo_top_frac is not None:
    assert 0.4 <= float(met['vppo/token_frac']) < 0.5


def test_zero_gamma_at_run_time_adds_no_perception_term():
  """VPPO without PAPO reads the masked log-probs for the dependency only: with gamma a traced 0
  (the train step's runtime scalar) value and gradient equal those of the term left out."""
  inp = make_inputs(10)
  cfg = losses.LossConfig(**VPPO_7B)   # gamma 0

  def value_and_grad(gamma):
    f = lambda lp, g: losses.papo_loss(lp, inp['old'], None, inp['mask_lp'], inp['adv'], inp['m'], cfg, gamma=g)[0]
    if gamma is None:   # a static 0: the perception term is not in the graph
      return jax.jit(jax.value_and_grad(lambda lp: f(lp, 0.0)))(jnp.asarray(inp['lp']))
    return jax.jit(jax.value_and_grad(f))(jnp.asarray(inp['lp']), jnp.float32(gamma))

  (l_t, g_t), (l_s, g_s) = value_and_grad(0.0), value_and_grad(None)
  assert float(l_t) == float(l_s)
  np.testing.assert_array_equal(np.asarray(g_t), np.asarray(g_s))
  assert abs(float(l_t) - ref_vppo_loss(inp, cfg)) <= TOL
  l_on, g_on = value_and_grad(0.02)   # and the same program does add it when gamma is not 0
  assert float(l_on) < float(l_t) and np.abs(np.asarray(g_on) - np.asarray(g_t)).max() > 1e-6


def test_vppo_explicit_dependency_and_full_kl_option():
  inp = make_inputs(6)
  dep = np.float32(np.random.default_rng(6).exponential(0.2, size=(B, T)))
  cfg = losses.LossConfig(vppo_top_frac=0.4, vppo_adv_scale_min=0.9, vppo_dependency='full_kl')
  with pytest.raises(ValueError, match='full_kl'):
    call(inp, cfg)
  loss, _ = call(inp, cfg, dependency_BxT=dep)
  a = inp['adv'] * ref_adv_scale(ref_score(np.float64(dep), inp['m']), inp['m'].sum(1) > 0, 0.9)
  pg = ref_pg(inp['lp'], inp['old'], np.broadcast_to(a[:, None], (B, T)), 0.2, 0.3, 3.0)
  want = tokmean(pg * ref_top_mask(np.float64(dep), inp['m'], 0.4), inp['m'])
  assert abs(float(loss) - want) <= TOL


def test_vppo_terms_reach_the_gradient():
  """On-policy the PPO gradient is -A * s_i * v_it / N: the scale and the mask act exactly."""
  inp = make_inputs(7)
  inp['old'] = inp['lp'].copy()
  m, n = inp['m'], inp['m'].sum()
  dep = ref_dependency(inp['old'], inp['mask_lp'])
  a = np.broadcast_to(inp['adv'][:, None], m.shape)
  g_plain = grads(inp, losses.LossConfig())
  np.testing.assert_allclose(g_plain, -a * m / n, rtol=1e-5, atol=1e-9)
  g_mask = grads(inp, losses.LossConfig(vppo_top_frac=0.4))
  keep = ref_top_mask(dep, m, 0.4)
  np.testing.assert_allclose(g_mask, -a * keep / n, rtol=1e-5, atol=1e-9)
  assert ((keep == 0) & (m > 0)).any()
  g_scale = grads(inp, losses.LossConfig(vppo_adv_scale_min=0.9))
  s = ref_adv_scale(ref_score(dep, m), m.sum(1) > 0, 0.9)
  np.testing.assert_allclose(g_scale, -a * s[:, None] * m / n, rtol=1e-5, atol=1e-9)
  assert np.ptp(s[m.sum(1) > 0]) > 0.05


def test_adaptive_gamma_reaches_the_gradient_per_sample():
  """d/dlp of -gamma * tokmean(f_i * k3) = -gamma * f_i * m * (1 - e^x) / N."""
  inp = make_inputs(8)
  m, n = inp['m'], inp['m'].sum()
  cfg = losses.LossConfig(gamma=0.3, adaptive_gamma=True, group_size=4)
  g = grads(inp, cfg) - grads(inp, losses.LossConfig())
  dep = ref_dependency(inp['old'], inp['mask_lp'])
  f = ref_gamma_factor(ref_score(dep, m), m.sum(1) > 0, 4, cfg.adaptive_gamma_max)
  assert np.ptp(f) > 0.5
  x = np.float64(inp['mask_lp']) - np.float64(inp['lp'])
  live = (np.abs(x) < 20) & (np.exp(x) - x - 1 < 10)
  want = np.where(live, -0.3 * f[:, None] * m * (1 - np.exp(np.clip(x, -20, 20))) / n, 0.0)
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)
  loss, met = call(inp, cfg)
  assert abs(float(loss) - ref_vppo_loss(inp, cfg, gamma_factor=f)) <= TOL
  with pytest.raises(ValueError, match='group_size'):
    call(inp, losses.LossConfig(gamma=0.3, adaptive_gamma=True))


def test_whole_batch_factors_make_micro_batches_equal_one_batch():
  """sequence_factors over [M, B, T] + token-share weights = the loss over all rows at once."""
  inp = make_inputs(9, b=16)
  cfg = losses.LossConfig(gamma=0.02, eta_ori=0.06, vppo_top_frac=0.4, vppo_adv_scale_min=0.9,
                          adaptive_gamma=True, group_size=4)
  whole, _ = call(inp, cfg)
  split = {k: v.reshape(4, 4, *v.shape[1:]) for k, v in inp.items()}
  fac = losses.sequence_factors(cfg, split['old'], split['mask_lp'], split['m'])
  assert fac['adv_scale'].shape == (4, 4) and fac['gamma_factor'].shape == (4, 4)
  total, own_total = 0.0, 0.0
  for i in range(4):
    mb = {k: v[i] for k, v in split.items()}
    share = mb['m'].sum() / inp['m'].sum()
    total += share * float(call(mb, cfg, adv_scale_B=fac['adv_scale'][i],
                                gamma_factor_B=fac['gamma_factor'][i])[0])
    own_total += share * float(call(mb, cfg)[0])  # normalised per micro-batch instead
  assert abs(total - float(whole)) <= 2e-6
  assert abs(own_total - float(whole)) > 1e-4


def test_config_validation():
  for bad in (dict(vppo_top_frac=0.0), dict(vppo_adv_scale_min=1.5), dict(vppo_minmax_chunk=0),
              dict(vppo_dependency='kl'), dict(adaptive_gamma_max=0.0), dict(kl_prcp_top_mode='x')):
    with pytest.raises(ValueError, match=next(iter(bad))):
      losses.LossConfig(**bad)
  assert not losses.LossConfig().needs_dependency
  assert losses.LossConfig(vppo_top_frac=0.4).needs_dependency
