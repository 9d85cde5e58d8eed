"""Evaluation: avg@k on the paper's benchmarks with the training sampler and grader.

    python -m papo_jax.eval --config=configs/qwen25vl_3b.py --checkpoint=/runs/papo_3b \\
        --config.eval.data_dir=/data/papo_eval --out=/runs/papo_3b/eval [--baseline=/runs/grpo_3b/eval/results.csv]

``--checkpoint`` is a training workdir (its latest orbax step, or ``--step``) or a
Hugging Face model directory. For every benchmark: k samples per question (the paper:
k = 8, temperature 1.0, top_p 1.0, top_k 50, 2048 new tokens, images at most 768*768
pixels), each graded by the training reward's grader; a question scores the mean of its
k accuracies and a benchmark the mean over questions (avg@k). The report gives every
benchmark, the unweighted means of the general and the vision-dependent groups, the
overall mean, and with a baseline the per-benchmark relative gain and its mean
(Delta%rel). Outputs in ``--out``: ``results.md`` (also printed), ``results.csv``,
``results.json`` and one ``<benchmark>.jsonl`` with every question's k responses and
scores. A benchmark whose ``<benchmark>.done.json`` exists is read back, not redone,
so an interrupted evaluation resumes where it stopped -- but only when that record was
made by the same checkpoint (path, step and a fingerprint of its files), the same k,
sampling settings, grader and benchmark files; otherwise the benchmark is recomputed and
the log says what differed. Every benchmark's files are found before anything is generated.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import glob
import hashlib
import json
import os
import re
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from papo_jax.rollouts import score_prompt_batch

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Run config (configs/*.py); its eval group sets the protocol.")
  flags.DEFINE_string("checkpoint", None, "Training workdir or Hugging Face model directory.")
  flags.DEFINE_integer("step", None, "Checkpoint step of a training workdir (default: the latest).")
  flags.DEFINE_string("out", None, "Output directory (default: <checkpoint>/eval).")
  flags.DEFINE_string("baseline", None, "results.csv/json of a baseline evaluation, for Delta%rel.")
  flags.mark_flags_as_required(["config", "checkpoint"])


# ============================================================================================
# Benchmarks
# ============================================================================================

GENERAL, VISION = "general", "vision"


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """Where a benchmark's records are and how to read them.

  ``pattern``: glob under the eval data directory (parquet or JSON lines); ``problem``,
  ``answer``, ``images``: column names (``problem`` may hold a chat ``messages`` list);
  ``closed_form``: keep only questions whose answer is closed-form (the paper does so for
  MathVista and MathVerse); ``group``: general | vision.
  """
  name: str
  pattern: str
  group: str
  problem: str = "problem"
  answer: str = "answer"
  images: str = "images"
  closed_form: bool = False


# The paper's eight benchmarks (papo.md section 7); MathVerse also as its vision-only subset.
BENCHMARKS = {b.name: b for b in (
    Benchmark("geometry3k", "geometry3k/*", GENERAL),
    Benchmark("mathvista", "mathvista/*", GENERAL, closed_form=True),
    Benchmark("wemath", "wemath/*", GENERAL),
    Benchmark("mmk12", "mmk12/*", GENERAL),
    Benchmark("mathverse", "mathverse/*", GENERAL, closed_form=True),
    Benchmark("logicvista", "logicvista/*", VISION),
    Benchmark("superclevr", "superclevr/*", VISION),
    Benchmark("mmmu_pro", "mmmu_pro/*", VISION),
    Benchmark("mathverse_vision", "mathverse_vision/*", VISION, closed_form=True),
)}

_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?%?$", re.IGNORECASE)
_FRACTION = re.compile(r"^[-+]?\d+\s*/\s*\d+$")
_CHOICE = re.compile(r"^\(?[A-Ha-h]\)?$")


def is_closed_form(answer: str) -> bool:
  """A number (int, decimal, fraction, percent), a choice letter, or a short math expression.

  Free-text answers (words) are open-ended and dropped where the paper keeps only
  closed-form questions.
  """
  a = answer.strip().strip("$").strip()
  a = re.sub(r"\\(text|mathrm)\{([^}]*)\}", r"\2", a).replace(",", "")
  if _NUMBER.match(a) or _FRACTION.match(a) or _CHOICE.match(a):
    return True
  words = re.findall(r"[A-Za-z]{4,}", re.sub(r"\\[A-Za-z]+", "", a))
  return bool(a) and len(a) <= 32 and not words


def registry(c_eval) -> dict[str, Benchmark]:
  """The built-in benchmarks plus the config's own (``eval.custom``: name -> dict of fields)."""
  out = dict(BENCHMARKS)
  for name, spec in (c_eval.get("custom") or {}).items():
    out[name] = Benchmark(name=name, **dict(spec))
  return out


