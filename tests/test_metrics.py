"""What a run reports: dropped records, metrics after a resume, samples, the monitor's gamma lowering."""

import json
import os

import ml_collections
import numpy as np
import pytest

from papo_jax import metrics as M
from papo_jax.config_base import base_config, perception_terms


def test_data_metrics_counts_flat_pipeline_keys_and_prefilter_drops():
  stats = {"batch_index": 7, "skipped/image_missing": 1, "skipped_total/image_missing": 3,
           "skipped_total/too_long": 2, "prefilter/too_long": 4, "prefilter/other": 1, "prefilter/kept": 90}
  got = M.data_metrics(stats)
  assert got == {"data/skipped_total": 10.0, "data/skipped_total/image_missing": 3.0,
                 "data/skipped_total/too_long": 6.0, "data/skipped_total/other": 1.0}
  assert M.data_metrics({"batch_index": 0, "prefilter/kept": 5}) == {"data/skipped_total": 0.0}


def test_skipped_records_of_a_real_pipeline_reach_the_metrics(tmp_path):
  """A JSON-lines file with broken records: the trainer's data metrics count them by reason."""
  from papo_jax.data import pipeline, testing
  from papo_jax.data.tiny_tokenizer import build_tiny_checkpoint_files
  ckpt = str(tmp_path / "tok")
  build_tiny_checkpoint_files(ckpt, min_pixels=56 * 56, max_pixels=56 * 56)
  img = testing.encode(testing.natural_image(56, 56, 0))
  recs = [dict(problem=f"<image>How many? ({i})", answer=str(i), images=[img]) for i in range(6)]
  recs.append(dict(problem="<image>Broken image", answer="1", images=["missing.png"]))
  recs.append(dict(problem="No answer", images=[img]))
  path = str(tmp_path / "train.jsonl")
  testing.write_jsonl(path, recs)
  cfg = pipeline.DataConfig(source="jsonl", path=path, batch_size=2, min_pixels=56 * 56, max_pixels=56 * 56,
                            max_prompt_length=256, prompt_length_buckets=(128, 256), num_threads=1,
                            process_index=0, process_count=1)
  it = pipeline.make_iterator(cfg, ckpt_dir=ckpt)
  try:
    got = M.data_metrics(next(it).stats)
  finally:
    it.close()
  assert got["data/skipped_total"] == 2.0, got
  assert sum(v for k, v in got.items() if k.startswith("data/skipped_total/")) == 2.0


def _rows(path):
  return [json.loads(line) for line in open(path)]


