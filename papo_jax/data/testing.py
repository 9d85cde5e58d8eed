"""Helpers that write small real data files (tests, the benchmark, demos)."""

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from papo_jax.data import sources as sources_lib


def natural_image(height, width, seed=0):
  """uint8 [H, W, 3] with smooth gradients, shapes and a little noise (compresses like
  a photo, unlike pure noise)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  base = np.stack([x / max(width, 1), y / max(height, 1), (x + y) / max(height + width, 1)], -1)
  img = Image.fromarray((base * 200 + 30).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  for _ in range(8):
    x0, y0 = rng.integers(0, width), rng.integers(0, height)
    s = int(rng.integers(max(2, min(height, width) // 10), max(3, min(height, width) // 3)))
    draw.ellipse([x0, y0, x0 + s, y0 + s], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
  arr = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, (height, width, 3))
  return np.clip(arr, 0, 255).astype(np.uint8)


def encode(image, fmt="PNG", mode=None, **kwargs):
  """uint8 array (or PIL image) → encoded bytes, optionally converted to `mode` first."""
  img = image if isinstance(image, Image.Image) else Image.fromarray(image)
  if mode is not None:
    img = img.convert(mode)
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def write_parquet(path, records, images_as="dicts"):
  """Records (problem, answer, images: [bytes], kind?) → a Hub-layout parquet file.

  images_as: 'dicts' ([{bytes, path}] like the Hub/`datasets`) or 'bytes' ([bytes]).
  """
  rows = {"problem": [], "answer": [], "images": [], "kind": []}
  for r in records:
    rows["problem"].append(r.get("problem"))
    rows["answer"].append(r.get("answer"))
    imgs = [im["bytes"] if isinstance(im, dict) else im for im in r.get("images", [])]
    if images_as == "dicts":
      rows["images"].append([{"bytes": b, "path": f"img_{i}.png"} for i, b in enumerate(imgs)])
    else:
      rows["images"].append(imgs)
    rows["kind"].append(r.get("kind", ""))
  pq.write_table(pa.table(rows), path)
  return path


def write_jsonl(path, records):
  """Records whose images are bytes → a .jsonl file + image files beside it (relative
  paths). A record's `images` entry that is a str is written as a path unchanged."""
  base = os.path.dirname(os.path.abspath(path))
  os.makedirs(os.path.join(base, "images"), exist_ok=True)
  with open(path, "w") as f:
    for i, r in enumerate(records):
      row = {k: v for k, v in r.items() if k != "images"}
      paths = []
      for k, im in enumerate(r.get("images", [])):
        if isinstance(im, str):
          paths.append(im)
          continue
        data = im["bytes"] if isinstance(im, dict) else im
        rel = os.path.join("images", f"{i}_{k}.bin")
        with open(os.path.join(base, rel), "wb") as g:
          g.write(data)
        paths.append(rel)
      if "images" in r:
        row["images"] = paths
      f.write(json.dumps(row) + "\n")
  return path


class ListSource:
  """In-memory records (raw rows) with the source interface."""

  def __init__(self, rows, name="list", fields=sources_lib.Fields()):
    self.rows, self.name, self.fields = list(rows), name, fields

  def __len__(self):
    return len(self.rows)

  def record(self, i):
    return sources_lib.normalize_record(self.rows[i], self.fields, i, self.name)
