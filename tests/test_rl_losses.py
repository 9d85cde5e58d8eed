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


def ref_quantile_mask(score, m, frac):
  """The authors' token mask: score >= torch.nanquantile(score masked to nan, 1 - frac, dim=1).

  torch forms the rank q * (n - 1) in float32 (the input dtype), then interpolates linearly.
  """
  out = np.zeros_like(m, dtype=np.float64)
  for i in range(m.shape[0]):
    valid = np.flatnonzero(m[i] > 0)
    if not len(valid):
      continue
    v = np.sort(np.float64(score[i, valid]))
    rank = float(np.float32(1.0 - frac) * np.float32(len(valid) - 1))
    lo, hi = int(math.floor(rank)), int(math.ceil(rank))
    thresh = v[lo] + (rank - lo) * (v[hi] - v[lo])
    out[i, valid] = (score[i, valid] >= thresh).astype(np.float64)
  return out


def ref_total(inp, cfg, gamma=None, scale=1.0):
  """The authors' dp_actor.update_policy loss (float64), with this project's named options."""
  lp, old, ref, msk, a, m = (inp[k] for k in ('lp', 'old', 'ref', 'mask_lp', 'adv', 'm'))
  a = np.broadcast_to(a[:, None] if a.ndim == 1 else a, lp.shape).astype(np.float64)
  gamma = cfg.gamma if gamma is None else gamma
  agg = lambda x, mm=m: ref_agg(x, mm, cfg.agg)
  k = ref_k3(lp, msk)
  m_prcp = m
  if cfg.kl_prcp_top_frac is not None:
    if cfg.kl_prcp_top_mode == 'quantile':
      k = k * ref_quantile_mask(k, m, cfg.kl_prcp_top_frac)
    else:
      m_prcp = ref_top_mask(k, m, cfg.kl_prcp_top_frac)
  if cfg.kl_prcp_clamp is not None:
    k = np.clip(k, *cfg.kl_prcp_clamp)
  total = (agg(ref_pg(lp, old, a, cfg.eps_low, cfg.eps_high, cfg.dual_clip))
           + cfg.beta * agg(ref_k3(lp, ref))
           - gamma * agg(k, m_prcp)
           + cfg.eta_ori * scale * ref_agg(-np.float64(lp), m, 'token')  # always a token mean
           + cfg.eta_mask * scale * ref_agg(-np.float64(msk), m, 'token'))
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
  d = np.clip(inp['lp'].astype(np.float64) - inp['old'], -20, 20)
  ratio = np.exp(d)
  # The authors' definitions (core_algos.compute_policy_loss): 'higher' = the clipped ratio
  # wins the max, on either side; 'lower' = the dual clip binds.
  pg1, pg2 = -a * ratio, -a * np.exp(np.clip(d, np.log(0.8), np.log(1.28)))
  higher = pg1 < pg2
  lower = (a < 0) & (np.maximum(pg1, pg2) > -a * 3.0)
  # ... which for the clip is the union of the two sides.
  np.testing.assert_array_equal(higher, ((a > 0) & (ratio > 1.28)) | ((a < 0) & (ratio < 0.8)))
  assert (higher & (a > 0) & (m > 0)).any() and (higher & (a < 0) & (m > 0)).any()
  for key, flag in [('actor/pg_clipfrac_higher', higher), ('actor/pg_clipfrac_lower', lower)]:
    assert abs(float(met[key]) - ref_agg(flag, m, 'token')) <= TOL
    assert float(met[key]) > 0
  assert not {'actor/clipfrac_high', 'actor/clipfrac_low', 'actor/dual_clip_frac'} & set(met)
  # ppo_kl: masked mean of -clamp(lp - lp_old, -20, 20); the inputs have |lp - lp_old| > 20.
  want_kl = ref_agg(-d, m, 'token')
  assert abs(float(met['actor/ppo_kl']) - want_kl) <= TOL
  assert abs(ref_agg(inp['old'] - np.float64(inp['lp']), m, 'token') - want_kl) > 1e-3


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


