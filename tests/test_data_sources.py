"""Sources on small real files, image decoding, and bad records that must be skipped."""

import json
import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from papo_jax.data import images as images_lib
from papo_jax.data import pipeline
from papo_jax.data import processor as proc_lib
from papo_jax.data import sources
from papo_jax.data import synthetic
from papo_jax.data import testing
from papo_jax.data import tiny_tokenizer


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tiny_ckpt"))
  tiny_tokenizer.build_tiny_checkpoint_files(d, max_pixels=28 * 28 * 64)
  return proc_lib.Processor.from_pretrained(d)


def _records(n, fmt="PNG"):
  return [{"problem": f"<image>How many circles? ({i})", "answer": str(i),
           "images": [testing.encode(testing.natural_image(40 + i, 50, i), fmt)],
           "kind": "count_shape"} for i in range(n)]


@pytest.mark.parametrize("images_as", ["dicts", "bytes"])
def test_parquet_source(tmp_path, images_as):
  recs = _records(3) + _records(2, "JPEG")
  path = testing.write_parquet(str(tmp_path / "train.parquet"), recs, images_as)
  src = sources.parquet_source(path)
  assert len(src) == 5
  for i, r in enumerate(recs):
    got = src.record(i)
    assert got["problem"] == r["problem"] and got["answer"] == r["answer"]
    assert got["images"] == r["images"] and got["kind"] == "count_shape"
    assert got["record_id"] == i and got["origin"] == "train.parquet"
  # A directory of parquet files concatenates them in name order.
  testing.write_parquet(str(tmp_path / "train2.parquet"), recs[:2], images_as)
  assert len(sources.parquet_source(str(tmp_path))) == 7


def test_parquet_custom_columns(tmp_path):
  import pyarrow.parquet as pq
  img = testing.encode(testing.natural_image(30, 30))
  pq.write_table(pa.table({"question": ["<image>q"], "solution": ["7"], "image": [img]}),
                 str(tmp_path / "x.parquet"))
  src = sources.parquet_source(str(tmp_path / "x.parquet"),
                               sources.Fields("question", "solution", "image", kind=None))
  rec = src.record(0)
  assert rec["answer"] == "7" and rec["images"] == [img] and rec["kind"] == ""
  with pytest.raises(ValueError, match="not found"):
    sources.parquet_source(str(tmp_path / "x.parquet"))


def test_jsonl_relative_paths(tmp_path):
  recs = _records(3)
  os.makedirs(tmp_path / "sub")
  path = testing.write_jsonl(str(tmp_path / "sub" / "data.jsonl"), recs)
  src = sources.JsonlSource(path)
  assert len(src) == 3
  for i, r in enumerate(recs):
    assert src.record(i)["images"] == r["images"]


