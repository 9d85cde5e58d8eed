r"""Variants x seeds on one config, side by side: a table and one figure.

    python -m papo_jax.compare --out=/tmp/cmp --variants=grpo,papo_g --seeds=0,1,2
    python -m papo_jax.compare --out=/tmp/cmp --variants=grpo,papo_g --seeds=0,1,2 --summarize_only

Each (variant, seed) is one ``python -m papo_jax.train --config=<config>:<variant>`` run in
``<out>/<variant>/seed<k>`` with ``train.seed``, ``data.seed`` and the tiny model's seed set
to k (an independent replicate: initial weights, data order and sampling all change).
Finished runs are not rerun (the trainer says a finished run is done), so the command can be
repeated to add seeds or variants. ``--jobs`` runs that many at once.

Per variant it reports, as mean ± std over seeds: the training reward's first- and
last-fifth means (``reward/overall``), held-out accuracy at the start and at the end
(``val/accuracy``), the perception KL over the last fifth (``actor/kl_prcp``; none for
variants without the masked pass) and the median wall time per step (``timing/step``).
``<out>/summary.md``, ``summary.json`` and ``compare.png`` (reward, held-out accuracy and
perception KL per step, mean over seeds with a min-max band) are written.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags():
  flags.DEFINE_string("out", None, "Directory of the runs and the summary.")
  flags.DEFINE_string("config", os.path.join(ROOT, "configs", "tiny.py"), "Config file (variants as :name).")
  flags.DEFINE_list("variants", ["grpo", "papo_g"], "Config variants to compare.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (one replicate each).")
  flags.DEFINE_integer("jobs", 1, "Runs at once.")
  flags.DEFINE_multi_string("set", [], "Extra --config.x=v overrides for every run, e.g. --set=train.steps=100.")
  flags.DEFINE_bool("summarize_only", False, "Only read the existing runs.")
  flags.mark_flags_as_required(["out"])


def run_dir(out: str, variant: str, seed: int) -> str:
  return os.path.join(out, variant, f"seed{seed}")


def train_command(config: str, variant: str, seed: int, workdir: str, overrides=()) -> list[str]:
  """The trainer's command line for one replicate."""
  return [sys.executable, "-m", "papo_jax.train", f"--config={config}:{variant}", f"--workdir={workdir}",
          f"--config.train.seed={seed}", f"--config.data.seed={seed}", f"--config.model.tiny.seed={seed}",
          *[f"--config.{o}" for o in overrides]]


def read_rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the rows that carry ``key``."""
  pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
  if not pts:
    return np.zeros(0), np.zeros(0)
  s, v = np.asarray(pts, dtype=np.float64).T
  return s, v


def fifths(values: np.ndarray) -> tuple[float, float]:
  """Means of the first and the last fifth (at least one value each); NaN when empty."""
  if not len(values):
    return float("nan"), float("nan")
  k = max(1, len(values) // 5)
  return float(np.mean(values[:k])), float(np.mean(values[-k:]))


def run_summary(rows: list[dict]) -> dict[str, float]:
  """One replicate's figures (see the module docstring)."""
  train_rows = [r for r in rows if r.get("step", 0) >= 1 and "reward/overall" in r]
  _, reward = series(train_rows, "reward/overall")
  _, acc = series(rows, "val/accuracy")
  _, kl = series(train_rows, "actor/kl_prcp")
  _, secs = series(train_rows, "timing/step")
  first, last = fifths(reward)
  return {"steps": float(len(train_rows)), "reward_first": first, "reward_last": last,
          "val_first": float(acc[0]) if len(acc) else float("nan"),
          "val_last": float(acc[-1]) if len(acc) else float("nan"),
          "kl_prcp_last": fifths(kl)[1], "seconds_per_step": float(np.median(secs)) if len(secs) else float("nan")}


