"""Bad settings stop at start-up with the field's name, before anything is built or written."""

import importlib.util
import os

import pytest

from papo_jax.config_base import ConfigError, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(variant="papo_g"):
  spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "configs", "tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def test_tiny_config_is_valid():
  validate_config(tiny())
  validate_config(tiny("qwen3_papo_d"))
  validate_config(tiny("vppo"))
  validate_config(tiny("papo_vppo"))


@pytest.mark.parametrize("field,value,named", [
    ("model.init", "pretrained", "model.path"),   # pretrained without a checkpoint
    ("model.init", "random", "model.init"),
    ("rollout.n", 0, "rollout.n"),
    ("optim.micro_batches", 7, "optim.micro_batches"),   # 16 x 5 rollouts do not split into 7
    ("algo.name", "ppo", "algo.name"),
    ("algo.dapo_chunk", 0, "algo.dapo_chunk"),
    ("monitor.action", "panic", "monitor.action"),
    ("reward.format_mode", "xml", "reward.format_mode"),
    ("model.attention", "flash", "model.attention"),
    ("data.path", "/nonexistent/train.parquet", "data.path"),   # the synthetic source reads no files
    ("vppo.top_frac", 1.5, "vppo.top_frac"),
    ("vppo.top_frac", 0.0, "vppo.top_frac"),                    # off is -1
    ("vppo.adv_scale_min", 1.5, "vppo.adv_scale_min"),
    ("vppo.minmax_chunk", 7, "vppo.minmax_chunk"),              # 16 x 8 rows per update
    ("vppo.mean_chunk", 3, "vppo.mean_chunk"),
    ("vppo.dependency", "kl", "vppo.dependency"),
    ("papo.adaptive_gamma_max", 0.0, "papo.adaptive_gamma_max"),
])
def test_error_names_the_field(field, value, named):
  c = tiny()
  group, name = field.split(".")
  c[group][name] = value
  with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
    validate_config(c)


@pytest.mark.parametrize("source,path", [
    ("parquet", "/nonexistent/train.parquet"),
    ("parquet", "/nonexistent/dir/*.parquet"),
    ("jsonl", "/nonexistent.jsonl"),
    ("hf_datasets", "/nonexistent"),
    ("parquet", ""),
])
def test_missing_data_files_fail_at_start_up(source, path):
  c = tiny()
  c.data.source, c.data.path = source, path
  with pytest.raises(ConfigError, match=r"data\.path"):
    validate_config(c)


def test_existing_data_files_pass(tmp_path):
  c = tiny()
  (tmp_path / "a.parquet").write_bytes(b"")
  (tmp_path / "b.jsonl").write_text("")
  for source, path in (("parquet", tmp_path / "a.parquet"), ("parquet", tmp_path), ("parquet", tmp_path / "*.parquet"),
                       ("jsonl", tmp_path / "b.jsonl"), ("parquet", "gs://bucket/train.parquet")):
    c.data.source, c.data.path = source, str(path)
    validate_config(c)


def test_held_out_path_is_checked_too():
  c = tiny()
  c.val.source, c.val.path = "parquet", "/nonexistent/val.parquet"
  with pytest.raises(ConfigError, match=r"val\.path"):
    validate_config(c)


def test_command_line_error_exits_before_writing(tmp_path):
  """The program itself: a bad field exits with status 2 and its name, and creates no workdir."""
  import subprocess
  import sys
  wd = str(tmp_path / "never")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-m", "papo_jax.train", f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
                      f"--workdir={wd}", "--config.data.path=/nonexistent"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "data.path" in r.stderr
  assert not os.path.exists(wd)


def test_unknown_field_and_wrong_type_are_refused_by_the_locked_config():
  """What ``--config.model.no_such_field=1`` / ``--config.rollout.n=five`` hit (config_flags locks the config)."""
  c = tiny()
  c.lock()
  with pytest.raises(AttributeError, match="no_such_field"):
    c.model.no_such_field = 1
  with pytest.raises(TypeError):
    c.rollout.n = "five"


def test_adaptive_gamma_needs_gamma_and_whole_groups_per_update():
  c = tiny("papo_g")
  c.papo.adaptive_gamma = True
  validate_config(c)
  c.optim.mini_batches = 2      # 16 prompts x 8 split in 2 updates of whole groups
  validate_config(c)
  c.data.batch_size, c.optim.mini_batches = 3, 2   # 24 rows: 12 per update cut a group of 8
  c.optim.micro_batches = 1
  with pytest.raises(ConfigError, match=r"papo\.adaptive_gamma"):
    validate_config(c)
  c = tiny("grpo")
  c.papo.adaptive_gamma = True
  with pytest.raises(ConfigError, match=r"papo\.adaptive_gamma"):
    validate_config(c)
