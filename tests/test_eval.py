"""Evaluation: avg@k tables equal an independent recomputation from the JSONL; skips; resume."""

import csv
import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest

from papo_jax import eval as E
from papo_jax.data import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_reward(responses, answers):
  """A deterministic grader with varied 0/1 scores (a random tiny model is never right)."""
  h = [int(hashlib.sha1((r + a).encode()).hexdigest(), 16) for r, a in zip(responses, answers)]
  acc = np.asarray([x % 3 == 0 for x in h], np.float32)
  fmt = np.asarray([x % 2 == 0 for x in h], np.float32)
  return {"overall": 0.9 * acc + 0.1 * fmt, "accuracy": acc, "format": fmt}


def _img(seed):
  return testing.encode(testing.natural_image(56, 56, seed))


def write_benchmarks(root):
  """Three small benchmarks in their published layouts, with one bad and one open-ended record."""
  os.makedirs(os.path.join(root, "geometry3k"))
  testing.write_parquet(os.path.join(root, "geometry3k", "test.parquet"),
                        [dict(problem=f"<image>Find x. ({i})", answer=str(i + 2), images=[_img(i)]) for i in range(5)])
  os.makedirs(os.path.join(root, "mathvista"))
  recs = [dict(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"What is {i}+1?"}]}],
               answer=str(i + 1), images=[_img(10 + i)]) for i in range(4)]
  recs.append(dict(messages=[{"role": "user", "content": "<image>Describe the plot."}],
                   answer="The curve rises then falls slowly", images=[_img(20)]))      # open-ended: filtered
  recs.append(dict(messages=[{"role": "user", "content": "<image>Count."}], answer="3",
                   images=["images/missing.png"]))                                          # missing image: skipped
  testing.write_jsonl(os.path.join(root, "mathvista", "testmini.jsonl"), recs)
  os.makedirs(os.path.join(root, "counting"))
  import pyarrow as pa
  import pyarrow.parquet as pq
  # A chat-format parquet file: a `messages` column instead of `problem`, images as bytes.
  pq.write_table(pa.table({
      "messages": [[{"role": "user", "content": "<image>How many objects?"}]] * 3,
      "answer": [str(i) for i in range(3)],
      "images": [[_img(30 + i)] for i in range(3)]}), os.path.join(root, "counting", "a.parquet"))


def tiny_eval_config(tmp_path, benchmarks=("geometry3k", "mathvista", "counting")):
  spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "configs", "tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("grpo")
  c.reward.name = "test_eval:fake_reward"
  c.eval.data_dir = str(tmp_path / "bench")
  c.eval.k, c.eval.max_new_tokens, c.eval.batch_size = 3, 6, 2
  c.eval.max_pixels, c.eval.min_pixels = 56 * 56, 28 * 28
  c.eval.benchmarks = benchmarks
  c.eval.custom = {"counting": dict(pattern="counting/*", group="vision")}
  c.data.num_threads = 1
  return c


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
  from papo_jax.models.tiny import build_tiny_checkpoint
  path = str(tmp_path_factory.mktemp("tiny") / "model")
  c = tiny_eval_config(tmp_path_factory.getbasetemp())
  return build_tiny_checkpoint(path, c.model.tiny, min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels)


def _recompute(out_dir, names):
  """Independent: per benchmark, the mean over questions of each question's mean accuracy."""
  per = {}
  for n in names:
    rows = [json.loads(line) for line in open(os.path.join(out_dir, f"{n}.jsonl"))]
    per[n] = 100.0 * sum(sum(r["accuracy"]) / len(r["accuracy"]) for r in rows) / len(rows)
  return per


