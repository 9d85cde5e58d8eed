"""Records → bucketed `PromptBatch`es on grain, resumable at the exact record.

Stages:
  1. `prefilter` (once, up front, on every host alike): reads each record's text and
     image headers only; drops records that are malformed or whose prompt (image tokens
     included) exceeds `max_prompt_length`; counts them by reason.
  2. grain: shuffle the kept ids by seed (reshuffled every epoch), repeat, shard by
     process (`ids[process_index::process_count]`), then decode + resize + normalise +
     tokenise in `num_threads` background threads (`ReadOptions`).
  3. Batch assembly: take examples until `batch_size / process_count` good ones (bad
     records found while decoding are skipped with a warning and counted), draw the
     masked images with key (seed, batch index, record id, image index), pad to the
     configured buckets. With NoisyRollout on (`noise.enabled`), the distorted images are
     drawn next to the masked ones, from the same key, at the strength the noise schedule
     gives the RL step that consumes the batch (`noise.batch_step`: the batch index, less
     the batches a warm-up read, when one batch feeds one step; DAPO refills count prompts
     in steps of `noise.prompts_per_step`). With `prefetch_batches > 0` this runs in a background thread.

`PromptBatchIterator.get_state()` is a JSON-serialisable dict describing the position
after the last batch handed out; `set_state` resumes exactly there (same records, same
masks, same noise).
"""

import collections
import concurrent.futures
import dataclasses
import queue
import threading
from typing import Optional

from absl import logging
import grain
import numpy as np

from papo_jax.data import images as images_lib
from papo_jax.data import masking
from papo_jax.data import noise as noise_lib
from papo_jax.data import processor as proc_lib
from papo_jax.data import sources as sources_lib
from papo_jax.data import synthetic as synthetic_lib


@dataclasses.dataclass
class DataConfig:
  """The `data` config group (the trainer maps its ConfigDict onto these fields)."""
  source: str = "synthetic"            # parquet | jsonl | hf_datasets | synthetic
  path: Optional[str] = None
  problem_key: str = "problem"
  answer_key: str = "answer"
  images_key: str = "images"
  kind_key: str = "kind"
  min_pixels: Optional[int] = None     # None: the checkpoint's preprocessor_config.json
  max_pixels: Optional[int] = None
  max_prompt_length: int = 4096        # tokens, image tokens included
  # Lp is the smallest bucket >= the longest prompt of the batch; max_prompt_length is
  # always added as the last bucket.
  prompt_length_buckets: tuple = (256, 512, 1024, 2048)
  # Np (pixel_values rows) / I (image_grid_thw rows) buckets; () → powers of two
  # (patches: also 1.5x steps, so padding stays under a third).
  patch_buckets: tuple = ()
  image_buckets: tuple = ()
  batch_size: int = 8                  # global prompts per batch (split across processes)
  seed: int = 0
  shuffle: bool = True
  num_epochs: Optional[int] = None     # None: repeat forever
  num_threads: int = 4                 # grain decode/preprocess threads (0: inline)
  prefetch_buffer_size: int = 16       # grain elements in flight
  prefetch_batches: int = 2            # assembled batches in flight (0: no thread)
  mask: masking.MaskConfig = dataclasses.field(default_factory=masking.MaskConfig)
  noise: noise_lib.NoiseConfig = dataclasses.field(default_factory=noise_lib.NoiseConfig)  # NoisyRollout
  # Synthetic task (source='synthetic').
  synthetic_num_records: int = 1024
  synthetic_difficulty: int = 1
  synthetic_image_size: int = 56
  synthetic_seed: int = 0
  # The most patches one resized image may have (the model pads each image to it); a record
  # with a bigger one is skipped ('too_many_patches'). 0: max_pixels // patch_size², the
  # nominal bound; processor.max_patches_for gives the true one for the pixel range.
  max_image_patches: int = 0
  synthetic_kinds: tuple = synthetic_lib.KINDS   # question kinds drawn (synthetic.ALL_KINDS)
  process_index: Optional[int] = None  # None: jax.process_index()
  process_count: Optional[int] = None

  def __post_init__(self):
    # Accept what a ConfigDict hands over: lists for tuples, a dict for the mask group.
    for name in ("prompt_length_buckets", "patch_buckets", "image_buckets"):
      setattr(self, name, tuple(int(b) for b in getattr(self, name)))
    self.synthetic_kinds = ((self.synthetic_kinds,) if isinstance(self.synthetic_kinds, str)
                            else tuple(str(k) for k in self.synthetic_kinds))
    if not isinstance(self.mask, masking.MaskConfig):
      self.mask = masking.MaskConfig(**dict(self.mask))
    if not isinstance(self.noise, noise_lib.NoiseConfig):
      self.noise = noise_lib.NoiseConfig(**dict(self.noise))
    if self.batch_size <= 0 or self.max_prompt_length <= 0:
      raise ValueError(f"batch_size {self.batch_size} and max_prompt_length "
                       f"{self.max_prompt_length} must be positive")

  @property
  def fields(self):
    return sources_lib.Fields(self.problem_key, self.answer_key, self.images_key, self.kind_key)