@pytest.mark.parametrize('mode', losses.TOP_MODES)
def test_guards_against_reference(mode):
  inp = make_inputs(5)
  m = inp['m']
  for clamp, frac in [((0.0, 0.2), None), (None, 0.2), ((0.0, 0.2), 0.2), ((0.05, 1.0), 0.5)]:
    cfg = losses.LossConfig(gamma=0.02, beta=0.01, kl_prcp_clamp=clamp, kl_prcp_top_frac=frac,
                            kl_prcp_top_mode=mode)
    loss, met = call(inp, cfg)
    assert abs(float(loss) - ref_total(inp, cfg)) <= TOL, (clamp, frac)
    k = ref_k3(inp['lp'], inp['mask_lp'])
    if frac and mode == 'quantile':  # the authors: zero the dropped tokens, mean over all tokens
      k, m_prcp = k * ref_quantile_mask(k, m, frac), m
    else:  # ours: mean over the kept tokens only
      m_prcp = ref_top_mask(k, m, frac) if frac else m
    k = np.clip(k, *clamp) if clamp else k
    assert abs(float(met['actor/kl_prcp_guarded']) - ref_agg(k, m_prcp, 'token')) <= TOL
  mask = np.asarray(losses.top_frac_mask(k, m, 0.2))
  np.testing.assert_array_equal(mask.sum(-1), [math.ceil(0.2 * n - 1e-4) for n in m.sum(-1)])


def test_top_fraction_guard_modes_differ_by_the_kept_fraction():
  """At top 20% the kept-token mean is ~1/0.2 times the authors' all-token mean."""
  inp = make_inputs(13)
  got = {}
  for mode in losses.TOP_MODES:
    cfg = losses.LossConfig(gamma=0.02, kl_prcp_top_frac=0.2, kl_prcp_top_mode=mode)
    got[mode] = call(inp, cfg)[1]
  kept = float(got['quantile']['actor/kl_prcp_top_frac_kept'])
  assert 0.18 < kept < 0.3
  ratio = float(got['rank_kept']['actor/kl_prcp_guarded']) / float(got['quantile']['actor/kl_prcp_guarded'])
  assert 3.0 < ratio < 6.0
  k = ref_k3(inp['lp'], inp['mask_lp'])
  np.testing.assert_allclose(ratio, ref_agg(k * ref_top_mask(k, inp['m'], 0.2), inp['m'], 'token') ** -1
                             * ref_agg(k, ref_top_mask(k, inp['m'], 0.2), 'token'), rtol=0.3)


def test_row_nanquantile_and_mask_match_torch():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(14)
  for t in (1, 2, 5, 11, 16, 37):
    x = rng.exponential(1.0, size=(9, t)).astype(np.float32)
    x[0, :] = 0.5  # all ties
    m = (np.arange(t)[None, :] < rng.integers(0, t + 1, size=9)[:, None]).astype(np.float32)
    m[1] = 1.0
    for frac in (0.2, 0.4, 0.5, 0.9):
      xt = torch.tensor(np.where(m > 0, x, np.nan))
      want = torch.nanquantile(xt, 1.0 - frac, dim=1).numpy()
      got = np.asarray(losses.row_nanquantile(x, m, 1.0 - frac))
      # torch's CPU lerp rounds once (fma); this one twice: at most 1 ulp apart, NaN alike.
      np.testing.assert_allclose(got, want, rtol=2.5e-7, atol=0)
      tmask = (torch.tensor(x) >= torch.tensor(want)[:, None]).numpy() & (m > 0)
      np.testing.assert_array_equal(np.asarray(losses.quantile_top_mask(x, m, frac)), tmask)
      np.testing.assert_array_equal(np.asarray(losses.quantile_top_mask(x, m, frac)),
                                    ref_quantile_mask(x, m, frac))


def test_seq_mean_token_mean_against_the_authors_seq_mode():
  """Equal to the authors' `average_loss(mode='seq')` without empty rows; padding rows are skipped."""
  inp = make_inputs(15)
  x, m = np.float64(inp['lp']), inp['m']
  full = m[[0, 1, 2, 4, 5]]
  assert (full.sum(-1) > 0).all()
  authors = lambda x, m: ((x * m).sum(-1) / (m.sum(-1) + 1e-8)).mean()
  got = float(losses.agg_tokens(x[[0, 1, 2, 4, 5]], full, 'seq_mean_token_mean'))
  assert abs(got - authors(x[[0, 1, 2, 4, 5]], full)) <= TOL
  assert m[3].sum() == 0  # a padding row: the authors' mean would count it as a 0
  got_pad = float(losses.agg_tokens(x, m, 'seq_mean_token_mean'))
  assert abs(got_pad - authors(x[m.sum(-1) > 0], m[m.sum(-1) > 0])) <= TOL


