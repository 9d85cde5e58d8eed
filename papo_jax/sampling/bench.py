"""Rollout throughput on long-tailed response lengths: static sampler vs continuous engine, same KV memory.

    python -m papo_jax.sampling.bench --engine=static,continuous            # CPU-sized defaults
    python -m papo_jax.sampling.bench --median=300 --p99=2000 --max_new_tokens=2048 --prompts=384 --n=5

One random Qwen2.5-VL (text hidden 256, 4 layers, vocab 1024; a small vision tower, one image
per prompt) decodes greedily. Every sample's length is drawn up front from a log-normal
(``--median``, ``--p99``, clipped to ``[2, max_new_tokens]``) and forced: the stop token is
suppressed before that length and forced at it (a logits hook in this bench only), so both
engines produce exactly the same lengths and the comparison is on scheduling alone.

* **static**: :class:`~papo_jax.sampling.sampler.Sampler` over batches of ``--static_rows``
  rows (prompts x n); each batch decodes until its longest row ends. KV memory:
  rows x (prompt + max_new_tokens) tokens.
* **continuous**: :class:`~papo_jax.sampling.engine.ContinuousEngine` with up to ``--slots``
  running samples, decode lanes bucketed from ``--min_decode_lanes`` (``--min_decode_lanes`` =
  ``--slots``: every step computes all slots), and a page pool of the *same* KV bytes as the
  static cache (``--kv_pages`` overrides).

Printed per engine: slot utilisation (response tokens / decode lane-steps computed), response tokens/s
(wall time of a second, compiled run), KV bytes, steps, preemptions.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from papo_jax.models import config as model_config_lib
from papo_jax.models.checkpoint import init_model
from papo_jax.models.qwen2_5_vl import Qwen25VL
from papo_jax.sampling.engine import ContinuousEngine, EngineConfig
from papo_jax.sampling.sampler import Sampler, SamplingConfig

FLAGS = flags.FLAGS
flags.DEFINE_list("engine", ["static", "continuous"], "Engines to run, in order: static, continuous, "
                  "continuous_full (the engine computing all --slots lanes every step).")
flags.DEFINE_integer("prompts", 64, "Prompts in the workload.")
flags.DEFINE_integer("n", 4, "Samples per prompt.")
flags.DEFINE_integer("prompt_len", 48, "Prompt length (image tokens included), left padded.")
flags.DEFINE_integer("image_side", 56, "Image side in pixels (one image per prompt; 0 for text only).")
flags.DEFINE_float("median", 30.0, "Median response length.")
flags.DEFINE_float("p99", 200.0, "99th percentile of the response length.")
flags.DEFINE_integer("max_new_tokens", 256, "Response length cap (lengths are clipped to it).")
flags.DEFINE_integer("static_rows", 32, "Static sampler: rows (prompts x n) per generate call.")
flags.DEFINE_integer("slots", 64, "Continuous engine: decode slots.")
flags.DEFINE_integer("page_size", 16, "Continuous engine: tokens per KV page.")
flags.DEFINE_integer("kv_pages", 0, "Continuous engine: pages (0: the static sampler's KV bytes).")
flags.DEFINE_integer("prefill_chunk", 64, "Continuous engine: prompt tokens per prefill lane per step.")
flags.DEFINE_integer("prefill_lanes", 1, "Continuous engine: prompts prefilled per step.")
flags.DEFINE_integer("min_decode_lanes", 1, "Continuous engine: smallest decode-lane bucket (--slots: no buckets).")
flags.DEFINE_integer("seed", 0, "Workload seed.")

IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID, BOS_ID, EOS_ID, PAD_ID = 20, 21, 22, 23, 1, 2, 0
BIG = 1e4


def model_config():
  from transformers import Qwen2_5_VLConfig
  text = dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
              bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]})
  vision = dict(depth=2, hidden_size=128, num_heads=4, intermediate_size=256, out_hidden_size=256,
                fullatt_block_indexes=[1], hidden_act="silu", patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, window_size=112, tokens_per_second=2)
  hf = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                        vision_start_token_id=VSTART_ID, vision_end_token_id=VEND_ID, tie_word_embeddings=True,
                        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
  return model_config_lib.from_hf_dict(hf.to_dict(), dtype="float32")


def make_prompts(batch: int, length: int, side: int, vocab: int, seed: int = 0):
  """Left-padded prompts of lengths in [length/2, length]: [text, <vs>, image pads, <ve>, text]."""
  rng = np.random.default_rng(seed)
  g = side // 28 * 2
  n_img = g * g // 4
  ids = np.full((batch, length), PAD_ID, np.int32)
  mask = np.zeros((batch, length), np.int32)
  for b in range(batch):
    real = int(rng.integers(max(length // 2, n_img + 4), length + 1))
    seq = list(rng.integers(30, vocab, size=real))
    if side:
      seq[1:3 + n_img] = [VSTART_ID] + [IMAGE_ID] * n_img + [VEND_ID]
    ids[b, length - real:] = seq[:real]
    mask[b, length - real:] = 1
  if not side:
    return ids, mask, None, None
  grid = np.tile(np.array([[1, g, g]], np.int32), (batch, 1))
  pv = rng.normal(size=(batch * g * g, 1176)).astype(np.float32)
  return ids, mask, pv, grid


def draw_lengths(count: int, median: float, p99: float, cap: int, seed: int) -> np.ndarray:
  """Log-normal response lengths (stop token included) with the given median and 99th percentile."""
  sigma = np.log(p99 / median) / 2.3263
  x = np.random.default_rng(seed + 1).lognormal(np.log(median), sigma, size=count)
  return np.clip(np.round(x), 2, cap).astype(np.int32)


def force_length(logits_NxV, token_index_N, target_N):
  """The stop token is impossible before token ``target - 1`` and certain at it."""
  at = (token_index_N == target_N - 1)[:, None]
  eos = jnp.arange(logits_NxV.shape[-1])[None, :] == EOS_ID
  return jnp.where(eos, jnp.where(at, BIG, -BIG), jnp.where(at, -BIG, logits_NxV))


class ForcedLengthModel(Qwen25VL):
  """Bench-only: the static sampler's decode step forces the stop token at each row's ``eos_slot_R``.

  The static decode loop writes response token s at cache slot ``prompt_len + s`` and then
  samples token ``s + 1`` from these logits, so token ``target - 1`` is drawn when the written
  slot is ``prompt_len + target - 2``.
  """

  def decode_step(self, x_Bx1xD, position_ids_3xBx1, cache, write_slot_B):
    h, cache = super().decode_step(x_Bx1xD, position_ids_3xBx1, cache, write_slot_B)
    # Read by logits() in the same trace (the decode body calls logits right after this);
    # set past nnx's attribute checks because the body runs at an inner trace level.
    object.__setattr__(self, "_forced_index_B", jnp.where(write_slot_B == self.eos_slot_R.get_value(), 0, 1))
    return h, cache

  def logits(self, hidden_BxLxD, dtype=None):
    out = super().logits(hidden_BxLxD, dtype)
    forced = getattr(self, "_forced_index_B", None)
    index = jnp.ones(out.shape[:1], jnp.int32) if forced is None else forced       # 0: force now
    return force_length(out[:, 0], index, jnp.ones_like(index))[:, None]


def run_static(sampler, model, ids, mask, pv, grid, targets, *, n, rows, t, batches=None):
  """Every batch of ``rows`` rows (the first ``batches`` only, for a warm-up: they share one shape)."""
  b_per = rows // n
  prompt_len = mask.sum(1)
  patches = None if grid is None else grid.prod(-1)
  lengths, slot_steps = [], 0
  for start in list(range(0, ids.shape[0], b_per))[:batches]:
    sl = slice(start, start + b_per)
    tgt = targets[start * n:(start + b_per) * n]
    model.eos_slot_R.set_value(jnp.asarray(np.repeat(prompt_len[sl], n) + tgt - 2, jnp.int32))
    graphdef, state = nnx.split(model)
    if pv is None:
      pv_b, grid_b = None, None
    else:
      p0 = int(patches[:start].sum())
      pv_b, grid_b = pv[p0:p0 + int(patches[sl].sum())], grid[sl]
    ro = sampler.generate(state, ids[sl], mask[sl], pv_b, grid_b, n=n)
    got = np.asarray(jax.device_get(ro.lengths_R))
    lengths.append(got)
    slot_steps += len(got) * int(got.max())          # the while loop runs until the longest row ends
  lengths = np.concatenate(lengths)
  kv_bytes = 2 * model.config.text.num_hidden_layers * rows * (ids.shape[1] + t) * \
      model.config.text.num_key_value_heads * model.config.text.head_dim * 4
  return lengths, dict(slot_utilisation=lengths.sum() / slot_steps, kv_bytes=kv_bytes,
                       steps=slot_steps // rows, preemptions=0)


def run_continuous(engine, model, ids, mask, pv, grid, *, n):
  ro = engine.generate(nnx.state(model), ids, mask, pv, grid, n=n)
  return np.asarray(jax.device_get(ro.lengths_R)), dict(engine.stats)


def main(argv):
  del argv
  n, t = FLAGS.n, FLAGS.max_new_tokens
  if FLAGS.static_rows % n:
    raise ValueError(f"--static_rows={FLAGS.static_rows} must be a multiple of --n={n}")
  cfg = model_config()
  model = init_model(cfg)
  bench_model = ForcedLengthModel(cfg, rngs=nnx.Rngs(0))
  nnx.update(bench_model, nnx.state(model))
  rows = FLAGS.static_rows
  bench_model.eos_slot_R = nnx.Variable(jnp.zeros((rows,), jnp.int32))
  ids, mask, pv, grid = make_prompts(FLAGS.prompts, FLAGS.prompt_len, FLAGS.image_side, cfg.text.vocab_size,
                                     FLAGS.seed)
  targets = draw_lengths(FLAGS.prompts * n, FLAGS.median, FLAGS.p99, t, FLAGS.seed)
  static_kv = 2 * cfg.text.num_hidden_layers * rows * (FLAGS.prompt_len + t) * cfg.text.num_key_value_heads * \
      cfg.text.head_dim * 4
  pages = FLAGS.kv_pages or static_kv // (2 * cfg.text.num_hidden_layers * FLAGS.page_size *
                                          cfg.text.num_key_value_heads * cfg.text.head_dim * 4)
  engine_cfg = EngineConfig(num_slots=FLAGS.slots, page_size=FLAGS.page_size, num_pages=int(pages),
                            prefill_chunk=FLAGS.prefill_chunk, prefill_lanes=FLAGS.prefill_lanes,
                            min_decode_lanes=FLAGS.min_decode_lanes)
  print(f"\nrollout bench: hidden 256, 4 layers, vocab {cfg.text.vocab_size}, float32, {FLAGS.prompts} prompts x "
        f"n={n}, prompt_len={FLAGS.prompt_len}, image={FLAGS.image_side}px, lengths log-normal median "
        f"{FLAGS.median:g} p99 {FLAGS.p99:g} cap {t} (drawn: median {np.median(targets):.0f}, mean "
        f"{targets.mean():.1f}, p99 {np.percentile(targets, 99):.0f}, max {targets.max()}, total {targets.sum()}), "
        f"devices={jax.devices()[0].platform}x{jax.device_count()}, cpus={os.cpu_count()}")
  scfg = SamplingConfig(max_new_tokens=t, greedy=True, cache_dtype="float32", stop_token_ids=(EOS_ID,))
  sampler = Sampler(nnx.graphdef(bench_model), scfg)
  target_R = jnp.asarray(targets)
  forced = lambda l, seq, j: force_length(l, j, target_R[seq])
  engines = {"continuous": ContinuousEngine(nnx.graphdef(model), scfg, engine_cfg, logits_processor=forced),
             "continuous_full": ContinuousEngine(nnx.graphdef(model), scfg, dataclasses.replace(
                 engine_cfg, min_decode_lanes=engine_cfg.num_slots), logits_processor=forced)}
  results = []
  for name in FLAGS.engine:
    if name == "static":
      fn = lambda: run_static(sampler, bench_model, ids, mask, pv, grid, targets, n=n, rows=rows, t=t)
      desc = f"static ({rows} rows/batch)"
    elif name in engines:
      engine = engines[name]
      fn = lambda engine=engine: run_continuous(engine, model, ids, mask, pv, grid, n=n)
      ec = engine.engine_cfg
      desc = (f"{name} ({ec.num_slots} slots, {ec.num_pages}x{ec.page_size} pages, chunk "
              f"{ec.prefill_chunk}x{ec.prefill_lanes}, lane buckets {','.join(map(str, ec.decode_buckets))})")
    else:
      raise ValueError(f"--engine: unknown engine {name!r} (static, continuous, continuous_full)")
    t0 = time.perf_counter()
    if name == "static":                                # compile + warm-up (one batch: one shape)
      run_static(sampler, bench_model, ids, mask, pv, grid, targets, n=n, rows=rows, t=t, batches=1)
    else:
      fn()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lengths, stats = fn()
    wall = time.perf_counter() - t0
    if not np.array_equal(lengths, targets):
      raise AssertionError(f"{name}: response lengths differ from the forced targets "
                           f"({int((lengths != targets).sum())} of {len(targets)} rows)")
    results.append((desc, compile_s, wall, targets.sum() / wall, stats))
  width = max(len(r[0]) for r in results)
  print(f"{'engine':<{width}} {'warm-up s':>9} {'wall s':>7} {'tokens/s':>9} {'vs first':>8} {'slot util':>9} "
        f"{'KV MB':>7} {'steps':>6} {'preempt':>7}")
  for desc, comp, wall, rate, st in results:
    print(f"{desc:<{width}} {comp:>9.1f} {wall:>7.2f} {rate:>9.0f} {rate / results[0][3]:>7.2f}x "
          f"{st['slot_utilisation']:>9.1%} {st['kv_bytes'] / 2**20:>7.1f} {st['steps']:>6} {st['preemptions']:>7}")
  print("(every engine's response lengths equal the forced targets)")


if __name__ == "__main__":
  app.run(main)
