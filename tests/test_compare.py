"""papo_jax.compare: the per-replicate figures, their aggregation, the table and the figure."""

import json
import os

import numpy as np
import pytest

from papo_jax import compare


def _rows(rewards, val, kl=None, secs=1.0):
  rows = [{"step": 0, "val/accuracy": val[0]}]
  for i, r in enumerate(rewards):
    row = {"step": i + 1, "reward/overall": r, "timing/step": secs}
    if kl is not None:
      row["actor/kl_prcp"] = kl[i]
    rows.append(row)
  rows[-1]["val/accuracy"] = val[1]
  return rows


def test_fifths_and_run_summary():
  assert compare.fifths(np.arange(10.0)) == (0.5, 8.5)
  assert compare.fifths(np.array([3.0])) == (3.0, 3.0)
  assert all(np.isnan(compare.fifths(np.zeros(0))))
  s = compare.run_summary(_rows(np.linspace(0, 0.9, 10), (0.2, 0.7), kl=np.arange(10.0), secs=2.0))
  assert s["steps"] == 10
  assert s["reward_first"] == pytest.approx(0.05) and s["reward_last"] == pytest.approx(0.85)
  assert (s["val_first"], s["val_last"]) == (0.2, 0.7)
  assert s["kl_prcp_last"] == pytest.approx(8.5)
  assert s["seconds_per_step"] == 2.0
  assert np.isnan(compare.run_summary(_rows([0.1, 0.2], (0.1, 0.1)))["kl_prcp_last"])


def test_summarize_writes_table_json_and_figure(tmp_path):
  out = str(tmp_path)
  for seed, shift in ((0, 0.0), (1, 0.1)):
    for variant, kl in (("grpo", None), ("papo_g", np.full(10, 1e-3))):
      d = compare.run_dir(out, variant, seed)
      os.makedirs(d)
      with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for r in _rows(np.linspace(0, 0.9, 10) + shift, (0.25, 0.5 + shift), kl=kl):
          f.write(json.dumps(r) + "\n")
  md = compare.summarize(out, ["grpo", "papo_g", "missing"], [0, 1])
  lines = md.splitlines()
  assert len(lines) == 4 and lines[2].startswith("| grpo | 2 | 10 |") and lines[3].startswith("| papo_g | 2 |")
  assert "0.900 ± 0.050" in lines[2]          # last-fifth reward: (0.85, 0.95) over the two seeds
  assert "| - |" in lines[2] and "0.00100 ± 0.00000" in lines[3]   # KL only where the masked pass ran
  data = json.load(open(os.path.join(out, "summary.json")))
  assert data["papo_g"]["val_last"] == pytest.approx([0.55, 0.05])
  from PIL import Image
  img = np.asarray(Image.open(os.path.join(out, "compare.png")).convert("L"), dtype=np.float32)
  assert img.std() > 5.0   # something was drawn


def test_train_command_sets_every_seed():
  cmd = compare.train_command("configs/tiny.py", "grpo", 2, "/tmp/w", ["train.steps=5"])
  assert "--config=configs/tiny.py:grpo" in cmd and "--config.train.steps=5" in cmd
  assert {"--config.train.seed=2", "--config.data.seed=2", "--config.model.tiny.seed=2"} <= set(cmd)