def test_entropy_terms_are_token_means_under_seq_aggregation():
  inp = make_inputs(16)
  for field, other in (('eta_ori', 'lp'), ('eta_mask', 'mask_lp')):
    base = call(inp, losses.LossConfig(agg='seq_mean_token_mean'))[0]
    with_e = call(inp, losses.LossConfig(agg='seq_mean_token_mean', **{field: 0.5}))[0]
    tok = ref_agg(-np.float64(inp[other]), inp['m'], 'token')
    seq = ref_agg(-np.float64(inp[other]), inp['m'], 'seq_mean_token_mean')
    assert abs(tok - seq) > 1e-2  # the two differ on these inputs
    assert abs(float(with_e - base) - 0.5 * tok) <= TOL


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


@pytest.mark.parametrize('mode', losses.TOP_MODES)
def test_guard_gradients(mode):
  inp = make_inputs(9)
  g0 = _grads(inp, losses.LossConfig(gamma=0.0))
  g = _grads(inp, losses.LossConfig(gamma=0.5, kl_prcp_clamp=(0.0, 2.0), kl_prcp_top_frac=0.5,
                                    kl_prcp_top_mode=mode))
  k = ref_k3(inp['lp'], inp['mask_lp'])
  sel = (ref_quantile_mask if mode == 'quantile' else ref_top_mask)(k, inp['m'], 0.5) > 0
  moved = np.abs(g - g0) > 1e-9
  assert moved.any()
  assert not moved[~sel].any()  # unselected tokens get no perception-KL gradient
  assert not moved[sel & (k > 2.0 + 1e-4)].any()  # clamped tokens neither
  inside = sel & (k < 2.0 - 1e-4) & (k > 1e-4)
  assert inside.any() and moved[inside].all()


def test_perception_gradient_sign_and_scale_against_analytic_float64():
  """d(loss)/d(lp) of -gamma*tokmean(k3(lp, lp_mask)) = -gamma * m * (1 - exp(x)) / N.

  A flipped sign, a lost factor or a wrong normaliser fails here; tokens with |x| > 20 or
  k3 > 10 are clipped (no gradient).
  """
  inp = make_inputs(17)
  gamma = 0.3
  g = _grads(inp, losses.LossConfig(gamma=gamma)) - _grads(inp, losses.LossConfig())
  x = np.float64(inp['mask_lp']) - np.float64(inp['lp'])
  live = (np.abs(x) < 20) & (np.exp(x) - x - 1 < 10)
  want = np.where(live, -gamma * inp['m'] * (1.0 - np.exp(np.clip(x, -20, 20))) / inp['m'].sum(), 0.0)
  assert np.abs(want).max() > 1e-4
  np.testing.assert_allclose(g, want, atol=1e-7, rtol=1e-4)
  g_m = (_grads(inp, losses.LossConfig(gamma=gamma), argnums=1)
         - _grads(inp, losses.LossConfig(), argnums=1))  # through lp_mask when it has gradient
  np.testing.assert_allclose(g_m, np.where(live, -gamma * inp['m'] * (np.exp(np.clip(x, -20, 20)) - 1.0)
                                           / inp['m'].sum(), 0.0), atol=1e-7, rtol=1e-4)


def test_entropy_and_ref_gradients_against_analytic_float64():
  inp = make_inputs(18)
  n = inp['m'].sum()
  g = _grads(inp, losses.LossConfig(eta_ori=0.2)) - _grads(inp, losses.LossConfig())
  np.testing.assert_allclose(g, -0.2 * inp['m'] / n, atol=1e-8, rtol=1e-5)  # + eta * tokmean(-lp)
  g = _grads(inp, losses.LossConfig(beta=0.2)) - _grads(inp, losses.LossConfig())
  x = np.float64(inp['ref']) - np.float64(inp['lp'])
  live = (np.abs(x) < 20) & (np.exp(x) - x - 1 < 10)
  np.testing.assert_allclose(g, np.where(live, 0.2 * inp['m'] * (1.0 - np.exp(x)) / n, 0.0),
                             atol=1e-7, rtol=1e-4)


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