def make_source(cfg):
  """The record source that `cfg` names."""
  if cfg.source == "synthetic":
    return sources_lib.SyntheticSource(
        num_records=cfg.synthetic_num_records, seed=cfg.synthetic_seed,
        difficulty=cfg.synthetic_difficulty, image_size=cfg.synthetic_image_size,
        kinds=cfg.synthetic_kinds)
  return sources_lib.make_source(cfg.source, cfg.path, cfg.fields)


@dataclasses.dataclass
class PromptBatch:
  """One batch of B prompts in static, bucketed shapes (numpy, host memory).

  input_ids [B, Lp] int32, LEFT-padded with the pad id; attention_mask [B, Lp] int32.
  pixel_values / masked_pixel_values [Np, D] float32: all images of the batch in
    row-major batch order (prompt 0's images, prompt 1's, ...), zero rows after
    `num_patches`. masked_pixel_values is None when masking is off.
  noisy_pixel_values [Np, D] float32: the same images distorted for NoisyRollout's noisy
    rollouts (same layout); None when NoisyRollout is off. Only the sampler reads them.
  image_grid_thw [I, 3] int32: one (t, h, w) row per image, zero rows after `num_images`
    (a zero row means "no image": zero tokens).
  image_counts [B] int32: images per prompt. record_ids [B] int64.
  answers / kinds / problems: list[str] of length B.
  stats: dict of counters (skips by reason in this batch and in total, prefilter drops,
    batch index, bucket overflows; `noise_strength`, the diffusion step of the noisy copy).
  """
  input_ids: np.ndarray
  attention_mask: np.ndarray
  pixel_values: np.ndarray
  masked_pixel_values: Optional[np.ndarray]
  image_grid_thw: np.ndarray
  image_counts: np.ndarray
  num_patches: int
  num_images: int
  record_ids: np.ndarray
  answers: list
  kinds: list
  problems: list
  stats: dict
  noisy_pixel_values: Optional[np.ndarray] = None

  @property
  def batch_size(self):
    return self.input_ids.shape[0]


