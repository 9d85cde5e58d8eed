"""Per-token perception diagnostics: how much each response token leans on the image.

A response token's *visual dependency* is VPPO's one-sample k3 estimate of
KL(π(·|image) ‖ π(·|masked image)) at the sampled token
(:func:`papo_jax.rl.vppo.token_dependency`), from the policy log-probs given the real image
(old_logp) and the data pipeline's masked copy (mask_logp). It exists only when the run
makes masked copies (``train_step.needs_masked_images``: γ > 0 or eta_mask ≠ 0).

Every ``log.samples_every`` steps (:func:`step_perception`, called by ``train.update`` on
every process, before the update donates the parameters):

* with several mini-batches the log-prob pass already holds old/masked log-probs of the
  whole batch; otherwise one jitted log-prob pass with the masked path runs on the batch
  (one more compile, on sample steps only);
* process 0 then writes, next to ``samples.jsonl`` (:func:`annotate_samples`,
  :func:`write_step_files`): each logged row's decoded ``tokens``, their ``dependency`` and
  its ``top_tokens``; ``samples/step_<N>/`` with each logged prompt's image and masked copy
  as PNG (inverted from ``pixel_values``: :func:`patches_to_image`) and ``dependency.json``,
  the histogram of the dependency over every response token of the batch.

``python -m papo_jax.inspect --workdir=DIR`` turns one step of these into HTML pages.

Row order: a step's rows are its groups in order, n responses each (row r = group r // n,
response r % n; ``rl.batching.assemble_train_batch``), which is also the order of
``train.Collected.samples`` and of ``metrics.pick_samples``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
from typing import Any, Callable

import numpy as np

# Histogram bins of the dependency: fixed, so steps compare; roughly log-spaced because most
# tokens sit near 0. The k3 estimate is clamped to [0, 10] (vppo.DEP_MAX).
HIST_EDGES = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
TOP_FRACTION = 0.1   # tokens marked per response: ceil(10% of its length), at least 1 ...
TOP_MAX = 10         # ... and at most 10
STEP_DIR = "samples"
HIST_FILE = "dependency.json"


@dataclasses.dataclass
class Perception:
  """A sample step's visual dependency with what its logged rows need (host data).

  dependency_RxT: float32, rows group-major like the batch; groups: the step's
  ``rl.batching.Group``s (responses, masks, images); decode: token ids -> text (special
  tokens kept); image: the processor's ``ImageConfig`` (None: no images written).
  """
  dependency_RxT: np.ndarray
  groups: list
  decode: Callable[[list], str]
  image: Any = None

  @property
  def n(self) -> int:
    return int(self.groups[0].responses.shape[0])


# ============================================================================================
# Pure functions
# ============================================================================================


def flat_rows(x_MxBxT: np.ndarray) -> np.ndarray:
  """[M, B, ...] micro-batched rows -> [M·B, ...]: micro-batch m holds rows m·B .. m·B + B - 1."""
  x = np.asarray(x_MxBxT)
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def row_source(row: int, n: int) -> tuple[int, int]:
  """(group, response within the group) of a step's row r (group-major, n responses each)."""
  return divmod(int(row), int(n))


def response_mask_rows(groups: list) -> np.ndarray:
  """[R, T] response masks of the groups' rows in row order."""
  return np.concatenate([np.asarray(g.response_mask) for g in groups]).astype(bool)


def token_strings(decode: Callable[[list], str], ids) -> list[str]:
  """The text of each token, joined equal to ``decode(ids)`` (one string per id).

  Byte-level BPE can split one character over several tokens; those decode alone to
  U+FFFD, so such a token shows "" and the token that completes the character carries it
  (a UTF-8 character spans at most 4 tokens). Bytes that no later token completes keep
  their U+FFFD on the last of them.
  """
  ids = [int(i) for i in ids]
  out, start = [], 0
  for i in range(len(ids)):
    text = decode(ids[start:i + 1])
    if text.endswith("\ufffd") and i + 1 < len(ids) and i + 1 - start < 4:
      out.append("")
      continue
    if i > start:   # pending bytes: did token i complete them?
      head, own = decode(ids[start:i]), decode(ids[i:i + 1])
      if head + own == text:
        out[-1] = head
        text = own
    out.append(text)
    start = i + 1
  return out


