"""The Colab notebook runs top to bottom (few steps) and writes its figure."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "papo_vs_grpo_tiny.ipynb")


def test_notebook_executes_and_plots_both_runs(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  out = tmp_path / "runs"
  for k, v in dict(PAPO_NB_STEPS="3", PAPO_NB_WARMUP="2", PAPO_NB_VAL_EVERY="3", PAPO_NB_VAL_QUESTIONS="16",
                      PAPO_NB_OUT=str(out), PAPO_NB_VARIANTS="grpo,papo_g").items():
    monkeypatch.setenv(k, v)
  monkeypatch.delenv("XLA_FLAGS", raising=False)   # one CPU device, as on Colab
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  assert (out / "papo_vs_grpo.png").stat().st_size > 10_000
  for variant in ("grpo", "papo_g"):
    rows = [json.loads(l) for l in open(out / variant / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]   # step 0: held-out scores before RL
    assert "val/accuracy" in rows[0] and "reward/overall" not in rows[0]
    assert "val/accuracy" in rows[-1]
    assert ("actor/kl_prcp" in rows[-1]) == (variant == "papo_g")   # GRPO runs no masked pass
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "GRPO: final reward" in text and "PAPO-G: final reward" in text
  assert "on 16 questions" in text
  # By default it trains every method of the comparison (the test trains two, for time).
  assert all(v in nb.cells[3].source for v in ("grpo", "papo_g", "vppo", "papo_vppo", "noisy_rollout"))
  # A fresh runtime installs from a repository URL; the badge opens the notebook in Colab.
  assert "REPO_URL" in nb.cells[1].source
  assert "colab.research.google.com/github/" in nb.cells[0].source