def benchmark_files(data_dir: str, bench: Benchmark) -> tuple[str, list[str]]:
  """(source kind, files) for a benchmark under ``data_dir``."""
  files = sorted(f for f in glob.glob(os.path.join(data_dir, bench.pattern))
                 if f.endswith((".parquet", ".jsonl", ".json")))
  if not files:
    raise FileNotFoundError(f"benchmark {bench.name}: no .parquet/.jsonl files match "
                            f"{os.path.join(data_dir, bench.pattern)!r}")
  kinds = {"parquet" if f.endswith(".parquet") else "jsonl" for f in files}
  if len(kinds) > 1:
    raise ValueError(f"benchmark {bench.name}: mixes parquet and JSON-lines files")
  return kinds.pop(), files


def check_benchmark_files(data_dir: str, benches: list[Benchmark]) -> dict[str, tuple[str, list[str]]]:
  """benchmark_files for every benchmark; one error naming all that are missing or unreadable."""
  found, problems = {}, []
  for b in benches:
    try:
      found[b.name] = benchmark_files(data_dir, b)
    except (FileNotFoundError, ValueError) as e:
      problems.append(str(e))
  if problems:
    raise FileNotFoundError(f"{len(problems)} of {len(benches)} benchmarks cannot be read, nothing was run:\n  "
                            + "\n  ".join(problems))
  return found


# ============================================================================================
# What a result depends on (the done-record's identity)
# ============================================================================================

_CHUNK = 1 << 20


def fingerprint_files(root: str) -> str:
  """A cheap content fingerprint of every file under ``root`` (a local path or an fsspec URL).

  Small files are hashed whole; larger ones by their size and three 1 MiB windows (start,
  middle, end), so two fine-tunes of one architecture (equal sizes) still differ.
  """
  import fsspec
  fs, base = fsspec.core.url_to_fs(root)
  files = sorted(fs.find(base)) if fs.isdir(base) else [base]
  h = hashlib.sha1()
  for path in files:
    rel = os.path.relpath(path, base) if path != base else os.path.basename(path)
    size = fs.size(path)
    h.update(f"{rel}\0{size}\0".encode())
    with fs.open(path, "rb") as f:
      if size <= 4 * _CHUNK:
        h.update(f.read())
      else:
        for start in (0, size // 2, size - _CHUNK):
          f.seek(start)
          h.update(f.read(_CHUNK))
  return h.hexdigest()[:20]


def checkpoint_identity(checkpoint: str, step: int | None = None) -> dict:
  """{checkpoint, step, fingerprint} of what ``load_policy`` will load.

  A training workdir: the orbax step (``step`` or the latest) and a fingerprint of that
  step's directory. A Hugging Face directory: step None and a fingerprint of the directory.
  """
  from papo_jax.data.remote import is_remote, localize
  local = localize(checkpoint)
  name = checkpoint if is_remote(checkpoint) else os.path.abspath(checkpoint)
  if not os.path.isdir(os.path.join(local, "checkpoints")):
    return {"checkpoint": name, "step": None, "fingerprint": fingerprint_files(local)}
  import orbax.checkpoint as ocp
  with open(os.path.join(local, "config.json")) as f:
    ckpt_dir = (json.load(f).get("checkpoint") or {}).get("dir") or os.path.join(local, "checkpoints")
  mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True))
  steps = list(mngr.all_steps())
  step = mngr.latest_step() if step is None else int(step)
  if step is None or step not in steps:
    raise FileNotFoundError(f"{ckpt_dir}: no checkpoint at step {step} (steps there: {sorted(steps)})")
  step_dir = str(mngr.directory / str(step)) if (mngr.directory / str(step)).exists() else None
  if step_dir is None:                      # a step name format other than the default "<step>"
    step_dir = next(str(p) for p in mngr.directory.iterdir() if p.name.endswith(str(step)))
  return {"checkpoint": name, "step": step, "fingerprint": fingerprint_files(step_dir)}