def top_token_indices(dependency_T: np.ndarray) -> list[int]:
  """Indices of a response's highest-dependency tokens, highest first (ties: earlier first).

  ceil(TOP_FRACTION · length) of them, between 1 and TOP_MAX; tokens with dependency 0
  (the image made no difference) are never marked.
  """
  d = np.asarray(dependency_T, np.float64)
  if d.size == 0:
    return []
  k = min(TOP_MAX, max(1, math.ceil(TOP_FRACTION * d.size)))
  order = np.argsort(-d, kind="stable")[:k]
  return [int(i) for i in order if d[i] > 0]


def dependency_hist(dependency_RxT: np.ndarray, mask_RxT: np.ndarray) -> dict:
  """Histogram (fixed ``HIST_EDGES``) and summary of the dependency over all response tokens."""
  v = np.asarray(dependency_RxT, np.float64)[np.asarray(mask_RxT, bool)]
  counts, _ = np.histogram(np.clip(v, HIST_EDGES[0], HIST_EDGES[-1]), bins=np.asarray(HIST_EDGES))
  out = {"edges": list(HIST_EDGES), "counts": [int(c) for c in counts], "tokens": int(v.size)}
  if v.size:
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    out.update(mean=float(v.mean()), p50=float(p50), p90=float(p90), p99=float(p99), max=float(v.max()))
  return out


