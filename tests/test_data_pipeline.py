"""Grain pipeline: resume, buckets, sharding, padding layout; the synthetic task."""

import collections
import json

import numpy as np
import pytest

from papo_jax.data import masking
from papo_jax.data import pipeline
from papo_jax.data import processor as proc_lib
from papo_jax.data import synthetic
from papo_jax.data import testing
from papo_jax.data import tiny_tokenizer


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tiny_ckpt"))
  tiny_tokenizer.build_tiny_checkpoint_files(d, max_pixels=28 * 28 * 64)
  return proc_lib.Processor.from_pretrained(d)


def _varied_source(n=40, seed=0):
  """Records with 1-2 images of varied sizes and varied text lengths."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    k = int(rng.integers(1, 3))
    imgs = [testing.encode(testing.natural_image(int(rng.integers(20, 300)),
                                                 int(rng.integers(20, 300)), i * 3 + j))
            for j in range(k)]
    rows.append({"problem": "<image>" * k + " count" * int(rng.integers(0, 40)),
                 "answer": str(i), "images": imgs, "kind": "k%d" % (i % 3)})
  return testing.ListSource(rows, "varied")


def _cfg(**kw):
  base = dict(batch_size=4, max_prompt_length=512, prompt_length_buckets=(128, 256),
              patch_buckets=(512, 1024, 2048), image_buckets=(4, 8), num_threads=2,
              prefetch_batches=2, seed=3, process_index=0, process_count=1)
  base.update(kw)
  return pipeline.DataConfig(**base)


def _same(a, b):
  for f in ("input_ids", "attention_mask", "pixel_values", "masked_pixel_values",
            "image_grid_thw", "record_ids", "image_counts"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
  assert a.answers == b.answers and a.kinds == b.kinds
  assert a.stats["batch_index"] == b.stats["batch_index"]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_gives_the_same_batches(processor, prefetch):
  src = _varied_source()
  cfg = _cfg(prefetch_batches=prefetch)
  full = pipeline.PromptBatchIterator(cfg, processor, src)
  ref = [next(full) for _ in range(14)]  # 56 records > 40: crosses an epoch boundary
  full.close()
  first = pipeline.PromptBatchIterator(cfg, processor, src)
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  next(first)  # consumed past the saved state: must not matter
  first.close()
  resumed = pipeline.PromptBatchIterator(cfg, processor, src)
  resumed.set_state(state)
  for want in ref[5:]:
    _same(next(resumed), want)
  resumed.close()
  # Epoch 2 is a different order from epoch 1, and each epoch covers every record once.
  ids = np.concatenate([b.record_ids for b in ref])
  assert sorted(ids[:40]) == list(range(40)) and (ids[:16] != ids[40:56]).any()


def test_buckets_produce_only_configured_shapes(processor):
  cfg = _cfg(batch_size=3)
  it = pipeline.PromptBatchIterator(cfg, processor, _varied_source(60, seed=1))
  lens, patches, imgs = set(), set(), set()
  for _ in range(20):
    b = next(it)
    assert b.input_ids.shape[1] in (128, 256, 512) and b.input_ids.dtype == np.int32
    assert b.pixel_values.shape[0] in (512, 1024, 2048) and b.pixel_values.shape[1] == 1176
    assert b.masked_pixel_values.shape == b.pixel_values.shape
    assert b.image_grid_thw.shape[0] in (4, 8) and b.image_grid_thw.dtype == np.int32
    lens.add(b.input_ids.shape[1])
    patches.add(b.pixel_values.shape[0])
    imgs.add(b.image_grid_thw.shape[0])
    _check_layout(b, processor)
  it.close()
  assert len(lens) > 1 and len(patches) > 1 and len(imgs) > 1  # buckets actually exercised


def _check_layout(b, processor):
  """Left padding, zero padding rows, and grids consistent with the image tokens."""
  am = b.attention_mask
  for i in range(b.batch_size):
    n = int(am[i].sum())
    assert (am[i, -n:] == 1).all() and (am[i, :-n] == 0).all()
    assert (b.input_ids[i, :-n] == processor.pad_token_id).all()
  assert (b.pixel_values[b.num_patches:] == 0).all()
  assert (b.image_grid_thw[b.num_images:] == 0).all()
  grid = b.image_grid_thw[:b.num_images]
  assert int(grid.prod(-1).sum()) == b.num_patches
  assert int((b.input_ids == processor.image_token_id).sum()) == int(grid.prod(-1).sum()) // 4
  assert int(b.image_counts.sum()) == b.num_images


def test_masked_differs_only_in_pixels(processor):
  it = pipeline.PromptBatchIterator(_cfg(), processor, _varied_source())
  b = next(it)
  it.close()
  n = b.num_patches
  assert (b.masked_pixel_values[:n] != b.pixel_values[:n]).any()
  assert (b.masked_pixel_values[n:] == 0).all()
  # Mask key: (seed, batch index, record id, image index), so it can be recomputed.
  src = _varied_source()
  rec = src.record(int(b.record_ids[0]))
  from papo_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  imgs = [images_lib.decode_image(x) for x in rec["images"]]
  want = masking.masked_pixel_values(imgs, masking.MaskConfig(), processor.image, seed=3,
                                     step=0, record_id=int(b.record_ids[0]))
  np.testing.assert_array_equal(b.masked_pixel_values[:len(want)], want)


def test_mask_disabled(processor):
  it = pipeline.PromptBatchIterator(_cfg(mask=masking.MaskConfig(enabled=False)), processor,
                                    _varied_source())
  assert next(it).masked_pixel_values is None
  it.close()


def test_sharding_by_process(processor):
  src = _varied_source(24)
  seen = []
  for p in range(2):
    cfg = _cfg(batch_size=4, num_epochs=1, process_index=p, process_count=2,
               prefetch_batches=0)
    it = pipeline.PromptBatchIterator(cfg, processor, src)
    ids = np.concatenate([b.record_ids for b in it])
    assert it.per_host_batch == 2
    seen.append(set(ids.tolist()))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(24))


def test_too_long_dropped_up_front(processor):
  cfg = _cfg(max_prompt_length=90, prompt_length_buckets=(64,))
  it = pipeline.PromptBatchIterator(cfg, processor, _varied_source())
  b = next(it)
  it.close()
  assert b.stats["prefilter/too_long"] > 0
  assert b.stats["prefilter/too_long"] + b.stats["prefilter/kept"] == 40
  assert b.input_ids.shape[1] in (64, 90) and int(b.attention_mask.sum(1).max()) <= 90


def test_pick_bucket():
  assert pipeline.pick_bucket(5, (4, 8)) == (8, False)
  assert pipeline.pick_bucket(8, (4, 8)) == (8, False)
  assert pipeline.pick_bucket(17, (4, 8)) == (24, True)


def test_synthetic_task(processor):
  a = synthetic.make_records(200, seed=0, difficulty=1)
  b = synthetic.make_records(200, seed=0, difficulty=1)
  assert a == b
  assert synthetic.make_records(5, seed=1) != a[:5]
  kinds = collections.Counter(r["kind"] for r in a)
  assert set(kinds) == set(synthetic.KINDS)
  allowed = {"left", "right", *synthetic.COLORS, *synthetic.SHAPES} | {str(i) for i in range(10)}
  for r in a:
    assert r["answer"] in allowed and r["answer"] == r["answer"].lower()
    assert r["problem"].startswith("<image>") and len(r["images"]) == 1
  # Answers depend on the image: the same question text has several answers.
  by_q = collections.defaultdict(set)
  for r in a:
    by_q[r["problem"]].add(r["answer"])
  assert all(len(v) > 1 for q, v in by_q.items() if len([r for r in a if r["problem"] == q]) > 10)
  # Difficulty and size knobs.
  from papo_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  for d in (0, 2):
    for r in synthetic.make_records(20, difficulty=d, image_size=84):
      assert images_lib.decode_image(r["images"][0]["bytes"]).shape == (84, 84, 3)


def test_synthetic_pipeline_end_to_end(processor):
  cfg = _cfg(source="synthetic", synthetic_num_records=64, batch_size=8,
             prompt_length_buckets=(96, 128), patch_buckets=(128,), image_buckets=(8,))
  it = pipeline.make_iterator(cfg, processor)
  b = next(it)
  it.close()
  assert b.input_ids.shape == (8, 96) and b.pixel_values.shape == (128, 1176)
  assert b.image_grid_thw[:8].tolist() == [[1, 4, 4]] * 8


def _with_image(problem, h, w, i=0):
  return {"problem": problem, "answer": "a", "images": [testing.encode(testing.natural_image(h, w, i))],
          "kind": "k"}


def test_oversized_image_and_special_token_skipped_with_record_id(processor, tmp_path, caplog):
  # min = max = 56² (the tiny demo's range): a 40x60 image is scaled UP and rounded to
  # 56x84 = 24 patches > the nominal 16; a literal control token in the text is skipped too.
  from papo_jax.data import tiny_tokenizer as tt  # pylint: disable=g-import-not-at-top
  d = str(tmp_path / "ckpt")
  tt.build_tiny_checkpoint_files(d, min_pixels=56 * 56, max_pixels=56 * 56)
  proc = proc_lib.Processor.from_pretrained(d)
  assert proc.num_patches(40, 60) == 24 and proc.nominal_max_patches == 16
  rows = [_with_image("<image>fine", 56, 56, 0), _with_image("<image>too wide", 40, 60, 1),
          _with_image("<image>a <|image_pad|> in text", 56, 56, 2),
          _with_image("<image>and <|vision_start|> here", 56, 56, 3), _with_image("<image>ok", 70, 70, 4)]
  src = testing.ListSource(rows, "odd")
  with caplog.at_level("WARNING"):
    kept, counts = pipeline.prefilter(src, proc, 512, num_threads=1)
  assert kept.tolist() == [0, 4]
  assert counts == {"too_many_patches": 1, "special_token": 2}
  log = caplog.text
  assert "record 1 of odd" in log and "24 patches > 16" in log
  assert "record 2 of odd" in log and "<|image_pad|>" in log
  assert "record 3 of odd" in log and "<|vision_start|>" in log
  # The true bound for the pixel range keeps the wide image (the model would then pad to it).
  cap = proc_lib.max_patches_for(56 * 56, 56 * 56, 28, 14)
  kept, counts = pipeline.prefilter(src, proc, 512, num_threads=1, max_image_patches=cap)
  assert kept.tolist() == [0, 1, 4] and counts == {"special_token": 2}
  # Through the iterator: the skipped records never reach a batch and are counted.
  cfg = _cfg(batch_size=2, prompt_length_buckets=(256,), patch_buckets=(64,), image_buckets=(2,),
             mask=masking.MaskConfig(enabled=False))
  it = pipeline.PromptBatchIterator(cfg, proc, src)
  b = next(it)
  it.close()
  assert set(b.record_ids.tolist()) <= {0, 4}
  assert b.stats["prefilter/too_many_patches"] == 1 and b.stats["prefilter/special_token"] == 2


def test_environment_error_is_not_a_bad_record(processor, monkeypatch):
  # A missing package (transformers raises ImportError for jinja2) must stop the run with
  # its own message, not drop every record as 'other'.
  def no_jinja(*a, **k):
    raise ImportError("apply_chat_template requires jinja2 to be installed.")
  src = testing.ListSource([_with_image("<image>x", 56, 56, i) for i in range(4)], "env")
  monkeypatch.setattr(processor, "prompt_text", no_jinja)
  for threads in (1, 2):
    with pytest.raises(pipeline.EnvironmentProblem, match=r"record \d of env: ImportError: .*jinja2.*not a malformed"):
      pipeline.prefilter(src, processor, 512, num_threads=threads)
  with pytest.raises(pipeline.EnvironmentProblem, match="jinja2"):
    pipeline.process_record(0, src, processor, 512, False)
  monkeypatch.undo()
  # A record's own fault is still a drop with a reason.
  out = pipeline.process_record(0, testing.ListSource([{"problem": "no image", "answer": "a",
                                                        "images": [testing.encode(testing.natural_image(9, 9))]}],
                                                      "bad"), processor, 512, False)
  assert out["ok"] is False and out["reason"] == "placeholder_mismatch"


def test_synthetic_color_task_needs_the_image(processor):
  recs = synthetic.make_records(400, seed=0, kinds=("color",))
  assert {r["kind"] for r in recs} == {"color"}
  assert len({r["problem"] for r in recs}) == 1          # the text says nothing about the answer
  counts = collections.Counter(r["answer"] for r in recs)
  assert set(counts) == set(synthetic.COLORS)            # 4 classes: chance is 1/4
  assert min(counts.values()) > 60
  from papo_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  for r in recs[:50]:                                    # the answer's colour is what is drawn
    img = images_lib.decode_image(r["images"][0]["bytes"]).reshape(-1, 3).astype(int)
    rgb = np.asarray(synthetic.COLORS[r["answer"]])
    assert (np.abs(img - rgb).sum(1) < 30).mean() > 0.05
    for other, c in synthetic.COLORS.items():
      if other != r["answer"]:
        assert (np.abs(img - np.asarray(c)).sum(1) < 30).mean() == 0
  assert synthetic.make_records(3, seed=1, kinds=("color",)) != recs[:3]
  with pytest.raises(ValueError, match="unknown"):
    synthetic.make_example(0, kinds=("colour",))
  cfg = _cfg(source="synthetic", synthetic_num_records=16, synthetic_kinds=["color"], batch_size=8,
             prompt_length_buckets=(96, 128), patch_buckets=(128,), image_buckets=(8,))
  assert cfg.synthetic_kinds == ("color",)
  it = pipeline.make_iterator(cfg, processor)
  b = next(it)
  it.close()
  assert set(b.kinds) == {"color"} and set(b.answers) <= set(synthetic.COLORS)
