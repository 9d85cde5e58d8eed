"""Processor parity with transformers (PIL backend) on the tiny checkpoint directory."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from papo_jax.data import processor as proc_lib
from papo_jax.data import synthetic
from papo_jax.data import testing
from papo_jax.data import tiny_tokenizer

transformers = pytest.importorskip("transformers")

MAX_PIXELS = 28 * 28 * 64  # small, so ordinary test images hit the max-pixel branch


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tiny_ckpt"))
  tiny_tokenizer.build_tiny_checkpoint_files(d, max_pixels=MAX_PIXELS)
  return d


def hf_processor(ckpt_dir):
  """transformers' Qwen2.5-VL processor with the PIL image backend.

  AutoProcessor also builds a video processor, which needs torchvision; without it,
  build the same processor from its parts (and skip the video-class check).
  """
  try:
    return transformers.AutoProcessor.from_pretrained(ckpt_dir, backend="pil")
  except ImportError:
    pass
  from transformers.models.qwen2_5_vl import processing_qwen2_5_vl as hf_mod
  image_processor = transformers.AutoImageProcessor.from_pretrained(ckpt_dir, backend="pil")
  tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt_dir)
  cls = type("Qwen2_5_VLProcessorNoVideo", (hf_mod.Qwen2_5_VLProcessor,),
             {"check_argument_for_proper_class": lambda self, name, arg: None})
  with open(os.path.join(ckpt_dir, "chat_template.json")) as f:
    template = json.load(f)["chat_template"]
  return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
             chat_template=template)


@pytest.fixture(scope="module")
def both(ckpt_dir):
  return proc_lib.Processor.from_pretrained(ckpt_dir), hf_processor(ckpt_dir)


def _compare(ours, hf, problem, images):
  messages, n = proc_lib.build_messages(problem)
  assert n == len(images)
  text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  ref = hf(text=[text], images=[Image.fromarray(im) for im in images] or None,
           return_tensors="np")
  got = ours(problem, images)
  np.testing.assert_array_equal(got["input_ids"], ref["input_ids"][0])
  np.testing.assert_array_equal(got["attention_mask"], ref["attention_mask"][0])
  np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"])
  assert got["pixel_values"].dtype == np.float32
  assert got["pixel_values"].shape == ref["pixel_values"].shape
  assert np.abs(got["pixel_values"] - ref["pixel_values"]).max() <= 1e-6
  return got


@pytest.mark.parametrize("sizes,branch", [
    ([(60, 90)], "round"),
    ([(20, 30)], "min"),          # 560 px < min_pixels 3136
    ([(333, 517)], "max"),        # > max_pixels 50176
    ([(3, 400)], "min"),          # thin but within 200:1
    ([(57, 57), (240, 100)], "two images"),
])
def test_parity_with_transformers(both, sizes, branch):
  ours, hf = both
  images = [testing.natural_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
  problem = " ".join(["<image>"] * len(images)) + " How many red shapes are there?"
  got = _compare(ours, hf, problem, images)
  grids = got["image_grid_thw"]
  for (h, w), g in zip(sizes, grids):
    rh, rw = proc_lib.smart_resize(h, w, 28, 3136, MAX_PIXELS)
    assert tuple(g) == (1, rh // 14, rw // 14), branch
  n_pad = int((got["input_ids"] == ours.image_token_id).sum())
  assert n_pad == sum(int(np.prod(g)) // 4 for g in grids)


def test_parity_placeholders_inside_text(both):
  ours, hf = both
  images = [testing.natural_image(50, 70, 1), testing.natural_image(90, 30, 2)]
  _compare(ours, hf, "Look at <image> and then at <image>. Which is larger?", images)


def test_smart_resize_matches_transformers():
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_sr
  rng = np.random.default_rng(0)
  sizes = [(42, 70), (14, 14), (1, 150), (4000, 3000), (70, 98)]
  sizes += [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(200)]
  for h, w in sizes:
    if max(h, w) / min(h, w) > 200:
      continue
    for lo, hi in ((3136, 12845056), (200704, 1003520)):
      assert proc_lib.smart_resize(h, w, 28, lo, hi) == hf_sr(h, w, 28, lo, hi), (h, w)


def test_aspect_ratio_error():
  with pytest.raises(proc_lib.AspectRatioError, match="200"):
    proc_lib.smart_resize(1, 201)


def test_qwen3_style_preprocessor_config(tmp_path):
  cfg = {"image_processor_type": "Qwen2VLImageProcessorFast", "patch_size": 16,
         "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
         "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 4096, "longest_edge": 65536}}
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
  ours = proc_lib.ImageConfig.from_dict(cfg)
  assert ours.factor == 32 and ours.patch_dim == 1536
  hf = transformers.AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")
  images = [testing.natural_image(h, w, k) for k, (h, w) in enumerate([(100, 150), (400, 300)])]
  ref = hf(images=[Image.fromarray(im) for im in images], return_tensors="np")
  pv, grid = proc_lib.images_to_pixel_values(images, ours)
  np.testing.assert_array_equal(grid, ref["image_grid_thw"])
  assert np.abs(pv - ref["pixel_values"]).max() <= 1e-6


def test_min_max_pixel_overrides(ckpt_dir):
  ours = proc_lib.Processor.from_pretrained(ckpt_dir, min_pixels=200704, max_pixels=1003520)
  assert (ours.image.min_pixels, ours.image.max_pixels) == (200704, 1003520)
  got = ours("<image>hi", [testing.natural_image(40, 40)])
  assert int(np.prod(got["image_grid_thw"][0])) * 14 * 14 >= 200704


def test_tiny_tokenizer(ckpt_dir):
  ids = tiny_tokenizer.build_tiny_checkpoint_files(ckpt_dir + "_again", max_pixels=MAX_PIXELS)
  tok = transformers.AutoTokenizer.from_pretrained(ckpt_dir)
  assert ids["vocab_size"] == len(tok) <= 512
  for name, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                      ("vision_start_token_id", "<|vision_start|>"),
                      ("vision_end_token_id", "<|vision_end|>"),
                      ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>")):
    assert tok.convert_tokens_to_ids(token) == ids[name]
  # Deterministic: a second build writes the same vocabulary.
  with open(os.path.join(ckpt_dir, "tokenizer.json")) as a, \
       open(os.path.join(ckpt_dir + "_again", "tokenizer.json")) as b:
    assert a.read() == b.read()
  # The synthetic task (with the PAPO instruction and system prompt) encodes compactly.
  ours = proc_lib.Processor.from_pretrained(ckpt_dir)
  for rec in synthetic.make_records(20):
    text, _ = ours.prompt_text(rec["problem"])
    assert len(tok.encode(text)) <= 80
    assert tok.decode(tok.encode(rec["problem"])) == rec["problem"]
  text = "Ünïcode ∑ works: <think> x </think> \\boxed{42}"
  assert tok.decode(tok.encode(text)) == text


def test_autoprocessor_loads_dir(ckpt_dir):
  try:
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pytest.skip("transformers' AutoProcessor for Qwen2.5-VL needs torchvision (video processor)")
  p = transformers.AutoProcessor.from_pretrained(ckpt_dir)
  assert p.image_token == "<|image_pad|>"


# -- Qwen3-VL checkpoints -----------------------------------------------------------------------

Q3_MIN, Q3_MAX = 32 * 32 * 4, 32 * 32 * 64   # small, so test images hit every smart_resize branch


@pytest.fixture(scope="module")
def qwen3_dirs(tmp_path_factory):
  dirs = {}
  for name, thinking in (("instruct", False), ("thinking", True)):
    d = str(tmp_path_factory.mktemp(f"tiny_qwen3_{name}"))
    tiny_tokenizer.build_tiny_checkpoint_files(d, family="qwen3_vl", thinking=thinking, min_pixels=Q3_MIN,
                                               max_pixels=Q3_MAX)
    dirs[name] = d
  return dirs


def hf_qwen3_processor(ckpt_dir):
  """transformers' Qwen3-VL processor (PIL image backend), built from its parts when torchvision is missing."""
  try:
    return transformers.AutoProcessor.from_pretrained(ckpt_dir, backend="pil")
  except (ImportError, ValueError):  # no torchvision: no video processor
    pass
  from transformers.models.qwen3_vl import processing_qwen3_vl as hf_mod
  image_processor = transformers.AutoImageProcessor.from_pretrained(ckpt_dir, backend="pil")
  tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt_dir)
  cls = type("Qwen3VLProcessorNoVideo", (hf_mod.Qwen3VLProcessor,),
             {"check_argument_for_proper_class": lambda self, name, arg: None})
  with open(os.path.join(ckpt_dir, "chat_template.json")) as f:
    template = json.load(f)["chat_template"]
  return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=template)