def eval_settings(c, format_mode: str) -> dict:
  """Everything besides the checkpoint and the data that a benchmark's scores depend on."""
  ce = c.eval
  return {"k": int(ce.k), "temperature": float(ce.temperature), "top_p": float(ce.top_p), "top_k": int(ce.top_k),
          "max_new_tokens": int(ce.max_new_tokens), "min_pixels": int(ce.min_pixels),
          "max_pixels": int(ce.max_pixels), "max_prompt_length": int(c.data.max_prompt_length),
          "batch_size": int(ce.batch_size), "seed": int(ce.seed), "dtype": str(c.model.dtype),
          "cache_dtype": str(c.rollout.cache_dtype), "reward": str(c.reward.name), "format_mode": format_mode}


def data_identity(bench: Benchmark, files: list[str]) -> dict:
  """The benchmark's definition and its files (names and sizes)."""
  return {**dataclasses.asdict(bench), "files": [[os.path.basename(f), os.path.getsize(f)] for f in files]}


def record_mismatch(expected: dict, found: dict | None) -> list[str]:
  """Human-readable differences between the expected identity and a done-record's ('' = reusable)."""
  if not found:
    return ["it records no checkpoint, settings or data (written by an older version)"]
  out = []
  for part in sorted(set(expected) | set(found)):
    e, f = expected.get(part), found.get(part)
    if isinstance(e, dict) and isinstance(f, dict):
      out += [f"{part}.{k}: {f.get(k)!r} there, {e.get(k)!r} now" for k in sorted(set(e) | set(f))
              if e.get(k) != f.get(k)]
    elif e != f:
      out.append(f"{part}: {f!r} there, {e!r} now")
  return out


# ============================================================================================
# Scores (pure functions)
# ============================================================================================

def avg_at_k(scores_QxK: np.ndarray) -> float:
  """Mean over questions of the mean of each question's k binary scores, in percent."""
  return float(np.mean(np.mean(scores_QxK, axis=1)) * 100.0) if len(scores_QxK) else float("nan")


def relative_gain(ours: float, base: float) -> float:
  """(ours - base) / base in percent."""
  return (ours - base) / base * 100.0


def summarize(per_bench: dict[str, float], groups: dict[str, str], baseline: dict[str, float] | None = None):
  """Group means, the overall mean and (with a baseline) Delta%rel = mean of per-benchmark gains."""
  names = list(per_bench)
  out = {}
  for g in (GENERAL, VISION):
    vals = [per_bench[n] for n in names if groups[n] == g]
    out[f"mean/{g}"] = float(np.mean(vals)) if vals else float("nan")
  out["mean/overall"] = float(np.mean([per_bench[n] for n in names])) if names else float("nan")
  if baseline:
    gains = {n: relative_gain(per_bench[n], baseline[n]) for n in names if n in baseline}
    out["gain"] = gains
    out["delta_rel"] = float(np.mean(list(gains.values()))) if gains else float("nan")
  return out


def read_baseline(path: str) -> dict[str, float]:
  """Per-benchmark avg@k from a previous evaluation's results.csv or results.json."""
  if path.endswith(".json"):
    with open(path) as f:
      return {k: float(v) for k, v in json.load(f)["benchmarks"].items()}
  with open(path) as f:
    return {row["benchmark"]: float(row["avg@k"]) for row in csv.DictReader(f)
            if not row["benchmark"].startswith("mean/")}


# ============================================================================================
# Generation + grading (papo_jax.rollouts.score_prompt_batch, shared with the trainer's validation)
# ============================================================================================

