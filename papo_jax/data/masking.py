"""PAPO's masked image (papo.md §3) and aligned variants.

Default ('raw_squares', the paper): a grid of 14×14-pixel squares from the top-left of
the RAW image (edge squares clipped), each blacked out (all channels 0) independently
with probability `ratio`, before the Qwen resize/patchify. Variants:
  'patch'         14-px patches of the RESIZED image (aligned with the vision patches);
  'merged_token'  28-px merge units of the resized image (one LLM image token each).
`exact_ratio=True` blacks out exactly round(ratio·n) units instead of each with prob
`ratio`. Every variant keeps the image size, hence image_grid_thw, tokens and
positions; only pixels change.

Randomness is a pure function of (run seed, step, record id, image index) through
numpy's SeedSequence, so a resumed run draws the same masks.
"""

import dataclasses

import numpy as np

from papo_jax.data import processor as proc_lib

MODES = ("raw_squares", "patch", "merged_token")
_MASK_SALT = 0x9A9A  # keeps mask streams apart from any other use of the run seed


@dataclasses.dataclass(frozen=True)
class MaskConfig:
  """Mask settings (the `papo` / `data.mask` config group maps onto this)."""
  enabled: bool = True
  ratio: float = 0.6
  patch_size: int = 14  # square side for 'raw_squares'
  mode: str = "raw_squares"
  exact_ratio: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mask mode {self.mode!r} not in {MODES}")
    if not 0.0 <= self.ratio <= 1.0:
      raise ValueError(f"mask ratio {self.ratio} not in [0, 1]")


def mask_rng(seed, step, record_id, image_index):
  """numpy Generator seeded by (seed, step, record id, image index) only."""
  entropy = [int(seed) & 0xFFFFFFFF, _MASK_SALT, int(step), int(record_id), int(image_index)]
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def unit_mask(rows, cols, ratio, rng, exact_ratio=False):
  """bool [rows, cols]: True = black out that unit."""
  n = rows * cols
  if exact_ratio:
    flat = np.zeros(n, bool)
    flat[rng.choice(n, size=int(round(ratio * n)), replace=False)] = True
  else:
    flat = rng.random(n) < ratio
  return flat.reshape(rows, cols)


def pixel_mask(height, width, unit, ratio, rng, exact_ratio=False):
  """bool [H, W] from a grid of `unit`-px squares from the top-left (edges clipped)."""
  rows, cols = -(-height // unit), -(-width // unit)
  m = unit_mask(rows, cols, ratio, rng, exact_ratio)
  return np.repeat(np.repeat(m, unit, axis=0), unit, axis=1)[:height, :width]


def apply_mask(image_HxWx3, mask_HxW):
  """uint8 [H, W, 3] with masked pixels set to 0 in all channels (a copy)."""
  return image_HxWx3 * (~mask_HxW)[..., None].astype(image_HxWx3.dtype)


def mask_image(image_HxWx3, cfg, image_cfg, rng):
  """uint8 [H, W, 3] raw image → uint8 RESIZED masked image [h̄, w̄, 3].

  'raw_squares' masks before resizing; the aligned modes mask the resized image.
  """
  if cfg.mode == "raw_squares":
    h, w = image_HxWx3.shape[:2]
    masked = apply_mask(image_HxWx3, pixel_mask(h, w, cfg.patch_size, cfg.ratio, rng,
                                                cfg.exact_ratio))
    return proc_lib.resize_image(masked, image_cfg)
  resized = proc_lib.resize_image(image_HxWx3, image_cfg)
  unit = image_cfg.patch_size * (image_cfg.merge_size if cfg.mode == "merged_token" else 1)
  h, w = resized.shape[:2]
  return apply_mask(resized, pixel_mask(h, w, unit, cfg.ratio, rng, cfg.exact_ratio))


def masked_pixel_values(images, cfg, image_cfg, *, seed, step, record_id):
  """Masked pixel_values [ΣN, D] float32 for one prompt's raw uint8 images.

  Same shape and row layout as the original's `pixel_values` (same grid); image k uses
  `mask_rng(seed, step, record_id, k)`. Shared by all n rollouts of the prompt.
  """
  resized = [mask_image(im, cfg, image_cfg, mask_rng(seed, step, record_id, k))
             for k, im in enumerate(images)]
  pixel_values, _ = proc_lib.images_to_pixel_values(resized, image_cfg, resized=True)
  return pixel_values


def mask_prompt(processed, images, cfg, image_cfg, *, seed, step, record_id):
  """A processed prompt (Processor output dict) → the same dict with masked pixels.

  input_ids, attention_mask and image_grid_thw are shared (not copied) with the input.
  """
  out = dict(processed)
  out["pixel_values"] = masked_pixel_values(
      images, cfg, image_cfg, seed=seed, step=step, record_id=record_id)
  if out["pixel_values"].shape != processed["pixel_values"].shape:
    raise AssertionError("masking changed the patch count")  # cannot happen: same sizes
  return out