class _AuthorsAnnealing:
  """The authors' AnnealingKLController as ray_trainer.py drives it: read kl_coef, then update(1)."""

  def __init__(self, start, end, training_steps, annealing_ratio=0.5):
    self.start, self.end = start, end
    self.total = max(1, int(training_steps * annealing_ratio))
    self.coef, self.step = start, 0

  def next(self):
    coef = self.coef
    self.step += 1
    self.coef = self.start + (self.end - self.start) * min(self.step / self.total, 1.0)
    return coef


def test_gamma_schedule_follows_the_authors_horizon():
  for steps, start, end in [(202, 0.02, 0.0), (7, 0.01, 0.002), (1, 0.02, 0.0)]:
    authors = _AuthorsAnnealing(start, end, steps)
    for step in range(steps + 3):
      want = authors.next()
      g, s = losses.gamma_schedule(step, steps, start, end)
      assert abs(float(g) - want) < 1e-8, (steps, step)
      assert abs(float(s) - want / start) < 1e-6
  # Half the steps by default, then flat at gamma_end.
  for step, want in [(0, 0.02), (25, 0.015), (50, 0.01), (80, 0.01)]:
    assert abs(float(losses.gamma_schedule(step, 100, 0.02, 0.01)[0]) - want) < 1e-8
  # horizon_frac=1.0: the project's first schedule, over all steps.
  for step, want in [(0, 0.02), (50, 0.015), (100, 0.01), (150, 0.01)]:
    g, s = losses.gamma_schedule(step, 100, 0.02, 0.01, horizon_frac=1.0)
    assert abs(float(g) - want) < 1e-8 and abs(float(s) - want / 0.02) < 1e-6
  with pytest.raises(ValueError, match='horizon_frac'):
    losses.gamma_schedule(0, 100, 0.02, 0.0, horizon_frac=0.0)


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
    frac = min(i / 50, 1.0)
    gamma, scale = 0.02 * (1 - frac), 1 - frac
    assert abs(float(loss) - ref_total(inp, cfg, gamma=gamma, scale=scale)) <= TOL
    assert abs(float(met['actor/gamma']) - gamma) < 1e-8
  assert len(traces) == 1


# ----------------------------------------------------------------------------------
# The authors' loss in torch (their clamp/max/min gradients), transcribed from
# core_algos.compute_policy_loss / compute_kl / average_loss and dp_actor.update_policy.
# ----------------------------------------------------------------------------------


def _torch_authors_loss(torch, t, cfg, gamma):
  lp, old, ref, aug, adv, m = (t[k] for k in ('lp', 'old', 'ref', 'mask_lp', 'adv', 'm'))
  mean = lambda v: (v * m).sum() / (m.sum() + 1e-8)
  avg = mean if cfg.agg == 'token' else (lambda v: ((v * m).sum(-1) / (m.sum(-1) + 1e-8)).mean())
  nak = torch.clamp(lp - old, -20.0, 20.0)
  ratio = torch.exp(nak)
  cratio = torch.exp(torch.clamp(nak, math.log(1 - cfg.eps_low), math.log(1 + cfg.eps_high)))
  pg1, pg2, pg3 = -adv * ratio, -adv * cratio, -adv * cfg.dual_clip
  higher = torch.max(pg1, pg2)
  final = torch.where(adv < 0, torch.min(higher, pg3), higher)
  loss = avg(final)

  def low_var_kl(a, b):
    x = (b - a).clamp(-20.0, 20.0)
    return torch.clamp(x.exp() - x - 1, min=-10.0, max=10.0)

  loss = loss + cfg.beta * avg(low_var_kl(lp, ref))
  kld = low_var_kl(lp, aug)
  if cfg.kl_prcp_top_frac is not None:
    thresh = torch.nanquantile(kld.masked_fill(~m.bool(), float('nan')), 1.0 - cfg.kl_prcp_top_frac,
                               dim=1, keepdim=True)
    kld = kld * (kld >= thresh).to(kld.dtype)
  if cfg.kl_prcp_clamp is not None:
    kld = torch.clamp(kld, min=cfg.kl_prcp_clamp[0], max=cfg.kl_prcp_clamp[1])
  loss = loss - gamma * avg(kld)
  loss = loss + cfg.eta_mask * (-mean(aug)) + cfg.eta_ori * (-mean(lp))
  metrics = {'actor/pg_clipfrac_higher': mean((pg1 < pg2).float()),
             'actor/pg_clipfrac_lower': mean((higher > pg3).float() * (adv < 0).float()),
             'actor/ppo_kl': mean(-nak)}
  return loss, metrics


