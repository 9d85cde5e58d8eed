"""KV-cache rollout engine for Qwen2.5-VL: one prefill per prompt, n samples, a while_loop decode.

    sampler = Sampler(graphdef, SamplingConfig(max_new_tokens=512, temperature=1.0, top_p=1.0))
    rollout = sampler.generate(state, input_ids_BxLp, attention_mask_BxLp, pixel_values_NpxP,
                               image_grid_thw_Ix3, n=8, key=jax.random.key(0))

Two jitted programs per bucket shape ``(B, Lp, Np, I, T)`` (and per ``n``):

* **prefill** runs the vision tower once per prompt and the decoder over the left-padded
  prompts, writing a ``[layers, B, Lp, KVH, D]`` cache; that cache is repeated n times (not
  recomputed) into a ``[layers, B*n, Lp+T, KVH, D]`` buffer, and the first response token
  is sampled from the last prompt position (left padding puts every prompt's last real
  token there).
* **decode** takes that buffer *donated* and runs a ``jax.lax.while_loop``: each step feeds
  one token per sequence at cache slot ``Lp + s`` with 3-D RoPE position
  ``n_real + s + rope_delta`` (transformers' rule), samples the next one, and exits as soon
  as every sequence has emitted a stop token or ``T`` tokens exist.

The caller pads prompts to a few length buckets and pixel rows / grid rows to a few patch
buckets (zero rows are ignored by the model), so a run compiles a handful of programs.
``state`` is the trainer's own parameter arrays (passed through, never copied). Under
:func:`papo_jax.parallel.use_mesh_rules` (``mesh=`` argument) the cache is constrained to
``('batch', 'cache_length', 'kv_heads', 'head_dim')``: batch over data/fsdp, kv heads over
tensor.

Randomness is per sequence: sequence ``i`` uses ``fold_in(fold_in(key, i), step)``, so a
sample does not depend on the batch it was drawn in or on how the batch is sharded.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from papo_jax.models.qwen2_5_vl import KVCache
from papo_jax.parallel import constrain, use_mesh_rules

FINISH_EOS = 0      # a stop token was emitted (it is part of the response and of the mask)
FINISH_LENGTH = 1   # max_new_tokens reached without a stop token

CACHE_AXES = (None, "batch", "cache_length", "kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling settings (hashable: one compiled program per distinct config and shape).

  ``top_k <= 0`` and ``top_p >= 1`` switch those filters off; ``greedy`` ignores all three.
  ``stop_token_ids=None`` stops on the model config's ``eos_token_id``. ``pad_token_id``
  fills the response after its stop token (None: the model's pad id, else the first stop id).
  """
  max_new_tokens: int = 256
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  greedy: bool = False
  cache_dtype: str = "bfloat16"
  stop_token_ids: tuple[int, ...] | None = None
  pad_token_id: int | None = None
  top_p_candidates: int = 1024   # top-p over this many largest logits (0: full sort); see filter_logits

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not self.greedy and self.temperature <= 0:
      raise ValueError(f"SamplingConfig.temperature must be > 0 when sampling (use greedy=True), got "
                       f"{self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
    if self.top_p_candidates < 0:
      raise ValueError(f"SamplingConfig.top_p_candidates must be >= 0 (0: full sort), got {self.top_p_candidates}")
    if self.stop_token_ids is not None:
      object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


class Rollout(NamedTuple):
  """Generated responses, ``R = B * n`` rows (prompt ``b``'s samples are rows ``b*n .. b*n+n-1``).

  tokens_RxT:          response token ids, ``pad`` after the stop token.
  mask_RxT:            1 up to and including the first stop token (int32).
  logprobs_RxT:        log-prob of each sampled token under the sampling distribution
                       (pad-token suppression, temperature, top-k, top-p); 0 when greedy.
  policy_logprobs_RxT: log-prob under the raw policy (temperature 1, full vocabulary), i.e.
                       what a forward pass of the model over prompt + response gives.
  finish_reason_R:     FINISH_EOS or FINISH_LENGTH.
  lengths_R:           response tokens in the mask.
  prompt_ids_RxLp, prompt_mask_RxLp: the left-padded prompts, repeated n times.
  position_ids_3xRxL:  3-D RoPE positions of prompt ⊕ response (L = Lp + T), 0 on padding,
                       as ``model.positions`` gives for the concatenated sequence.
  rope_deltas_Rx1:     ``max prompt position + 1 - n_real`` per row (response token s sits at
                       ``n_real + s + rope_delta``).
  """
  tokens_RxT: jax.Array
  mask_RxT: jax.Array
  logprobs_RxT: jax.Array
  policy_logprobs_RxT: jax.Array
  finish_reason_R: jax.Array
  lengths_R: jax.Array
  prompt_ids_RxLp: jax.Array
  prompt_mask_RxLp: jax.Array
  position_ids_3xRxL: jax.Array
  rope_deltas_Rx1: jax.Array

  def sequences(self):
    """(input_ids [R, Lp+T], attention_mask [R, Lp+T]) of prompt ⊕ response for the trainer."""
    return (jnp.concatenate([self.prompt_ids_RxLp, self.tokens_RxT.astype(self.prompt_ids_RxLp.dtype)], axis=1),
            jnp.concatenate([self.prompt_mask_RxLp.astype(jnp.int32), self.mask_RxT], axis=1))


# -- token sampling (pure) ---------------------------------------------------------------------


# Candidates the top-p filter considers: a lax.top_k over this many logits replaces a full
# vocabulary sort at every decode step (151,936 entries for Qwen).
TOP_P_CANDIDATES = SamplingConfig.top_p_candidates


def filter_logits(logits_BxV: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  top_p_candidates: int = TOP_P_CANDIDATES):
  """Temperature, then top-k, then top-p (transformers' warper order); dropped logits -> -inf.

  Ties at the top-k / top-p boundary value are all kept (as transformers does). Float32 [B, V].

  Top-p looks only at the ``top_p_candidates`` largest logits (a partial sort, ``lax.top_k``)
  but measures their probabilities against the whole vocabulary's normaliser, so whenever
  the nucleus has at most ``top_p_candidates`` tokens the result is exactly the full-sort
  one. When it does not (the top candidates hold less than ``top_p`` of the mass: a flat
  distribution), all candidates are kept and the rest dropped, i.e. sampling falls back to
  top-``top_p_candidates``: a slightly narrower law that loses less than ``top_p`` minus the
  candidates' mass. ``top_p_candidates <= 0`` sorts the whole vocabulary (the reference).
  With ``top_k`` set, its ``top_k`` survivors are the candidates (exact).
  """
  x = logits_BxV.astype(jnp.float32) / temperature
  v = x.shape[-1]
  cand_desc = None
  if 0 < top_k < v:
    cand_desc, _ = jax.lax.top_k(x, top_k)                           # [B, k], descending
    x = jnp.where(x < cand_desc[:, -1:], -jnp.inf, x)
  if top_p < 1.0:
    if cand_desc is None:
      k = v if top_p_candidates <= 0 else min(top_p_candidates, v)
      cand_desc = jax.lax.top_k(x, k)[0] if k < v else -jnp.sort(-x, axis=-1)
    # True probabilities of the candidates (normalised over the whole row, not the candidates).
    probs = jnp.exp(cand_desc - jax.nn.logsumexp(x, axis=-1, keepdims=True))
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p                # mass before it < p; first always kept
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(cand_desc, n_keep - 1, axis=-1)
    x = jnp.where(x < threshold, -jnp.inf, x)
  return x


def sample_tokens(logits_BxV: jax.Array, keys_B: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, greedy: bool = False, banned_ids: Sequence[int] = (),
                  top_p_candidates: int = TOP_P_CANDIDATES):
  """Draws one token per row; returns (tokens [B] int32, sampling log-probs [B], raw log-probs [B]).

  ``banned_ids`` (image / video pad) get logit -inf before anything else. The raw log-prob is
  ``log_softmax(logits)`` of the drawn token over the full, unfiltered vocabulary.
  ``top_p_candidates``: see :func:`filter_logits`.
  """
  logits = logits_BxV.astype(jnp.float32)
  raw_logp_BxV = jax.nn.log_softmax(logits, axis=-1)
  if banned_ids:
    logits = logits.at[:, jnp.asarray(banned_ids, jnp.int32)].set(-jnp.inf)
  if greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    samp_logp = jnp.zeros(tokens.shape, jnp.float32)
  else:
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                             top_p_candidates=top_p_candidates)
    tokens = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys_B, filtered).astype(jnp.int32)
    samp_logp = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), tokens[:, None], axis=-1)[:, 0]
  raw = jnp.take_along_axis(raw_logp_BxV, tokens[:, None], axis=-1)[:, 0]
  return tokens, samp_logp, raw


