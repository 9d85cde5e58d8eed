"""A procedurally drawn vision task whose answers need the image.

Coloured shapes (circle, square, triangle in red/green/blue/yellow) on a plain or noisy
background, with questions of five `kind`s:

  count_color    "How many red shapes are there in the image?"   → "2"
  count_shape    "How many circles are there in the image?"      → "3"
  largest_color  "What colour is the largest shape?"             → "blue"
  shape_color    "What shape is the green object?"               → "triangle"
  left_right     "Is the circle left or right of the square?"    → "left"
  color          "What colour is the shape?"                     → "green"

`color` (not among the default `KINDS`) is the demo task of configs/tiny.py: one large
shape whose colour is the answer, on a pale tint of that colour (so every patch, not only
the shape's, carries the answer: a random tiny vision tower then separates the colours
strongly at the answer position). The question text is the same for every record, so a
model that ignores the image stays at chance (1 in 4); read the image and it is easy.

Answers are canonical lowercase strings (a word or a small integer). `difficulty`
(0, 1, 2, ...) raises the number of shapes, shrinks the size gaps and adds background
noise. Record i is a pure function of (seed, i), in ViRL39K's record format:
{problem: "<image>...", answer, images: [{bytes: PNG, path}], kind}.
"""

import io

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
KINDS = ("count_color", "count_shape", "largest_color", "shape_color", "left_right")
ALL_KINDS = KINDS + ("color",)
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


def _draw(draw, shape, color, cx, cy, size):
  r = size / 2
  box = [cx - r, cy - r, cx + r - 1, cy + r - 1]
  if shape == "circle":
    draw.ellipse(box, fill=color)
  elif shape == "square":
    draw.rectangle(box, fill=color)
  else:
    draw.polygon([(cx, cy - r), (cx - r, cy + r - 1), (cx + r - 1, cy + r - 1)], fill=color)


def _place(rng, sizes, image_size, tries=200):
  """Non-overlapping centres for squares of the given sizes (None if it fails)."""
  placed = []
  for s in sizes:
    for _ in range(tries):
      cx = rng.uniform(s / 2 + 1, image_size - s / 2 - 1)
      cy = rng.uniform(s / 2 + 1, image_size - s / 2 - 1)
      if all(abs(cx - x) >= (s + t) / 2 + 2 or abs(cy - y) >= (s + t) / 2 + 2
             for x, y, t in placed):
        placed.append((cx, cy, s))
        break
    else:
      return None
  return placed


def _objects(rng, kind, difficulty, image_size):
  """list of (shape, colour, size) satisfying the kind's uniqueness constraints."""
  lo, hi = 1 + difficulty, 2 + 2 * difficulty
  n = int(rng.integers(lo, hi + 1))
  smin, smax = max(6, image_size // 8), max(10, image_size // 3)
  if kind == "color":  # one shape, 55-85% of the image wide: it covers most patches, cheap to draw
    size = int(rng.integers(max(6, (11 * image_size) // 20), max(7, (17 * image_size) // 20) + 1))
    return [(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), size)]
  if kind == "left_right":
    objs = [("circle", rng.choice(list(COLORS)), None), ("square", rng.choice(list(COLORS)), None)]
    objs += [("triangle", rng.choice(list(COLORS)), None) for _ in range(max(0, n - 2))]
  elif kind == "shape_color":
    colors = list(rng.permutation(list(COLORS)))
    target = colors[0]
    objs = [(rng.choice(SHAPES), target, None)]
    objs += [(rng.choice(SHAPES), rng.choice(colors[1:]), None) for _ in range(n - 1)]
  else:
    objs = [(rng.choice(SHAPES), rng.choice(list(COLORS)), None) for _ in range(n)]
  gap = max(2, 6 - 2 * difficulty)
  sizes = rng.choice(np.arange(smin, smax + 1), size=len(objs), replace=len(objs) > smax - smin + 1)
  if kind == "largest_color":  # a unique largest shape
    sizes = np.sort(sizes)[::-1].copy()
    if len(sizes) > 1:
      sizes[0] = max(sizes[0], sizes[1] + gap)
      sizes[0] = min(sizes[0], image_size - 4)
      sizes[1:] = np.minimum(sizes[1:], sizes[0] - gap)
      sizes = np.maximum(sizes, 3)
  return [(str(s), str(c), int(z)) for (s, c, _), z in zip(objs, sizes)]


def _question(rng, kind, objs, placed):
  """(question text, canonical answer)."""
  if kind == "count_color":
    color = rng.choice(list(COLORS))
    return (f"How many {color} shapes are there in the image?",
            str(sum(c == color for _, c, _ in objs)))
  if kind == "count_shape":
    shape = rng.choice(SHAPES)
    return (f"How many {_PLURAL[shape]} are there in the image?",
            str(sum(s == shape for s, _, _ in objs)))
  if kind == "largest_color":
    return "What colour is the largest shape?", objs[int(np.argmax([z for *_, z in objs]))][1]
  if kind == "color":
    return "What colour is the shape?", objs[0][1]
  if kind == "shape_color":
    return f"What shape is the {objs[0][1]} object?", objs[0][0]
  xs = {s: x for (s, _, _), (x, _, _) in zip(objs, placed) if s in ("circle", "square")}
  return ("Is the circle left or right of the square?",
          "left" if xs["circle"] < xs["square"] else "right")


def make_example(index, seed=0, difficulty=1, image_size=56, kinds=KINDS):
  """Record `index` of the task: dict(problem, answer, images=[{bytes, path}], kind)."""
  unknown = set(kinds) - set(ALL_KINDS)
  if not kinds or unknown:
    raise ValueError(f"synthetic kinds {tuple(kinds)!r}: unknown {sorted(unknown)} (known: {ALL_KINDS})")
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E7, int(index)]))
  kind = str(kinds[int(rng.integers(len(kinds)))])
  for _ in range(50):
    objs = _objects(rng, kind, difficulty, image_size)
    placed = _place(rng, [z for *_, z in objs], image_size)
    if placed is not None and (kind != "left_right" or abs(placed[0][0] - placed[1][0]) >= 2):
      break
  else:
    raise RuntimeError(f"synthetic record {index}: cannot place {len(objs)} shapes "
                       f"in {image_size}px at difficulty {difficulty}")
  if difficulty >= 2:
    bg = rng.integers(200, 256, size=(image_size, image_size, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
  elif kind == "color":  # a pale tint of the shape's colour: every patch carries the answer
    img = Image.new("RGB", (image_size, image_size), tuple(int(v) for v in (np.array(COLORS[objs[0][1]]) * 0.8 + 255 * 0.2)))
  else:
    img = Image.new("RGB", (image_size, image_size), (255, 255, 255))
  draw = ImageDraw.Draw(img)
  for (shape, color, size), (cx, cy, _) in zip(objs, placed):
    _draw(draw, shape, COLORS[color], cx, cy, size)
  question, answer = _question(rng, kind, objs, placed)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return {"problem": "<image>" + question, "answer": answer,
          "images": [{"bytes": buf.getvalue(), "path": f"synthetic_{seed}_{index}.png"}],
          "kind": kind}


def make_records(num_records, seed=0, difficulty=1, image_size=56, kinds=KINDS):
  """list of `num_records` records (e.g. to write a parquet for a demo)."""
  return [make_example(i, seed, difficulty, image_size, kinds) for i in range(num_records)]
