"""NoisyRollout image distortion, its annealing schedule and the clean/noisy rollout split.

Pure NumPy, host side. Definitions follow github.com/John-AI-Lab/NoisyRollout (mirrored as
NUS-TRAIL/NoisyRollout):
- `verl/utils/image_aug.py` `ImageAugmenter._add_gaussian_noise`: a diffusion forward step
  x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps on the image in [0, 1], with
  betas = sigmoid(linspace(-6, 6, 1000)) * (0.5e-2 - 1e-5) + 1e-5 and abar = cumprod(1 - beta);
  then clamp to [0, 1] and back to uint8 as torchvision's ToPILImage (x * 255, truncated).
- `ImageAugmenter.augment`: t = int(gaussian_noise_step * decay(step / total_steps)).
- `verl/trainer/ray_trainer.py` `fit`: each prompt gets n rollouts on the clean image and n
  on the noisy one (n1 = n2 = worker.rollout.n); the group of 2n shares one advantage
  baseline, and the update (old/ref log-probs and the loss) sees the clean image only.
Values of their released scripts (`training_scripts/qwen2_5_vl_7b_*_noisyrollout.sh`):
aug_type=gaussian, decay_mode=sigmoid, decay_sig_mid_step=40, gaussian_noise_step 500
(Geometry3K, decay_coef 30) or 450 (K12, decay_coef 60), rollout.n=6.
"""

from __future__ import annotations

import functools
import math

import numpy as np

NUM_STEPS = 1000
BETA_MIN = 1e-5
BETA_MAX = 0.5e-2
DECAY_MODES = ('sigmoid', 'linear', 'pow', 'exp', 'none')


@functools.lru_cache(maxsize=None)
def diffusion_coefficients(num_steps: int = NUM_STEPS) -> tuple[np.ndarray, np.ndarray]:
  """([num_steps], [num_steps]) float32 sqrt(abar_t) and sqrt(1 - abar_t), as torch computes them.

  float32 like their torch code (linspace, sigmoid); torch's CPU cumprod accumulates a
  float32 tensor in float64, so this one does too, rounding the product to float32.
  """
  x = np.linspace(-6.0, 6.0, num_steps, dtype=np.float64).astype(np.float32)
  betas = (1.0 / (1.0 + np.exp(-x))).astype(np.float32) * np.float32(BETA_MAX - BETA_MIN) + np.float32(BETA_MIN)
  abar = np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)
  return np.sqrt(abar).astype(np.float32), np.sqrt(np.float32(1.0) - abar).astype(np.float32)


def distort_image(img_uint8: np.ndarray, strength: int, rng: np.random.Generator) -> np.ndarray:
  """[H, W(, C)] uint8 image with NoisyRollout's Gaussian noise at diffusion step `strength`.

  strength: the integer step t in [0, 999] (`noise_schedule` gives it); even t = 0 adds a
  little noise (std ~0.005 of the range), as theirs. Every channel gets noise (their
  ToTensor path does not special-case alpha). rng: the per-record generator.
  """
  img = np.asarray(img_uint8)
  if img.dtype != np.uint8 or img.ndim not in (2, 3):
    raise ValueError(f'distort_image: expected a uint8 [H, W] or [H, W, C] image, got {img.dtype} '
                     f'{img.shape}')
  t = int(strength)
  if not 0 <= t < NUM_STEPS:
    raise ValueError(f'distort_image: strength={strength} must be an integer step in [0, {NUM_STEPS - 1}]')
  a_T, b_T = diffusion_coefficients()
  x0 = img.astype(np.float32) / np.float32(255.0)  # ToTensor
  noise = rng.standard_normal(img.shape, dtype=np.float32)
  xt = np.clip(a_T[t] * x0 + b_T[t] * noise, 0.0, 1.0)
  return (xt * np.float32(255.0)).astype(np.uint8)  # ToPILImage: mul(255).byte() truncates


def noise_decay(step: int, total_steps: int, mode: str = 'sigmoid', coef: float = 30.0,
                mid_step: float = 40.0) -> float:
  """Their `decay` multiplier of the initial noise step (ImageAugmenter.augment).

  norm = step / total_steps;
  sigmoid: 1 - sigmoid(coef * (norm - mid_step / total_steps)) (their scripts' choice);
  linear: 1 - norm; pow: 1 - norm ** coef; exp: 1 - coef ** (total_steps - step);
  none: 1 (constant noise). Their class defaults (mode exp, coef 1.0) give 0.
  """
  if mode not in DECAY_MODES:
    raise ValueError(f'noise_decay: mode={mode!r}: expected one of {DECAY_MODES}')
  if total_steps < 1:
    raise ValueError(f'noise_decay: total_steps={total_steps} must be >= 1')
  norm = step / total_steps
  if mode == 'exp':
    return 1.0 - coef ** (total_steps - step)
  if mode == 'pow':
    return 1.0 - norm ** coef
  if mode == 'linear':
    return 1.0 - norm
  if mode == 'sigmoid':
    x = coef * (norm - mid_step / total_steps)
    return 1.0 - 1.0 / (1.0 + math.exp(-x))
  return 1.0


def noise_schedule(step: int, total_steps: int, *, alpha0: int = 500, mode: str = 'sigmoid',
                   coef: float = 30.0, mid_step: float = 40.0) -> int:
  """Diffusion step t = int(alpha0 * decay) for training step `step` (their global_step: 1 first).

  alpha0 is their `gaussian_noise_step` (initial strength). t is clipped to [0, 999]: a
  negative t, reachable only with mode='exp' and coef > 1, would wrap around in their
  tensor indexing.
  """
  t = int(alpha0 * noise_decay(step, total_steps, mode, coef, mid_step))
  return min(max(t, 0), NUM_STEPS - 1)


def rollout_split(num_prompts: int, n_clean: int, n_noisy: int | None = None) -> np.ndarray:
  """[P * (n_clean + n_noisy)] bool, True where a rollout sees the distorted image.

  Their layout (ray_trainer.py, image_status): prompt p owns rows
  [p * (n1 + n2), (p + 1) * (n1 + n2)), its n1 clean rollouts first, then its n2 noisy
  ones; n_noisy defaults to n_clean as theirs (n1 = n2 = rollout.n, 2n rollouts a prompt).
  Group ids are `np.repeat(np.arange(P), n1 + n2)`: advantages over the mixed group.
  """
  n_noisy = n_clean if n_noisy is None else n_noisy
  if num_prompts < 0 or n_clean < 0 or n_noisy < 0 or n_clean + n_noisy < 1:
    raise ValueError(f'rollout_split: num_prompts={num_prompts}, n_clean={n_clean}, '
                     f'n_noisy={n_noisy} must be >= 0 with n_clean + n_noisy >= 1')
  block = np.concatenate([np.zeros(n_clean, bool), np.ones(n_noisy, bool)])
  return np.tile(block, num_prompts)