@pytest.mark.parametrize("sizes", [[(60, 90)], [(20, 30)], [(333, 517)], [(57, 57), (240, 100)]])
def test_qwen3_parity_with_transformers(qwen3_dirs, sizes):
  """Factor 32, mean/std 0.5 and the Qwen3-VL template: same ids, grids and pixels as transformers."""
  ours = proc_lib.Processor.from_pretrained(qwen3_dirs["instruct"])
  assert (ours.image.patch_size, ours.image.factor, ours.image.image_mean) == (16, 32, (0.5, 0.5, 0.5))
  images = [testing.natural_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
  problem = " ".join(["<image>"] * len(images)) + " How many red shapes are there?"
  got = _compare(ours, hf_qwen3_processor(qwen3_dirs["instruct"]), problem, images)
  for (h, w), g in zip(sizes, got["image_grid_thw"]):
    rh, rw = proc_lib.smart_resize(h, w, 32, Q3_MIN, Q3_MAX)
    assert tuple(g) == (1, rh // 16, rw // 16)


def test_qwen3_template_has_no_default_system_prompt(qwen3_dirs):
  instruct = proc_lib.Processor.from_pretrained(qwen3_dirs["instruct"])
  thinking = proc_lib.Processor.from_pretrained(qwen3_dirs["thinking"])
  turn = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?\n\n"
          + proc_lib.REASONING_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
  assert instruct.prompt_text("<image>What is shown?") == (turn, 1)
  assert thinking.prompt_text("<image>What is shown?") == (turn + "<think>\n", 1)
  assert not instruct.thinking and thinking.thinking
  qwen25_dir = qwen3_dirs["instruct"] + "_qwen25"
  tiny_tokenizer.build_tiny_checkpoint_files(qwen25_dir)
  qwen25 = proc_lib.Processor.from_pretrained(qwen25_dir)
  assert qwen25.prompt_text("hi")[0].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
  assert not qwen25.thinking


def _brute_max_patches(lo, hi, f, p, h_max, w_max):
  best = 0
  for h in range(1, h_max + 1):
    for w in range(h, min(200 * h, w_max) + 1):
      rh, rw = proc_lib.smart_resize(h, w, f, lo, hi)
      best = max(best, rh * rw)
  return best // (p * p)


@pytest.mark.parametrize("lo,hi,f,p", [(56 * 56, 56 * 56, 28, 14), (64 * 64, 64 * 64, 32, 16),
                                       (28 * 28, 56 * 56, 28, 14)])
def test_max_patches_for_is_the_true_maximum(lo, hi, f, p):
  # Brute force over sizes up to aspect 200 (the maximisers are thin images: h = 1 or ~f/2).
  bound = proc_lib.max_patches_for(lo, hi, f, p)
  assert bound == _brute_max_patches(lo, hi, f, p, 16, 3000)
  assert bound > hi // p ** 2          # the nominal bound is wrong for these ranges


def test_max_patches_for_real_ranges_and_known_cases():
  # Qwen2.5-VL's defaults: thin images cannot beat max_pixels, so the nominal bound holds.
  assert proc_lib.max_patches_for(200704, 1003520, 28, 14) == 1003520 // 196
  assert proc_lib.max_patches_for(3136, 28 * 28 * 1280, 28, 14) == 28 * 28 * 1280 // 196
  h, w = proc_lib.smart_resize(40, 60, 28, 56 * 56, 56 * 56)
  assert (h, w) == (56, 84) and h * w // 196 == 24 <= proc_lib.max_patches_for(3136, 3136, 28, 14)