def test_eval_report_matches_recomputation_with_skips_and_resume(tmp_path, tiny_model_dir):
  write_benchmarks(str(tmp_path / "bench"))
  out = str(tmp_path / "out")
  # An interrupted evaluation: only the first benchmark finished.
  E.run(tiny_eval_config(tmp_path, benchmarks=("geometry3k",)), tiny_model_dir, out)
  first = os.path.getmtime(os.path.join(out, "geometry3k.jsonl"))
  res = E.run(tiny_eval_config(tmp_path), tiny_model_dir, out)
  assert os.path.getmtime(os.path.join(out, "geometry3k.jsonl")) == first     # read back, not redone

  names = ["geometry3k", "mathvista", "counting"]
  per = _recompute(out, names)
  for n in names:
    assert res["benchmarks"][n] == pytest.approx(per[n], abs=1e-9)
    rows = [json.loads(line) for line in open(os.path.join(out, f"{n}.jsonl"))]
    assert all(len(r["responses"]) == 3 and len(r["accuracy"]) == 3 for r in rows)   # k samples per question
  assert len(open(os.path.join(out, "geometry3k.jsonl")).readlines()) == 5
  assert len(open(os.path.join(out, "mathvista.jsonl")).readlines()) == 4
  assert 0 < np.mean(list(per.values())) < 100            # the scores vary, so the check means something
  general = np.mean([per["geometry3k"], per["mathvista"]])
  assert res["mean/general"] == pytest.approx(general)
  assert res["mean/vision"] == pytest.approx(per["counting"])
  assert res["mean/overall"] == pytest.approx(np.mean(list(per.values())))
  # The skipped records are reported with their reasons.
  mv = json.load(open(os.path.join(out, "mathvista.done.json")))
  assert mv["skipped"].get("not_closed_form") == 1 and sum(mv["skipped"].values()) == 2, mv["skipped"]
  table = open(os.path.join(out, "results.md")).read()
  assert f"| mathvista | general | 4 | 2 | {per['mathvista']:.2f} |" in table
  with open(os.path.join(out, "results.csv")) as f:
    csv_rows = {r["benchmark"]: float(r["avg@k"]) for r in csv.DictReader(f)}
  assert csv_rows["mean/overall"] == pytest.approx(res["mean/overall"])

  # Delta%rel against a baseline: the mean of per-benchmark relative gains.
  base = {"geometry3k": 20.0, "mathvista": 40.0, "counting": 10.0}
  base_csv = str(tmp_path / "base.csv")
  with open(base_csv, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["benchmark", "group", "questions", "skipped", "avg@k"])
    w.writeheader()
    for n, v in base.items():
      w.writerow(dict(benchmark=n, group="", questions=1, skipped=0, **{"avg@k": v}))
    w.writerow(dict(benchmark="mean/overall", group="", questions="", skipped="", **{"avg@k": 99.0}))
  res2 = E.run(tiny_eval_config(tmp_path), tiny_model_dir, out, baseline_path=base_csv)
  gains = [(per[n] - base[n]) / base[n] * 100 for n in names]
  assert res2["delta_rel"] == pytest.approx(np.mean(gains))
  assert "Delta%rel" in open(os.path.join(out, "results.md")).read()


def test_paper_arithmetic():
  """Group means are unweighted; Delta%rel of the paper's 3B overall scores (GRPO 47.92 -> PAPO-G 49.92)."""
  assert E.relative_gain(49.92, 47.92) == pytest.approx(4.1736, abs=1e-4)
  per = {"a": 50.0, "b": 40.0, "c": 30.0}
  out = E.summarize(per, {"a": "general", "b": "general", "c": "vision"}, {"a": 40.0, "b": 40.0, "c": 40.0})
  assert out["mean/general"] == 45.0 and out["mean/vision"] == 30.0 and out["mean/overall"] == 40.0
  assert out["delta_rel"] == pytest.approx((25.0 + 0.0 - 25.0) / 3)
  assert E.avg_at_k(np.asarray([[1, 0, 0, 1], [1, 1, 1, 1]])) == pytest.approx(75.0)


@pytest.mark.parametrize("answer,closed", [("3", True), ("-2.5", True), ("3/4", True), ("B", True), ("(c)", True),
                                           ("\\frac{\\sqrt{3}}{2}", True), ("12%", True), ("2\\pi", True),
                                           ("The curve rises then falls", False), ("yes because", False)])
def test_closed_form_filter(answer, closed):
  assert E.is_closed_form(answer) == closed


def test_config_errors_name_the_field(tmp_path, tiny_model_dir):
  c = tiny_eval_config(tmp_path, benchmarks=("nope",))
  with pytest.raises(ValueError, match="eval.benchmarks"):
    E.run(c, tiny_model_dir, str(tmp_path / "o"))
  c.eval.data_dir = ""
  with pytest.raises(ValueError, match="eval.data_dir"):
    E.run(c, tiny_model_dir, str(tmp_path / "o"))


def _rows(out, name):
  return [json.loads(line) for line in open(os.path.join(out, f"{name}.jsonl"))]


