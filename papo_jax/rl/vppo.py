"""VPPO (Spotlight on Token Perception for Multimodal RL) and adaptive gamma: pure jnp functions.

Each response token's *visual dependency* is the divergence between the policy given the
real image and given a patch-blackened copy. VPPO uses it twice, both without gradient:
- trajectory advantage reweighting by the sequence's mean dependency (`advantage_scale`);
- a per-sequence top-fraction token mask on the policy-gradient term (`losses.top_frac_mask`).

Definitions follow the authors' code, github.com/huaixuheqing/VPPO-RL:
`verl/workers/actor/dp_actor.py`, `DataParallelPPOActor.update_policy` (dependency, mask,
advantage shaping) and `verl/trainer/core_algos.py`, `compute_policy_loss(loss_token_mask=)`.
Values of the paper's runs are in their `examples/configs/train_vppo_7b.sh`
(top_p_perception_tokens=0.4, advantage_scaling_min=0.9, entropy_penalty_coef=0.06, n=8)
and `train_vppo_8b.sh` (the same with entropy_penalty_coef=0.12); their masked copy is
`verl/workers/perc_utils.py` `random_patch_blackening(patch_size=14, black_prob=0.5)`.

Shapes: R rows (sequences), T response tokens, V vocabulary, D hidden size.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

LOG_RATIO_CLIP = 20.0
DEP_MAX = 10.0  # their clamp(low_var_kl, min=0.0, max=10.0)
RANGE_EPS = 1e-6  # their `(global_max_score - global_min_score) > 1e-6`
MU_EPS = 1e-8  # their `epsilon = 1e-8` in target_max


def token_dependency(old_logp_RxT: Array, mask_logp_RxT: Array) -> Array:
  """[R, T] float32 one-sample k3 estimate of KL(pi(.|image) || pi(.|masked image)), no gradient.

  dp_actor.py: x = clamp(aug_log_probs - old_log_probs, -20, 20);
  k = clamp(exp(x) - x - 1, 0, 10), on the sampled tokens' log-probs under the pre-update
  policy (old) and the same policy with the patch-blackened image (aug).
  """
  x = jnp.asarray(mask_logp_RxT, jnp.float32) - jnp.asarray(old_logp_RxT, jnp.float32)
  x = jnp.clip(x, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
  return jax.lax.stop_gradient(jnp.clip(jnp.exp(x) - x - 1.0, 0.0, DEP_MAX))


def full_kl_from_logits(logits_RxTxV: Array, logits_masked_RxTxV: Array,
                        temperature: float = 1.0) -> Array:
  """[R, T] float32 exact KL(pi(.|image) || pi(.|masked image)) over the vocabulary, no gradient.

  The paper's definition of visual dependency, of which `token_dependency` is the
  one-sample estimate; logits are divided by the sampling temperature as for log-probs.
  """
  lp = jax.nn.log_softmax(jnp.asarray(logits_RxTxV, jnp.float32) / temperature, axis=-1)
  lq = jax.nn.log_softmax(jnp.asarray(logits_masked_RxTxV, jnp.float32) / temperature, axis=-1)
  return jax.lax.stop_gradient(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1))


def full_kl_chunked(logits_fn: Callable[[Array], Array], h_RxTxD: Array, h_masked_RxTxD: Array,
                    chunk: int, temperature: float = 1.0) -> Array:
  """[R, T] `full_kl_from_logits` from hidden states, forming [R, chunk, V] logits at a time.

  logits_fn maps [R, C, D] hidden states to [R, C, V] logits (e.g.
  `lambda h: model.logits(h, dtype=jnp.float32)`); h_* are the states that predict the
  response tokens (position Lp + t - 1 for token t), as for the log-probs.
  """
  if h_RxTxD.shape != h_masked_RxTxD.shape:
    raise ValueError(f'full_kl_chunked: hidden shapes {h_RxTxD.shape} and {h_masked_RxTxD.shape} differ')
  r, t, d = h_RxTxD.shape
  chunk = max(1, min(chunk, t))
  pad = (-t) % chunk
  n = (t + pad) // chunk

  def split(h):
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    return h.reshape(r, n, chunk, d).swapaxes(0, 1)  # [n, R, C, D]

  def one(xs):
    a, b = xs
    return full_kl_from_logits(logits_fn(a), logits_fn(b), temperature)

  kl = jax.lax.map(one, (split(jax.lax.stop_gradient(h_RxTxD)), split(jax.lax.stop_gradient(h_masked_RxTxD))))
  return kl.swapaxes(0, 1).reshape(r, n * chunk)[:, :t]


def sequence_dependency(dep_RxT: Array, mask_RxT: Array) -> Array:
  """[R] float32 mean token dependency per sequence: sum(dep * m) / max(n, 1) (their sensitivity_score)."""
  m = jnp.asarray(mask_RxT, jnp.float32)
  return jnp.sum(jnp.asarray(dep_RxT, jnp.float32) * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def _chunks(r: int, chunk: int | None, name: str) -> int:
  chunk = r if chunk is None else int(chunk)
  if r % chunk:
    raise ValueError(f'vppo.advantage_scale: {r} rows do not split into {name}={chunk}')
  return chunk


def advantage_scale(score_R: Array, valid_R: Array, scale_min: float, *,
                    minmax_chunk: int | None = None, mean_chunk: int | None = None) -> Array:
  """[R] float32 VPPO trajectory advantage scale (their `use_advantage_shaping`), no gradient.

  Over a min/max set S (rows with tokens): norm = clip((s - min_S) / (max_S - min_S), 0, 1);
  over a mean set U: mu = mean(norm over valid rows of U);
  scale = scale_min + norm * (1 - scale_min) / (mu + 1e-8), so the scale averages 1 over U
  and spans [scale_min, scale_min + (1 - scale_min) / mu]. Rows without tokens, and whole
  sets with fewer than 2 valid rows or max - min <= 1e-6, get 1.
  Default S = U = all R rows (results independent of the device count). Their code takes
  S = each device's mini-batch and U = each micro-batch: `minmax_chunk` / `mean_chunk`
  consecutive rows (mean_chunk defaults to minmax_chunk and must divide it).
  """
  s = jax.lax.stop_gradient(jnp.asarray(score_R, jnp.float32))
  v = jnp.asarray(valid_R, bool)
  r = s.shape[0]
  cm = _chunks(r, minmax_chunk, 'minmax_chunk')
  cu = _chunks(cm, cm if mean_chunk is None else mean_chunk, 'mean_chunk')
  s_SxC, v_SxC = s.reshape(-1, cm), v.reshape(-1, cm)
  lo_S = jnp.min(jnp.where(v_SxC, s_SxC, jnp.inf), axis=-1)
  hi_S = jnp.max(jnp.where(v_SxC, s_SxC, -jnp.inf), axis=-1)
  ok_S = (jnp.sum(v_SxC, axis=-1) > 1) & (hi_S - lo_S > RANGE_EPS)
  span_S = jnp.where(ok_S, hi_S - lo_S, 1.0)
  norm_SxC = jnp.clip((s_SxC - jnp.where(ok_S, lo_S, 0.0)[:, None]) / span_S[:, None], 0.0, 1.0)
  norm_UxC, v_UxC = norm_SxC.reshape(-1, cu), v_SxC.reshape(-1, cu)
  n_U = jnp.sum(v_UxC, axis=-1)
  mu_U = jnp.sum(jnp.where(v_UxC, norm_UxC, 0.0), axis=-1) / jnp.maximum(n_U, 1)
  t_max_U = scale_min + (1.0 - scale_min) / (mu_U + MU_EPS)
  mapped_UxC = scale_min + norm_UxC * (t_max_U - scale_min)[:, None]
  ok_UxC = jnp.repeat(ok_S, cm // cu)[:, None] & v_UxC
  return jnp.where(ok_UxC, mapped_UxC, 1.0).reshape(r)


def adaptive_gamma_factor(score_R: Array, valid_R: Array, group_size: int, *,
                          f_max: float = 2.0) -> Array:
  """[R] float32 f_i of the adaptive perception coefficient gamma_i = gamma * f_i, no gradient.

  f_i = s_i / mean_{j in g(i), valid} s_j, clipped to [0, f_max]: the sample's mean token
  dependency relative to the mean of its prompt group g(i) (consecutive runs of
  `group_size` rows). Before the clip f averages 1 over a group, so the group's mean
  coefficient stays gamma while samples that lean more on the image get a stronger
  perception loss; f_max bounds gamma_i (gamma >= 0.04 collapses in the PAPO paper).
  Rows without tokens and groups whose mean is <= 1e-8 get f = 1.
  """
  s = jax.lax.stop_gradient(jnp.asarray(score_R, jnp.float32))
  v = jnp.asarray(valid_R, bool)
  if s.shape[0] % group_size:
    raise ValueError(f'vppo.adaptive_gamma_factor: {s.shape[0]} rows do not split into groups '
                     f'of group_size={group_size}')
  s_GxN, v_GxN = s.reshape(-1, group_size), v.reshape(-1, group_size)
  mean_G = jnp.sum(jnp.where(v_GxN, s_GxN, 0.0), axis=-1) / jnp.maximum(jnp.sum(v_GxN, axis=-1), 1)
  ok_GxN = v_GxN & (mean_G[:, None] > MU_EPS)
  f_GxN = jnp.where(ok_GxN, s_GxN / jnp.where(mean_G > MU_EPS, mean_G, 1.0)[:, None], 1.0)
  return jnp.clip(f_GxN, 0.0, f_max).reshape(-1)
