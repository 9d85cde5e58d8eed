"""Qwen2.5-VL / Qwen3-VL processor in numpy + PIL (no torch).

Mirrors `transformers.AutoProcessor.from_pretrained(dir, backend="pil")` (v5) for the
same checkpoint directory: identical `input_ids` and `image_grid_thw`, `pixel_values`
bit-exact (spec qwen_vl.md §4). Images go in as uint8 RGB arrays `[H, W, 3]`
(see `images.decode_image`); the tokenizer and chat template come from the checkpoint
through transformers' `AutoTokenizer`. Everything family-specific is read from the
checkpoint's files: patch size, merge size and mean/std from preprocessor_config.json
(Qwen3-VL: 16, 2 and 0.5, so images snap to multiples of 32 px), the chat template
(Qwen3-VL's has no default system prompt) from chat_template.jinja/.json.

Pixel path: smart_resize → PIL bicubic on uint8 → x/255 (float64 → float32) →
(x - mean)/std in float32 → patchify into merge-unit-major rows of
C·T·P·P values in (c, t, y, x) order, the still frame repeated T times.
"""

import dataclasses
import functools
import json
import math
import os
import threading

import numpy as np
from PIL import Image

# papo.md §5: appended to the problem after a blank line.
REASONING_INSTRUCTION = (
    "You first think through the reasoning process as an internal monologue, enclosed "
    "within <think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
)
IMAGE_PLACEHOLDER = "<image>"
IMAGE_PAD = "<|image_pad|>"

# Class defaults of transformers' Qwen2VLImageProcessor (used when the config omits a key).
_DEFAULT_MIN_PIXELS = 56 * 56
_DEFAULT_MAX_PIXELS = 28 * 28 * 1280
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class AspectRatioError(ValueError):
  """max(h, w) / min(h, w) > 200: the Qwen processors refuse such images."""


def smart_resize(height, width, factor=28, min_pixels=_DEFAULT_MIN_PIXELS,
                 max_pixels=_DEFAULT_MAX_PIXELS):
  """(h̄, w̄): multiples of `factor`, h̄·w̄ in [min_pixels, max_pixels], aspect kept.

  Same arithmetic as transformers' `smart_resize` (Python's banker's `round`).
  """
  if max(height, width) / min(height, width) > 200:
    raise AspectRatioError(
        f"absolute aspect ratio must be smaller than 200, got {height}x{width} "
        f"({max(height, width) / min(height, width):.1f})")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def max_patches_for(min_pixels, max_pixels, factor=28, patch=14, max_aspect=200):
  """The most patches `smart_resize` can give any image of aspect ratio <= `max_aspect`.

  Not max_pixels // patch²: smart_resize rounds to multiples of `factor` after scaling, so
  (a) an image under min_pixels is scaled up and each side rounded UP (a 40x60 image with
  min = max = 56² becomes 56x84, 24 patches > 16), and (b) an image over max_pixels whose
  short side scales below one `factor` is clamped to `factor` while its long side keeps
  its length. Both depend on the aspect ratio a only, so the bound is a maximum over a in
  [1, max_aspect] of piecewise-constant functions, taken exactly at their breakpoints.
  Returns an int (patches of patch x patch pixels).
  """
  f, lo, hi = int(factor), float(min_pixels), float(max_pixels)
  # (c) inside the range after rounding: at most max_pixels.
  best = (int(hi) // (f * f)) * f * f
  # (a) scaled up to min_pixels: sides sqrt(lo/a), sqrt(lo*a), each rounded up to f.
  def up(a):
    return math.ceil(math.sqrt(lo / a) / f) * math.ceil(math.sqrt(lo * a) / f) * f * f
  cuts = {1.0, float(max_aspect)}
  for k in range(1, int(math.sqrt(lo * max_aspect) / f) + 2):
    for a in (lo / (f * k) ** 2, (f * k) ** 2 / lo):  # where a side crosses k*f
      if 1.0 <= a <= max_aspect:
        cuts.add(a)
  cuts = sorted(cuts)
  # ceil is constant on each open interval; its value there is the one just past the left cut.
  probes = cuts + [(x + y) / 2 for x, y in zip(cuts, cuts[1:])]
  best = max(best, max(up(a) for a in probes))
  # (b) scaled down to max_pixels with the short side clamped to f: the long side is
  # sqrt(hi*a) floored to f, largest at a = max_aspect.
  if hi / max_aspect < f * f:
    best = max(best, f * math.floor(math.sqrt(hi * max_aspect) / f) * f)
  return best // (patch * patch)


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """The preprocessor_config.json numbers that matter (defaults: Qwen2.5-VL)."""
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  min_pixels: int = _DEFAULT_MIN_PIXELS
  max_pixels: int = _DEFAULT_MAX_PIXELS
  image_mean: tuple = _CLIP_MEAN
  image_std: tuple = _CLIP_STD
  rescale_factor: float = 1 / 255

  @property
  def factor(self):
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self):
    """Values per pixel_values row: 3·T·P·P (1176 for Qwen2.5-VL, 1536 for Qwen3-VL)."""
    return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

  @classmethod
  def from_dict(cls, cfg, min_pixels=None, max_pixels=None):
    """From a preprocessor_config.json dict; explicit min/max_pixels win.

    As in transformers, top-level `min_pixels`/`max_pixels` override
    `size.shortest_edge`/`size.longest_edge`.
    """
    size = dict(cfg.get("size") or {})
    lo = size.get("shortest_edge", size.get("min_pixels", _DEFAULT_MIN_PIXELS))
    hi = size.get("longest_edge", size.get("max_pixels", _DEFAULT_MAX_PIXELS))
    lo = cfg["min_pixels"] if cfg.get("min_pixels") is not None else lo
    hi = cfg["max_pixels"] if cfg.get("max_pixels") is not None else hi
    lo = min_pixels if min_pixels is not None else lo
    hi = max_pixels if max_pixels is not None else hi
    mean = cfg.get("image_mean", _CLIP_MEAN)
    std = cfg.get("image_std", _CLIP_STD)
    mean = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,) * 3
    std = tuple(std) if isinstance(std, (list, tuple)) else (std,) * 3
    return cls(
        patch_size=int(cfg.get("patch_size", 14)),
        temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
        merge_size=int(cfg.get("merge_size", 2)),
        min_pixels=int(lo), max_pixels=int(hi),
        image_mean=tuple(float(m) for m in mean), image_std=tuple(float(s) for s in std),
        rescale_factor=float(cfg.get("rescale_factor", 1 / 255)))


