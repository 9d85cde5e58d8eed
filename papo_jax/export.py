"""Export a training checkpoint as a Hugging Face model directory.

    python -m papo_jax.export --workdir=/tmp/papo_tiny --out=/tmp/papo_tiny_hf [--step=N] [--dtype=bfloat16]

Writes safetensors + config.json (official key layout) and copies the tokenizer,
chat-template and preprocessor files of the run's base checkpoint, so that
``transformers.AutoModelForImageTextToText.from_pretrained(out)`` and our own
``papo_jax.models.from_pretrained(out)`` both load it.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
from absl import app, flags, logging
from flax import nnx

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  flags.DEFINE_string("workdir", None, "Training workdir (holds config.json and checkpoints/).")
  flags.DEFINE_string("out", None, "Output directory for the Hugging Face model.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("dtype", None, "Tensor dtype to write (default: the trained parameters' dtype).")
  flags.mark_flags_as_required(["workdir", "out"])

_AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "chat_template.jinja",
              "preprocessor_config.json", "processor_config.json", "special_tokens_map.json", "vocab.json",
              "merges.txt", "generation_config.json", "added_tokens.json")


def base_model_path(c, workdir: str) -> str:
  return c.model.path if c.model.init == "pretrained" else os.path.join(workdir, "model")


def load_trained_model(workdir: str, step: int | None = None):
  """(model with the checkpoint's parameters, the run config, base checkpoint path, step)."""
  import orbax.checkpoint as ocp
  from papo_jax import models
  from papo_jax.rl.train_step import init_train_state, make_optimizer

  with open(os.path.join(workdir, "config.json")) as f:
    c = ml_collections.ConfigDict(json.load(f))
  from papo_jax.data.remote import localize
  path = localize(base_model_path(c, workdir))
  model = models.from_pretrained(path, dtype=c.model.param_dtype, param_dtype=c.model.param_dtype)
  graphdef, params = nnx.split(model)
  tx = make_optimizer(c.optim.lr, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
                      weight_decay=c.optim.weight_decay, grad_clip=c.optim.grad_clip)
  abstract = jax.eval_shape(lambda: init_train_state(params, tx))
  ckpt_dir = c.checkpoint.get("dir") or os.path.join(workdir, "checkpoints")
  mngr = ocp.CheckpointManager(ckpt_dir)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint")
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return nnx.merge(graphdef, restored.state.params), c, path, step


def export(workdir: str, out: str, step: int | None = None, dtype: str | None = None) -> str:
  from papo_jax import models
  model, _, path, step = load_trained_model(workdir, step)
  models.save_pretrained(model, out, dtype=dtype)
  for fn in _AUX_FILES:
    if os.path.exists(os.path.join(path, fn)):
      shutil.copy(os.path.join(path, fn), os.path.join(out, fn))
  logging.info("exported step %d of %s to %s", step, workdir, out)
  return out


def main(argv):
  del argv
  export(FLAGS.workdir, FLAGS.out, FLAGS.step, FLAGS.dtype)


if __name__ == "__main__":
  define_flags()
  app.run(main)