def _batches(source, ids, processor, cfg_data, batch_size: int):
  """(PromptBatch, real rows, per-batch skips) over ``ids`` in order, the last batch padded by repetition."""
  from papo_jax.data import pipeline
  buckets = pipeline.resolve_buckets(cfg_data, batch_size)
  patch_dim = processor.image.patch_dim
  pending, skipped = [], {}
  for pos, rid in enumerate(ids):
    ex = pipeline.process_record(int(rid), source, processor, cfg_data.max_prompt_length, False)
    if not ex["ok"]:
      skipped[ex["reason"]] = skipped.get(ex["reason"], 0) + 1
      logging.warning("skipping %s (%s)", ex["message"], ex["reason"])
    else:
      pending.append(ex)
    if len(pending) == batch_size or (pos == len(ids) - 1 and pending):
      real = len(pending)
      pending += [pending[-1]] * (batch_size - real)     # a static shape for the last batch
      batch, _ = pipeline.collate(pending, processor.pad_token_id, buckets, patch_dim, False)
      yield batch, real, skipped
      pending, skipped = [], {}
  if skipped:
    yield None, 0, skipped


def evaluate_benchmark(bench: Benchmark, data_dir: str, out_dir: str, *, sampler, params, processor, reward_fn,
                       tokenizer, stop_ids, k: int, batch_size: int, cfg_data, seed: int = 0,
                       identity: dict | None = None) -> dict:
  """Runs one benchmark (or reads back its finished result); returns its summary dict.

  ``identity``: {"checkpoint": ..., "settings": ...} of this evaluation (``run`` passes
  checkpoint_identity and eval_settings); the benchmark's data, k, batch size and seed are
  added here. A done-record is read back only when its identity equals this one.
  """
  from papo_jax.data import pipeline, sources
  done_path = os.path.join(out_dir, f"{bench.name}.done.json")
  kind, files = benchmark_files(data_dir, bench)
  identity = dict(identity or {})
  identity["settings"] = {**identity.get("settings", {}), "k": int(k), "batch_size": int(batch_size),
                          "seed": int(seed)}
  identity["data"] = data_identity(bench, files)
  if os.path.exists(done_path):
    with open(done_path) as f:
      summary = json.load(f)
    diff = record_mismatch(identity, summary.get("identity"))
    if not diff:
      logging.info("%s: finished earlier (avg@%d %.2f), read back", bench.name, summary["k"], summary["avg@k"])
      return summary
    logging.warning("%s: the finished result in %s is not reused, recomputing: %s", bench.name, done_path,
                    "; ".join(diff))
    os.remove(done_path)
  fields = sources.Fields(problem=bench.problem, answer=bench.answer, images=bench.images, kind="")
  src = sources.make_source(kind, files[0] if len(files) == 1 else os.path.dirname(files[0]), fields)
  kept, dropped = pipeline.prefilter(src, processor, cfg_data.max_prompt_length, max(1, cfg_data.num_threads))
  skipped = {k_: int(v) for k_, v in dropped.items() if v}
  if bench.closed_form:
    closed = [i for i in kept if is_closed_form(src.record(int(i))["answer"])]
    if len(closed) < len(kept):
      skipped["not_closed_form"] = len(kept) - len(closed)
    kept = closed
  jsonl = os.path.join(out_dir, f"{bench.name}.jsonl")
  scores, t0 = [], time.perf_counter()
  with open(jsonl, "w") as f, tqdm(total=len(kept), desc=bench.name, unit="q", dynamic_ncols=True) as bar:
    for bi, (batch, real, skips) in enumerate(_batches(src, kept, processor, cfg_data, batch_size)):
      for reason, n in skips.items():
        skipped[reason] = skipped.get(reason, 0) + n
      if batch is None:
        continue
      key = jax.random.fold_in(jax.random.key(seed), bi)
      texts, r = score_prompt_batch(sampler, params, batch, k=k, key=key, reward_fn=reward_fn, tokenizer=tokenizer,
                                    stop_ids=stop_ids, rows=real)
      acc = np.asarray(r["accuracy"], np.float64).reshape(real, k)
      fmt = np.asarray(r["format"], np.float64).reshape(real, k)
      for i in range(real):
        f.write(json.dumps({"benchmark": bench.name, "record_id": int(batch.record_ids[i]),
                            "problem": batch.problems[i], "answer": batch.answers[i],
                            "responses": texts[i * k:(i + 1) * k], "accuracy": acc[i].tolist(),
                            "format": fmt[i].tolist(), "score": float(acc[i].mean())}) + "\n")
      scores.append(acc)
      bar.update(real)
  scores_QxK = np.concatenate(scores) if scores else np.zeros((0, k))
  summary = {"benchmark": bench.name, "group": bench.group, "k": k, "questions": int(len(scores_QxK)),
             "avg@k": avg_at_k(scores_QxK), "skipped": skipped, "seconds": time.perf_counter() - t0,
             "identity": identity}
  if skipped:
    logging.warning("%s: skipped %s", bench.name, skipped)
  with open(done_path, "w") as f:
    json.dump(summary, f, indent=1)
  return summary


