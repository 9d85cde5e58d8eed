"""What a training run reports: per-step metrics, sampled responses, the console, the KL_prcp monitor.

Files in the workdir (process 0 only): ``metrics.jsonl`` (one row per step),
``samples.jsonl`` (a few sampled responses with their rewards every
``log.samples_every`` steps), ``tb/`` (TensorBoard scalars and the samples as text) and,
when configured, a W&B run. After a resume both JSONL files are cut back to the restored
step, so each step appears once.
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import os
import re
import sys

import jax
import numpy as np
from absl import logging

# ============================================================================================
# Metrics of one step (pure functions of host data)
# ============================================================================================


def mean_over_updates(step_metrics: list[dict]) -> dict[str, float]:
  """The mean of each train-step metric over the step's optimizer updates (mini-batches)."""
  return {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}


def rollout_metrics(rewards: dict[str, np.ndarray], response_lengths: np.ndarray, max_new_tokens: int) -> dict:
  """reward/* (overall, format, accuracy) and response_length/* of the step's kept rollouts."""
  lengths = np.asarray(response_lengths)
  return {
      "reward/overall": float(rewards["overall"].mean()), "reward/format": float(rewards["format"].mean()),
      "reward/accuracy": float(rewards["accuracy"].mean()),
      "response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
      "response_length/clip_ratio": float((lengths >= max_new_tokens).mean()),
  }


def data_metrics(stats: dict) -> dict[str, float]:
  """Dropped records so far, in total and by reason, from a PromptBatch's flat ``stats``.

  The pipeline reports records dropped while batching as ``skipped_total/<reason>``
  (running totals) and those the start-up prefilter dropped as ``prefilter/<reason>``
  (``prefilter/kept`` is the count it kept); both count here.
  """
  by_reason: dict[str, float] = {}
  for key, value in stats.items():
    prefix, _, reason = key.partition("/")
    if reason and (prefix == "skipped_total" or (prefix == "prefilter" and reason != "kept")):
      by_reason[reason] = by_reason.get(reason, 0.0) + float(value)
  out = {"data/skipped_total": float(sum(by_reason.values()))}
  out.update({f"data/skipped_total/{r}": v for r, v in sorted(by_reason.items())})
  return out


