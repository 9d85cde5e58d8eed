"""Every paper config and variant carries the constants of papo.md §2."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# run -> (eps_high, beta, gamma, eta_ori/eta_mask, dynamic sampling), from the spec's table.
EXPECTED = {
    ("qwen25vl_3b", "grpo"): (0.3, 0.01, 0.0, 0.0, False),
    ("qwen25vl_3b", "papo_g"): (0.3, 0.01, 0.02, 0.0, False),
    ("qwen25vl_7b", "grpo"): (0.3, 0.01, 0.0, 0.0, False),
    ("qwen25vl_7b", "papo_g"): (0.3, 0.01, 0.02, 0.05, False),
    ("qwen25vl_3b", "papo_g_no_ref_kl"): (0.3, 0.0, 0.01, 0.03, False),
    ("qwen25vl_7b", "papo_g_no_ref_kl"): (0.3, 0.0, 0.01, 0.03, False),
    ("qwen25vl_3b", "dapo"): (0.28, 0.0, 0.0, 0.0, True),
    ("qwen25vl_7b", "dapo"): (0.28, 0.0, 0.0, 0.0, True),
    ("qwen25vl_3b", "papo_d"): (0.28, 0.0, 0.01, 0.03, True),
    ("qwen25vl_7b", "papo_d"): (0.28, 0.0, 0.01, 0.03, True),
    ("qwen3vl_2b", "grpo"): (0.3, 0.01, 0.0, 0.0, False),
    ("qwen3vl_2b", "papo_g"): (0.3, 0.01, 0.01, 0.0, False),
}


def load(name, variant):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert "python -m papo_jax.train" in mod.__doc__  # the docstring gives the run command
  return mod.get_config(variant)


@pytest.mark.parametrize("run", sorted(EXPECTED))
def test_paper_constants(run):
  c = load(*run)
  eps_high, beta, gamma, eta, dynamic = EXPECTED[run]
  assert (c.algo.eps_low, c.algo.eps_high, c.algo.dual_clip) == (0.2, eps_high, 3.0)
  assert c.algo.beta == beta and c.papo.gamma == gamma
  assert c.papo.eta_ori == c.papo.eta_mask == eta
  assert c.algo.dynamic_sampling == dynamic
  assert c.data.mask.enabled == (gamma > 0 or eta > 0)
  assert (c.data.batch_size, c.rollout.n, c.optim.mini_batches, c.optim.lr) == (384, 5, 3, 1e-6)
  assert (c.data.min_pixels, c.data.max_pixels) == (200704, 1003520)
  assert (c.optim.weight_decay, c.optim.grad_clip, c.optim.b1, c.optim.b2) == (0.01, 1.0, 0.9, 0.999)
  assert (c.rollout.temperature, c.rollout.top_p, c.rollout.max_new_tokens) == (1.0, 0.99, 2048)


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="papo_x"):
    load("qwen25vl_3b", "papo_x")


# NoisyRollout's released scripts (John-AI-Lab/NoisyRollout, training_scripts/*_noisyrollout.sh, Geometry3K):
# worker.rollout.n=6 clean + 6 noisy, gaussian_noise_step=500, decay_mode=sigmoid, decay_coef=30,
# decay_sig_mid_step=40.
NOISY = dict(enabled=True, rollouts=6, strength=500, decay_mode="sigmoid", decay_coef=30.0, mid_step=40.0)


@pytest.mark.parametrize("name", ["qwen25vl_3b", "qwen25vl_7b"])
@pytest.mark.parametrize("variant,base", [("noisy_rollout", "grpo"), ("papo_noisy", "papo_g")])
def test_noisy_variants_are_their_base_plus_noisyrollouts_values(name, variant, base):
  from papo_jax.config_base import validate_config
  c, ref = load(name, variant), load(name, base)
  assert c.noisy.to_dict() == NOISY and not ref.noisy.enabled
  assert c.rollout.n == 12   # one group: 6 clean + 6 noisy rollouts
  # Everything else is the base variant's (papo.md §2), except how many micro-batches hold the 12 rollouts:
  # never more rows per micro-batch than the base run.
  rows = lambda x: x.data.batch_size * x.rollout.n // (x.optim.mini_batches * x.optim.micro_batches)
  assert rows(c) <= rows(ref) and rows(c) * c.optim.mini_batches * c.optim.micro_batches == 384 * 12
  for group in ref:
    if group not in ("noisy",):
      want = ref[group].to_dict()
      got = c[group].to_dict()
      if group == "rollout":
        want.pop("n"), got.pop("n")
      if group == "optim":
        want.pop("micro_batches"), got.pop("micro_batches")
      assert got == want, group
  c.model.init = "tiny_random"   # no checkpoint here; everything else as configured
  c.data.source, c.data.path = "synthetic", ""
  validate_config(c)


# VPPO's released 7B run (github.com/huaixuheqing/VPPO-RL examples/configs/train_vppo_7b.sh on
# examples/configs/config.yaml): top_p_perception_tokens, advantage_scaling_min, entropy_penalty_coef,
# rollout n, clip_ratio_high, online_filtering (0.01, 0.99), disable_kl; perc_utils.py's
# random_patch_blackening(patch_size=14, black_prob=0.5) on the resized image.
VPPO_PAPER = dict(top_frac=0.4, adv_scale_min=0.9, entropy_penalty=0.06, n=8, eps_high=0.28, beta=0.0,
                  dynamic=True, mask=("patch", 0.5, 14, False))


@pytest.mark.parametrize("name", ["qwen25vl_3b", "qwen25vl_7b", "tiny"])
def test_vppo_variants_carry_the_authors_constants(name):
  from papo_jax.config_base import step_config
  from papo_jax.train import train_data_config
  v = VPPO_PAPER
  c = load(name, "vppo")
  assert (c.vppo.top_frac, c.vppo.adv_scale_min, c.vppo.dependency) == (v["top_frac"], v["adv_scale_min"], "k3")
  assert (c.vppo.minmax_chunk, c.vppo.mean_chunk) == (0, 0)   # normalised over the whole update batch
  assert (c.papo.eta_ori, c.papo.eta_mask, c.papo.gamma, c.papo.adaptive_gamma) == (v["entropy_penalty"], 0.0, 0.0,
                                                                                   False)
  assert (c.algo.name, c.algo.eps_low, c.algo.eps_high, c.algo.beta) == ("dapo", 0.2, v["eps_high"], v["beta"])
  assert c.algo.dynamic_sampling == v["dynamic"] and (c.algo.dapo_acc_low, c.algo.dapo_acc_high) == (0.01, 0.99)
  assert c.rollout.n == v["n"]
  assert (c.data.mask.mode, c.data.mask.ratio, c.data.mask.patch_size, c.data.mask.exact_ratio) == v["mask"]
  sc = step_config(c)
  assert sc.loss.vppo_top_frac == 0.4 and sc.loss.vppo_adv_scale_min == 0.9 and sc.loss.group_size == v["n"]
  assert sc.needs_mask and sc.needs_logprob_pass and not sc.needs_ref
  # the data pipeline makes the masked copies the step reads
  assert c.data.mask.enabled and train_data_config(c).mask.enabled
  if name != "tiny":   # the paper's data and optimizer settings
    assert (c.data.batch_size, c.optim.mini_batches, c.optim.lr, c.rollout.max_new_tokens) == (384, 3, 1e-6, 2048)
    assert (c.optim.weight_decay, c.optim.grad_clip, c.rollout.temperature, c.rollout.top_p) == (0.01, 1.0, 1.0, 0.99)
    assert c.data.batch_size * c.rollout.n // c.optim.mini_batches // c.optim.micro_batches <= {
        "qwen25vl_3b": 40, "qwen25vl_7b": 20}[name]   # no more rows per micro-batch than at n=5


@pytest.mark.parametrize("name", ["qwen25vl_3b", "qwen25vl_7b", "tiny"])
def test_papo_vppo_is_papo_g_with_vppo_loss_terms(name):
  from papo_jax.config_base import step_config
  c, g = load(name, "papo_vppo"), load(name, "papo_g")
  assert (c.vppo.top_frac, c.vppo.adv_scale_min) == (0.4, 0.9)
  assert c.papo.eta_ori == 0.06 and c.papo.eta_mask == 0.0
  assert g.vppo.top_frac == -1 and g.vppo.adv_scale_min == -1
  for field in ("algo", "rollout", "data"):   # PAPO-G's sampling, clip, reference KL, n and masked copy
    assert c[field].to_dict() == g[field].to_dict(), field
  assert c.papo.gamma == g.papo.gamma and step_config(c).needs_logprob_pass


@pytest.mark.parametrize("field,value", [("vppo.top_frac", 0.4), ("vppo.adv_scale_min", 0.0),
                                         ("papo.adaptive_gamma", True)])
def test_visual_dependency_turns_the_masked_copies_on(field, value):
  """Any option that reads the visual dependency makes the step read, and the pipeline make, masked copies."""
  from papo_jax.config_base import perception_terms, step_config
  from papo_jax.train import train_data_config
  c = load("qwen25vl_3b", "grpo")
  assert not step_config(c).needs_mask and not train_data_config(c).mask.enabled
  group, name = field.split(".")
  c[group][name] = value
  assert step_config(c).needs_mask and perception_terms(c).needs_mask and train_data_config(c).mask.enabled