def resized_size(height, width, cfg):
  """(h̄, w̄) that `cfg` resizes an image of (height, width) to."""
  return smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)


def resize_image(image_HxWx3, cfg):
  """uint8 [H, W, 3] → uint8 [h̄, w̄, 3] by PIL bicubic (a no-op when already sized)."""
  h, w = image_HxWx3.shape[:2]
  rh, rw = resized_size(h, w, cfg)
  if (rh, rw) == (h, w):
    return image_HxWx3
  pil = Image.fromarray(np.ascontiguousarray(image_HxWx3), mode="RGB")
  return np.asarray(pil.resize((rw, rh), resample=Image.BICUBIC))


def normalize_image(image_HxWx3, cfg):
  """uint8 [H, W, 3] → float32 [3, H, W], rescaled and normalised exactly as HF (PIL)."""
  x = (image_HxWx3.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
  mean = np.asarray(cfg.image_mean, np.float32)
  std = np.asarray(cfg.image_std, np.float32)
  return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))


def patchify(image_3xHxW, cfg):
  """float32 [3, H, W] → (patches [H·W/P², 3·T·P·P], (1, H/P, W/P)) in HF row order."""
  p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
  c, h, w = image_3xHxW.shape
  gh, gw = h // p, w // p
  x = image_3xHxW.reshape(c, gh // m, m, p, gw // m, m, p)
  x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, c, p, p)
  x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t,) + x.shape[5:])
  return x.reshape(gh * gw, c * t * p * p), (1, gh, gw)


@functools.lru_cache(maxsize=16)
def _normalize_lut(cfg):
  """float32 [3, 256]: the normalised value of each uint8 level per channel.

  Exactly `normalize_image`'s arithmetic (float64 rescale → float32, then float32
  subtract and divide), so looking values up is bit-identical and much cheaper.
  """
  v = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)
  mean = np.asarray(cfg.image_mean, np.float32)[:, None]
  std = np.asarray(cfg.image_std, np.float32)[:, None]
  return np.ascontiguousarray((v[None, :] - mean) / std)


