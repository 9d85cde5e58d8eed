"""Export a training checkpoint as a Hugging Face model directory.

    python -m papo_jax.export --workdir=/tmp/papo_tiny --out=/tmp/papo_tiny_hf [--step=N] [--dtype=bfloat16]

Writes safetensors + config.json (official key layout) and copies the tokenizer,
chat-template and preprocessor files of the run's base checkpoint, so that
``transformers.AutoModelForImageTextToText.from_pretrained(out)`` and our own
``papo_jax.models.from_pretrained(out)`` both load it (transformers' ``AutoProcessor``
for these models also needs ``torchvision``). ``generation_config.json`` carries the
evaluation's sampling settings (``eval.temperature``, ``top_p``, ``top_k``,
``max_new_tokens``) and the stop/pad ids, so ``model.generate`` samples as the
evaluation did; ``README.md`` is a model card with the training config and, when the
run was evaluated (``<workdir>/eval/results.md`` or ``--eval_report``), its results.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

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
  flags.DEFINE_string("eval_report", None, "results.md for the model card (default: <workdir>/eval/results.md).")
  flags.mark_flags_as_required(["workdir", "out"])

_AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "chat_template.jinja",
              "preprocessor_config.json", "processor_config.json", "special_tokens_map.json", "vocab.json",
              "merges.txt", "added_tokens.json")


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


def generation_config(c_eval, eos_token_id, pad_token_id, base: dict | None = None) -> dict:
  """generation_config.json: the base checkpoint's, with the evaluation's sampling settings on top."""
  out = dict(base or {})
  out.pop("transformers_version", None)
  out.update(do_sample=True, temperature=float(c_eval.temperature), top_p=float(c_eval.top_p),
             top_k=int(c_eval.top_k), max_new_tokens=int(c_eval.max_new_tokens))
  if eos_token_id is not None:
    eos = [int(t) for t in np.atleast_1d(eos_token_id)]
    out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if pad_token_id is None:          # transformers pads with the first stop token when none is set
      pad_token_id = eos[0]
  if pad_token_id is not None:
    out["pad_token_id"] = int(pad_token_id)
  return out


def model_card(c, workdir: str, step: int, eval_md: str | None) -> str:
  """README.md: what was trained from what, how to load it, the training config and the evaluation."""
  base = c.model.path if c.model.init == "pretrained" else "a tiny random model (model.init=tiny_random)"
  algo = f"{c.algo.name}, gamma {c.papo.gamma}" if "algo" in c and "papo" in c else ""
  hub_base = base[len("hf://"):].split("@")[0] if str(base).startswith("hf://") else None
  front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text",
           "tags: [papo, grpo, reinforcement-learning, multimodal-reasoning]"]
  if hub_base:
    front.append(f"base_model: {hub_base}")
  front.append("---")
  ce = c.eval
  lines = front + [
      "", f"# {os.path.basename(os.path.normpath(workdir))} (step {step})", "",
      f"Trained with papo_jax (PAPO: Perception-Aware Policy Optimization{', ' + algo if algo else ''}) "
      f"from `{base}`; checkpoint step {step} of `{workdir}`.", "",
      "## Use", "", "```python",
      "from transformers import AutoModelForImageTextToText, AutoProcessor   # AutoProcessor needs torchvision",
      "model = AutoModelForImageTextToText.from_pretrained(PATH)",
      "processor = AutoProcessor.from_pretrained(PATH)", "```", "",
      f"`generation_config.json` samples as the evaluation did: temperature {ce.temperature}, top_p {ce.top_p}, "
      f"top_k {ce.top_k}, at most {ce.max_new_tokens} new tokens.", ""]
  if eval_md:
    # The report's own headings go below this section's.
    body = [("##" + l if l.startswith("#") else l) for l in eval_md.strip().splitlines()]
    lines += ["## Evaluation", ""] + body + [""]
  lines += ["## Training config", "", "```json", c.to_json_best_effort(indent=2), "```", ""]
  return "\n".join(lines)


def export(workdir: str, out: str, step: int | None = None, dtype: str | None = None,
           eval_report: str | None = None) -> str:
  from papo_jax import models
  model, c, path, step = load_trained_model(workdir, step)
  models.save_pretrained(model, out, dtype=dtype)
  for fn in _AUX_FILES:
    if os.path.exists(os.path.join(path, fn)):
      shutil.copy(os.path.join(path, fn), os.path.join(out, fn))
  base = {}
  if os.path.exists(os.path.join(path, "generation_config.json")):
    with open(os.path.join(path, "generation_config.json")) as f:
      base = json.load(f)
  with open(os.path.join(out, "generation_config.json"), "w") as f:
    json.dump(generation_config(c.eval, model.config.eos_token_id, model.config.pad_token_id, base), f, indent=2)
  eval_report = eval_report or os.path.join(workdir, "eval", "results.md")
  eval_md = None
  if os.path.exists(eval_report):
    with open(eval_report) as f:
      eval_md = f.read()
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write(model_card(c, workdir, step, eval_md))
  logging.info("exported step %d of %s to %s", step, workdir, out)
  return out


def main(argv):
  del argv
  export(FLAGS.workdir, FLAGS.out, FLAGS.step, FLAGS.dtype, FLAGS.eval_report)


if __name__ == "__main__":
  define_flags()
  app.run(main)
