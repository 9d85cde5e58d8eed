"""Tests for papo_jax.data.noise against NoisyRollout's definitions (verl/utils/image_aug.py,
verl/trainer/ray_trainer.py), as float64 NumPy references and, where bits matter, torch."""

import math

import numpy as np
import pytest

from papo_jax.data import noise


def ref_coefficients():
  """float64 transcription of _add_gaussian_noise's schedule."""
  x = np.linspace(-6, 6, 1000)
  betas = 1 / (1 + np.exp(-x)) * (0.5e-2 - 1e-5) + 1e-5
  abar = np.cumprod(1 - betas)
  return np.sqrt(abar), np.sqrt(1 - abar)


def ref_decay(step, total, mode, coef, mid):
  norm = step / total
  if mode == 'exp':
    return 1.0 - coef ** (total - step)
  if mode == 'pow':
    return 1.0 - norm ** coef
  if mode == 'linear':
    return 1.0 - norm
  if mode == 'sigmoid':
    return 1.0 - 1 / (1 + math.exp(-(coef * (norm - mid / total))))
  return 1.0


def test_coefficients_against_reference_and_torch():
  a, b = noise.diffusion_coefficients()
  ra, rb = ref_coefficients()
  assert a.dtype == np.float32 and a.shape == (1000,)
  np.testing.assert_allclose(a, ra, rtol=2e-6)
  # sqrt(1 - abar) in float32 (as theirs) loses digits where abar ~ 1 (t small): 1e-3 relative.
  np.testing.assert_allclose(b, rb, rtol=2e-3)
  assert 0.99 < a[0] < 1.0 and 0.28 < a[-1] < 0.29 and b[-1] > 0.95  # t = 999 keeps 28.5% of the image
  torch = pytest.importorskip('torch')
  betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5
  prod = torch.cumprod(1 - betas, dim=0)
  np.testing.assert_allclose(a, torch.sqrt(prod).numpy(), rtol=1e-6)
  np.testing.assert_allclose(b, torch.sqrt(1 - prod).numpy(), rtol=1e-5, atol=1e-7)


def test_distort_image_against_reference():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, size=(9, 13, 3), dtype=np.uint8)
  ra, rb = ref_coefficients()
  for t in (0, 1, 250, 500, 999):
    got = noise.distort_image(img, t, np.random.default_rng(7))
    eps = np.random.default_rng(7).standard_normal(img.shape, dtype=np.float32)
    x = np.clip(ra[t] * (img / 255.0) + rb[t] * np.float64(eps), 0, 1)
    want = np.floor(x * 255.0)  # ToPILImage: mul(255).byte() truncates
    assert got.dtype == np.uint8 and got.shape == img.shape
    assert np.abs(got.astype(np.float64) - want).max() <= 1.0  # float32 vs float64 at integer edges
    assert (got.astype(np.float64) == want).mean() > 0.97
  # Grey images and alpha channels get the same treatment (their ToTensor path).
  for shape in ((5, 6), (5, 6, 4)):
    g = rng.integers(0, 256, size=shape, dtype=np.uint8)
    assert noise.distort_image(g, 300, np.random.default_rng(1)).shape == shape


def test_distort_image_uint8_conversion_matches_torch():
  torch = pytest.importorskip('torch')
  img = np.random.default_rng(2).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
  a, b = noise.diffusion_coefficients()
  eps = np.random.default_rng(3).standard_normal(img.shape, dtype=np.float32)
  x0 = torch.tensor(img).float().div(255)  # ToTensor (layout aside)
  xt = torch.clamp(float(a[400]) * x0 + float(b[400]) * torch.tensor(eps), 0.0, 1.0)
  want = xt.mul(255).byte().numpy()
  np.testing.assert_array_equal(noise.distort_image(img, 400, np.random.default_rng(3)), want)


def test_distort_image_strength_and_errors():
  img = np.full((64, 64, 3), 128, np.uint8)
  weak = noise.distort_image(img, 0, np.random.default_rng(0)).astype(np.float64)
  strong = noise.distort_image(img, 999, np.random.default_rng(0)).astype(np.float64)
  assert np.abs(weak - 128).max() <= 8 and 0.5 < weak.std() < 3  # std ~0.005 * 255
  assert strong.std() > 80  # clipped noise
  with pytest.raises(ValueError, match='strength'):
    noise.distort_image(img, 1000, np.random.default_rng(0))
  with pytest.raises(ValueError, match='uint8'):
    noise.distort_image(img.astype(np.float32), 10, np.random.default_rng(0))


@pytest.mark.parametrize('mode,coef', [('sigmoid', 30.0), ('sigmoid', 60.0), ('linear', 1.0),
                                       ('pow', 2.0), ('exp', 1.0), ('exp', 0.9), ('none', 1.0)])
def test_noise_schedule_against_reference(mode, coef):
  total = 60
  for step in range(1, total + 1):
    want = int(500 * ref_decay(step, total, mode, coef, 40))
    assert noise.noise_schedule(step, total, alpha0=500, mode=mode, coef=coef, mid_step=40) == \
        min(max(want, 0), 999)


def test_noise_schedule_of_their_scripts():
  # Geometry3K script: alpha0 500, sigmoid, coef 30, mid step 40: half strength at the mid step.
  total = 60
  ts = [noise.noise_schedule(s, total) for s in range(1, total + 1)]
  assert ts[0] == int(500 * (1 - 1 / (1 + math.exp(-30 * (1 / 60 - 40 / 60)))))
  assert ts[0] >= 499 and ts[39] == 250 and ts[-1] <= 2
  assert all(x >= y for x, y in zip(ts, ts[1:]))  # anneals monotonically
  # Their config-class defaults (mode exp, coef 1.0) switch the noise off; 'none' holds it.
  assert noise.noise_schedule(5, total, mode='exp', coef=1.0) == 0
  assert noise.noise_schedule(5, total, mode='none') == 500
  assert noise.noise_schedule(5, total, mode='exp', coef=30.0) == 0  # negative t clipped
  with pytest.raises(ValueError, match='mode'):
    noise.noise_schedule(5, total, mode='cosine')


def test_rollout_split_layout():
  split = noise.rollout_split(3, 2)
  np.testing.assert_array_equal(split, [0, 0, 1, 1] * 3)
  # Their image_status: 'normal' if (i // n) % 2 == 0 else 'noisy'.
  n = 6
  theirs = np.array([(i // n) % 2 == 1 for i in range(4 * 2 * n)])
  np.testing.assert_array_equal(noise.rollout_split(4, n), theirs)
  np.testing.assert_array_equal(noise.rollout_split(2, 3, 1), [0, 0, 0, 1] * 2)
  assert noise.rollout_split(0, 2).shape == (0,)
  with pytest.raises(ValueError, match='n_clean'):
    noise.rollout_split(2, 0, 0)