# ============================================================================================
# Report
# ============================================================================================

def report_header(identity: dict, date: str | None = None) -> list[str]:
  """The lines above the table: checkpoint, step, fingerprint, date and the settings."""
  ck, st = identity.get("checkpoint", {}), identity.get("settings", {})
  date = date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  step = "-" if ck.get("step") is None else str(ck["step"])
  return [f"# Evaluation of {ck.get('checkpoint', '?')}", "",
          f"- checkpoint: `{ck.get('checkpoint', '?')}` step {step} (fingerprint {ck.get('fingerprint', '?')})",
          f"- date: {date}",
          "- settings: " + ", ".join(f"{k}={v}" for k, v in st.items()), ""]


def write_report(summaries: list[dict], out_dir: str, baseline: dict[str, float] | None = None,
                 identity: dict | None = None) -> str:
  """results.md / .csv / .json in ``out_dir``; returns the Markdown report (header + table).

  ``identity``: {"checkpoint": checkpoint_identity, "settings": eval_settings} for the header.
  """
  per = {s["benchmark"]: s["avg@k"] for s in summaries}
  groups = {s["benchmark"]: s["group"] for s in summaries}
  agg = summarize(per, groups, baseline)
  k = summaries[0]["k"] if summaries else 0
  head = ["benchmark", "group", "questions", "skipped", f"avg@{k}"] + (["baseline", "gain %rel"] if baseline else [])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  rows = []
  for s in summaries:
    n = s["benchmark"]
    row = [n, s["group"], str(s["questions"]), str(sum(s["skipped"].values())), f"{s['avg@k']:.2f}"]
    if baseline:
      row += [f"{baseline[n]:.2f}" if n in baseline else "-",
              f"{agg['gain'][n]:+.2f}" if n in agg.get("gain", {}) else "-"]
    lines.append("| " + " | ".join(row) + " |")
    rows.append({"benchmark": n, "group": s["group"], "questions": s["questions"],
                 "skipped": sum(s["skipped"].values()), "avg@k": s["avg@k"]})
  for g in ("general", "vision", "overall"):
    v = agg[f"mean/{g}"]
    lines.append(f"| **mean {g}** | | | | {v:.2f} |" + (" | |" if baseline else ""))
    rows.append({"benchmark": f"mean/{g}", "group": "", "questions": "", "skipped": "", "avg@k": v})
  if baseline:
    lines.append(f"\nDelta%rel (mean of per-benchmark relative gains): {agg['delta_rel']:+.2f}%")
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  header = report_header(identity, date) if identity else []
  table = "\n".join(header + lines)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["benchmark", "group", "questions", "skipped", "avg@k"])
    w.writeheader()
    w.writerows(rows)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump({"k": k, "benchmarks": per, "summaries": summaries, **{k_: v for k_, v in agg.items()},
               **({"run": {**identity, "date": date}} if identity else {})}, f, indent=1)
  return table


# ============================================================================================
# Program
# ============================================================================================

def load_policy(checkpoint: str, c, step: int | None = None):
  """(graphdef, params, model config, model directory) from a training workdir or an HF directory.

  The vision tower pads each image to the most patches ``eval.max_pixels`` allows.
  """
  from flax import nnx
  from papo_jax import models
  from papo_jax.data.remote import localize
  checkpoint = localize(checkpoint)
  is_workdir = os.path.isdir(os.path.join(checkpoint, "checkpoints"))
  if is_workdir:
    from papo_jax.export import base_model_path
    with open(os.path.join(checkpoint, "config.json")) as f:
      model_dir = localize(base_model_path(ml_collections.ConfigDict(json.load(f)), checkpoint))
  else:
    model_dir = checkpoint
  patch = models.load_config(model_dir).vision.patch_size
  kw = dict(dtype=c.model.dtype, param_dtype=c.model.dtype, attention=c.model.attention,
            attention_block=c.model.get("attention_block", 512), max_image_patches=c.eval.max_pixels // patch ** 2)
  if is_workdir:
    from papo_jax.export import load_trained_model
    trained, _, path, step = load_trained_model(checkpoint, step)
    model = models.from_pretrained(path, **kw)
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda p, t: t.astype(p.dtype), params, nnx.split(trained)[1])
    logging.info("evaluating %s step %d", checkpoint, step)
    return graphdef, params, model.config, path
  model = models.from_pretrained(checkpoint, **kw)
  graphdef, params = nnx.split(model)
  return graphdef, params, model.config, checkpoint


