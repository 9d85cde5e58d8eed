"""Export extras: generation_config.json read back by transformers, and the model card."""

import importlib.util
import json
import os

import pytest

from papo_jax import export as X

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "configs", "tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("papo_g")
  c.eval.temperature, c.eval.top_p, c.eval.top_k, c.eval.max_new_tokens = 0.7, 0.9, 20, 321
  return c


@pytest.mark.parametrize("eos,pad,base", [(151645, 151643, {}), ([151645, 151643], None, {"bos_token_id": 151643,
                                                                                             "temperature": 0.01})])
def test_generation_config_reads_back_in_transformers(tmp_path, eos, pad, base):
  from transformers import GenerationConfig
  c = tiny_config()
  with open(tmp_path / "generation_config.json", "w") as f:
    json.dump(X.generation_config(c.eval, eos, pad, base), f)
  g = GenerationConfig.from_pretrained(str(tmp_path))
  assert g.do_sample is True and g.temperature == 0.7 and g.top_p == 0.9 and g.top_k == 20
  assert g.max_new_tokens == 321 and g.eos_token_id == eos
  assert g.pad_token_id == (pad if pad is not None else eos[0])
  if base:
    assert g.bos_token_id == 151643                  # the base checkpoint's other fields are kept


def test_export_writes_generation_config_and_model_card(tmp_path, monkeypatch):
  """export(): the checkpoint's model, the generation config from the run's eval group, the eval table."""
  from transformers import GenerationConfig
  from papo_jax import models
  from papo_jax.models.tiny import build_tiny_checkpoint
  c = tiny_config()
  base = build_tiny_checkpoint(str(tmp_path / "base"), c.model.tiny, min_pixels=c.data.min_pixels,
                              max_pixels=c.data.max_pixels)
  model = models.from_pretrained(base, dtype="float32")
  monkeypatch.setattr(X, "load_trained_model", lambda workdir, step=None: (model, c, base, 7))
  workdir = tmp_path / "run"
  (workdir / "eval").mkdir(parents=True)
  (workdir / "eval" / "results.md").write_text("# Evaluation of run\n\n| benchmark | avg@8 |\n|---|---|\n| geometry3k | 41.25 |\n")
  out = X.export(str(workdir), str(tmp_path / "hf"))
  g = GenerationConfig.from_pretrained(out)
  assert (g.temperature, g.top_p, g.top_k, g.max_new_tokens) == (0.7, 0.9, 20, 321)
  assert g.eos_token_id == model.config.eos_token_id
  card = open(os.path.join(out, "README.md")).read()
  assert card.startswith("---\nlibrary_name: transformers")
  assert "(step 7)" in card and "| geometry3k | 41.25 |" in card and "torchvision" in card
  assert "\n### Evaluation of run\n" in card                              # the report's heading, nested
  cfg_json = card.split("## Training config")[1].split("```json\n")[1].split("```")[0]
  assert json.loads(cfg_json)["papo"]["gamma"] == c.papo.gamma            # the whole training config, as JSON
  # No eval report: the card has no evaluation section.
  out2 = X.export(str(tmp_path / "run_noeval"), str(tmp_path / "hf2"))
  assert "## Evaluation" not in open(os.path.join(out2, "README.md")).read()
  assert models.load_config(out2).eos_token_id == model.config.eos_token_id