def _on_policy_inputs(seed):
  inp = make_inputs(seed)
  inp['old'] = inp['lp'].copy()  # ratio exactly 1: the clip bounds log(1 - 0) = log(1 + 0) = 0 bind
  return inp


@pytest.mark.parametrize('case', ['on_policy_eps0', 'on_policy_eps_low0', 'clamps_and_guards', 'seq'])
def test_loss_and_gradient_match_the_authors_torch_code(case):
  """Value and gradient equal torch's, including at a clip bound (torch.clamp passes the gradient)."""
  torch = pytest.importorskip('torch')
  if case == 'on_policy_eps0':
    inp, cfg = _on_policy_inputs(19), losses.LossConfig(eps_low=0.0, eps_high=0.0)
  elif case == 'on_policy_eps_low0':
    inp, cfg = _on_policy_inputs(20), losses.LossConfig(eps_low=0.0, eps_high=0.3, beta=0.01, gamma=0.02)
  elif case == 'clamps_and_guards':
    inp = make_inputs(21)
    cfg = losses.LossConfig(eps_high=0.28, beta=0.01, gamma=0.05, eta_ori=0.03, eta_mask=0.03,
                            kl_prcp_clamp=(0.0, 0.2), kl_prcp_top_frac=0.2)
  else:
    inp = make_inputs(22)
    inp['m'][3, :5] = 1.0  # the authors count empty rows in 'seq'; real batches have none
    cfg = losses.LossConfig(beta=0.01, gamma=0.02, eta_ori=0.05, agg='seq_mean_token_mean')
  gamma = cfg.gamma
  t = {k: torch.tensor(np.broadcast_to(v[:, None], inp['lp'].shape).copy() if k == 'adv' else v)
       for k, v in inp.items()}
  t['adv'] = t['adv'] * t['m']  # their advantages: scores.unsqueeze(-1) * response_mask
  t['lp'].requires_grad_(True)
  want, want_met = _torch_authors_loss(torch, t, cfg, gamma)
  want.backward()
  g_want = t['lp'].grad.numpy()
  loss, met = call(inp, cfg)
  g = _grads(inp, cfg)
  want = float(want.detach())
  assert abs(float(loss) - want) <= 2e-6 * max(1.0, abs(want))
  np.testing.assert_allclose(g, g_want, atol=1e-8, rtol=2e-5)
  for k, v in want_met.items():
    assert abs(float(met[k]) - float(v)) <= 1e-6, k
  if case.startswith('on_policy'):
    # jnp.clip would give 0.75 (one bound) or 0.625 (both) of this gradient.
    a = np.broadcast_to(inp['adv'][:, None], g.shape)
    pg_only = _grads(inp, losses.LossConfig(eps_low=cfg.eps_low, eps_high=cfg.eps_high))
    np.testing.assert_allclose(pg_only, -a * inp['m'] / inp['m'].sum(), rtol=1e-5, atol=1e-9)


def test_clamp_torch_gradient_at_the_bounds_matches_torch():
  torch = pytest.importorskip('torch')
  x = np.array([-1.0, 0.0, 0.5, 1.0, 2.0, 1.0, 0.0], np.float32)
  for lo, hi in [(0.0, 1.0), (None, 1.0), (0.0, None), (0.5, 0.5)]:
    xt = torch.tensor(x, requires_grad=True)
    torch.clamp(xt, min=lo, max=hi).pow(2).sum().backward()
    f = lambda v: jnp.sum(losses.clamp_torch(v, lo, hi) ** 2)
    np.testing.assert_array_equal(np.asarray(jax.grad(f)(jnp.asarray(x))), xt.grad.numpy())
    np.testing.assert_array_equal(np.asarray(losses.clamp_torch(x, lo, hi)), np.clip(x, lo, hi))
  # jnp.clip halves the gradient at a bound (the defect this helper exists for).
  assert float(jax.grad(lambda v: jnp.clip(v, 0.0, 1.0))(1.0)) == 0.5
