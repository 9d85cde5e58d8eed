"""Train-step cost of GRPO, PAPO and VPPO on the same batch, side by side.

    python -m papo_jax.rl.bench                      # CPU, 'small' model shape
    python -m papo_jax.rl.bench --preset=3b --rows=16 --prompt=1024 --response=1024 --peak_tflops=989

PAPO adds the masked-image forward (batch-concatenated with the original); with
mask_grad=False that half carries no gradient, so its backward is skipped. VPPO's
advantage scale is normalised over the whole update batch, so its step reads old and
masked log-probs from the log-prob pass (``StepConfig.needs_logprob_pass``), which runs
even with one mini-batch per step; its time counts pass + update. NoisyRollout changes
only the rollouts (half of them on noisy images); its update is GRPO's step.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from papo_jax.bench import model_flops_per_token, preset_config
from papo_jax.config_base import apply_variant, base_config, step_config
from papo_jax.models import from_hf_dict, init_model
from papo_jax.models.tiny import TEST_TOKEN_IDS, tiny_hf_dict
from papo_jax.rl import batching
from papo_jax.rl.losses import LossConfig
from papo_jax.rl.train_step import (StepConfig, TrainBatch, init_train_state, make_logprob_pass, make_optimizer,
                                    make_train_step)

FLAGS = flags.FLAGS
# --preset, --image_side, --iters, --peak_tflops come from papo_jax.bench.
flags.DEFINE_integer("rows", 8, "Rollouts per step (one micro-batch).")
flags.DEFINE_integer("prompt", 128, "Prompt tokens (image tokens included).")
flags.DEFINE_integer("response", 64, "Response tokens.")

# The 'small' preset: a CPU-sized Qwen2.5-VL from the shared tiny builder.
SMALL = dict(ids=dict(TEST_TOKEN_IDS, vocab_size=4096), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, mrope=(4, 6, 6), vision_depth=4, vision_hidden_size=128,
             vision_heads=4, vision_intermediate_size=256, fullatt_block_indexes=(1, 3))


def make_groups(rows: int, prompt: int, response: int, side: int, vocab: int, image_id: int, seed=0):
  rng = np.random.default_rng(seed)
  g = side // 28 * 2
  n_img = g * g // 4
  ids = rng.integers(30, vocab, size=prompt)
  ids[1] = 22
  ids[2:2 + n_img] = image_id
  ids[2 + n_img] = 23
  groups = []
  for r in range(rows):
    pv = rng.normal(size=(g * g, 1176)).astype(np.float32)
    groups.append(batching.Group(
        prompt_ids=ids, prompt_mask=np.ones(prompt, np.int32), pixel_values=pv,
        masked_pixel_values=pv * (rng.random((g * g, 1)) > 0.6), image_grid_thw=np.array([[1, g, g]]),
        responses=rng.integers(30, vocab, size=(1, response)), response_mask=np.ones((1, response), np.int32),
        advantages=rng.normal(size=1).astype(np.float32)))
  return groups


def main(argv):
  del argv
  dtype = "float32" if FLAGS.preset == "small" else "bfloat16"
  hf = tiny_hf_dict(**SMALL) if FLAGS.preset == "small" else preset_config(FLAGS.preset)
  cfg = from_hf_dict(hf, dtype=dtype, param_dtype="float32", remat=FLAGS.preset != "small")
  graphdef, params = nnx.split(init_model(cfg))
  ref = jax.tree.map(lambda a: jnp.array(a, dtype=jnp.dtype(dtype), copy=True), params)  # own buffers: params are donated
  groups = make_groups(FLAGS.rows, FLAGS.prompt, FLAGS.response, FLAGS.image_side, cfg.text.vocab_size,
                       cfg.image_token_id)
  batch = TrainBatch(**{k: jnp.asarray(v) for k, v in
                        batching.assemble_train_batch(groups, micro_batches=1, pad_id=0).items()})
  tx = make_optimizer(1e-6)

  def variant(name):   # the trainer's step switches for a config variant (papo_jax/config_base.py)
    return dataclasses.replace(step_config(apply_variant(base_config(), name)), logprob_chunk=StepConfig.logprob_chunk)

  grpo = StepConfig(loss=LossConfig(beta=0.01))
  # (name, step config, run the log-prob pass): with optim.mini_batches > 1 (the paper's 3) every
  # variant runs the pass, GRPO included, so the second GRPO row is the baseline of the pass rows.
  variants = [
      ("GRPO (beta 0.01)", grpo),
      ("GRPO, log-prob pass (mini_batches > 1)", grpo),
      ("PAPO-G (gamma 0.02), mask_grad=False", StepConfig(loss=LossConfig(beta=0.01, gamma=0.02))),
      ("PAPO-G + eta 0.05, mask_grad=True", StepConfig(loss=LossConfig(beta=0.01, gamma=0.02, eta_ori=0.05,
                                                                        eta_mask=0.05), mask_grad=True)),
      ("VPPO (variant vppo)", variant("vppo")),
      ("PAPO-G + VPPO (variant papo_vppo)", variant("papo_vppo")),
  ]
  tokens = FLAGS.rows * (FLAGS.prompt + FLAGS.response)
  flops = model_flops_per_token(cfg, FLAGS.prompt + FLAGS.response) * tokens
  rows = []
  for name, sc in variants:
    step = jax.jit(make_train_step(graphdef, tx, sc), donate_argnums=(0,))
    with_pass = sc.needs_logprob_pass or "log-prob pass" in name
    logprob_pass = jax.jit(make_logprob_pass(graphdef, sc)) if with_pass else None

    def update(state):
      if logprob_pass is None:
        return step(state, ref, batch)
      old, masked, ref_lp, dep = logprob_pass(state.params, ref, batch)
      return step(state, None, batch.replace(old_logp=old, mask_logp=masked, ref_logp=ref_lp, dependency=dep))

    state = init_train_state(jax.tree.map(jnp.copy, params), tx)  # the step donates its state
    t0 = time.perf_counter()
    state, m = update(state)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(FLAGS.iters):
      state, m = update(state)
    jax.block_until_ready(m)
    t = (time.perf_counter() - t0) / FLAGS.iters
    mfu = flops / t / 1e12 / FLAGS.peak_tflops if FLAGS.peak_tflops else float("nan")
    rows.append((name, logprob_pass is not None, compile_s, t, tokens / t, mfu))
  print(f"\npreset={FLAGS.preset} dtype={dtype} rows={FLAGS.rows} prompt={FLAGS.prompt} response={FLAGS.response} "
        f"image={FLAGS.image_side}px devices={jax.devices()[0].platform}x{jax.device_count()}")
  print(f"{'variant':<40} {'pass':>4} {'compile s':>10} {'step s':>9} {'tokens/s':>10} {'vs GRPO':>8} "
        f"{'vs GRPO+pass':>12} {'MFU(policy)':>11}")
  for name, with_pass, c, t, tps, mfu in rows:
    same = f"{t / rows[1][3]:>11.2f}x" if with_pass else f"{'-':>12}"
    print(f"{name:<40} {'yes' if with_pass else 'no':>4} {c:>10.2f} {t:>9.3f} {tps:>10.0f} {t / rows[0][3]:>7.2f}x "
          f"{same} {mfu:>11.1%}")
  print("pass: the step includes the log-prob pass (old + masked [+ ref] log-probs). With one mini-batch only VPPO "
        "needs it ('vs GRPO'); with optim.mini_batches > 1, as in the paper, every variant runs it ('vs GRPO+pass'). "
        "NoisyRollout: GRPO's step (only its rollouts differ).")

if __name__ == "__main__":
  app.run(main)
