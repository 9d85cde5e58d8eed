"""Per-token perception diagnostics: row mapping, top tokens, histogram, pixel inversion, files and pages."""

import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from papo_jax import diagnostics as D
from papo_jax import inspect as I
from papo_jax import metrics as M
from papo_jax.config_base import base_config
from papo_jax.data import processor as P
from papo_jax.rl import batching

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = P.ImageConfig()                       # Qwen2.5-VL: patch 14, merge 2, CLIP mean/std
CFG3 = P.ImageConfig(patch_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)   # Qwen3-VL


def _decode(ids):
  """Token id i is the letter chr(97 + i % 26); 0 is the end token."""
  return "".join("<end>" if i == 0 else chr(97 + int(i) % 26) for i in ids)


def _image(h, w, seed, tint=(0.2, 0.3, 1.0)):
  """A smooth blue-ish uint8 image with some noise (no red, so red pixels in a screenshot are tokens)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  base = 90 + 80 * np.sin(x / 7.0 + seed) * np.cos(y / 9.0)
  img = np.stack([base * t for t in tint], -1) + rng.integers(0, 20, (h, w, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


def _groups(n=3, prompts=4, t=6, seed=0, images=True):
  """Groups with distinct responses (id = 1 + 10·group + response, then running letters) and ragged masks."""
  rng = np.random.default_rng(seed)
  out = []
  for g in range(prompts):
    resp = (np.arange(t)[None] + 1 + 10 * g + np.arange(n)[:, None] * 3) % 25 + 1
    lengths = rng.integers(2, t + 1, n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    pv = mpv = None
    grid = np.zeros((0, 3), np.int64)
    if images:
      img = _image(56, 84, seed=g)
      masked = img.copy()
      masked[:28, :28] = 0
      pv, (gt, gh, gw) = P.image_to_patches(img, CFG, resized=True)
      mpv, _ = P.image_to_patches(masked, CFG, resized=True)
      grid = np.asarray([[gt, gh, gw]])
    out.append(batching.Group(prompt_ids=np.arange(5 + g % 2) + 100, prompt_mask=np.ones(5 + g % 2, np.int32),
                              pixel_values=pv, masked_pixel_values=mpv, image_grid_thw=grid,
                              responses=resp, response_mask=mask, advantages=np.zeros(n, np.float32)))
  return out


def _samples(groups):
  """(prompt, answer, response) rows as train.collect_groups makes them: prompt-major, n per group."""
  from papo_jax.rollouts import repeat_answers
  n = groups[0].responses.shape[0]
  texts = [_decode(g.responses[k][g.response_mask[k] > 0]) for g in groups for k in range(n)]
  answers = repeat_answers([f"answer{i}" for i in range(len(groups))], n)
  return list(zip(repeat_answers([f"prompt{i}" for i in range(len(groups))], n), answers, texts))


# ============================================================================================
# Row mapping
# ============================================================================================


def test_batch_rows_map_back_to_their_groups_and_samples():
  """Batch row r (micro-batches flattened) is group r // n, response r % n, and sample row r."""
  from papo_jax.parallel import DEFAULT_RULES
  from papo_jax.rl.train_step import TrainBatch
  from papo_jax.rl.vppo import token_dependency
  groups, n, t = _groups(), 3, 6
  arrays = batching.assemble_train_batch(groups, micro_batches=2, pad_id=0, shards=2)
  assert arrays["input_ids"].shape[:2] == (2, 6)
  # a row's log-probs encode its identity: old = -(row + 1) / 100, masked = old - (t + 1) / 50
  rows = np.arange(12).reshape(2, 6, 1) + np.zeros((1, 1, t))
  tok = np.arange(t)[None, None] + np.zeros((2, 6, 1))
  old = -(rows + 1) / 100
  masked = old - (tok + 1) / 50 - rows / 1000
  batch = TrainBatch(**arrays).replace(old_logp=old.astype(np.float32), mask_logp=masked.astype(np.float32))
  run = types.SimpleNamespace(mesh=None, rules=DEFAULT_RULES, graphdef=None, c=None,
                              tokenizer=types.SimpleNamespace(decode=lambda ids, skip_special_tokens: _decode(ids)),
                              it=types.SimpleNamespace(processor=types.SimpleNamespace(image=CFG)))
  perception = D.step_perception(run, None, batch, groups, wanted=True)   # the log-prob pass's values
  assert D.step_perception(run, None, batch, groups, wanted=False) is None
  assert D.step_perception(run, None, batch.replace(masked_pixel_values=None), groups, wanted=True) is None  # GRPO
  want = np.asarray(token_dependency(old, masked)).reshape(12, t)
  np.testing.assert_allclose(perception.dependency_RxT, want, rtol=1e-6)
  rewards = {"overall": np.arange(12) / 12.0}
  rows_out = D.annotate_samples(M.pick_samples(_samples(groups), rewards, 12), perception, step=7)
  flat_ids = D.flat_rows(arrays["input_ids"])[:, -t:]
  for r, row in enumerate(rows_out):
    g, k = divmod(r, n)
    assert D.row_source(r, n) == (g, k) and row["group"] == g and row["answer"] == f"answer{g}"
    keep = groups[g].response_mask[k] > 0
    np.testing.assert_array_equal(flat_ids[r][keep], groups[g].responses[k][keep])   # the batch's row r
    assert "".join(row["tokens"]) == row["response"] == _decode(groups[g].responses[k][keep])
    np.testing.assert_allclose(row["dependency"], want[r][keep], rtol=1e-5)
    assert row["reward/overall"] == pytest.approx(r / 12.0)
    assert row["images"] == [{"image": f"samples/step_7/group{g}_image0.png",
                              "masked": f"samples/step_7/group{g}_image0_masked.png"}]