def pick_bucket(n, buckets):
  """(smallest bucket >= n, overflowed?). Beyond the largest: a multiple of it."""
  for b in buckets:
    if n <= b:
      return b, False
  top = buckets[-1]
  return top * -(-n // top), True


def _pow2_buckets(lo, hi, half_steps=False):
  """lo, 2lo, 4lo, ... up to >= hi; with half_steps also 1.5x each (<= 33% padding)."""
  out, b = [], max(1, lo)
  while b < hi:
    out.append(b)
    if half_steps and b * 3 // 2 < hi:
      out.append(b * 3 // 2)
    b *= 2
  return tuple(out) + (b,)


def resolve_buckets(cfg, per_host_batch):
  """(length buckets, patch buckets, image buckets) as sorted tuples."""
  lens = tuple(sorted({b for b in cfg.prompt_length_buckets if b < cfg.max_prompt_length}
                      | {cfg.max_prompt_length}))
  # Patches of one prompt <= 4 · (its image tokens) <= 4 · max_prompt_length.
  patches = tuple(sorted(cfg.patch_buckets)) or _pow2_buckets(
      256, per_host_batch * 4 * cfg.max_prompt_length // 8, half_steps=True)
  imgs = tuple(sorted(cfg.image_buckets)) or _pow2_buckets(per_host_batch, 4 * per_host_batch)
  return lens, patches, imgs


def collate(examples, pad_id, buckets, patch_dim, with_masked, with_noisy=False):
  """list of processed examples → (PromptBatch without stats, overflow counters)."""
  len_buckets, patch_buckets, image_buckets = buckets
  b = len(examples)
  lengths = [len(e["input_ids"]) for e in examples]
  lp, _ = pick_bucket(max(lengths), len_buckets)
  input_ids = np.full((b, lp), pad_id, np.int32)
  attention_mask = np.zeros((b, lp), np.int32)
  for i, e in enumerate(examples):
    input_ids[i, lp - lengths[i]:] = e["input_ids"]
    attention_mask[i, lp - lengths[i]:] = 1
  n = sum(len(e["pixel_values"]) for e in examples)
  n_img = sum(len(e["image_grid_thw"]) for e in examples)
  np_, over_p = pick_bucket(max(n, 1), patch_buckets)
  ni, over_i = pick_bucket(max(n_img, 1), image_buckets)

  def pack(key):
    out = np.empty((np_, patch_dim), np.float32)
    row = 0
    for e in examples:
      out[row:row + len(e[key])] = e[key]
      row += len(e[key])
    out[row:] = 0
    return out

  grid = np.zeros((ni, 3), np.int32)
  if n_img:
    grid[:n_img] = np.concatenate([e["image_grid_thw"] for e in examples], axis=0)
  batch = PromptBatch(
      input_ids=input_ids, attention_mask=attention_mask, pixel_values=pack("pixel_values"),
      masked_pixel_values=pack("masked_pixel_values") if with_masked else None,
      image_grid_thw=grid,
      image_counts=np.asarray([len(e["image_grid_thw"]) for e in examples], np.int32),
      num_patches=n, num_images=n_img,
      record_ids=np.asarray([e["record_id"] for e in examples], np.int64),
      answers=[e["answer"] for e in examples], kinds=[e["kind"] for e in examples],
      problems=[e["problem"] for e in examples], stats={},
      noisy_pixel_values=pack("noisy_pixel_values") if with_noisy else None)
  return batch, {"patch_bucket_overflow": int(over_p), "image_bucket_overflow": int(over_i)}


def concat_batches(batches, pad_id):
  """One PromptBatch holding the rows of ``batches`` in order (the processes' local batches).

  Prompts are left-padded to the longest, real patches and grid rows are packed first
  (the layout the model expects), padding after, to the sum of the batches' padded sizes
  so the shapes stay within the buckets' combinations.
  """
  if len(batches) == 1:
    return batches[0]
  lp = max(b.input_ids.shape[1] for b in batches)
  rows = sum(b.batch_size for b in batches)
  input_ids = np.full((rows, lp), pad_id, np.int32)
  attention_mask = np.zeros((rows, lp), np.int32)
  r = 0
  for b in batches:
    input_ids[r:r + b.batch_size, lp - b.input_ids.shape[1]:] = b.input_ids
    attention_mask[r:r + b.batch_size, lp - b.input_ids.shape[1]:] = b.attention_mask
    r += b.batch_size
  n_patch = sum(b.num_patches for b in batches)
  n_img = sum(b.num_images for b in batches)

  def pack(key, total):
    parts = [getattr(b, key)[:b.num_patches] for b in batches]
    out = np.zeros((total,) + parts[0].shape[1:], parts[0].dtype)
    out[:n_patch] = np.concatenate(parts)
    return out

  grid = np.zeros((sum(b.image_grid_thw.shape[0] for b in batches), 3), np.int32)
  grid[:n_img] = np.concatenate([b.image_grid_thw[:b.num_images] for b in batches])
  total_patches = sum(b.pixel_values.shape[0] for b in batches)
  # Counters add up over processes; the batch index (and the noise strength it gives) is the same everywhere.
  stats = {}
  for b in batches:
    for k, v in b.stats.items():
      stats[k] = v if k in ("batch_index", "noise_strength") else stats.get(k, 0) + v
  return PromptBatch(
      input_ids=input_ids, attention_mask=attention_mask, pixel_values=pack("pixel_values", total_patches),
      masked_pixel_values=(pack("masked_pixel_values", total_patches)
                           if batches[0].masked_pixel_values is not None else None),
      image_grid_thw=grid, image_counts=np.concatenate([b.image_counts for b in batches]),
      num_patches=n_patch, num_images=n_img, record_ids=np.concatenate([b.record_ids for b in batches]),
      answers=sum((list(b.answers) for b in batches), []), kinds=sum((list(b.kinds) for b in batches), []),
      problems=sum((list(b.problems) for b in batches), []), stats=stats,
      noisy_pixel_values=(pack("noisy_pixel_values", total_patches)
                          if batches[0].noisy_pixel_values is not None else None))


# Failures of the environment, not of a record: a missing package (transformers' chat
# templates need jinja2), no memory, a broken install. These must stop the run with their
# own message instead of being counted as malformed records.
_ENVIRONMENT_ERRORS = (ImportError, MemoryError, RecursionError, SystemError)


class EnvironmentProblem(RuntimeError):
  """The environment (a missing package, ...), not the data, fails every record."""


def _raise_if_environment(exc, where):
  if isinstance(exc, _ENVIRONMENT_ERRORS):
    hint = (" (a missing package: `pip install -e .` installs everything the data pipeline needs)"
            if isinstance(exc, ImportError) else "")
    raise EnvironmentProblem(f"{where}: {type(exc).__name__}: {exc}{hint}; this is an environment "
                             "error, not a malformed record") from exc


def _reason_of(exc):
  if isinstance(exc, sources_lib.RecordError):
    return exc.reason
  if isinstance(exc, images_lib.ImageDecodeError):
    return "image_decode"
  if isinstance(exc, proc_lib.AspectRatioError):
    return "aspect_ratio"
  if isinstance(exc, PlaceholderMismatch):
    return "placeholder_mismatch"
  return "other"


class PlaceholderMismatch(ValueError):
  pass


def check_record(rec, processor, max_prompt_length, max_image_patches=0):
  """Cheap checks (text + image headers): placeholders, special tokens, aspect, patches, length; raises.

  max_image_patches: the most patches an image may have after resizing (0: the
  processor's nominal bound, max_pixels // patch_size², which the model is built with).
  """
  where = f"record {rec['record_id']} of {rec['origin']}"
  n_ph = rec["problem"].count(proc_lib.IMAGE_PLACEHOLDER)
  if n_ph != len(rec["images"]):
    raise PlaceholderMismatch(f"{where}: {n_ph} <image> placeholders but {len(rec['images'])} images")
  special = processor.special_tokens_in(rec["problem"])
  if special:
    # The tokenizer would encode it as the control token itself: an <|image_pad|> adds an
    # image slot with no image, a <|vision_start|> breaks the position ids.
    raise sources_lib.RecordError("special_token", f"{where}: the problem's text contains the special "
                                  f"token(s) {', '.join(special)}")
  cap = max_image_patches or processor.nominal_max_patches
  sizes = []
  for k, data in enumerate(rec["images"]):
    try:
      h, w = images_lib.image_size(data)
    except images_lib.ImageDecodeError as e:
      raise images_lib.ImageDecodeError(f"{where}, image {k}: {e}") from e
    if max(h, w) / max(1, min(h, w)) > 200:
      raise proc_lib.AspectRatioError(f"{where}, image {k}: aspect ratio {h}x{w} > 200")
    n_patch = processor.num_patches(h, w)
    if n_patch > cap:
      raise sources_lib.RecordError(
          "too_many_patches", f"{where}, image {k}: {h}x{w} px resizes to {n_patch} patches > {cap} "
          f"(the model's max_image_patches; min_pixels={processor.image.min_pixels}, "
          f"max_pixels={processor.image.max_pixels})")
    sizes.append((h, w))
  n = processor.prompt_length(rec["problem"], sizes)
  if n > max_prompt_length:
    raise sources_lib.RecordError(
        "too_long", f"{where}: prompt of {n} tokens > max_prompt_length {max_prompt_length}")
  return n


def prefilter(source, processor, max_prompt_length, num_threads=4, max_image_patches=0):
  """Ids of records passing `check_record`, and drop counts by reason.

  Raises `EnvironmentProblem` when a record fails for a reason that is not the record's
  (a missing package, ...), instead of dropping every record as `other`.
  """
  def one(i):
    try:
      check_record(source.record(i), processor, max_prompt_length, max_image_patches)
      return i, None, None
    except Exception as e:  # pylint: disable=broad-except
      _raise_if_environment(e, f"record {i} of {source.name}")
      return i, _reason_of(e), str(e)

  kept, counts = [], collections.Counter()
  ids = range(len(source))
  if num_threads > 1:
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      results = list(pool.map(one, ids, chunksize=64))
  else:
    results = [one(i) for i in ids]
  for i, reason, msg in results:
    if reason is None:
      kept.append(i)
    else:
      counts[reason] += 1
      if counts[reason] <= 20:
        logging.warning("dropping %s (%s)", msg, reason)
  if counts:
    logging.warning("prefilter of %s: kept %d of %d records; dropped %s",
                    source.name, len(kept), len(source), dict(counts))
  return np.asarray(kept, np.int64), dict(counts)


def process_record(record_id, source, processor, max_prompt_length, keep_raw, max_image_patches=0):
  """record id → processed example dict, or {'ok': False, reason, message}.

  Raises only `EnvironmentProblem` (see `prefilter`); a bad record is reported, not raised.
  """
  try:
    rec = source.record(int(record_id))
    check_record(rec, processor, max_prompt_length, max_image_patches)
    where = f"record {rec['record_id']} of {rec['origin']}"
    imgs = []
    for k, data in enumerate(rec["images"]):
      try:
        imgs.append(images_lib.decode_image(data))
      except images_lib.ImageDecodeError as e:
        raise images_lib.ImageDecodeError(f"{where}, image {k}: {e}") from e
    out = processor(rec["problem"], imgs)
    out.update(ok=True, record_id=rec["record_id"], answer=rec["answer"], kind=rec["kind"],
               problem=rec["problem"], raw_images=imgs if keep_raw else None)
    return out
  except Exception as e:  # pylint: disable=broad-except
    _raise_if_environment(e, f"record {int(record_id)} of {source.name}")
    return {"ok": False, "record_id": int(record_id), "reason": _reason_of(e), "message": str(e)}


class PromptBatchIterator:
  """Infinite (or num_epochs-long) iterator of `PromptBatch`es with get/set_state."""

  def __init__(self, cfg, processor, source=None):
    self.cfg, self.processor = cfg, processor
    self.source = source if source is not None else make_source(cfg)
    if cfg.process_index is None or cfg.process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      self.process_index, self.process_count = jax.process_index(), jax.process_count()
    else:
      self.process_index, self.process_count = cfg.process_index, cfg.process_count
    if cfg.batch_size % self.process_count:
      raise ValueError(f"batch_size {cfg.batch_size} not divisible by {self.process_count} processes")
    self.per_host_batch = cfg.batch_size // self.process_count
    self.buckets = resolve_buckets(cfg, self.per_host_batch)
    self.kept_ids, self.prefilter_counts = prefilter(
        self.source, processor, cfg.max_prompt_length, max(1, cfg.num_threads), cfg.max_image_patches)
    if len(self.kept_ids) < self.process_count:
      raise ValueError(f"{self.source.name}: only {len(self.kept_ids)} usable records "
                       f"(dropped by reason: {self.prefilter_counts}; the warnings above show examples)")
    self._pool = (concurrent.futures.ThreadPoolExecutor(cfg.num_threads)
                  if cfg.num_threads > 1 else None)
    self._reset(batch_index=0, grain_state=None, totals={})

  # -- grain ------------------------------------------------------------------------------

  def _dataset(self):
    cfg = self.cfg
    ds = grain.MapDataset.source(self.kept_ids)
    if cfg.shuffle:
      ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    ds = ds[self.process_index::self.process_count]
    src, proc, max_len = self.source, self.processor, cfg.max_prompt_length
    keep_raw = cfg.mask.enabled or cfg.noise.enabled
    cap = cfg.max_image_patches
    ds = ds.map(lambda rid: process_record(rid, src, proc, max_len, keep_raw, cap))
    return ds.to_iter_dataset(grain.ReadOptions(
        num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer_size))

  def _reset(self, batch_index, grain_state, totals):
    self._stop_producer()
    self._grain_it = iter(self._dataset())
    if grain_state is not None:
      self._grain_it.set_state(grain_state)
    self._batch_index = batch_index
    self._totals = collections.Counter(totals)
    self._delivered_state = self._state_now()
    self._queue, self._thread, self._stop = None, None, None

  def _state_now(self):
    return {"grain": self._grain_it.get_state(), "batch_index": self._batch_index,
            "skipped_total": dict(self._totals), "seed": self.cfg.seed,
            "num_records": int(len(self.kept_ids)), "process_index": self.process_index,
            "process_count": self.process_count}

  # -- batches ----------------------------------------------------------------------------

  def _masked(self, ex, step):
    return masking.masked_pixel_values(
        ex["raw_images"], self.cfg.mask, self.processor.image, seed=self.cfg.seed, step=step,
        record_id=ex["record_id"])

  def _noisy(self, ex, step, strength):
    return noise_lib.noisy_pixel_values(ex["raw_images"], self.processor.image, strength=strength,
                                        seed=self.cfg.seed, step=step, record_id=ex["record_id"])

  def _next_batch(self):
    """Produces (batch, state after it). Runs in the producer thread when prefetching."""
    skipped = collections.Counter()
    examples = []
    while len(examples) < self.per_host_batch:
      try:
        ex = next(self._grain_it)
      except StopIteration:
        if examples:
          logging.info("dropping the last partial batch of %d prompts", len(examples))
        raise
      if not ex["ok"]:
        skipped[ex["reason"]] += 1
        logging.warning("skipping %s (%s)", ex["message"], ex["reason"])
        continue
      examples.append(ex)
    step = self._batch_index
    with_masked, with_noisy = self.cfg.mask.enabled, self.cfg.noise.enabled
    strength = noise_lib.batch_strength(self.cfg.noise, step, self.cfg.batch_size) if with_noisy else None
    if with_masked or with_noisy:
      fn = lambda ex: (self._masked(ex, step) if with_masked else None,
                       self._noisy(ex, step, strength) if with_noisy else None)
      derived = list(self._pool.map(fn, examples)) if self._pool else [fn(e) for e in examples]
      for ex, (masked, noisy) in zip(examples, derived):
        ex["masked_pixel_values"], ex["noisy_pixel_values"] = masked, noisy
        ex["raw_images"] = None
    batch, overflow = collate(examples, self.processor.pad_token_id, self.buckets,
                              self.processor.image.patch_dim, with_masked, with_noisy)
    for k, v in overflow.items():
      if v:
        logging.warning("batch %d: %s (%d patches, %d images) beyond the largest bucket",
                        step, k, batch.num_patches, batch.num_images)
    self._totals.update(skipped)
    self._totals.update({k: v for k, v in overflow.items() if v})
    self._batch_index += 1
    stats = {"batch_index": step}
    if with_noisy:
      stats["noise_strength"] = strength
    stats.update({f"skipped/{k}": v for k, v in skipped.items()})
    stats.update({f"skipped_total/{k}": v for k, v in self._totals.items()})
    stats.update({f"prefilter/{k}": v for k, v in self.prefilter_counts.items()})
    stats["prefilter/kept"] = int(len(self.kept_ids))
    batch.stats = stats
    return batch, self._state_now()

  def _producer(self, q, stop):
    try:
      while not stop.is_set():
        item = self._next_batch()
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # pylint: disable=broad-except
      q.put(e)

  def _stop_producer(self):
    if getattr(self, "_thread", None) is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None

  def __iter__(self):
    return self

  def __next__(self):
    if self.cfg.prefetch_batches <= 0:
      batch, state = self._next_batch()
    else:
      if self._thread is None:
        self._queue = queue.Queue(maxsize=self.cfg.prefetch_batches)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._producer, args=(self._queue, self._stop),
                                        daemon=True, name="papo-data-prefetch")
        self._thread.start()
      item = self._queue.get()
      if isinstance(item, BaseException):
        self._thread.join()
        self._thread = None
        raise item
      batch, state = item
    self._delivered_state = state
    return batch

  def get_state(self):
    """JSON-serialisable position after the last batch returned by `next`."""
    return dict(self._delivered_state)

  def set_state(self, state):
    """Resume right after the batch whose state this is (drops prefetched batches)."""
    for key, mine in (("seed", self.cfg.seed), ("num_records", int(len(self.kept_ids))),
                      ("process_count", self.process_count)):
      if state.get(key) != mine:
        logging.warning("data state was saved with %s=%s, now %s: resuming anyway",
                        key, state.get(key), mine)
    self._reset(state["batch_index"], state["grain"], state.get("skipped_total", {}))

  def close(self):
    self._stop_producer()
    if self._pool is not None:
      self._pool.shutdown(wait=False)


def make_iterator(cfg, processor=None, ckpt_dir=None, source=None):
  """A `PromptBatchIterator` for `cfg` (builds the processor from `ckpt_dir` if needed)."""
  if processor is None:
    processor = proc_lib.Processor.from_pretrained(ckpt_dir, cfg.min_pixels, cfg.max_pixels)
  return PromptBatchIterator(cfg, processor, source)