def test_hf_datasets_dir(tmp_path):
  recs = _records(2)
  table = pa.table({
      "problem": [r["problem"] for r in recs], "answer": [r["answer"] for r in recs],
      "images": [[{"bytes": r["images"][0], "path": None}] for r in recs]})
  with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as f:
    with pa.ipc.new_stream(f, table.schema) as w:
      w.write_table(table)
  (tmp_path / "state.json").write_text(
      json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
  src = sources.hf_datasets_source(str(tmp_path))
  assert len(src) == 2 and src.record(1)["images"] == recs[1]["images"]


def test_synthetic_source_flows_through_parquet(tmp_path, processor):
  recs = synthetic.make_records(6, seed=1)
  path = testing.write_parquet(str(tmp_path / "syn.parquet"), recs)
  src = sources.parquet_source(path)
  syn = sources.SyntheticSource(6, seed=1)
  for i in range(6):
    a, b = src.record(i), syn.record(i)
    assert a["images"] == b["images"] and a["answer"] == b["answer"] and a["kind"] == b["kind"]
    out = processor(a["problem"], [images_lib.decode_image(x) for x in a["images"]])
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56x56 → 16 patches, 4 tokens


def test_decode_modes():
  rgb = testing.natural_image(20, 24)
  # CMYK, palette, grey, 1-bit → RGB.
  for mode, fmt in (("CMYK", "JPEG"), ("P", "PNG"), ("L", "PNG"), ("1", "PNG")):
    out = images_lib.decode_image(testing.encode(rgb, fmt, mode))
    assert out.shape == (20, 24, 3) and out.dtype == np.uint8, mode
  # RGBA: fully transparent pixels become white.
  rgba = np.concatenate([rgb, np.full((20, 24, 1), 255, np.uint8)], -1)
  rgba[:5, :, 3] = 0
  out = images_lib.decode_image(testing.encode(Image.fromarray(rgba, "RGBA")))
  assert (out[:5] == 255).all() and (out[5:] == rgb[5:]).all()
  # 16-bit grey: scaled to 8 bits, not clipped to white.
  arr16 = (np.arange(20 * 24).reshape(20, 24) * 100).astype(np.uint16)
  out = images_lib.decode_image(testing.encode(Image.fromarray(arr16)))
  np.testing.assert_array_equal(out[..., 0], np.rint(arr16 / 257.0).astype(np.uint8))
  with pytest.raises(images_lib.ImageDecodeError):
    images_lib.decode_image(b"not an image at all")


def _bad_dir(tmp_path):
  """A JSON-lines data set mixing good records and each kind of bad one."""
  good = lambda i, fmt="PNG", mode=None, hw=(40, 50): testing.encode(
      testing.natural_image(*hw, seed=i), fmt, mode)
  png = good(0)
  rgba = np.zeros((30, 30, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[10:, :, 3] = 255
  rows = [
      ("good", {"problem": "<image>a", "answer": "1", "images": [png]}),
      ("good", {"problem": "<image>b", "answer": "2", "images": [good(1, "JPEG")]}),
      ("skipped_total/image_decode", {"problem": "<image>x", "answer": "0",
                                      "images": [png[:len(png) // 2]]}),
      ("good", {"problem": "<image>cmyk", "answer": "3", "images": [good(2, "JPEG", "CMYK")]}),
      ("good", {"problem": "<image>palette", "answer": "4", "images": [good(3, "PNG", "P")]}),
      ("good", {"problem": "<image>rgba", "answer": "5",
                "images": [testing.encode(Image.fromarray(rgba, "RGBA"))]}),
      ("good", {"problem": "<image>i16", "answer": "6", "images": [testing.encode(
          Image.fromarray((np.arange(900).reshape(30, 30) * 70).astype(np.uint16)))]}),
      ("good", {"problem": "<image> vs <image>", "answer": "7", "images": [png, good(4)]}),
      ("prefilter/image_decode", {"problem": "<image>x", "answer": "0", "images": [b"garbage!"]}),
      ("prefilter/aspect_ratio", {"problem": "<image>x", "answer": "0",
                                  "images": [good(5, hw=(2, 500))]}),
      ("prefilter/missing_field", {"problem": "<image>x", "images": [png]}),
      ("prefilter/missing_field", {"answer": "1", "images": [png]}),
      ("prefilter/placeholder_mismatch", {"problem": "<image><image>x", "answer": "0",
                                          "images": [png]}),
      ("prefilter/placeholder_mismatch", {"problem": "no image here", "answer": "0",
                                          "images": [png]}),
      ("prefilter/too_long", {"problem": "<image>" + "word " * 400, "answer": "0",
                              "images": [png]}),
      ("prefilter/image_missing", {"problem": "<image>x", "answer": "0",
                                   "images": ["images/does_not_exist.png"]}),
  ]
  path = testing.write_jsonl(str(tmp_path / "bad.jsonl"), [r for _, r in rows])
  with open(path, "a") as f:
    f.write("{not json\n")
  expected = {}
  for label, _ in rows + [("prefilter/bad_json", None)]:
    if label != "good":
      expected[label] = expected.get(label, 0) + 1
  good_ids = [i for i, (label, _) in enumerate(rows) if label == "good"]
  return path, good_ids, expected


@pytest.mark.parametrize("prefetch", [0, 2])
def test_bad_records_are_skipped_and_counted(tmp_path, processor, prefetch):
  path, good_ids, expected = _bad_dir(tmp_path)
  cfg = pipeline.DataConfig(
      source="jsonl", path=path, batch_size=1, shuffle=False, num_epochs=1,
      max_prompt_length=256, prompt_length_buckets=(128,), patch_buckets=(512,),
      image_buckets=(2,), num_threads=2, prefetch_batches=prefetch,
      process_index=0, process_count=1)
  it = pipeline.make_iterator(cfg, processor)
  batches = list(it)
  assert [int(b.record_ids[0]) for b in batches] == good_ids
  assert [b.answers[0] for b in batches] == [str(i) for i in range(1, 8)]
  stats = batches[-1].stats
  counts = {k: v for k, v in stats.items()
            if k.startswith(("prefilter/", "skipped_total/")) and k != "prefilter/kept"}
  assert counts == expected
  assert stats["prefilter/kept"] == len(good_ids) + 1  # the truncated one passes the header check
  assert sum(b.stats.get("skipped/image_decode", 0) for b in batches) == 1
  # RGBA record: transparent area pasted on white.
  rgba_batch = batches[4]
  assert (rgba_batch.pixel_values[:rgba_batch.num_patches] != 0).any()
  assert rgba_batch.problems[0] == "<image>rgba"
  it.close()