# -- the engine -------------------------------------------------------------------------------


class _DecodeState(NamedTuple):
  step: jax.Array          # index of the last sampled token (fed in this iteration)
  cache: KVCache
  done_R: jax.Array        # emitted a stop token at or before `step`
  tokens_RxT: jax.Array
  logprobs_RxT: jax.Array
  policy_logprobs_RxT: jax.Array


class Sampler:
  """Batched generation with a KV cache for :class:`papo_jax.models.Qwen25VL`.

  Compiles once per ``(B, Lp, Np, I, T, n)``: batch, prompt bucket, pixel-row bucket, grid
  rows, ``max_new_tokens`` and samples per prompt; log lines announce each new shape.
  """

  def __init__(self, graphdef, cfg: SamplingConfig, *, mesh=None, rules=None):
    self.graphdef = graphdef
    self.cfg = cfg
    self.mesh = mesh
    self.rules = rules
    self._seen: set = set()
    # prefill: nothing donated (prompts and params are reused by the caller).
    self._prefill = jax.jit(self._prefill_impl, static_argnames=("n", "max_new_tokens"))
    # decode: the [layers, B*n, Lp+T, KVH, D] cache buffer is donated and updated in place.
    self._decode = jax.jit(self._decode_impl, donate_argnames=("cache",))

  def _mesh_ctx(self):
    if self.mesh is None:
      return use_mesh_rules(None)
    return use_mesh_rules(self.mesh) if self.rules is None else use_mesh_rules(self.mesh, self.rules)

  def _model_ids(self, model):
    mc = model.config
    stops = self.cfg.stop_token_ids
    if stops is None:
      eos = mc.eos_token_id
      stops = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    if not stops:
      raise ValueError("Sampler: no stop tokens (SamplingConfig.stop_token_ids is None and the model config has no "
                       "eos_token_id)")
    pad = self.cfg.pad_token_id
    if pad is None:
      pad = mc.pad_token_id if mc.pad_token_id is not None else stops[0]
    banned = tuple(i for i in (mc.image_token_id, mc.video_token_id) if i is not None and i < mc.text.vocab_size)
    return stops, int(pad), banned

  def _sample(self, logits_RxV, keys_R, banned):
    c = self.cfg
    return sample_tokens(logits_RxV, keys_R, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                         greedy=c.greedy, banned_ids=banned, top_p_candidates=c.top_p_candidates)

  # prefill -----------------------------------------------------------------------------------

  def _prefill_impl(self, state, input_ids_BxLp, attention_mask_BxLp, pixel_values_NxP, image_grid_thw_Ix3, key,
                    *, n: int, max_new_tokens: int):
    with self._mesh_ctx():
      model = nnx.merge(self.graphdef, state)
      b, lp = input_ids_BxLp.shape
      r, t = b * n, max_new_tokens
      _, _, banned = self._model_ids(model)
      mask_BxLp = attention_mask_BxLp.astype(jnp.int32)
      pos_3xBxLp, deltas_Bx1 = model.positions(input_ids_BxLp, image_grid_thw_Ix3, mask_BxLp)
      x_BxLpxD = model.embed(input_ids_BxLp, pixel_values_NxP, image_grid_thw_Ix3)
      cache = model.init_cache(b, lp, jnp.dtype(self.cfg.cache_dtype))
      cache = KVCache(*(constrain(a, CACHE_AXES) for a in cache))
      h_BxLpxD, cache = model.forward_cached(x_BxLpxD, pos_3xBxLp, mask_BxLp, cache, 0)
      # Zero-align the cache: rotate each row so its prompt occupies slots [0, n_b) and the
      # response follows it; decode kernels then need only per-row lengths.
      first_B = jnp.argmax(mask_BxLp, axis=1).astype(jnp.int32)
      from_B_Lp = (jnp.arange(lp, dtype=jnp.int32)[None, :] + first_B[:, None]) % lp

      # Share the prefill: repeat each prompt's cache n times and leave T slots for the response.
      def grow(a):
        a = jnp.take_along_axis(a, from_B_Lp[None, :, :, None, None], axis=2)
        a = jnp.repeat(a, n, axis=1)
        a = jnp.pad(a, ((0, 0), (0, 0), (0, t), (0, 0), (0, 0)))
        return constrain(a, CACHE_AXES)
      cache = KVCache(grow(cache.k), grow(cache.v))
      logits_BxV = model.logits(h_BxLpxD[:, -1:], dtype=jnp.float32)[:, 0]
      logits_RxV = jnp.repeat(logits_BxV, n, axis=0)
      keys_R = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(r))
      tok_R, lp_R, raw_R = self._sample(logits_RxV, jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys_R), banned)
      return dict(cache=cache, keys_R=keys_R, first_token_R=tok_R, first_logprob_R=lp_R, first_policy_logprob_R=raw_R,
                  prompt_ids_RxLp=jnp.repeat(input_ids_BxLp, n, axis=0), prompt_mask_RxLp=jnp.repeat(mask_BxLp, n, 0),
                  prompt_pos_3xRxLp=jnp.repeat(pos_3xBxLp, n, axis=1), rope_deltas_Rx1=jnp.repeat(deltas_Bx1, n, 0))

  # decode ------------------------------------------------------------------------------------

  def _decode_impl(self, state, cache, keys_R, first_token_R, first_logprob_R, first_policy_logprob_R,
                   prompt_ids_RxLp, prompt_mask_RxLp, prompt_pos_3xRxLp, rope_deltas_Rx1):
    with self._mesh_ctx():
      model = nnx.merge(self.graphdef, state)
      stops, pad, banned = self._model_ids(model)
      stops_arr = jnp.asarray(stops, jnp.int32)
      r, lp = prompt_ids_RxLp.shape
      s_len = cache.k.shape[2]
      t = s_len - lp
      prompt_len_R = jnp.sum(prompt_mask_RxLp, axis=1).astype(jnp.int32)
      next_pos_R = prompt_len_R + rope_deltas_Rx1[:, 0]    # position of response token 0

      def is_stop(tok_R):
        return jnp.any(tok_R[:, None] == stops_arr[None, :], axis=-1)

      def cond(st: _DecodeState):
        return (st.step < t - 1) & ~jnp.all(st.done_R)

      def body(st: _DecodeState):
        s = st.step
        tok_R = st.tokens_RxT[:, s]
        x_Rx1xD = model.embed(tok_R[:, None])
        pos_3xRx1 = jnp.broadcast_to((next_pos_R + s)[None, :, None], (3, r, 1)).astype(jnp.int32)
        # The cache is zero-aligned: row r's response token s goes to slot prompt_len_R[r] + s.
        h_Rx1xD, cache = model.decode_step(x_Rx1xD, pos_3xRx1, st.cache, prompt_len_R + s)
        cache = KVCache(*(constrain(a, CACHE_AXES) for a in cache))
        logits_RxV = model.logits(h_Rx1xD, dtype=jnp.float32)[:, 0]
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, s + 1))(keys_R)
        new_R, lp_R, raw_R = self._sample(logits_RxV, step_keys, banned)
        new_R = jnp.where(st.done_R, pad, new_R)
        lp_R = jnp.where(st.done_R, 0.0, lp_R)
        raw_R = jnp.where(st.done_R, 0.0, raw_R)
        return _DecodeState(
            step=s + 1, cache=cache, done_R=st.done_R | is_stop(new_R),
            tokens_RxT=st.tokens_RxT.at[:, s + 1].set(new_R),
            logprobs_RxT=st.logprobs_RxT.at[:, s + 1].set(lp_R),
            policy_logprobs_RxT=st.policy_logprobs_RxT.at[:, s + 1].set(raw_R))

      tokens = jnp.full((r, t), pad, jnp.int32).at[:, 0].set(first_token_R)
      zeros = jnp.zeros((r, t), jnp.float32)
      init = _DecodeState(step=jnp.int32(0), cache=cache, done_R=is_stop(first_token_R), tokens_RxT=tokens,
                          logprobs_RxT=zeros.at[:, 0].set(first_logprob_R),
                          policy_logprobs_RxT=zeros.at[:, 0].set(first_policy_logprob_R))
      final = jax.lax.while_loop(cond, body, init)

      stop_RxT = is_stop(final.tokens_RxT.reshape(-1)).reshape(r, t)
      # mask: up to and including the first stop token (positions after it hold pad).
      before_stop_RxT = jnp.cumsum(stop_RxT.astype(jnp.int32), axis=1) - stop_RxT.astype(jnp.int32) == 0
      steps_done = final.step + 1                                    # tokens actually sampled per row
      mask_RxT = (before_stop_RxT & (jnp.arange(t)[None, :] < steps_done)).astype(jnp.int32)
      lengths_R = jnp.sum(mask_RxT, axis=1)
      finish_R = jnp.where(jnp.any(stop_RxT & mask_RxT.astype(bool), axis=1), FINISH_EOS, FINISH_LENGTH)
      tokens_RxT = jnp.where(mask_RxT.astype(bool), final.tokens_RxT, pad)
      resp_pos_RxT = jnp.where(mask_RxT.astype(bool), next_pos_R[:, None] + jnp.arange(t)[None, :], 0)
      position_ids = jnp.concatenate(
          [prompt_pos_3xRxLp, jnp.broadcast_to(resp_pos_RxT[None], (3, r, t)).astype(jnp.int32)], axis=2)
      rollout = Rollout(
          tokens_RxT=tokens_RxT, mask_RxT=mask_RxT,
          logprobs_RxT=jnp.where(mask_RxT.astype(bool), final.logprobs_RxT, 0.0),
          policy_logprobs_RxT=jnp.where(mask_RxT.astype(bool), final.policy_logprobs_RxT, 0.0),
          finish_reason_R=finish_R.astype(jnp.int32), lengths_R=lengths_R.astype(jnp.int32),
          prompt_ids_RxLp=prompt_ids_RxLp, prompt_mask_RxLp=prompt_mask_RxLp,
          position_ids_3xRxL=position_ids, rope_deltas_Rx1=rope_deltas_Rx1)
      # The final cache is returned only so the donated input buffer can alias it (in-place
      # decode, no second copy of the cache); generate() drops it.
      return rollout, final.cache

  # public ------------------------------------------------------------------------------------

  def generate(self, state, input_ids_BxLp, attention_mask_BxLp, pixel_values_NxP=None, image_grid_thw_Ix3=None, *,
               n: int = 1, key: jax.Array | int = 0, max_new_tokens: int | None = None) -> Rollout:
    """Samples ``n`` responses per left-padded prompt; returns a :class:`Rollout` of ``B*n`` rows.

    input_ids_BxLp / attention_mask_BxLp: left-padded prompts (every row's last slot is real).
    pixel_values_NxP / image_grid_thw_Ix3: processor layout, may carry zero padding rows; None
    for text-only batches. ``key``: a PRNG key or an int seed. ``max_new_tokens`` overrides
    the config's T (a new T is a new compiled program).
    """
    if isinstance(key, int):
      key = jax.random.key(key)
    elif not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.wrap_key_data(key)
    t = self.cfg.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    if pixel_values_NxP is not None and image_grid_thw_Ix3 is None:
      raise ValueError("Sampler.generate: pixel_values given without image_grid_thw")
    shape = (tuple(input_ids_BxLp.shape), None if pixel_values_NxP is None else tuple(pixel_values_NxP.shape),
             None if image_grid_thw_Ix3 is None else tuple(image_grid_thw_Ix3.shape), t, n)
    if shape not in self._seen:
      self._seen.add(shape)
      logging.info("sampler: compiling for prompts %s, pixels %s, grid %s, max_new_tokens %d, n %d "
                   "(%d shapes so far)", *shape, len(self._seen))
    pre = self._prefill(state, jnp.asarray(input_ids_BxLp, jnp.int32), jnp.asarray(attention_mask_BxLp, jnp.int32),
                        None if pixel_values_NxP is None else jnp.asarray(pixel_values_NxP),
                        None if image_grid_thw_Ix3 is None else jnp.asarray(image_grid_thw_Ix3, jnp.int32),
                        key, n=n, max_new_tokens=t)
    rollout, _ = self._decode(state, **pre)
    return rollout


def generate(graphdef, state, cfg: SamplingConfig, *args, mesh=None, **kw) -> Rollout:
  """Convenience wrapper: ``Sampler(graphdef, cfg, mesh=mesh).generate(state, *args, **kw)``.

  Samplers are cached per (graphdef, cfg, mesh), so repeated calls reuse compiled programs.
  """
  return _cached_sampler(graphdef, cfg, mesh).generate(state, *args, **kw)


@functools.lru_cache(maxsize=16)
def _cached_sampler(graphdef, cfg, mesh):
  return Sampler(graphdef, cfg, mesh=mesh)