def aggregate(per_seed: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
  """(mean, std) over seeds of every figure, ignoring NaNs."""
  out = {}
  for k in per_seed[0]:
    v = np.asarray([s[k] for s in per_seed], dtype=np.float64)
    v = v[np.isfinite(v)]
    out[k] = (float(v.mean()), float(v.std())) if len(v) else (float("nan"), float("nan"))
  return out


def markdown_table(table: dict[str, dict], seeds: dict[str, int]) -> str:
  def f(mean_std, digits=3):
    m, s = mean_std
    return "-" if not np.isfinite(m) else f"{m:.{digits}f} ± {s:.{digits}f}"
  lines = ["| variant | seeds | steps | reward first 1/5 | reward last 1/5 | held-out acc start | held-out acc end | "
           "KL_prcp last 1/5 | s/step |", "|---|---|---|---|---|---|---|---|---|"]
  for v, agg in table.items():
    lines.append(f"| {v} | {seeds[v]} | {agg['steps'][0]:.0f} | {f(agg['reward_first'])} | {f(agg['reward_last'])} | "
                 f"{f(agg['val_first'])} | {f(agg['val_last'])} | {f(agg['kl_prcp_last'], 5)} | "
                 f"{f(agg['seconds_per_step'], 2)} |")
  return "\n".join(lines)


def plot(runs: dict[str, list[list[dict]]], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
  keys = [("reward/overall", "training reward (5-step mean)", 5), ("val/accuracy", "held-out accuracy (greedy)", 1),
          ("actor/kl_prcp", "perception KL (5-step mean)", 5)]
  for i, (label, replicates) in enumerate(runs.items()):
    color = f"C{i}"   # one colour per variant in every panel (a variant may have no curve in one)
    for ax, (key, _, k) in zip(axes, keys):
      curves = []
      for rows in replicates:
        s, v = series([r for r in rows if key != "reward/overall" or r.get("step", 0) >= 1], key)
        if len(v) >= k:
          v = np.convolve(v, np.ones(k) / k, mode="valid")
          curves.append((s[len(s) - len(v):], v))
      if not curves:
        continue
      n = min(len(v) for _, v in curves)
      steps, stack = curves[0][0][:n], np.stack([v[:n] for _, v in curves])
      ax.plot(steps, stack.mean(0), color=color, label=f"{label} ({len(curves)} seeds)",
              marker="o" if key == "val/accuracy" else None)
      ax.fill_between(steps, stack.min(0), stack.max(0), color=color, alpha=0.15)
  for ax, (key, title, _) in zip(axes, keys):
    ax.set(title=title, xlabel="step")
    ax.grid(alpha=0.3)
  axes[1].axhline(0.25, color="gray", ls="--", lw=1, label="chance")
  if axes[2].lines:
    axes[2].set_yscale("log")
  for ax in axes:
    if ax.lines:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summarize(out: str, variants: list[str], seeds: list[int]) -> str:
  runs, table, counts = {}, {}, {}
  for v in variants:
    reps = [read_rows(run_dir(out, v, s)) for s in seeds]
    reps = [r for r in reps if any(x.get("step", 0) >= 1 for x in r)]
    if not reps:
      continue
    runs[v], counts[v] = reps, len(reps)
    table[v] = aggregate([run_summary(r) for r in reps])
  md = markdown_table(table, counts)
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(md + "\n")
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({v: {k: list(ms) for k, ms in agg.items()} for v, agg in table.items()}, f, indent=1)
  if runs:
    try:
      plot(runs, os.path.join(out, "compare.png"))
    except ImportError:   # matplotlib is not a dependency of the trainer (the test extra has it)
      logging.warning("no figure: pip install matplotlib")
  return md


def main(argv):
  del argv
  seeds = [int(s) for s in FLAGS.seeds]
  os.makedirs(FLAGS.out, exist_ok=True)
  if not FLAGS.summarize_only:
    jobs = [(v, s) for s in seeds for v in FLAGS.variants]

    def one(job):
      v, s = job
      wd = run_dir(FLAGS.out, v, s)
      os.makedirs(wd, exist_ok=True)
      with open(os.path.join(wd, "train.log"), "a") as log:
        rc = subprocess.run(train_command(FLAGS.config, v, s, wd, FLAGS.set), stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT).returncode
      logging.info("%s seed %d: exit %d", v, s, rc)
      return rc

    with concurrent.futures.ThreadPoolExecutor(FLAGS.jobs) as pool:
      failed = [j for j, rc in zip(jobs, pool.map(one, jobs)) if rc]
    if failed:
      logging.error("runs that failed (see their train.log): %s", failed)
  print(summarize(FLAGS.out, FLAGS.variants, seeds))
  print(f"figure: {os.path.join(FLAGS.out, 'compare.png')}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