def test_dependency_of_a_model_matches_full_logits():
  """A tiny model, two micro-batches: the sample-step pass gives each row the k3 dependency that
  full-vocabulary log-probs of that row alone, on its own image and its masked copy, give."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  import hf_utils as H
  from rollouts import T, make_groups
  from papo_jax import models
  from papo_jax.parallel import DEFAULT_RULES
  from papo_jax.rl.train_step import TrainBatch
  model = models.init_model(models.from_hf_dict(H.tiny_hf_config().to_dict(), dtype="float32").replace(
      hf_dict=None), seed=0)
  graphdef, params = nnx.split(model)
  groups = make_groups(model, [[3, "img", 2], [4, "img", 1], [2, "img", 3]], [(1, 4, 4)] * 3, n=2, seed=1)
  c = base_config()
  c.papo.gamma, c.algo.beta, c.optim.logprob_chunk = 0.02, 0.01, 4
  run = types.SimpleNamespace(mesh=None, rules=DEFAULT_RULES, graphdef=graphdef, c=c, it=types.SimpleNamespace(),
                              tokenizer=types.SimpleNamespace(decode=lambda ids, skip_special_tokens: _decode(ids)))
  two = TrainBatch(**{k: jnp.asarray(v) for k, v in batching.assemble_train_batch(
      groups, micro_batches=2, pad_id=H.PAD_ID, patch_multiple=16, image_multiple=2).items()})
  one = D.step_perception(run, params, two, groups, wanted=True)
  ids_R = D.flat_rows(np.asarray(two.input_ids))
  am_R = D.flat_rows(np.asarray(two.attention_mask))
  forward = jax.jit(lambda ids, am, pv, grid: nnx.merge(graphdef, params)(ids, attention_mask=am, pixel_values=pv,
                                                                          image_grid_thw=grid))
  for r in range(6):
    g, k = D.row_source(r, 2)
    lp = {}
    for name, pv in (("image", groups[g].pixel_values), ("masked", groups[g].masked_pixel_values)):
      logits = np.asarray(forward(ids_R[r:r + 1], am_R[r:r + 1], pv, groups[g].image_grid_thw), np.float64)[0]
      logits = logits[-T - 1:-1]
      logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
      lp[name] = logits[np.arange(T), ids_R[r, -T:]] - logz
    x = np.clip(lp["masked"] - lp["image"], -20, 20)
    want = np.clip(np.exp(x) - x - 1, 0, 10)
    keep = groups[g].response_mask[k] > 0
    np.testing.assert_allclose(one.dependency_RxT[r][keep], want[keep], atol=2e-5, rtol=1e-3)
  assert one.dependency_RxT[np.concatenate([g.response_mask for g in groups]) > 0].max() > 1e-4   # pixels matter


def test_flat_rows_is_micro_batch_major():
  x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
  np.testing.assert_array_equal(D.flat_rows(x)[4], x[1, 1])


# ============================================================================================
# Tokens, top tokens, histogram
# ============================================================================================


def test_top_tokens_are_the_highest_positive_ones():
  d = np.array([0.1, 0.5, 0.0, 0.5, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3])
  assert D.top_token_indices(d) == [1, 3]             # ceil(0.1 * 11) = 2; the tie keeps order
  assert D.top_token_indices(np.zeros(5)) == []       # nothing depends on the image: nothing marked
  assert D.top_token_indices(np.array([0.0, 0.2])) == [1]
  long = np.random.default_rng(0).random(500)
  assert D.top_token_indices(long) == list(np.argsort(-long)[:D.TOP_MAX])
  assert D.top_token_indices(np.array([])) == []


def test_token_strings_join_to_the_decoded_text(tmp_path):
  """With the byte-level BPE tokenizer a multi-byte character split over tokens is carried by its last token."""
  from transformers import AutoTokenizer
  from papo_jax.data import tiny_tokenizer
  tiny_tokenizer.build_tiny_checkpoint_files(str(tmp_path))
  tok = AutoTokenizer.from_pretrained(str(tmp_path))
  text = "<think>the red é shape → ü</think>\\boxed{red}<|im_end|>"
  ids = tok.encode(text, add_special_tokens=False)
  decode = lambda x: tok.decode(x, skip_special_tokens=False)
  pieces = D.token_strings(decode, ids)
  assert len(pieces) == len(ids) and "".join(pieces) == decode(ids) == text
  assert "\ufffd" not in "".join(pieces) and "" in pieces      # some characters span several tokens
  assert pieces[-1] == "<|im_end|>"
  # a lone continuation byte (no character to complete) keeps its U+FFFD; the next token its own text
  lead, cont = tok.encode("é", add_special_tokens=False)    # two byte tokens in this vocabulary
  red = tok.encode(" red", add_special_tokens=False)
  pieces = D.token_strings(decode, [cont] + red + [lead, cont])
  assert pieces == ["\ufffd", *[decode([t]) for t in red], "", "é"], pieces


def test_dependency_histogram_against_a_loop():
  rng = np.random.default_rng(1)
  dep = np.concatenate([np.zeros(40), 10 ** rng.uniform(-5, 1, 200), [10.0, 3.0, 1e-4]])
  dep = rng.permutation(np.pad(dep, (0, 257 - dep.size)))
  dep_RxT = dep[:256].reshape(16, 16)
  mask = rng.random((16, 16)) < 0.7
  got = D.dependency_hist(dep_RxT, mask)
  kept = [float(v) for v, m in zip(dep_RxT.ravel(), mask.ravel()) if m]
  edges = D.HIST_EDGES
  want = [0] * (len(edges) - 1)
  for v in kept:   # [lo, hi) bins, the last one closed
    i = next(i for i in range(len(edges) - 1) if v < edges[i + 1] or i == len(edges) - 2)
    want[i] += 1
  assert got["counts"] == want and got["tokens"] == len(kept) == sum(want)
  assert got["edges"] == list(edges)
  assert got["mean"] == pytest.approx(np.mean(kept)) and got["max"] == pytest.approx(max(kept))
  assert got["p50"] == pytest.approx(np.median(kept))
  assert D.dependency_hist(dep_RxT, np.zeros_like(mask)) == {"edges": list(edges),
                                                               "counts": [0] * (len(edges) - 1), "tokens": 0}


def test_markdown_marks_the_top_tokens_bold():
  s = {"answer": "red", "reward/overall": 1.0, "response": " the red*", "tokens": [" the", " red", "*"],
       "dependency": [0.0, 0.9, 0.1], "dependency_mean": 0.33, "top_tokens": [{"index": 1, "token": " red"}]}
  md = M.samples_markdown([s])
  assert "the **red**\\*" in md and "0.33" in md
  assert M.marked_response([" a|b", "\n"], [0]) == " **a\\|b** "


# ============================================================================================
# Pixel inversion
# ============================================================================================


@pytest.mark.parametrize("cfg", [CFG, CFG3], ids=["qwen2_5", "qwen3"])
def test_patches_invert_to_the_image(cfg):
  f = cfg.factor
  img = np.random.default_rng(0).integers(0, 256, (2 * f, 3 * f, 3), dtype=np.uint8)
  pv, grid = P.image_to_patches(img, cfg, resized=True)
  np.testing.assert_array_equal(D.patches_to_image(pv, grid, cfg), img)
  # the processor's reference path (normalise, then patchify) inverts the same way
  pv2, _ = P.patchify(P.normalize_image(img, cfg), cfg)
  np.testing.assert_array_equal(D.patches_to_image(pv2, grid, cfg), img)
  # the train batch's bfloat16 pixels come back within a few levels
  import ml_dtypes
  approx = D.patches_to_image(pv.astype(ml_dtypes.bfloat16), grid, cfg).astype(int)
  assert np.abs(approx - img).max() <= 3
  with pytest.raises(ValueError, match="do not match grid"):
    D.patches_to_image(pv[:-1], grid, cfg)


def test_processor_output_inverts_to_the_resized_image(tmp_path):
  """The full processor (resize + normalise + patchify) on a non-multiple size: inverse = its resized image."""
  from papo_jax.data import tiny_tokenizer
  tiny_tokenizer.build_tiny_checkpoint_files(str(tmp_path), max_pixels=112 * 112)
  proc = P.Processor.from_pretrained(str(tmp_path))
  img = _image(70, 100, seed=3)
  out = proc("<image>What colour?", [img])
  back = D.patches_to_image(out["pixel_values"], out["image_grid_thw"][0], proc.image)
  np.testing.assert_array_equal(back, P.resize_image(img, proc.image))


# ============================================================================================
# Files and pages
# ============================================================================================


def _perception(groups, seed=0):
  rng = np.random.default_rng(seed)
  r, t = sum(g.responses.shape[0] for g in groups), groups[0].responses.shape[1]
  dep = (rng.random((r, t)) ** 4 * 0.5).astype(np.float32)
  dep[0, 1] = 2.0                    # one clearly image-dependent token
  return D.Perception(dependency_RxT=dep, groups=groups, decode=_decode, image=CFG)


def _write_run(workdir, steps=(5, 10), tensorboard=False, groups=None):
  c = base_config()
  c.log.tensorboard = tensorboard
  c.log.samples_every, c.log.samples_per_step = 5, 4
  groups = groups or _groups()
  rewards = {"overall": np.linspace(0, 1, 12), "accuracy": np.ones(12), "format": np.ones(12)}
  w = M.MetricWriter(workdir, c, 0)
  for s in steps:
    M.log_step(w, c, s, {"reward/overall": 0.5}, _samples(groups), rewards, perception=_perception(groups, s))
  w.close()
  return groups


def test_writer_logs_dependency_images_and_histogram(tmp_path):
  pytest.importorskip("tensorboardX")
  wd = str(tmp_path)
  groups = _write_run(wd, tensorboard=True)
  rows = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
  assert [r["step"] for r in rows] == [5] * 4 + [10] * 4
  dep10 = _perception(groups, 10).dependency_RxT
  for i, row in enumerate(rows[4:]):
    g, k = divmod(i, 3)
    keep = groups[g].response_mask[k] > 0
    assert len(row["tokens"]) == len(row["dependency"]) == keep.sum()
    np.testing.assert_allclose(row["dependency"], dep10[i][keep], rtol=1e-5)
    assert [t["index"] for t in row["top_tokens"]] == D.top_token_indices(dep10[i][keep])
  assert rows[4]["top_tokens"][0] == {"index": 1, "token": rows[4]["tokens"][1], "dependency": 2.0}
  from PIL import Image
  for g in (0, 1):   # samples 0..3 are groups 0 and 1: their images, once each
    img = np.asarray(Image.open(tmp_path / "samples" / "step_10" / f"group{g}_image0.png"))
    np.testing.assert_array_equal(img, _image(56, 84, seed=g))
    masked = np.asarray(Image.open(tmp_path / "samples" / "step_10" / f"group{g}_image0_masked.png"))
    assert (masked[:28, :28] == 0).all() and (masked[28:] == img[28:]).all()
  assert not (tmp_path / "samples" / "step_10" / "group2_image0.png").exists()
  hist = json.load(open(tmp_path / "samples" / "step_10" / "dependency.json"))
  assert hist["step"] == 10 and hist["tokens"] == sum(int(g.response_mask.sum()) for g in groups)
  assert sum(hist["counts"]) == hist["tokens"] and hist["max"] == pytest.approx(2.0)
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tb"))


def test_inspect_renders_a_step(tmp_path):
  wd = str(tmp_path / "run")
  _write_run(wd)
  index = I.render(wd)                       # the last logged step
  assert index == os.path.join(wd, "inspect", "step_10", "index.html")
  page = open(index).read()
  assert "<svg" in page and "<rect" in page and "sample_3.html" in page and "logged steps: 5, 10" in page
  assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
  sample = open(os.path.join(os.path.dirname(index), "sample_0.html")).read()
  assert sample.count("data:image/png;base64,") == 2          # image and masked copy, embedded
  assert 'class="tok top"' in sample and "rgb(215,48,39)" in sample   # the top token at the scale's colour
  assert "answer0" in sample and "reward/overall" in sample and "visual dependency" in sample
  other = I.render(wd, step=5, out=str(tmp_path / "pages"))
  assert other == str(tmp_path / "pages" / "index.html")
  with pytest.raises(ValueError, match="logged steps: \\[5, 10\\]"):
    I.render(wd, step=7)


def test_inspect_without_dependency_still_renders(tmp_path):
  """A plain GRPO run logs rows without tokens: the pages show the response and say why."""
  c = base_config()
  c.log.tensorboard = False
  w = M.MetricWriter(str(tmp_path), c, 0)
  w.write_samples(3, [{"prompt": "p", "answer": "1", "response": "r<x>", "reward/overall": 1.0}])
  w.close()
  index = I.render(str(tmp_path))
  assert "no dependency histogram" in open(index).read()
  assert "r&lt;x&gt;" in open(os.path.join(os.path.dirname(index), "sample_0.html")).read()


def test_url_workdir_files_and_pages(tmp_path, monkeypatch):
  import uuid
  import fsspec
  from papo_jax import workdir as W
  monkeypatch.setenv("PAPO_JAX_CACHE", str(tmp_path / "cache"))
  url = f"memory://diag-{uuid.uuid4().hex[:8]}/run"
  try:
    _write_run(url, steps=(5,))
    assert W.exists(W.join(url, "samples/step_5/group0_image0_masked.png"))
    assert json.loads(W.read_text(W.join(url, "samples/step_5/dependency.json")))["step"] == 5
    index = I.render(url)
    assert index.startswith(str(tmp_path / "cache")) and os.path.exists(index)
    assert "data:image/png;base64," in open(os.path.join(os.path.dirname(index), "sample_1.html")).read()
  finally:
    fsspec.filesystem("memory").rm(url.split("://")[1], recursive=True)


def test_inspect_command_prints_the_index(tmp_path):
  wd = str(tmp_path / "run")
  _write_run(wd, steps=(5,))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run([sys.executable, "-m", "papo_jax.inspect", f"--workdir={wd}"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == os.path.join(wd, "inspect", "step_5", "index.html")
  r = subprocess.run([sys.executable, "-m", "papo_jax.inspect", f"--workdir={tmp_path / 'empty'}"], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "no samples logged" in r.stderr


def chromium():
  return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(url: str, out: str, size=(1000, 1400)) -> np.ndarray:
  """RGB pixels of headless Chromium's screenshot of ``url``."""
  from PIL import Image
  cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         f"--user-data-dir={os.path.dirname(out)}/profile", f"--screenshot={out}",
         f"--window-size={size[0]},{size[1]}", url]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
  assert os.path.exists(out), r.stderr[-2000:]
  return np.asarray(Image.open(out).convert("RGB")).astype(np.int32)


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_sample_page_in_a_browser(tmp_path):
  """A real browser draws the pages: not blank, the images shown, the image-dependent tokens in the top colour."""
  wd = str(tmp_path / "run")
  groups = _groups(t=40)
  groups[0].response_mask[0] = 1                               # sample 0: 40 tokens ...
  perception = _perception(groups)
  perception.dependency_RxT[0] = 1.0
  perception.dependency_RxT[0, ::4] = 2.0                       # ... 10 of them at the step's largest value
  c = base_config()
  c.log.tensorboard = False
  w = M.MetricWriter(wd, c, 0)
  w.write_samples(5, M.pick_samples(_samples(groups), {"overall": np.zeros(12)}, 4), perception)
  w.close()
  index = I.render(wd)
  px = screenshot("file://" + os.path.join(os.path.dirname(index), "sample_0.html"), str(tmp_path / "shot.png"))
  assert px.shape[:2] == (1400, 1000) and px.std() > 20, px.std()
  near = lambda rgb, tol: (np.abs(px - np.asarray(rgb)).sum(-1) <= tol).sum()
  # ten token backgrounds (~9 x 20 px each); the legend's end alone gives < 200
  assert near(I.COLOUR_HI, 12) > 1000, near(I.COLOUR_HI, 12)
  assert near(I.colour(1.0, 2.0), 6) > 3000                    # the other 30 tokens, half as dependent
  blue = ((px[..., 2] - px[..., 0]) > 60).sum()                # the (blue) image and its masked copy
  assert blue > 20000, blue
  px = screenshot("file://" + index, str(tmp_path / "index.png"))
  assert px.std() > 20 and near(I.COLOUR_BAR, 6) > 2000         # the histogram's bars