def image_to_patches(image_HxWx3, cfg, resized=False):
  """uint8 [H, W, 3] → (pixel_values [N, D] float32, grid (1, h, w)).

  Same values as `patchify(normalize_image(resize_image(x)))`, computed by patchifying
  the uint8 image first and normalising through a lookup table (one pass over the
  output). `resized=True` skips the resize (the image is already [h̄, w̄, 3]).
  """
  img = image_HxWx3 if resized else resize_image(image_HxWx3, cfg)
  p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
  h, w, c = img.shape
  gh, gw = h // p, w // p
  u8 = img.reshape(gh // m, m, p, gw // m, m, p, c).transpose(0, 3, 1, 4, 6, 2, 5)
  u8 = np.ascontiguousarray(u8).reshape(gh * gw, c, p * p)  # cheap: 1 byte per value
  lut = _normalize_lut(cfg)
  out = np.empty((gh * gw, c, t, p * p), np.float32)
  for ch in range(c):
    vals = np.take(lut[ch], u8[:, ch])
    for tt in range(t):  # the still frame repeated temporal_patch_size times
      out[:, ch, tt] = vals
  return out.reshape(gh * gw, c * t * p * p), (1, gh, gw)


def images_to_pixel_values(images, cfg, resized=False):
  """list of uint8 [H, W, 3] → (pixel_values [ΣN, D] float32, image_grid_thw [I, 3] int64)."""
  if not images:
    return np.zeros((0, cfg.patch_dim), np.float32), np.zeros((0, 3), np.int64)
  outs = [image_to_patches(im, cfg, resized) for im in images]
  grid = np.asarray([o[1] for o in outs], np.int64)
  if len(outs) == 1:
    return outs[0][0], grid
  return np.concatenate([o[0] for o in outs], axis=0), grid


def build_messages(problem, instruction=REASONING_INSTRUCTION):
  """papo.md §5: one user turn; each `<image>` in the problem becomes an image item.

  The problem is stripped, then a blank line and the instruction are appended. Returns
  (messages, number of `<image>` placeholders).
  """
  text = problem.strip()
  if instruction:
    text = text + "\n\n" + instruction
  content = []
  pieces = text.split(IMAGE_PLACEHOLDER)
  for i, piece in enumerate(pieces):
    if i > 0:
      content.append({"type": "image"})
    if piece:
      content.append({"type": "text", "text": piece})
  return [{"role": "user", "content": content}], len(pieces) - 1


def _read_chat_template(ckpt_dir, tokenizer):
  """The checkpoint's chat template: chat_template.jinja > chat_template.json > tokenizer."""
  jinja = os.path.join(ckpt_dir, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja) as f:
      return f.read()
  js = os.path.join(ckpt_dir, "chat_template.json")
  if os.path.exists(js):
    with open(js) as f:
      return json.load(f)["chat_template"]
  if getattr(tokenizer, "chat_template", None):
    return tokenizer.chat_template
  raise ValueError(f"{ckpt_dir}: no chat template (chat_template.jinja/.json or tokenizer_config)")


class Processor:
  """Text + images → model inputs with exactly the HF processor's layout.

  Attributes: `image` (ImageConfig), `tokenizer` (transformers tokenizer),
  `chat_template` (str) and the token ids image_token_id, video_token_id,
  vision_start_token_id, vision_end_token_id, pad_token_id, eos_token_id.
  """

  def __init__(self, tokenizer, image_config, chat_template, instruction=REASONING_INSTRUCTION):
    self.tokenizer = tokenizer
    self.image = image_config
    self.chat_template = chat_template
    self.instruction = instruction
    tid = tokenizer.convert_tokens_to_ids
    self.image_token_id = tid(IMAGE_PAD)
    self.video_token_id = tid("<|video_pad|>")
    self.vision_start_token_id = tid("<|vision_start|>")
    self.vision_end_token_id = tid("<|vision_end|>")
    self.pad_token_id = tid("<|endoftext|>")
    self.eos_token_id = tid("<|im_end|>")
    self._text_cache = {}
    # HF fast tokenizers can fail with 'Already borrowed' when called from several
    # threads at once (grain workers); the calls are short, so serialise them.
    self._lock = threading.Lock()

  @classmethod
  def from_pretrained(cls, ckpt_dir, min_pixels=None, max_pixels=None,
                      instruction=REASONING_INSTRUCTION):
    """Reads preprocessor_config.json, the tokenizer files and the chat template."""
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    with open(os.path.join(ckpt_dir, "preprocessor_config.json")) as f:
      image_config = ImageConfig.from_dict(json.load(f), min_pixels, max_pixels)
    tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    return cls(tokenizer, image_config, _read_chat_template(ckpt_dir, tokenizer), instruction)

  @functools.cached_property
  def thinking(self):
    """True when the chat template's generation prompt opens a `<think>` block (Qwen3-VL
    "Thinking" models): responses then start inside it, and the format reward must not
    ask for the opening tag (papo.md section 5)."""
    with self._lock:
      text = self.tokenizer.apply_chat_template(
          [{"role": "user", "content": [{"type": "text", "text": "x"}]}], chat_template=self.chat_template,
          tokenize=False, add_generation_prompt=True)
    return text.rstrip().endswith("<think>")

  # -- text -----------------------------------------------------------------------------

  def prompt_text(self, problem):
    """(chat-template string with one `<|image_pad|>` per image, number of images)."""
    messages, n = build_messages(problem, self.instruction)
    with self._lock:
      text = self.tokenizer.apply_chat_template(
          messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True)
    return text, n

  def _encode_segments(self, text):
    """Token ids of each text segment between `<|image_pad|>`s (cached by string)."""
    segs = self._text_cache.get(text)
    if segs is None:
      with self._lock:
        segs = [self.tokenizer.encode(s, add_special_tokens=False) if s else []
                for s in text.split(IMAGE_PAD)]
      if len(self._text_cache) < 4096:
        self._text_cache[text] = segs
    return segs

  @property
  def nominal_max_patches(self):
    """max_pixels // patch²: the patch bound of an image inside the pixel range (see max_patches_for)."""
    return self.image.max_pixels // self.image.patch_size ** 2

  def num_patches(self, height, width):
    """Patches (rows of pixel_values) of an image of (height, width) after resizing."""
    rh, rw = resized_size(height, width, self.image)
    return (rh // self.image.patch_size) * (rw // self.image.patch_size)

  @functools.cached_property
  def _special_tokens(self):
    """The tokenizer's added tokens (control tokens and the like) other than text words."""
    vocab = self.tokenizer.get_added_vocab() if hasattr(self.tokenizer, "get_added_vocab") else {}
    toks = set(vocab) | set(getattr(self.tokenizer, "all_special_tokens", ()))
    return tuple(sorted(t for t in toks if t.startswith("<") and t.endswith(">") and len(t) > 2))

  def special_tokens_in(self, text):
    """The tokenizer's special/added tokens that occur literally in `text` (sorted)."""
    return [t for t in self._special_tokens if t in text]

  def tokens_per_image(self, grid_thw):
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (self.image.merge_size ** 2)

  def expand_ids(self, text, image_grid_thw):
    """input_ids [L] int32 of `text` with the k-th `<|image_pad|>` expanded to t·h·w/m²."""
    segs = self._encode_segments(text)
    if len(segs) - 1 != len(image_grid_thw):
      raise ValueError(f"{len(segs) - 1} image pads in the prompt but {len(image_grid_thw)} images")
    ids = list(segs[0])
    for grid, seg in zip(image_grid_thw, segs[1:]):
      ids += [self.image_token_id] * self.tokens_per_image(grid)
      ids += seg
    return np.asarray(ids, np.int32)

  def prompt_length(self, problem, image_sizes):
    """Token count of the prompt for images of (H, W) sizes, without decoding pixels."""
    text, _ = self.prompt_text(problem)
    segs = self._encode_segments(text)
    n = sum(len(s) for s in segs)
    for h, w in image_sizes:
      rh, rw = resized_size(h, w, self.image)
      n += (rh // self.image.patch_size) * (rw // self.image.patch_size) // self.image.merge_size ** 2
    return n

  # -- everything -----------------------------------------------------------------------

  def __call__(self, problem, images):
    """One prompt → dict(input_ids [L] int32, attention_mask [L] int32,
    pixel_values [ΣN, D] float32, image_grid_thw [I, 3] int64).

    `problem` has one `<image>` placeholder per entry of `images` (uint8 [H, W, 3]).
    """
    text, n = self.prompt_text(problem)
    if n != len(images):
      raise ValueError(f"{n} <image> placeholders but {len(images)} images")
    pixel_values, grid = images_to_pixel_values(images, self.image)
    ids = self.expand_ids(text, grid)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "pixel_values": pixel_values, "image_grid_thw": grid}