def resolved_format_mode(c, processor) -> str:
  """reward.format_mode with ``auto`` resolved from the chat template, as training resolves it."""
  from papo_jax.rl.rewards import format_mode
  return format_mode(c.reward.format_mode, processor)


def run(c: ml_collections.ConfigDict, checkpoint: str, out_dir: str, *, step: int | None = None,
        baseline_path: str | None = None) -> dict:
  """Evaluates every configured benchmark; returns results.json's content."""
  from papo_jax.data import pipeline
  from papo_jax.data.processor import Processor
  from papo_jax.rl import rewards
  from papo_jax.sampling import SamplingConfig, make_sampler
  ce = c.eval
  if not ce.get("data_dir"):
    raise ValueError("config field eval.data_dir: is empty; give the directory holding the benchmark files")
  table = registry(ce)
  names = list(ce.benchmarks) if ce.get("benchmarks") else list(BENCHMARKS)
  unknown = [n for n in names if n not in table]
  if unknown:
    raise ValueError(f"config field eval.benchmarks: unknown {unknown}; known: {sorted(table)}")
  check_benchmark_files(ce.data_dir, [table[n] for n in names])       # fail before any model is loaded
  os.makedirs(out_dir, exist_ok=True)
  ckpt_id = checkpoint_identity(checkpoint, step)
  graphdef, params, mcfg, model_dir = load_policy(checkpoint, c, ckpt_id["step"])
  processor = Processor.from_pretrained(model_dir, ce.min_pixels, ce.max_pixels)
  identity = {"checkpoint": ckpt_id, "settings": eval_settings(c, resolved_format_mode(c, processor))}
  stop_ids = tuple(int(t) for t in np.atleast_1d(mcfg.eos_token_id))
  sampler = make_sampler(graphdef, SamplingConfig(
      max_new_tokens=ce.max_new_tokens, temperature=ce.temperature, top_p=ce.top_p, top_k=ce.top_k,
      cache_dtype=c.rollout.cache_dtype, stop_token_ids=stop_ids, pad_token_id=mcfg.pad_token_id), c.rollout)
  reward_fn = rewards.make_reward_fn(c.reward, processor)
  cfg_data = pipeline.DataConfig(source="parquet", path="", min_pixels=ce.min_pixels, max_pixels=ce.max_pixels,
                                 max_prompt_length=c.data.max_prompt_length,
                                 prompt_length_buckets=tuple(c.data.prompt_length_buckets),
                                 batch_size=ce.batch_size, num_threads=c.data.num_threads)
  summaries = []
  try:
    for name in names:
      summaries.append(evaluate_benchmark(
          table[name], ce.data_dir, out_dir, sampler=sampler, params=params, processor=processor,
          reward_fn=reward_fn, tokenizer=processor.tokenizer, stop_ids=stop_ids, k=ce.k, batch_size=ce.batch_size,
          cfg_data=cfg_data, seed=ce.seed, identity=identity))
  finally:
    if hasattr(reward_fn, "close"):
      reward_fn.close()
  baseline = read_baseline(baseline_path) if baseline_path else None
  md = write_report(summaries, out_dir, baseline, identity)
  print(md)
  with open(os.path.join(out_dir, "results.json")) as f:
    return json.load(f)


def main(argv):
  del argv
  out = FLAGS.out or os.path.join(FLAGS.checkpoint, "eval")
  from papo_jax.workdir import use_compilation_cache
  use_compilation_cache(FLAGS.config.train.compilation_cache)
  try:
    run(FLAGS.config, FLAGS.checkpoint, out, step=FLAGS.step, baseline_path=FLAGS.baseline)
  except (ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
