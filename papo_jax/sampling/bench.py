"""Rollout throughput: our KV-cache sampler vs transformers ``generate``, same weights, same inputs.

    python -m papo_jax.sampling.bench                      # CPU, small random config, side by side
    python -m papo_jax.sampling.bench --batch=16 --max_new_tokens=256 --n=4

One random Qwen2.5-VL (text hidden 256, 4 layers, vocab 1024; a small vision tower) is built
in transformers, saved, and loaded into papo_jax, so both run identical float32 weights on
identical left-padded prompts (an image plus text per prompt). Both decode greedily for
exactly ``max_new_tokens`` (no early stop: HF gets ``min_new_tokens``, we stop on an id
outside the vocabulary). Prefill is timed separately (ours: the prefill program; HF:
``generate(max_new_tokens=1)``), and decode tokens/s = B*n*(T-1) / (total - prefill).
Torch runs with all CPU threads, XLA with its default CPU thread pool.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from papo_jax import models
from papo_jax.sampling.sampler import Sampler, SamplingConfig

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "Prompts per generate call.")
flags.DEFINE_integer("prompt_len", 64, "Prompt length (image tokens included), left padded.")
flags.DEFINE_integer("max_new_tokens", 128, "Response tokens generated per sequence.")
flags.DEFINE_integer("n", 1, "Samples per prompt (HF: prompts repeated n times).")
flags.DEFINE_integer("image_side", 112, "Image side in pixels (one image per prompt; 0 for text only).")
flags.DEFINE_integer("iters", 3, "Timed repetitions (after one warm-up / compile call).")
flags.DEFINE_bool("skip_hf", False, "Do not time transformers.")

IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID, BOS_ID, EOS_ID, PAD_ID = 20, 21, 22, 23, 1, 2, 0


def hf_config():
  from transformers import Qwen2_5_VLConfig
  text = dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
              bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]})
  vision = dict(depth=2, hidden_size=128, num_heads=4, intermediate_size=256, out_hidden_size=256,
                fullatt_block_indexes=[1], hidden_act="silu", patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2, window_size=112, tokens_per_second=2)
  return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                          vision_start_token_id=VSTART_ID, vision_end_token_id=VEND_ID, tie_word_embeddings=True,
                          bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


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


def _timed(fn, iters):
  out = fn()                                                   # warm-up / compile
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters


def main(argv):
  del argv
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration
  b, lp, t, n = FLAGS.batch, FLAGS.prompt_len, FLAGS.max_new_tokens, FLAGS.n
  torch.manual_seed(0)
  hf = Qwen2_5_VLForConditionalGeneration(hf_config()).eval().float()
  hf.set_attn_implementation("sdpa")
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    model = models.from_pretrained(d, dtype="float32")
  graphdef, state = nnx.split(model)
  vocab = model.config.text.vocab_size
  ids, mask, pv, grid = make_prompts(b, lp, FLAGS.image_side, vocab)
  args = [jnp.asarray(a) if a is not None else None for a in (ids, mask, pv, grid)]

  rows = []
  cfg = SamplingConfig(max_new_tokens=t, greedy=True, cache_dtype="float32", stop_token_ids=(vocab,))
  sampler = Sampler(graphdef, cfg)
  t0 = time.perf_counter()
  jax.block_until_ready(sampler.generate(state, *args, n=n))
  compile_s = time.perf_counter() - t0
  total = _timed(lambda: sampler.generate(state, *args, n=n), FLAGS.iters)
  prefill = _timed(lambda: sampler._prefill(state, *args, jax.random.key(0), n=n, max_new_tokens=t), FLAGS.iters)
  rows.append(("papo_jax Sampler (jit, while_loop)", compile_s, prefill, total))

  if not FLAGS.skip_hf:
    # HF greedy has no num_return_sequences > 1: expand the prompts n times as generate() itself does
    # for sampling (HF then prefills every copy; we prefill once per prompt).
    ti = torch.as_tensor(np.repeat(ids, n, 0), dtype=torch.long)
    kw = dict(input_ids=ti, attention_mask=torch.as_tensor(np.repeat(mask, n, 0), dtype=torch.long),
              mm_token_type_ids=(ti == IMAGE_ID).long(), do_sample=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    if pv is not None:
      pv_n = np.repeat(pv.reshape(b, -1, pv.shape[-1]), n, 0).reshape(-1, pv.shape[-1])
      kw.update(pixel_values=torch.as_tensor(pv_n), image_grid_thw=torch.as_tensor(np.repeat(grid, n, 0)).long())

    def hf_gen(new):
      with torch.no_grad():
        out = hf.generate(**kw, max_new_tokens=new, min_new_tokens=new)
      assert out.shape == (b * n, lp + new), out.shape
      return out

    total_hf = _timed(lambda: hf_gen(t), FLAGS.iters)
    prefill_hf = _timed(lambda: hf_gen(1), FLAGS.iters)
    rows.append(("transformers generate (torch, sdpa)", 0.0, prefill_hf, total_hf))

  print(f"\nrollout bench: hidden 256, 4 layers, vocab {vocab}, float32, batch={b} n={n} prompt_len={lp} "
        f"image={FLAGS.image_side}px max_new_tokens={t} devices={jax.devices()[0].platform}x{jax.device_count()} "
        f"cpus={os.cpu_count()} torch_threads={torch.get_num_threads()}")
  print(f"{'implementation':<36} {'compile s':>9} {'prefill s':>9} {'total s':>8} {'decode tok/s':>12} "
        f"{'end-to-end tok/s':>16}")
  rates = []
  for name, comp, pre, tot in rows:
    dec = b * n * (t - 1) / max(tot - pre, 1e-9)
    e2e = b * n * t / tot
    rates.append(dec)
    print(f"{name:<36} {comp:>9.2f} {pre:>9.4f} {tot:>8.3f} {dec:>12.0f} {e2e:>16.0f}")
  if len(rates) == 2:
    print(f"speed-up (decode tok/s): {rates[0] / rates[1]:.1f}x; "
          f"end-to-end: {rows[1][3] / rows[0][3]:.1f}x")


if __name__ == "__main__":
  app.run(main)
