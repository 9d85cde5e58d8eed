"""PAPO masked images: fraction, reproducibility, layout invariance, aligned variants."""

import numpy as np
import pytest

from papo_jax.data import masking
from papo_jax.data import processor as proc_lib
from papo_jax.data import testing
from papo_jax.data import tiny_tokenizer

IMG_CFG = proc_lib.ImageConfig(max_pixels=28 * 28 * 64)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tiny_ckpt"))
  tiny_tokenizer.build_tiny_checkpoint_files(d, max_pixels=28 * 28 * 64)
  return proc_lib.Processor.from_pretrained(d)


def test_fraction_within_tolerance():
  # 140x154 → 10x11 = 110 squares; 400 draws → std of the mean fraction ≈ 0.0023.
  fracs = [masking.pixel_mask(140, 154, 14, 0.6, masking.mask_rng(0, s, 7, 0)).mean()
           for s in range(400)]
  assert abs(np.mean(fracs) - 0.6) < 0.01
  assert np.std(fracs) > 0.01  # random per draw, not exactly 0.6


def test_exact_ratio():
  for s in range(20):
    m = masking.unit_mask(10, 11, 0.6, masking.mask_rng(1, s, 0, 0), exact_ratio=True)
    assert m.sum() == round(0.6 * 110)


def test_squares_from_top_left_clipped_at_edges():
  m = masking.pixel_mask(30, 45, 14, 0.5, masking.mask_rng(3, 0, 0, 0))
  assert m.shape == (30, 45)
  for r0 in range(0, 30, 14):
    for c0 in range(0, 45, 14):
      block = m[r0:r0 + 14, c0:c0 + 14]
      assert block.all() or not block.any()


def test_reproducible_and_fresh():
  key = dict(seed=5, step=3, record_id=11, image_index=0)
  a = masking.pixel_mask(98, 98, 14, 0.6, masking.mask_rng(**key))
  b = masking.pixel_mask(98, 98, 14, 0.6, masking.mask_rng(**key))
  np.testing.assert_array_equal(a, b)
  for change in (dict(step=4), dict(seed=6), dict(record_id=12), dict(image_index=1)):
    c = masking.pixel_mask(98, 98, 14, 0.6, masking.mask_rng(**{**key, **change}))
    assert (a != c).any(), change


@pytest.mark.parametrize("mode", masking.MODES)
def test_masked_prompt_shares_tokens_and_grid(processor, mode):
  images = [testing.natural_image(100, 130, 0), testing.natural_image(333, 517, 1)]
  prompt = processor("<image> and <image>: which has more circles?", images)
  cfg = masking.MaskConfig(mode=mode)
  m1 = masking.mask_prompt(prompt, images, cfg, processor.image, seed=0, step=0, record_id=4)
  m2 = masking.mask_prompt(prompt, images, cfg, processor.image, seed=0, step=0, record_id=4)
  m3 = masking.mask_prompt(prompt, images, cfg, processor.image, seed=0, step=1, record_id=4)
  for k in ("input_ids", "attention_mask", "image_grid_thw"):
    np.testing.assert_array_equal(m1[k], prompt[k])
  assert m1["pixel_values"].shape == prompt["pixel_values"].shape
  assert (m1["pixel_values"] != prompt["pixel_values"]).any()
  np.testing.assert_array_equal(m1["pixel_values"], m2["pixel_values"])
  assert (m1["pixel_values"] != m3["pixel_values"]).any()


@pytest.mark.parametrize("mode,unit", [("patch", 14), ("merged_token", 28)])
def test_aligned_modes_black_out_whole_units(processor, mode, unit):
  img = testing.natural_image(224, 280, 0)
  cfg = masking.MaskConfig(mode=mode)
  masked = masking.mask_image(img, cfg, processor.image, masking.mask_rng(0, 0, 0, 0))
  resized = proc_lib.resize_image(img, processor.image)
  black = (masked == 0).all(-1) & (resized != 0).any(-1)
  h, w = black.shape
  units = black.reshape(h // unit, unit, w // unit, unit).transpose(0, 2, 1, 3).reshape(
      h // unit, w // unit, -1)
  changed = (masked != resized).any(-1).reshape(h // unit, unit, w // unit, unit).any((1, 3))
  # Every changed unit is entirely black; roughly `ratio` of the units changed.
  assert units[changed].all()
  assert 0.3 < changed.mean() < 0.9


def test_ratio_extremes(processor):
  img = testing.natural_image(60, 60, 0)
  none = masking.masked_pixel_values([img], masking.MaskConfig(ratio=0.0), processor.image,
                                     seed=0, step=0, record_id=0)
  orig, _ = proc_lib.images_to_pixel_values([img], processor.image)
  np.testing.assert_array_equal(none, orig)
  full = masking.masked_pixel_values([img], masking.MaskConfig(ratio=1.0), processor.image,
                                     seed=0, step=0, record_id=0)
  black, _ = proc_lib.images_to_pixel_values([np.zeros_like(img)], processor.image)
  np.testing.assert_array_equal(full, black)


def test_each_image_masked_independently():
  img = testing.natural_image(98, 98, 0)
  cfg = masking.MaskConfig()
  a = masking.mask_image(img, cfg, IMG_CFG, masking.mask_rng(0, 0, 0, 0))
  b = masking.mask_image(img, cfg, IMG_CFG, masking.mask_rng(0, 0, 0, 1))
  assert (a != b).any()


def test_bad_config():
  with pytest.raises(ValueError, match="mode"):
    masking.MaskConfig(mode="saliency")