def noisy_metrics(rewards: dict[str, np.ndarray], c, stats: dict) -> dict[str, float]:
  """NoisyRollout: noisy/reward_clean|noisy and noisy/accuracy_clean|noisy, the mean over the step's kept
  rollouts on the clean / distorted images (each group of rollout.n: clean rows, then noisy.rollouts noisy
  rows), and noisy/strength, the diffusion step of the step's (last) prompt batch. {} when off."""
  from papo_jax.config_base import noisy_rollouts
  from papo_jax.data.noise import rollout_split
  k = noisy_rollouts(c)
  if not k:
    return {}
  noisy_R = rollout_split(len(rewards["overall"]) // c.rollout.n, c.rollout.n - k, k)
  out = {f"noisy/{name}_{side}": float(np.asarray(rewards[key])[rows].mean())
         for name, key in (("reward", "overall"), ("accuracy", "accuracy"))
         for side, rows in (("clean", ~noisy_R), ("noisy", noisy_R))}
  if "noise_strength" in stats:
    out["noisy/strength"] = float(stats["noise_strength"])
  return out


def throughput(tokens: float, seconds: float) -> dict[str, float]:
  return {"throughput/tokens_per_s_per_device": tokens / seconds / jax.device_count()}


def step_row(step_metrics: list[dict], rewards: dict, groups: list, extra: dict, stats: dict, c, gamma: float,
             seconds: float) -> dict:
  """The metrics row of one RL step: train-step means, rollouts, NoisyRollout's split, data, ``extra``
  (timings, DAPO rounds)."""
  lengths = np.concatenate([g.response_mask.sum(-1) for g in groups])
  tokens = float(sum(g.response_mask.sum() + g.prompt_mask.sum() * g.responses.shape[0] for g in groups))
  return {**mean_over_updates(step_metrics), **rollout_metrics(rewards, lengths, c.rollout.max_new_tokens),
          **noisy_metrics(rewards, c, stats), "actor/lr": float(c.optim.lr), "actor/gamma": float(gamma),
          **data_metrics(stats),
          **{k: float(v) for k, v in extra.items()}, "timing/step": seconds, **throughput(tokens, seconds)}


# ============================================================================================
# KL_prcp hacking monitor (papo.md §8)
# ============================================================================================


class Monitor:
  """Early warnings of KL_prcp hacking: perception-KL spike, rising high clip, rising entropies.

  ``monitor.action``: warn | lower_gamma (each warning halves γ from then on; the
  trainer reads :attr:`gamma_halvings`) | stop.
  """

  # the metrics check() reads: all a resumed run needs of the history
  KEYS = ("actor/kl_prcp", "actor/pg_clipfrac_higher", "actor/entropy_ori", "actor/entropy_mask")

  def __init__(self, m):
    self.cfg = m
    self.hist: list[dict] = []
    self.gamma_halvings = 0

  def state(self) -> dict:
    """What a checkpoint keeps (JSON): the γ halvings and the last window of checked metrics."""
    return {"gamma_halvings": self.gamma_halvings,
            "hist": [{k: float(x[k]) for k in self.KEYS if k in x} for x in self.hist[-self.cfg.window:]]}

  def restore(self, state: dict | None) -> None:
    """Continues from :meth:`state` (None: a checkpoint written without one; starts afresh)."""
    if state:
      self.gamma_halvings = int(state["gamma_halvings"])
      self.hist = [dict(x) for x in state["hist"]]

  def check(self, metrics: dict) -> list[str]:
    warnings = []
    h = self.hist[-self.cfg.window:]
    if len(h) >= 3:
      base = np.median([x.get("actor/kl_prcp", 0.0) for x in h])
      kl = metrics.get("actor/kl_prcp", 0.0)
      if base > 0 and kl > self.cfg.kl_prcp_spike * base:
        warnings.append(f"perception KL spiked to {kl:.4g} ({kl / base:.1f}x its recent median)")
      clip = [x.get("actor/pg_clipfrac_higher", 0.0) for x in h] + [metrics.get("actor/pg_clipfrac_higher", 0.0)]
      if clip[-1] > self.cfg.pg_clipfrac_higher_max and all(a <= b for a, b in zip(clip[-4:], clip[-3:])):
        warnings.append(f"high-side clip fraction keeps rising ({clip[-1]:.3f})")
      for k in ("actor/entropy_ori", "actor/entropy_mask"):
        e0 = np.mean([x.get(k, 0.0) for x in h])
        if k in metrics and e0 > 0 and metrics[k] > (1 + self.cfg.entropy_rise) * e0:
          warnings.append(f"{k} rose to {metrics[k]:.3f} from {e0:.3f}")
    self.hist.append(metrics)
    return warnings

  def should_stop(self, step: int, metrics: dict) -> bool:
    """Logs this step's warnings and applies ``monitor.action``; True when the run should stop."""
    for w in self.check(metrics):
      logging.warning("step %d: KL_prcp hacking warning: %s", step, w)
      if self.cfg.action == "lower_gamma":
        self.gamma_halvings += 1
        logging.warning("lowering gamma to %g x its schedule", 0.5 ** self.gamma_halvings)
      elif self.cfg.action == "stop":
        logging.warning("stopping; the last good checkpoint is kept")
        return True
    return False


# ============================================================================================
# Files: metrics.jsonl, samples.jsonl, TensorBoard, W&B
# ============================================================================================


class MetricWriter:
  """JSONL in the workdir, TensorBoard (and W&B when configured); process 0 only.

  ``workdir`` may be a local path, ``gs://`` or any fsspec URL (:mod:`papo_jax.workdir`):
  on a URL the JSONL rows are rewritten at most every ``flush_every_s`` seconds and on
  :meth:`close`, and TensorBoard writes a local directory that is copied to ``<workdir>/tb``
  at most as often and on :meth:`close`. ``start_step``: the step the run starts (or
  resumes) from; rows past it are removed.
  """

  def __init__(self, workdir: str, c, start_step: int = 0, *, flush_every_s: float = 30.0):
    from papo_jax import workdir as workdir_lib
    self.active = jax.process_index() == 0
    self.jsonl = self.samples = self.tb = self.tb_mirror = self.wandb = None
    self.flush_every_s = flush_every_s
    self._last_tb_sync = 0.0
    self.workdir = workdir
    self.metrics_path = workdir_lib.join(workdir, "metrics.jsonl")
    self.samples_path = workdir_lib.join(workdir, "samples.jsonl")
    self.tb_dir = workdir_lib.join(workdir, "tb") if c.log.tensorboard else None
    if not self.active:
      return
    self.jsonl = workdir_lib.JsonlLog(self.metrics_path, resume_step=start_step, flush_every_s=flush_every_s)
    self.samples = workdir_lib.JsonlLog(self.samples_path, resume_step=start_step, flush_every_s=flush_every_s)
    if c.log.tensorboard:
      try:
        from tensorboardX import SummaryWriter
        # tensorboardX writes local files only (gs:// needs google-cloud-storage); a URL gets a mirror.
        self.tb_mirror = workdir_lib.DirMirror(self.tb_dir)
        self.tb = SummaryWriter(self.tb_mirror.local_dir)
      except ImportError:
        logging.warning("tensorboardX is not installed; TensorBoard logging is off")
        self.tb_dir = None
    if c.log.wandb_project:
      import tempfile
      import wandb  # optional dependency
      local = workdir if not workdir_lib.is_url(workdir) else tempfile.mkdtemp(prefix="papo_wandb_")
      self.wandb = wandb.init(project=c.log.wandb_project, config=c.to_dict(), dir=local)

  def _flush_tb(self, force: bool = False) -> None:
    import time
    self.tb.flush()
    if force or time.monotonic() - self._last_tb_sync >= self.flush_every_s:
      self.tb_mirror.sync()
      self._last_tb_sync = time.monotonic()

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    self.jsonl.write(row)
    if self.tb is not None:
      for k, v in row.items():
        if k != "step":
          self.tb.add_scalar(k, v, step)
      self._flush_tb()
    if self.wandb is not None:
      self.wandb.log(row, step=step)

  def write_samples(self, step: int, samples: list[dict], perception=None) -> None:
    """Rows ``{step, prompt, answer, response, reward/...}`` to samples.jsonl and as TensorBoard text.

    With a :class:`papo_jax.diagnostics.Perception` (masked copies on) the rows also carry
    each token's visual dependency, and ``samples/step_<N>/`` gets the logged prompts'
    images, their masked copies and the batch's dependency histogram (``diagnostics``).
    """
    if not self.active or not samples:
      return
    hist = None
    if perception is not None:
      from papo_jax import diagnostics
      samples = diagnostics.annotate_samples(samples, perception, step)
      hist = diagnostics.write_step_files(self.workdir, step, samples, perception)
    for s in samples:
      self.samples.write({"step": step, **s})
    if self.tb is not None:
      self.tb.add_text("samples", samples_markdown(samples), step)
      if hist is not None and hist["tokens"]:
        from papo_jax.diagnostics import response_mask_rows
        self.tb.add_histogram("perception/dependency", perception.dependency_RxT[
            response_mask_rows(perception.groups)], step)
      self._flush_tb()

  def close(self):
    """Writes out everything buffered (JSONL rows, TensorBoard events) to the workdir."""
    for f in (self.jsonl, self.samples):
      if f is not None:
        f.close()
    if self.tb is not None:
      self.tb.close()
      self.tb_mirror.sync()
    self.jsonl = self.samples = self.tb = None


def pick_samples(rows: list[tuple[str, str, str]], rewards: dict[str, np.ndarray], count: int) -> list[dict]:
  """The first ``count`` of a step's (prompt, answer, response) rows with their rewards."""
  return [{"prompt": prompt, "answer": answer, "response": response,
           **{f"reward/{k}": float(v[i]) for k, v in rewards.items()}}
          for i, (prompt, answer, response) in enumerate(rows[:count])]


def _md_escape(text: str) -> str:
  return re.sub(r"([\\`*_{}\[\]()#+!|<>~])", r"\\\1", text).replace("\n", " ")


def marked_response(tokens: list[str], top: list[int]) -> str:
  """Markdown of a response with its ``top`` tokens in **bold** (whitespace kept outside the marks)."""
  top = set(top)
  parts = []
  for i, tok in enumerate(tokens):
    text = _md_escape(tok)
    core = text.strip()
    if i in top and core:
      lead, trail = text[:len(text) - len(text.lstrip())], text[len(text.rstrip()):]
      text = f"{lead}**{core}**{trail}"
    parts.append(text)
  return "".join(parts)


def samples_markdown(samples: list[dict]) -> str:
  """The samples as a markdown table; with per-token dependency, the top tokens in bold."""
  perception = any("tokens" in s for s in samples)
  rows = ["| answer | reward/overall | response |" + (" mean dependency |" if perception else ""),
          "|---|---|---|" + ("---|" if perception else "")]
  for s in samples:
    if "tokens" in s:
      resp = marked_response(s["tokens"], [t["index"] for t in s.get("top_tokens", [])])
    else:
      resp = "`" + s["response"].replace("|", "\\|").replace("\n", " ") + "`"
    dep = f" {s['dependency_mean']:.3g} |" if "dependency_mean" in s else (" |" if perception else "")
    rows.append(f"| {s['answer']} | {s.get('reward/overall', float('nan')):.2f} | {resp} |{dep}")
  return "\n".join(rows)


# ============================================================================================
# Console
# ============================================================================================

# The per-step console line: the same names as metrics.jsonl.
CONSOLE_KEYS = ("reward/overall", "reward/accuracy", "reward/format", "response_length/mean", "actor/kl_prcp",
                "actor/pg_loss", "actor/grad_norm", "timing/step")


def console_line(step: int, metrics: dict) -> str:
  parts = [f"{k} {metrics[k]:.4g}" for k in CONSOLE_KEYS if k in metrics]
  return f"step {step} | " + " | ".join(parts)


def bar_postfix(metrics: dict) -> dict[str, str]:
  return {k: f"{metrics[k]:.3f}" for k in ("reward/overall", "reward/accuracy") if k in metrics}


class _OrbaxInfoFilter(py_logging.Filter):
  """Drops orbax's INFO chatter (one line per checkpoint step and file); its warnings stay."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


_ORBAX_FILTER = _OrbaxInfoFilter()


def quiet_orbax() -> None:
  """Silences orbax below WARNING on the absl handler and on orbax's own loggers."""
  handler = logging.get_absl_handler()
  if _ORBAX_FILTER not in handler.filters:
    handler.addFilter(_ORBAX_FILTER)
  for name in ("orbax", "orbax.checkpoint"):
    py_logging.getLogger(name).setLevel(py_logging.WARNING)


class _AboveBar:
  """A text stream that writes whole lines through ``tqdm.write``, above the progress bar."""

  def __init__(self, stream):
    self.stream, self.buf = stream, ""

  def write(self, s: str) -> int:
    from tqdm import tqdm
    self.buf += s
    while "\n" in self.buf:
      line, self.buf = self.buf.split("\n", 1)
      tqdm.write(line, file=self.stream)
    return len(s)

  def flush(self):
    self.stream.flush()

  def __getattr__(self, name):   # isatty, fileno, encoding, ...
    return getattr(self.stream, name)


@contextlib.contextmanager
def logs_above_progress_bar():
  """Log lines go above the tqdm bar instead of being glued onto it."""
  handler = logging.get_absl_handler().python_handler
  old = handler.stream
  handler.stream = _AboveBar(old if old is not None else sys.stderr)
  try:
    yield
  finally:
    handler.stream = old


def summary(*, workdir: str, ckpt_dir: str, steps_done: int, total_steps: int, seconds: float,
            rows: list[dict], writer: MetricWriter | None = None) -> str:
  """The end-of-run report: steps, wall time, final reward, held-out accuracy and where the files are."""
  lines = [f"finished {steps_done}/{total_steps} steps in {seconds / 60:.1f} min" if steps_done
           else f"nothing to do: the run already finished its {total_steps} steps"]
  if rows:
    tail = rows[-max(1, len(rows) // 10):]
    lines.append(f"reward/overall: last step {rows[-1].get('reward/overall', float('nan')):.3f}, "
                 f"mean of the last {len(tail)} steps {np.mean([r.get('reward/overall', np.nan) for r in tail]):.3f}")
    val = [r for r in rows if "val/accuracy" in r]
    if val:
      lines.append(f"held-out accuracy (val/accuracy) at step {val[-1]['step']}: {val[-1]['val/accuracy']:.3f}"
                   + (f" (first: {val[0]['val/accuracy']:.3f} at step {val[0]['step']})" if len(val) > 1 else ""))
  lines.append(f"metrics: {os.path.join(workdir, 'metrics.jsonl')}")
  lines.append(f"samples: {os.path.join(workdir, 'samples.jsonl')}")
  if writer is not None and writer.tb_dir:
    lines.append(f"TensorBoard: tensorboard --logdir {writer.tb_dir}")
  lines.append(f"checkpoints: {ckpt_dir}")
  return "\n".join(lines)


def is_sample_step(c, step: int) -> bool:
  """Whether finished step ``step`` logs samples (every ``log.samples_every`` steps)."""
  return bool(c.log.samples_every and c.log.samples_per_step and step % c.log.samples_every == 0)


def log_step(writer: MetricWriter, c, step: int, metrics: dict, samples: list, rewards: dict, bar=None,
             perception=None) -> None:
  """One finished step's records: metrics.jsonl/TensorBoard, a few samples every
  ``log.samples_every`` steps (with ``perception``: their per-token visual dependency, see
  :mod:`papo_jax.diagnostics`), and the console line above the progress bar (process 0)."""
  writer.write(step, metrics)
  if is_sample_step(c, step):
    writer.write_samples(step, pick_samples(samples, rewards, c.log.samples_per_step), perception)
  if writer.active and step % c.log.every == 0:
    if bar is not None:
      bar.set_postfix(bar_postfix(metrics))
    logging.info("%s", console_line(step, metrics))


def end_of_run(c, workdir: str, ckpt_dir: str, writer: MetricWriter, *, start: int, step: int, seconds: float,
               completed: bool, stop_line: str | None) -> None:
  """Process 0: marks a completed run DONE and logs the closing summary (a stop's reason last,
  so it is the line a log tail shows)."""
  from papo_jax import workdir as workdir_lib
  if not writer.active:
    return
  if completed:
    workdir_lib.mark_done(workdir, c.train.steps)
  logging.info("%s", summary(workdir=workdir, ckpt_dir=ckpt_dir, steps_done=step + 1 - start,
                             total_steps=c.train.steps, seconds=seconds,
                             rows=workdir_lib.read_jsonl(writer.metrics_path), writer=writer))
  if stop_line is not None and not completed:
    logging.info("%s", stop_line)
