"""Image bytes → uint8 RGB arrays, robust to the modes real data sets contain.

RGB conversion follows qwen-vl-utils' `fetch_image`: images with transparency (RGBA,
LA, palette with a transparent index) are pasted on a white background; CMYK, YCbCr,
palette, 1-bit and grey images go through PIL's `convert("RGB")`; 16/32-bit integer
and float grey images ("I;16", "I", "F") are scaled to 8 bits first. Anything PIL
cannot decode fully (corrupt or truncated bytes) raises `ImageDecodeError`.
"""

import io

import numpy as np
from PIL import Image


class ImageDecodeError(ValueError):
  """The bytes are not a complete image that PIL can read."""


def _high_bit_depth_to_l(img):
  """'I;16*', 'I', 'F' → 'L' by scaling the 16-bit range (or the value range) to 0..255."""
  arr = np.asarray(img)
  if arr.dtype.kind == "f":
    arr = np.nan_to_num(arr.astype(np.float64))
    hi = 1.0 if arr.max(initial=0) <= 1.0 else 255.0 if arr.max(initial=0) <= 255 else 65535.0
  else:
    arr = arr.astype(np.int64)
    hi = 255 if arr.max(initial=0) <= 255 else 65535
  arr = np.clip(np.rint(arr.astype(np.float64) * (255.0 / hi)), 0, 255).astype(np.uint8)
  return Image.fromarray(arr)


def to_rgb(img):
  """PIL image of any common mode → PIL 'RGB' image (alpha pasted on white)."""
  if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
    img = _high_bit_depth_to_l(img)
  if img.mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = img.convert("RGBA")
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, mask=rgba.split()[3])
    return white
  if img.mode != "RGB":
    img = img.convert("RGB")
  return img


def decode_image(data):
  """Encoded image bytes (or a PIL image) → uint8 [H, W, 3] RGB array."""
  try:
    if isinstance(data, Image.Image):
      img = data
    else:
      img = Image.open(io.BytesIO(data))
    img.load()  # decodes fully: truncated files fail here, not later
    arr = np.asarray(to_rgb(img))
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb...)
    raise ImageDecodeError(f"cannot decode image: {type(e).__name__}: {e}") from e
  if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8 or 0 in arr.shape:
    raise ImageDecodeError(f"decoded to an unusable array {arr.shape} {arr.dtype}")
  return arr


def image_size(data):
  """(H, W) from the header only (cheap; used to drop over-long prompts up front)."""
  try:
    if isinstance(data, Image.Image):
      w, h = data.size
    else:
      with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
  except Exception as e:
    raise ImageDecodeError(f"cannot read image header: {type(e).__name__}: {e}") from e
  return h, w


def encode_png(image_HxWx3):
  """uint8 [H, W, 3] → PNG bytes."""
  buf = io.BytesIO()
  Image.fromarray(image_HxWx3).save(buf, format="PNG")
  return buf.getvalue()