@pytest.mark.slow
def test_stale_results_are_recomputed_and_the_report_names_the_run(tmp_path, tiny_model_dir, caplog):
  """End to end through run(): the done-record's identity, a k change recomputes, the report header."""
  write_benchmarks(str(tmp_path / "bench"))
  out = str(tmp_path / "out")
  c = tiny_eval_config(tmp_path, benchmarks=("geometry3k",))
  E.run(c, tiny_model_dir, out)
  done = json.load(open(os.path.join(out, "geometry3k.done.json")))
  ident = done["identity"]
  assert ident["checkpoint"]["checkpoint"] == os.path.abspath(tiny_model_dir) and ident["checkpoint"]["step"] is None
  assert ident["checkpoint"]["fingerprint"] == E.fingerprint_files(tiny_model_dir)
  assert ident["settings"]["k"] == 3 and ident["settings"]["temperature"] == c.eval.temperature
  assert ident["settings"]["format_mode"] in ("think", "thinking") and ident["settings"]["reward"] == c.reward.name
  assert ident["data"]["files"] == [["test.parquet", os.path.getsize(tmp_path / "bench" / "geometry3k" / "test.parquet")]]
  md = open(os.path.join(out, "results.md")).read()
  assert f"# Evaluation of {os.path.abspath(tiny_model_dir)}" in md
  assert "step -" in md and "- date: 20" in md and "k=3" in md and "temperature=1.0" in md and "top_k=" in md
  run_info = json.load(open(os.path.join(out, "results.json")))["run"]
  assert run_info["checkpoint"] == ident["checkpoint"] and run_info["date"].startswith("20")

  # k=2: recomputed with 2 samples per question, and the log names the difference.
  c2 = tiny_eval_config(tmp_path, benchmarks=("geometry3k",))
  c2.eval.k = 2
  with caplog.at_level("WARNING"):
    res = E.run(c2, tiny_model_dir, out)
  assert "settings.k: 3 there, 2 now" in caplog.text
  assert all(len(r["accuracy"]) == 2 for r in _rows(out, "geometry3k"))
  assert res["k"] == 2 and json.load(open(os.path.join(out, "geometry3k.done.json")))["k"] == 2
  assert "k=2" in open(os.path.join(out, "results.md")).read()


class ScriptedSampler:
  """Stands in for the Sampler: k fixed responses per prompt (the generation itself is tested above)."""

  def __init__(self, tokenizer):
    self.calls = 0
    self.ids = [tokenizer.encode(t, add_special_tokens=False) for t in ("1", "2", "3", "4")]

  def generate(self, params, ids, mask, pv, grid, *, n, key):
    self.calls += 1
    rows = [self.ids[(r + self.calls) % 4] for r in range(ids.shape[0] * n)]
    width = max(len(r) for r in rows)
    toks = np.asarray([r + [0] * (width - len(r)) for r in rows], np.int32)
    mask_ = np.asarray([[1] * len(r) + [0] * (width - len(r)) for r in rows], np.int32)
    return type("Rollout", (), dict(tokens_RxT=toks, mask_RxT=mask_))


def test_done_records_are_reused_only_for_the_same_identity(tmp_path, tiny_model_dir, caplog):
  """evaluate_benchmark: the same identity reads back; another k, grader, checkpoint or data file recomputes."""
  from papo_jax.data import pipeline
  from papo_jax.data.processor import Processor
  write_benchmarks(str(tmp_path / "bench"))
  data_dir, out = str(tmp_path / "bench"), str(tmp_path / "out")
  os.makedirs(out)
  proc = Processor.from_pretrained(tiny_model_dir, 28 * 28, 56 * 56)
  cfg_data = pipeline.DataConfig(source="parquet", path="", min_pixels=28 * 28, max_pixels=56 * 56,
                                 max_prompt_length=256, prompt_length_buckets=(256,), batch_size=2, num_threads=1)
  ck = {"checkpoint": "/runs/a", "step": 120, "fingerprint": "f120"}
  settings = {"temperature": 1.0, "top_p": 1.0, "format_mode": "think", "reward": "test_eval:fake_reward"}
  sampler = ScriptedSampler(proc.tokenizer)

  def ev(k=2, checkpoint=ck, settings=settings):
    return E.evaluate_benchmark(E.BENCHMARKS["geometry3k"], data_dir, out, sampler=sampler, params=None,
                                processor=proc, reward_fn=fake_reward, tokenizer=proc.tokenizer, stop_ids=(),
                                k=k, batch_size=2, cfg_data=cfg_data,
                                identity={"checkpoint": checkpoint, "settings": settings})

  first = ev()
  assert sampler.calls == 3 and first["questions"] == 5                # 5 questions in batches of 2
  assert first["identity"]["checkpoint"] == ck and first["identity"]["settings"]["k"] == 2
  assert ev() == first and sampler.calls == 3                          # same identity: read back

  def recomputed(why, **kw):
    calls = sampler.calls
    caplog.clear()
    with caplog.at_level("WARNING"):
      got = ev(**kw)
    assert sampler.calls == calls + 3, why
    assert why in caplog.text, caplog.text
    return got

  assert recomputed("settings.k: 2 there, 3 now", k=3)["k"] == 3
  recomputed("checkpoint.step: 120 there, 110 now", k=3, checkpoint={**ck, "step": 110, "fingerprint": "f110"})
  recomputed("settings.format_mode: 'think' there, 'thinking' now", k=3,
             checkpoint={**ck, "step": 110, "fingerprint": "f110"}, settings={**settings, "format_mode": "thinking"})
  testing.write_parquet(os.path.join(data_dir, "geometry3k", "test.parquet"),
                        [dict(problem=f"<image>Find y. ({i})", answer=str(i), images=[_img(i)]) for i in range(6)])
  got = recomputed("data.files", k=3, checkpoint={**ck, "step": 110, "fingerprint": "f110"},
                   settings={**settings, "format_mode": "thinking"})
  assert got["questions"] == 6
  # A record from before identities were stored is not trusted either.
  done = os.path.join(out, "geometry3k.done.json")
  old = json.load(open(done))
  del old["identity"]
  json.dump(old, open(done, "w"))
  recomputed("records no checkpoint", k=3, checkpoint={**ck, "step": 110, "fingerprint": "f110"},
             settings={**settings, "format_mode": "thinking"})