def test_metric_writer_after_resume_holds_each_step_once(tmp_path):
  c = base_config()
  c.log.tensorboard = False
  wd = str(tmp_path)
  w = M.MetricWriter(wd, c, 0)
  for s in range(1, 6):
    w.write(s, {"reward/overall": s / 10})
    w.write_samples(s, [{"response": f"r{s}", "answer": "1", "reward/overall": 0.0}])
  w.close()
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"step": 6, "rew')          # killed mid-write
  w = M.MetricWriter(wd, c, 3)             # resumed from the step-3 checkpoint
  for s in range(4, 7):
    w.write(s, {"reward/overall": s / 10})
  w.close()
  assert [r["step"] for r in _rows(os.path.join(wd, "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in _rows(os.path.join(wd, "samples.jsonl"))] == [1, 2, 3]


def test_samples_go_to_jsonl_and_tensorboard_text(tmp_path):
  pytest.importorskip("tensorboardX")
  c = base_config()
  w = M.MetricWriter(str(tmp_path), c, 0)
  rewards = {"overall": np.array([1.0, 0.1, 0.0]), "accuracy": np.array([1.0, 0.0, 0.0]),
             "format": np.array([1.0, 1.0, 0.0])}
  samples = M.pick_samples([("p1", "3", "<think></think>\\boxed{3}"), ("p1", "3", "b"), ("p2", "4", "c")], rewards, 2)
  w.write_samples(10, samples)
  w.close()
  rows = _rows(str(tmp_path / "samples.jsonl"))
  assert rows == [{"step": 10, "prompt": "p1", "answer": "3", "response": "<think></think>\\boxed{3}",
                   "reward/overall": 1.0, "reward/accuracy": 1.0, "reward/format": 1.0},
                  {"step": 10, "prompt": "p1", "answer": "3", "response": "b", "reward/overall": 0.1,
                   "reward/accuracy": 0.0, "reward/format": 1.0}]
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tb"))
  assert "\\boxed{3}" in M.samples_markdown(samples)


def _monitor_cfg(action):
  return ml_collections.ConfigDict(dict(kl_prcp_spike=5.0, pg_clipfrac_higher_max=0.2, entropy_rise=0.5, window=10,
                                        action=action))


@pytest.mark.parametrize("gamma_end", [-1.0, 0.0])
def test_lower_gamma_halves_gamma_with_and_without_annealing(gamma_end):
  """monitor.action=lower_gamma: a perception-KL spike halves gamma from then on, annealed or not."""
  c = base_config()
  c.papo.gamma, c.papo.gamma_end, c.train.steps = 0.02, gamma_end, 10
  mon = M.Monitor(_monitor_cfg("lower_gamma"))
  for _ in range(4):
    assert not mon.should_stop(1, {"actor/kl_prcp": 1e-3})
  before = perception_terms(c, 4, mon.gamma_halvings)
  assert not mon.should_stop(5, {"actor/kl_prcp": 1e-1})   # a 100x spike
  after = perception_terms(c, 4, mon.gamma_halvings)
  assert mon.gamma_halvings == 1
  assert after.gamma == pytest.approx(before.gamma / 2) and before.gamma > 0
  assert after.entropy_scale == pytest.approx(before.entropy_scale / 2)


def test_monitor_state_makes_a_resumed_run_decide_as_the_uninterrupted_one():
  """The checkpointed monitor state (JSON) carries the γ halvings and the recent history: a
  resumed monitor lowers γ where the uninterrupted one does; a fresh one would miss a spike."""
  import json
  rows = [{"actor/kl_prcp": 1e-3 * (1 + 0.1 * i), "actor/entropy_ori": 0.5, "reward/overall": 0.3} for i in range(6)]
  rows += [{"actor/kl_prcp": 0.1}, {"actor/kl_prcp": 1e-3}, {"actor/kl_prcp": 0.2}]

  def feed(mon, part):
    for r in part:
      assert not mon.should_stop(1, dict(r))
    return mon

  whole = feed(M.Monitor(_monitor_cfg("lower_gamma")), rows)
  first = feed(M.Monitor(_monitor_cfg("lower_gamma")), rows[:7])
  saved = json.loads(json.dumps(first.state()))
  assert saved["gamma_halvings"] == 1 and len(saved["hist"]) == 7 and "reward/overall" not in saved["hist"][0]
  resumed = M.Monitor(_monitor_cfg("lower_gamma"))
  resumed.restore(saved)
  feed(resumed, rows[7:])
  fresh = feed(M.Monitor(_monitor_cfg("lower_gamma")), rows[7:])
  assert resumed.gamma_halvings == whole.gamma_halvings == 2 and fresh.gamma_halvings == 0
  M.Monitor(_monitor_cfg("warn")).restore(None)   # a checkpoint written without a monitor state


def test_monitor_stop_action():
  mon = M.Monitor(_monitor_cfg("stop"))
  for _ in range(4):
    mon.should_stop(1, {"actor/kl_prcp": 1e-3})
  assert mon.should_stop(5, {"actor/kl_prcp": 1.0})


def test_perception_terms_one_rule():
  c = base_config()
  c.papo.gamma, c.papo.eta_mask = 0.0, 0.0
  assert perception_terms(c) == (0.0, 1.0, False)
  c.papo.eta_mask = 0.03
  assert perception_terms(c).needs_mask
  c.papo.gamma, c.papo.eta_mask = 0.02, 0.0
  t = perception_terms(c, 7)
  assert t.needs_mask and t.gamma == pytest.approx(0.02) and t.entropy_scale == 1.0


def test_console_line_uses_the_file_names():
  line = M.console_line(3, {"reward/overall": 0.5, "reward/accuracy": 0.25, "actor/grad_norm": 1.0})
  assert line == "step 3 | reward/overall 0.5 | reward/accuracy 0.25 | actor/grad_norm 1"
