"""Model throughput: our jitted forward and forward+backward vs Hugging Face PyTorch eager.

    python -m papo_jax.bench --preset=small            # CPU, side by side with transformers
    python -m papo_jax.bench --preset=3b --batch=8 --seq=2048 --skip_hf   # accelerator, bf16
    # attention backends side by side (GPU): 4 x 6144 tokens, one 1-megapixel image each
    python -m papo_jax.bench --preset=3b --batch=4 --seq=6144 --image_side=1008 --attention=xla,cudnn \
        --skip_hf --remat --peak_tflops=989

Prints one table: compile time, step time, tokens/s, compiled temporary memory, the
largest logit difference from the first backend, and (with ``--peak_tflops``) model
FLOPs utilisation.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from papo_jax.models import from_hf_dict, init_model

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "small", ["small", "3b", "7b"], "Model shape.")
flags.DEFINE_integer("batch", 4, "Sequences per step.")
flags.DEFINE_integer("seq", 256, "Tokens per sequence (image tokens included).")
flags.DEFINE_integer("image_side", 224, "Image side in pixels (one image per sequence).")
flags.DEFINE_string("dtype", None, "Compute/param dtype; default float32 for small, bfloat16 otherwise.")
flags.DEFINE_integer("iters", 5, "Timed iterations.")
flags.DEFINE_bool("skip_hf", False, "Do not time the transformers model.")
flags.DEFINE_float("peak_tflops", 0.0, "Accelerator peak TFLOP/s for MFU (e.g. 989 for H100 bf16 dense).")
flags.DEFINE_bool("remat", False, "Rematerialise decoder layers.")
flags.DEFINE_list("attention", ["xla"], "Attention backends to compare (auto, xla, cudnn, pallas_tpu).")

IMAGE_ID = 20


def preset_config(name: str) -> dict:
  if name == "small":
    text = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    vision = dict(depth=4, hidden_size=128, num_heads=4, intermediate_size=256, out_hidden_size=256,
                  fullatt_block_indexes=[1, 3])
  else:
    big = name == "7b"
    text = dict(vocab_size=152064 if big else 151936, hidden_size=3584 if big else 2048,
                intermediate_size=18944 if big else 11008, num_hidden_layers=28 if big else 36,
                num_attention_heads=28 if big else 16, num_key_value_heads=4 if big else 2,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                  out_hidden_size=3584 if big else 2048, fullatt_block_indexes=[7, 15, 23, 31])
  return dict(model_type="qwen2_5_vl", rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=name != "7b",
              image_token_id=IMAGE_ID, video_token_id=21, vision_start_token_id=22, vision_end_token_id=23,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, vision_config=dict(vision, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, tokens_per_second=2), **text)


def make_inputs(batch: int, seq: int, side: int, vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  g = side // 28 * 2
  n_img_tok = g * g // 4
  if n_img_tok + 4 > seq:
    raise ValueError(f"--seq {seq} is too short for a {side}px image ({n_img_tok} image tokens)")
  ids = rng.integers(30, vocab, size=(batch, seq))
  ids[:, 2] = 22
  ids[:, 3:3 + n_img_tok] = IMAGE_ID
  ids[:, 3 + n_img_tok] = 23
  grid = np.tile(np.array([[1, g, g]]), (batch, 1))
  pv = rng.normal(size=(batch * g * g, 1176)).astype(np.float32)
  return ids.astype(np.int32), np.ones_like(ids, np.int32), pv, grid.astype(np.int32)


def model_flops_per_token(cfg, seq: int) -> float:
  """6 * params (fwd+bwd matmuls) + attention scores, per text token (vision counted via its tokens)."""
  t = cfg.text
  layer = 2 * t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
  layer += 2 * t.hidden_size * t.num_attention_heads * t.head_dim + 3 * 2 * t.hidden_size * t.intermediate_size
  dense = t.num_hidden_layers * layer + 2 * t.hidden_size * t.vocab_size
  attn = t.num_hidden_layers * 2 * 2 * seq * t.num_attention_heads * t.head_dim / 2
  return 3 * (dense + attn)


def _time(fn, iters):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn()
  jax.block_until_ready(out)
  return first, (time.perf_counter() - t0) / iters


def main(argv):
  del argv
  dtype = FLAGS.dtype or ("float32" if FLAGS.preset == "small" else "bfloat16")
  hf_cfg = preset_config(FLAGS.preset)
  ids, mask, pv, grid = make_inputs(FLAGS.batch, FLAGS.seq, FLAGS.image_side, hf_cfg["vocab_size"])
  ids_j, mask_j, pv_j, grid_j = map(jnp.asarray, (ids, mask, pv, grid))
  tokens = FLAGS.batch * FLAGS.seq
  per_image = int(grid[0].prod())
  rows, first_logits = [], None
  for backend in FLAGS.attention:
    cfg = from_hf_dict(hf_cfg, dtype=dtype, param_dtype=dtype, remat=FLAGS.remat, attention=backend,
                       max_image_patches=per_image)
    graphdef, state = nnx.split(init_model(cfg, seed=0))   # same seed: same weights for every backend

    def loss_fn(state):
      m = nnx.merge(graphdef, state)
      h = m.hidden_states(ids_j, mask_j, pv_j, grid_j)
      logits = m.logits(h[:, :-1], dtype=jnp.float32)
      lp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(lp, ids_j[:, 1:, None], -1))

    fwd = jax.jit(lambda s: nnx.merge(graphdef, s)(ids_j, attention_mask=mask_j, pixel_values=pv_j,
                                                   image_grid_thw=grid_j)[:, -256:].astype(jnp.float32))
    fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))
    mem = {}
    for name, fn in (("forward", fwd), ("fwd+bwd", fwd_bwd)):
      try:
        mem[name] = fn.lower(state).compile().memory_analysis().temp_size_in_bytes / 2**30
      except Exception:  # some backends report no memory analysis
        mem[name] = float("nan")
    logits = np.asarray(fwd(state))
    first_logits = logits if first_logits is None else first_logits
    diff = float(np.abs(logits - first_logits).max())
    c_f, t_f = _time(lambda: fwd(state), FLAGS.iters)
    c_b, t_b = _time(lambda: fwd_bwd(state), FLAGS.iters)
    state = None   # free this backend's parameters before the next one
    flops = model_flops_per_token(cfg, FLAGS.seq) * tokens
    mfu = lambda t, frac: (flops * frac / t / 1e12 / FLAGS.peak_tflops) if FLAGS.peak_tflops else float("nan")
    label = f"papo_jax (jit, {backend})"
    rows.append((label, "forward", c_f - t_f, t_f, tokens / t_f, mfu(t_f, 1 / 3), mem["forward"], diff))
    rows.append((label, "fwd+bwd", c_b - t_b, t_b, tokens / t_b, mfu(t_b, 1.0), mem["fwd+bwd"], float("nan")))
  peak = "n/a"
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = f"{stats.get('peak_bytes_in_use', 0) / 2**30:.1f} GiB" if stats else "n/a"
  except Exception:  # CPU has no memory stats
    pass

  if not FLAGS.skip_hf:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tdtype = torch.float32 if dtype == "float32" else torch.bfloat16
    hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_cfg)).to(tdtype)
    hf.set_attn_implementation("eager")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = hf.to(device)
    ti = torch.as_tensor(ids, dtype=torch.long, device=device)
    kw = dict(input_ids=ti, attention_mask=torch.as_tensor(mask, device=device),
              pixel_values=torch.as_tensor(pv, device=device), image_grid_thw=torch.as_tensor(grid, device=device),
              mm_token_type_ids=(ti == IMAGE_ID).long())

    def hf_fwd():
      with torch.no_grad():
        return hf(**kw).logits

    def hf_fwd_bwd():
      out = hf(**kw, labels=ti)
      out.loss.backward()
      return out.loss

    def sync(x):
      if device == "cuda":
        torch.cuda.synchronize()
      return x

    for name, fn in (("forward", hf_fwd), ("fwd+bwd", hf_fwd_bwd)):
      hf.eval()
      fn()
      t0 = time.perf_counter()
      for _ in range(FLAGS.iters):
        sync(fn())
      t = (time.perf_counter() - t0) / FLAGS.iters
      rows.append(("transformers (torch eager)", name, 0.0, t, tokens / t, mfu(t, 1 / 3 if name == "forward" else 1.0),
                   float("nan"), float("nan")))

  print(f"\npreset={FLAGS.preset} dtype={dtype} batch={FLAGS.batch} seq={FLAGS.seq} image={FLAGS.image_side}px "
        f"devices={jax.devices()[0].platform}x{jax.device_count()} peak_mem={peak}")
  print(f"{'implementation':<32} {'pass':<8} {'compile s':>10} {'step s':>9} {'tokens/s':>11} {'MFU':>6} "
        f"{'temp GiB':>9} {'max |dlogit|':>13}")
  for impl, name, comp, t, tps, m, mem_gib, diff in rows:
    print(f"{impl:<32} {name:<8} {comp:>10.2f} {t:>9.4f} {tps:>11.0f} {m:>6.1%} {mem_gib:>9.2f} {diff:>13.2e}")
  ours = {r[1]: r[3] for r in rows if r[0].startswith("papo_jax")}
  theirs = {r[1]: r[3] for r in rows if r[0].startswith("transformers")}
  for k in theirs:
    print(f"speed-up {k}: {theirs[k] / ours[k]:.2f}x")


if __name__ == "__main__":
  app.run(main)
