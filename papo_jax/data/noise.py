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

In the data pipeline (`noisy_pixel_values`, `batch_strength`): each prompt's distorted
pixels are made next to its masked copy, from the same per-record key (run seed, batch
index, record id, image index; a salt of its own keeps the noise apart from the mask), on
the image resized to the model's resolution (theirs is noised after EasyR1 resized it into
[min_pixels, max_pixels]; the Qwen processor then only snaps it to the 28-px grid), at the
strength of the RL step that consumes the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from papo_jax.data import processor as proc_lib

NUM_STEPS = 1000
BETA_MIN = 1e-5
BETA_MAX = 0.5e-2
DECAY_MODES = ('sigmoid', 'linear', 'pow', 'exp', 'none')
_NOISE_SALT = 0x5A5A  # keeps noise streams apart from the masks' (masking._MASK_SALT) and other uses of the seed


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
  """The `noisy` config group as the data pipeline needs it (the trainer fills in the step counts)."""
  enabled: bool = False
  strength: int = 500          # their gaussian_noise_step: the diffusion step at the start
  decay_mode: str = 'sigmoid'
  decay_coef: float = 30.0
  mid_step: float = 40.0
  total_steps: int = 1         # train.steps
  prompts_per_step: int = 0    # data.batch_size (0: one pipeline batch per step)
  warmup_batches: int = 0      # batches read before RL step 0 (train.warmup_sft_steps: the format warm-up)

  def __post_init__(self):
    if self.decay_mode not in DECAY_MODES:
      raise ValueError(f'noise decay_mode {self.decay_mode!r} not in {DECAY_MODES}')
    if not 0 <= int(self.strength) < NUM_STEPS:
      raise ValueError(f'noise strength {self.strength} not a diffusion step in [0, {NUM_STEPS - 1}]')


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


def noise_rng(seed: int, step: int, record_id: int, image_index: int) -> np.random.Generator:
  """numpy Generator seeded by (seed, batch index, record id, image index) only: masking.mask_rng's key."""
  entropy = [int(seed) & 0xFFFFFFFF, _NOISE_SALT, int(step), int(record_id), int(image_index)]
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def batch_step(batch_index: int, batch_size: int, prompts_per_step: int, warmup_batches: int = 0) -> int:
  """The 0-based RL step that consumes pipeline batch `batch_index` of `batch_size` prompts.

  (batch_index - warmup_batches) * batch_size // prompts_per_step, at least 0, where
  warmup_batches is what a supervised warm-up read before RL (the tiny demo's): the batch
  index itself when one batch feeds one step (GRPO). DAPO reads algo.dapo_chunk prompts per batch and refills a step until
  enough groups survive, so a step consumes a varying number of batches; the rule then counts
  the prompts drawn before the batch in steps of data.batch_size (the step the batch would feed
  if every group survived, never behind the true step). Either way it depends on the batch
  index only, which the data state saves: a resumed run draws the same strengths.
  """
  drawn = max(0, int(batch_index) - int(warmup_batches)) * int(batch_size)
  return drawn // max(1, int(prompts_per_step or batch_size))


def batch_strength(cfg: NoiseConfig, batch_index: int, batch_size: int) -> int:
  """The diffusion step of batch `batch_index`: noise_schedule at its RL step (1-based, as their global_step)."""
  step = batch_step(batch_index, batch_size, cfg.prompts_per_step, cfg.warmup_batches)
  return noise_schedule(step + 1, cfg.total_steps, alpha0=int(cfg.strength), mode=cfg.decay_mode,
                        coef=float(cfg.decay_coef), mid_step=float(cfg.mid_step))


def noisy_pixel_values(images, image_cfg, *, strength: int, seed: int, step: int, record_id: int) -> np.ndarray:
  """Distorted pixel_values [ΣN, D] float32 for one prompt's raw uint8 [H, W, 3] images.

  Each image is resized as the processor does, then distorted at `strength` with
  `noise_rng(seed, step, record_id, k)`: same shape and row layout as the clean
  `pixel_values` (same grid, tokens and positions), shared by the prompt's noisy rollouts.
  """
  noisy = [distort_image(proc_lib.resize_image(im, image_cfg), strength, noise_rng(seed, step, record_id, k))
           for k, im in enumerate(images)]
  pixel_values, _ = proc_lib.images_to_pixel_values(noisy, image_cfg, resized=True)
  return pixel_values
