"""Static size bounds the model is compiled for, derived from the data settings."""

from __future__ import annotations


def max_image_patches(max_pixels: int, patch_size: int) -> int:
  """Patches of the largest image the processor emits under ``max_pixels``.

  The vision tower's full-attention layers pad each image to this, so their memory is
  linear in the number of images. 0 (no pixel cap) means "no padding bound".
  """
  return int(max_pixels) // int(patch_size) ** 2 if max_pixels else 0
