"""The fused, jitted PAPO train step.

One XLA program per bucket shape takes a batch of pre-sampled rollouts and:

1. runs the policy on the original inputs and on the masked copy (same tokens and
   positions, different pixels) and the frozen reference model on the original inputs
   under stop-gradient. With ``mask_grad=False`` (the paper) the masked pass is
   forward-only, outside the differentiated function, so PAPO costs one extra forward
   over GRPO; with ``mask_grad=True`` the policy runs once on the batch-concatenated
   ``[original ; masked]`` inputs and the gradient flows through both halves;
2. extracts response-token log-probs in sequence chunks (so ``[B, L, V]`` float32
   logits never exist at once);
3. computes the PAPO loss, its gradient, global-norm clipping and the optax update,
   skipping the update when the gradient is not finite.

Sequences are laid out as ``[prompt (Lp, left padded) | response (T, right padded)]``.
Every array of a :class:`TrainBatch` has a leading micro-batch axis M; micro-batches are
accumulated with ``lax.scan`` so memory is bounded by one micro-batch, and each
micro-batch's loss is weighted by its share of response tokens (or sequences), so the
update equals the one of the whole batch at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from papo_jax.rl.losses import LossConfig, papo_loss

Array = jax.Array


@flax.struct.dataclass
class TrainBatch:
  """Rollouts for one optimizer update; every field has a leading micro-batch axis M.

  input_ids_MxBxL: prompt ⊕ response tokens; attention_mask_MxBxL; position_ids_Mx3xBxL
  (from the model's get_rope_index, shared by the masked copy); response_mask_MxBxT
  (1 up to and including EOS); advantages_MxB; pixel_values_MxNxP and
  masked_pixel_values_MxNxP (zero-padded patch buckets), image_grid_thw_MxIx3.
  Optional precomputed log-probs [M, B, T] (several mini-batches per step):
  old_logp, mask_logp, ref_logp.
  """
  input_ids: Array
  attention_mask: Array
  response_mask: Array
  advantages: Array
  position_ids: Array | None = None   # None: computed in the step from ids, grid and mask
  pixel_values: Array | None = None
  masked_pixel_values: Array | None = None
  image_grid_thw: Array | None = None
  old_logp: Array | None = None
  mask_logp: Array | None = None
  ref_logp: Array | None = None


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any          # nnx.State of the policy
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static switches of the step (hashable)."""
  loss: LossConfig
  mask_grad: bool = False        # True: gradient also flows through the masked path ("true double entropy")
  logprob_chunk: int = 256       # response tokens per log-prob chunk
  grad_clip: float = 1.0

  @property
  def needs_mask(self) -> bool:
    return self.loss.gamma != 0.0 or self.loss.eta_mask != 0.0

  @property
  def needs_ref(self) -> bool:
    return self.loss.beta != 0.0


def make_optimizer(lr: float | optax.Schedule, *, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                   grad_clip: float = 1.0) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, as in the paper (weight decay on all parameters)."""
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))


def init_train_state(params, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


# -- log-probs -------------------------------------------------------------------------------


def response_logprobs(model, input_ids_BxL, attention_mask_BxL, position_ids_3xBxL, pixel_values, image_grid_thw,
                      response_len: int, chunk: int) -> Array:
  """log p(response token) [B, T] float32; logits are formed ``chunk`` tokens at a time.

  The hidden state at position Lp + t - 1 predicts response token t.
  """
  if position_ids_3xBxL is None:
    position_ids_3xBxL, _ = model.positions(input_ids_BxL, image_grid_thw, attention_mask_BxL)
  hidden = model.hidden_states(input_ids_BxL, attention_mask_BxL, pixel_values, image_grid_thw, position_ids_3xBxL)
  l = input_ids_BxL.shape[1]
  h_BxTxD = hidden[:, l - response_len - 1:l - 1]
  targets_BxT = input_ids_BxL[:, l - response_len:]
  return chunked_token_logprobs(model, h_BxTxD, targets_BxT, chunk)


def chunked_token_logprobs(model, h_BxTxD: Array, targets_BxT: Array, chunk: int) -> Array:
  b, t, d = h_BxTxD.shape
  chunk = min(chunk, t)
  pad = (-t) % chunk
  h = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
  y = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
  n = (t + pad) // chunk
  h = h.reshape(b, n, chunk, d).swapaxes(0, 1)
  y = y.reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(h_BxCxD, y_BxC):
    logits = model.logits(h_BxCxD, dtype=jnp.float32)
    tgt = jnp.take_along_axis(logits, y_BxC[..., None], -1)[..., 0]
    return tgt - jax.nn.logsumexp(logits, axis=-1)

  lp = jax.lax.map(lambda xs: one(*xs), (h, y))          # [n, B, C]
  return lp.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def _concat_masked(model, mb: TrainBatch):
  """[original ; masked] along the batch axis: same tokens/positions, masked pixels second."""
  cat = lambda a, axis=0: jnp.concatenate([a, a], axis=axis)
  pv = grid = None
  if mb.pixel_values is not None:
    grid = cat(mb.image_grid_thw)
    # The vision tower expects all real patches first and bucket padding last, so the
    # masked copy's real patches are moved up against the original's.
    n = mb.pixel_values.shape[0]
    n_real = jnp.sum(jnp.prod(mb.image_grid_thw, axis=-1))
    i = jnp.arange(2 * n)
    j = i - 2 * n_real
    src = jnp.where(i < n_real, i,
                    jnp.where(i < 2 * n_real, n + i - n_real,
                              jnp.where(j < n - n_real, n_real + j, n + n_real + j - (n - n_real))))
    pv = jnp.concatenate([mb.pixel_values, mb.masked_pixel_values], 0)[src]
  pos = mb.position_ids
  if pos is None:  # the masked copy shares the original's positions
    pos = model.positions(mb.input_ids, mb.image_grid_thw, mb.attention_mask)[0]
  return cat(mb.input_ids), cat(mb.attention_mask), cat(pos, 1), pv, grid


def _micro(batch: TrainBatch, i):
  return jax.tree.map(lambda a: a[i], batch)


def micro_logprobs(cfg: StepConfig, model, mb: TrainBatch, *, with_mask: bool) -> tuple[Array, Array | None]:
  """Policy log-probs on the original (and, if asked, masked) inputs of one micro-batch."""
  t = mb.response_mask.shape[-1]
  if with_mask:
    ids, am, pos, pv, grid = _concat_masked(model, mb)
    lp_both = response_logprobs(model, ids, am, pos, pv, grid, t, cfg.logprob_chunk)
    b = mb.input_ids.shape[0]
    return lp_both[:b], lp_both[b:]
  lp = response_logprobs(model, mb.input_ids, mb.attention_mask, mb.position_ids, mb.pixel_values,
                         mb.image_grid_thw, t, cfg.logprob_chunk)
  return lp, None


def masked_logprobs(cfg: StepConfig, model, mb: TrainBatch) -> Array:
  """Policy log-probs on the masked images (same tokens and positions as the original)."""
  return response_logprobs(model, mb.input_ids, mb.attention_mask, mb.position_ids, mb.masked_pixel_values,
                           mb.image_grid_thw, mb.response_mask.shape[-1], cfg.logprob_chunk)


# -- the step -------------------------------------------------------------------------------


def make_grad_fn(graphdef, cfg: StepConfig) -> Callable:
  """``grad_fn(params, ref_params, batch, gamma, entropy_scale) -> (grads, loss, metrics)``.

  Gradients are accumulated over the micro-batch axis with ``lax.scan``; each
  micro-batch's loss is weighted by its share of response tokens (sequences for
  'seq_mean_token_mean'), so the result equals the whole batch's.
  """

  def micro_loss(params, ref_params, mb: TrainBatch, weight, gamma, entropy_scale):
    model = nnx.merge(graphdef, params)
    recompute_mask = cfg.needs_mask and (mb.mask_logp is None or cfg.mask_grad)
    lp, lp_mask = micro_logprobs(cfg, model, mb, with_mask=recompute_mask)
    if cfg.needs_mask and not recompute_mask:
      lp_mask = mb.mask_logp
    if lp_mask is not None and not cfg.mask_grad:
      lp_mask = jax.lax.stop_gradient(lp_mask)
    lp_ref = None
    if cfg.needs_ref:
      if mb.ref_logp is not None:
        lp_ref = mb.ref_logp
      else:
        ref = nnx.merge(graphdef, ref_params)
        lp_ref = jax.lax.stop_gradient(micro_logprobs(cfg, ref, mb, with_mask=False)[0])
    lp_old = jax.lax.stop_gradient(lp) if mb.old_logp is None else mb.old_logp
    loss, metrics = papo_loss(lp, lp_old, lp_ref, lp_mask, mb.advantages, mb.response_mask, cfg.loss,
                              gamma=gamma, entropy_scale=entropy_scale)
    return loss * weight, jax.tree.map(lambda m: m * weight, metrics)

  value_and_grad = jax.value_and_grad(micro_loss, has_aux=True)

  def grad_fn(params, ref_params, batch: TrainBatch, gamma=None, entropy_scale=1.0):
    gamma = cfg.loss.gamma if gamma is None else gamma
    m = batch.response_mask.astype(jnp.float32)
    if cfg.loss.agg == "token":
      share = m.sum(axis=(1, 2)) / jnp.maximum(m.sum(), 1.0)
    else:
      rows = (m.sum(-1) > 0).astype(jnp.float32)
      share = rows.sum(-1) / jnp.maximum(rows.sum(), 1.0)

    def body(carry, i):
      g_acc, l_acc, m_acc = carry
      mb = _micro(batch, i)
      if cfg.needs_mask and not cfg.mask_grad and mb.mask_logp is None:
        # No gradient through the masked path: a forward-only pass outside the
        # differentiated function, so the backward runs on the original half alone.
        mb = mb.replace(mask_logp=jax.lax.stop_gradient(masked_logprobs(cfg, nnx.merge(graphdef, params), mb)))
      (loss, metrics), g = value_and_grad(params, ref_params, mb, share[i], gamma, entropy_scale)
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss, jax.tree.map(jnp.add, m_acc, metrics)), None

    # The metrics' structure, from an abstract evaluation (no compute).
    metric_shape = jax.eval_shape(
        lambda: value_and_grad(params, ref_params, _micro(batch, 0), 1.0, gamma, entropy_scale)[0][1])
    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shape))
    (grads, loss, metrics), _ = jax.lax.scan(body, init, jnp.arange(batch.input_ids.shape[0]))
    return grads, loss, metrics

  return grad_fn


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: StepConfig) -> Callable:
  """Returns ``step(state, ref_params, batch, gamma, entropy_scale) -> (state, metrics)`` (jit it).

  ``ref_params`` may be None when the loss has no reference KL or the batch carries
  precomputed ``ref_logp``. ``gamma``/``entropy_scale`` are scalars (annealing without
  recompiling). A step whose gradient norm or loss is not finite leaves params and
  optimizer state untouched and reports ``actor/skipped_nonfinite`` = 1.
  """
  grad_fn = make_grad_fn(graphdef, cfg)

  def step(state: TrainState, ref_params, batch: TrainBatch, gamma=None, entropy_scale=1.0):
    grads, loss, metrics = grad_fn(state.params, ref_params, batch, gamma, entropy_scale)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(step=state.step + finite.astype(jnp.int32), params=keep(new_params, state.params),
                           opt_state=keep(new_opt, state.opt_state))
    metrics = dict(metrics)
    metrics.update({"actor/grad_norm": grad_norm, "actor/skipped_nonfinite": (~finite).astype(jnp.float32),
                    "actor/loss_total": loss})
    return new_state, metrics

  return step


def make_logprob_pass(graphdef, cfg: StepConfig) -> Callable:
  """``fn(params, ref_params, batch) -> (old_logp, mask_logp | None, ref_logp | None)`` [M, B, T], no gradient.

  The one fused no-grad pass that precedes several mini-batch updates per step.
  """

  def fn(params, ref_params, batch: TrainBatch):
    def one(i):
      mb = _micro(batch, i)
      model = nnx.merge(graphdef, params)
      lp, lp_mask = micro_logprobs(cfg, model, mb, with_mask=cfg.needs_mask)
      lp_ref = None
      if cfg.needs_ref:
        lp_ref = micro_logprobs(cfg, nnx.merge(graphdef, ref_params), mb, with_mask=False)[0]
      return lp, lp_mask, lp_ref
    return jax.lax.stop_gradient(jax.lax.map(one, jnp.arange(batch.input_ids.shape[0])))

  return fn