def test_report_header_names_checkpoint_step_date_and_settings(tmp_path):
  s = [{"benchmark": "geometry3k", "group": "general", "k": 4, "questions": 2, "skipped": {}, "avg@k": 50.0}]
  ident = {"checkpoint": {"checkpoint": "gs://b/runs/a", "step": 120, "fingerprint": "abc"},
           "settings": {"k": 4, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "format_mode": "think"}}
  md = E.write_report(s, str(tmp_path), None, ident)
  lines = md.splitlines()
  assert lines[0] == "# Evaluation of gs://b/runs/a"
  assert "- checkpoint: `gs://b/runs/a` step 120 (fingerprint abc)" in lines
  assert any(l.startswith("- date: 20") and l.endswith("UTC") for l in lines)
  assert "- settings: k=4, temperature=1.0, top_p=1.0, top_k=50, format_mode=think" in lines
  assert "| geometry3k | general | 2 | 0 | 50.00 |" in lines
  assert open(tmp_path / "results.md").read() == md + "\n"
  res = json.load(open(tmp_path / "results.json"))
  assert res["run"]["checkpoint"]["step"] == 120 and res["run"]["settings"]["top_k"] == 50


def test_fingerprint_follows_the_bytes(tmp_path):
  d = tmp_path / "m"
  d.mkdir()
  (d / "config.json").write_text("{}")
  big = np.random.default_rng(0).integers(0, 255, 9 << 20, dtype=np.uint8)
  (d / "model.safetensors").write_bytes(big.tobytes())
  a = E.fingerprint_files(str(d))
  assert E.fingerprint_files(str(d)) == a
  big[len(big) // 2 + 10] ^= 1                        # one byte in the middle window: equal size, new weights
  (d / "model.safetensors").write_bytes(big.tobytes())
  b = E.fingerprint_files(str(d))
  assert b != a
  (d / "config.json").write_text('{"x": 1}')
  assert E.fingerprint_files(str(d)) != b


def test_workdir_identity_names_the_step(tmp_path):
  """A training workdir: the latest orbax step by default, or the asked one; each step its own fingerprint."""
  import orbax.checkpoint as ocp
  wd = tmp_path / "run"
  (wd / "checkpoints").mkdir(parents=True)
  (wd / "config.json").write_text(json.dumps({"checkpoint": {"dir": ""}}))
  with ocp.CheckpointManager(str(wd / "checkpoints")) as mngr:
    for step in (110, 120):
      mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.full(4, step, np.float32)})))
    mngr.wait_until_finished()
  latest = E.checkpoint_identity(str(wd))
  assert latest["step"] == 120 and latest["checkpoint"] == str(wd)
  at110 = E.checkpoint_identity(str(wd), 110)
  assert at110["step"] == 110 and at110["fingerprint"] != latest["fingerprint"]
  assert E.record_mismatch({"checkpoint": latest}, {"checkpoint": at110}) == [
      f"checkpoint.fingerprint: {at110['fingerprint']!r} there, {latest['fingerprint']!r} now",
      "checkpoint.step: 110 there, 120 now"]
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 115"):
    E.checkpoint_identity(str(wd), 115)


def test_missing_benchmarks_fail_before_any_generation(tmp_path, monkeypatch):
  write_benchmarks(str(tmp_path / "bench"))
  c = tiny_eval_config(tmp_path, benchmarks=("geometry3k", "wemath", "mathvista", "superclevr"))
  def no_model(*a, **k):
    raise AssertionError("the model was loaded before the benchmark files were checked")
  monkeypatch.setattr(E, "load_policy", no_model)
  monkeypatch.setattr(E, "checkpoint_identity", no_model)
  out = tmp_path / "o"
  with pytest.raises(FileNotFoundError) as e:
    E.run(c, "/nonexistent/model", str(out))
  msg = str(e.value)
  assert "2 of 4" in msg and "benchmark wemath" in msg and "benchmark superclevr" in msg and "geometry3k" not in msg
  assert not out.exists()