def patches_to_image(pixel_values_NxD: np.ndarray, grid_thw, cfg) -> np.ndarray:
  """uint8 [H, W, 3] of one image from its ``pixel_values`` rows: the Qwen-VL processor inverted.

  Undoes ``processor.image_to_patches`` (merge-unit-major rows of C·T·P·P values, the still
  frame repeated T times: frame 0 is taken) and the normalisation (x·std + mean, / rescale).
  ``grid_thw`` = (t, h, w) in patches; ``cfg`` the processor's ``ImageConfig``.
  """
  t, gh, gw = (int(v) for v in grid_thw)
  p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
  x = np.asarray(pixel_values_NxD, np.float32)
  if x.shape != (t * gh * gw, 3 * tp * p * p):
    raise ValueError(f"pixel_values {x.shape} do not match grid {(t, gh, gw)} with patch {p}, temporal {tp}")
  x = x[:gh * gw].reshape(gh // m, gw // m, m, m, 3, tp, p, p)[:, :, :, :, :, 0]
  x = x.transpose(0, 2, 5, 1, 3, 6, 4).reshape(gh * p, gw * p, 3)   # (y, x, c)
  mean = np.asarray(cfg.image_mean, np.float32)
  std = np.asarray(cfg.image_std, np.float32)
  return np.clip(np.rint((x * std + mean) / cfg.rescale_factor), 0, 255).astype(np.uint8)


def group_images(group, cfg) -> list[tuple[np.ndarray, np.ndarray | None]]:
  """(image, masked copy or None) uint8 [H, W, 3] per image of one prompt group."""
  if group.pixel_values is None or cfg is None:
    return []
  grid = np.asarray(group.image_grid_thw, np.int64).reshape(-1, 3)
  starts = np.concatenate([[0], np.cumsum(grid.prod(-1))])
  out = []
  for i, g in enumerate(grid):
    rows = slice(starts[i], starts[i + 1])
    masked = group.masked_pixel_values
    out.append((patches_to_image(group.pixel_values[rows], g, cfg),
                None if masked is None else patches_to_image(masked[rows], g, cfg)))
  return out


def png_bytes(image_HxWx3: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(image_HxWx3), mode="RGB").save(buf, format="PNG")
  return buf.getvalue()


def _short(x: float) -> float:
  return float(f"{float(x):.6g}")


def annotate_samples(samples: list[dict], perception: Perception, step: int) -> list[dict]:
  """The logged rows (the step's first rows, in order) with ``tokens``, ``dependency``,
  ``top_tokens`` ([{index, token, dependency}], highest first), ``dependency_mean`` and
  ``images`` ([{image, masked}] paths relative to the workdir, written by :func:`write_step_files`)."""
  out = []
  for r, s in enumerate(samples):
    g, k = row_source(r, perception.n)
    group = perception.groups[g]
    keep = np.asarray(group.response_mask[k], bool)
    ids = np.asarray(group.responses[k])[keep]
    dep = np.asarray(perception.dependency_RxT[r], np.float64)[keep]
    tokens = token_strings(perception.decode, ids)
    images = []
    for i, (_, masked) in enumerate(group_images(group, perception.image)):
      images.append({"image": image_path(step, g, i), **({"masked": image_path(step, g, i, masked=True)}
                                                         if masked is not None else {})})
    out.append({**s, "group": g, "tokens": tokens, "dependency": [_short(d) for d in dep],
                "dependency_mean": _short(dep.mean()) if dep.size else 0.0,
                "top_tokens": [{"index": i, "token": tokens[i], "dependency": _short(dep[i])}
                               for i in top_token_indices(dep)],
                **({"images": images} if images else {})})
  return out


def step_dir(step: int) -> str:
  return f"{STEP_DIR}/step_{int(step)}"


def image_path(step: int, group: int, index: int, masked: bool = False) -> str:
  """Where a logged prompt's image goes, relative to the workdir."""
  return f"{step_dir(step)}/group{group}_image{index}{'_masked' if masked else ''}.png"


# ============================================================================================
# Files (process 0) and the device pass (every process)
# ============================================================================================


def write_step_files(workdir: str, step: int, samples: list[dict], perception: Perception) -> dict:
  """``samples/step_<N>/``: the PNGs the annotated ``samples`` name and ``dependency.json``
  (the batch's histogram); returns the histogram."""
  from papo_jax import workdir as workdir_lib
  written = set()
  for s in samples:
    g = s["group"]
    if g in written:
      continue
    written.add(g)
    for i, (image, masked) in enumerate(group_images(perception.groups[g], perception.image)):
      workdir_lib.write_bytes(workdir_lib.join(workdir, image_path(step, g, i)), png_bytes(image))
      if masked is not None:
        workdir_lib.write_bytes(workdir_lib.join(workdir, image_path(step, g, i, masked=True)), png_bytes(masked))
  hist = {"step": int(step), **dependency_hist(perception.dependency_RxT, response_mask_rows(perception.groups))}
  workdir_lib.write_text(workdir_lib.join(workdir, step_dir(step), HIST_FILE), json.dumps(hist) + "\n")
  return hist


@functools.lru_cache(maxsize=2)
def _dependency_pass(graphdef, cfg):
  """The jitted log-prob pass with the masked path (no reference): old and masked log-probs
  (and the full-distribution dependency with vppo.dependency=full_kl)."""
  import jax
  from papo_jax.rl.train_step import make_logprob_pass
  return jax.jit(make_logprob_pass(graphdef, cfg))


def pass_config(c):
  """The run's train-step config for the dependency pass: the masked path on, no reference model.
  (The log-prob pass reads only needs_mask/needs_ref/logprob_chunk from it.)"""
  from papo_jax.config_base import step_config
  cfg = step_config(c)
  loss = dataclasses.replace(cfg.loss, beta=0.0, gamma=cfg.loss.gamma or 1.0)
  return dataclasses.replace(cfg, loss=loss)


def step_perception(run, params, batch, groups: list, wanted: bool) -> Perception | None:
  """This step's :class:`Perception`, or None when not ``wanted`` (not a sample step) or the
  batch has no masked copies (plain GRPO). Call on every process (the pass and the gather
  are collective) with the pre-update ``params``. Uses ``batch.old_logp``/``mask_logp``
  when the log-prob pass set them, else runs the jitted pass with the masked path.
  """
  if not wanted or batch.masked_pixel_values is None:
    return None
  from papo_jax.parallel import to_host, use_mesh_rules
  from papo_jax.rl.vppo import token_dependency
  with use_mesh_rules(run.mesh, run.rules):
    if batch.old_logp is not None and batch.mask_logp is not None:
      old, masked, dep = batch.old_logp, batch.mask_logp, batch.dependency
    else:
      old, masked, _, dep = _dependency_pass(run.graphdef, pass_config(run.c))(params, None, batch)
    # the loss's own dependency: the full-distribution KL when vppo.dependency=full_kl, else k3
    dep_MxBxT = to_host(token_dependency(old, masked) if dep is None else dep)
  processor = getattr(run.it, "processor", None)
  return Perception(dependency_RxT=flat_rows(dep_MxBxT).astype(np.float32), groups=groups,
                    decode=lambda ids: run.tokenizer.decode(list(ids), skip_special_tokens=False),
                    image=getattr(processor, "image", None))
