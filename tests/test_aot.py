"""The ahead-of-time TPU compile tool, the rollout budget and the FLOP / roofline arithmetic.

The TPU compiles need libtpu (``pip install -e '.[aot]'``); they run in a subprocess with
their own environment (the rest of the suite keeps JAX_PLATFORMS=cpu and never loads
libtpu) and are skipped, with the reason, when libtpu is not importable. PAPO_AOT_PYTHON
may name an interpreter that has it (e.g. a separate virtual environment).
"""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from papo_jax import aot, models
from papo_jax.sampling import budget

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mc(name):
  return models.from_hf_dict(aot.ARCHITECTURES[name])


# -- rollout budget ---------------------------------------------------------------------------


def test_kv_bytes_per_token_by_hand():
  assert budget.kv_bytes_per_token(_mc("Qwen2.5-VL-3B-Instruct").text) == 36 * 2 * 2 * 128 * 2
  assert budget.kv_bytes_per_token(_mc("Qwen2.5-VL-7B-Instruct").text, "float32") == 28 * 2 * 4 * 128 * 4
  assert budget.kv_bytes_per_token(_mc("Qwen3-VL-2B-Instruct").text) == 28 * 2 * 8 * 128 * 2


def test_rollout_bytes_per_prompt_by_hand():
  mc = _mc("Qwen2.5-VL-3B-Instruct")
  m = budget.rollout_bytes_per_prompt(mc, n_samples=5, prompt_len=4096, max_new_tokens=2048)
  kv = 36864
  assert m.decode_cache == 5 * 6144 * kv
  assert m.prefill_cache == 4096 * kv
  assert m.prefill_activations == 4096 * (6 * 2048 + 3 * 11008) * 2
  assert m.logits == 5 * 151936 * 4 * 6
  assert m.total == m.decode_cache + m.prefill_cache + m.prefill_activations + m.logits
  mv = budget.rollout_bytes_per_prompt(mc, n_samples=5, prompt_len=4096, max_new_tokens=2048, patches_per_prompt=5120)
  assert mv.vision == 5120 * (1176 * 4 + (6 * 1280 + 3 * 3420) * 2) and mv.total == m.total + mv.vision


def test_rollout_chunk_prompts_fits_divides_and_shards():
  mc = _mc("Qwen2.5-VL-3B-Instruct")
  kw = dict(n_samples=5, prompt_len=4096, max_new_tokens=2048)
  per = budget.rollout_bytes_per_prompt(mc, **kw).total
  # Exactly 52 prompts' worth over 8 chips: 48 is the largest multiple of 8 dividing 384 below it.
  b = budget.rollout_chunk_prompts(mc, **kw, hbm_bytes_budget=52 * per / 8 + 1, n_devices=8, total_prompts=384)
  assert b == 48 and 384 % b == 0 and b * per / 8 <= 52 * per / 8 + 1
  # A huge budget caps at the whole batch; a budget for 9 prompts on 1 chip gives 9 (no divisor needed to fit).
  assert budget.rollout_chunk_prompts(mc, **kw, hbm_bytes_budget=1e15, n_devices=8, total_prompts=384) == 384
  assert budget.rollout_chunk_prompts(mc, **kw, hbm_bytes_budget=9.5 * per, n_devices=1, total_prompts=384) == 8
  assert budget.rollout_chunk_prompts(mc, **kw, hbm_bytes_budget=9.5 * per, n_devices=1, total_prompts=387) == 9
  # Batch shards: a multiple of 4 prompts.
  assert budget.rollout_chunk_prompts(mc, **kw, hbm_bytes_budget=7 * per / 2, n_devices=2, total_prompts=100,
                                      batch_shards=4) == 4


def test_rollout_chunk_prompts_too_small_names_the_setting():
  mc = _mc("Qwen2.5-VL-3B-Instruct")
  with pytest.raises(ValueError, match="rollout.kv_budget_gb"):
    budget.rollout_chunk_prompts(mc, n_samples=5, prompt_len=4096, max_new_tokens=2048, hbm_bytes_budget=2**30,
                                 n_devices=8, total_prompts=384)


# -- analytic FLOPs and roofline ----------------------------------------------------------------


def test_matmul_params_match_the_published_parameter_counts():
  """Matmul weights by hand for the 3B; for all three the sum is within 0.1% of the published count
  (the rest are biases and norms)."""
  p = aot.matmul_params(_mc("Qwen2.5-VL-3B-Instruct"))
  assert p.text_per_token == 36 * (2048 * 128 * (2 * 16 + 2 * 2) + 3 * 2048 * 11008)
  assert p.head_per_token == 2048 * 151936
  merger = 5120 * 5120 + 5120 * 2048
  assert p.vision_per_patch == 1176 * 1280 + 32 * (4 * 1280 ** 2 + 3 * 1280 * 3420) + merger // 4
  published = {"Qwen2.5-VL-3B-Instruct": (3_754_622_976, 1), "Qwen2.5-VL-7B-Instruct": (8_292_166_656, 2),
               "Qwen3-VL-2B-Instruct": (2_127_532_032, 1)}
  for name, (count, embeddings) in published.items():
    mc = _mc(name)
    q = aot.matmul_params(mc)
    v = mc.vision
    unit = v.spatial_merge_size ** 2
    mlp = (2 if mc.model_type == "qwen3_vl" else 3) * v.hidden_size * v.intermediate_size
    mergers = (1 + len(v.deepstack_visual_indexes)) * ((v.hidden_size * unit) ** 2
                                                       + v.hidden_size * unit * v.out_hidden_size)
    vision = v.patch_dim * v.hidden_size + v.depth * (4 * v.hidden_size ** 2 + mlp) + mergers
    total = q.text_per_token + embeddings * q.head_per_token + vision + v.num_position_embeddings * v.hidden_size
    assert abs(total - count) / count < 1e-3, (name, total, count)


def test_train_step_flops_by_hand():
  """6·N·tokens + 3x forward attention, for 2 rows of 4096 + 2048 tokens and 5120 patches of the 3B."""
  mc = _mc("Qwen2.5-VL-3B-Instruct")
  rows, l, t, patches = 2, 6144, 2048, 5120 * 2
  text = 36 * (2048 * 128 * 36 + 3 * 2048 * 11008)
  head = 2048 * 151936
  vis = 1176 * 1280 + 32 * (4 * 1280 ** 2 + 3 * 1280 * 3420) + (5120 * 5120 + 5120 * 2048) // 4
  attn_text = 2.0 * rows * l * l * 16 * 128 * 36
  attn_vis = 4.0 * patches * 1280 * (4 * 5120 + 28 * 64)    # 4 full blocks, 28 windowed (8x8 patches)
  fwd = 2.0 * (text * rows * l + head * rows * t + vis * patches) + attn_text + attn_vis
  got = aot.train_step_flops(mc, rows=rows, length=l, response=t, patches=patches, patches_per_image=5120)
  assert got == pytest.approx(3 * fwd, rel=1e-12)
  got2 = aot.train_step_flops(mc, rows=rows, length=l, response=t, patches=patches, patches_per_image=5120,
                              extra_forwards=2)
  assert got2 == pytest.approx(5 * fwd, rel=1e-12)
  # Decode: 3 steps of 10 rows over a cache of prompt + steps + 1 slots.
  dec = aot.decode_flops(mc, rows=10, prompt_len=100, steps=3)
  assert dec == pytest.approx(3 * (2.0 * (text + head) * 10 + 4.0 * 10 * 104 * 16 * 128 * 36), rel=1e-12)


def test_roofline_and_mfu_by_hand():
  chip = aot.CHIPS["v5p"]
  r = aot.Report("x", 0, argument=10 * aot.GiB, output=2 * aot.GiB, alias=2 * aot.GiB, temp=50 * aot.GiB,
                 code=aot.GiB, resident=3 * aot.GiB, xla_flops=0, hlo_flops=400e12, kernel_flops=59e12,
                 model_flops=0.6 * 459e12, hbm_bytes=0.5 * 2765e9)
  t, mfu = aot.roofline(r, chip)
  assert t == pytest.approx(1.0) and mfu == pytest.approx(0.6)
  assert r.peak_bytes == 64 * aot.GiB and aot.fits(r, chip)
  # Memory-bound: 3 s of HBM traffic.
  t, mfu = aot.roofline(dataclasses.replace(r, hbm_bytes=3 * 2765e9), chip)
  assert t == pytest.approx(3.0) and mfu == pytest.approx(0.2)
  assert not aot.fits(dataclasses.replace(r, temp=90 * aot.GiB), chip)
  row = aot.table_row("3b", "v5p:2x2x1", r, chip)
  assert row.startswith("| 3b | v5p:2x2x1 | x | yes | 64.00 (95) |") and row.endswith("| 60% |")


def test_extrapolate_is_linear_in_depth():
  base = aot.Report("p", 1.0, argument=4, output=1, alias=0, temp=10, code=5, resident=0, xla_flops=100,
                    hlo_flops=200, kernel_flops=7, model_flops=9, hbm_bytes=30)
  two = dataclasses.replace(base, argument=6, temp=14, code=4, xla_flops=150, hlo_flops=300, hbm_bytes=40)
  (r,) = aot.extrapolate([base], [two], 1, 2, 36)
  assert (r.argument, r.temp, r.code, r.hlo_flops, r.hbm_bytes) == (4 + 2 * 35, 10 + 4 * 35, 5, 200 + 100 * 35,
                                                                     30 + 10 * 35)
  assert (r.kernel_flops, r.model_flops) == (7, 9) and "extrapolated" in r.note


def test_cached_point_stores_and_reuses_reports(tmp_path):
  """--save: a point's reports are stored once compiled and read back, not compiled again, by the same
  command line; another command line or depth compiles."""
  r = aot.Report("p", 1.0, argument=4, output=1, alias=0, temp=10, code=5, resident=0, xla_flops=100,
                 hlo_flops=200, kernel_flops=7, model_flops=9, hbm_bytes=30, note="n", gathered_outside_loops=3)
  path, calls = str(tmp_path / "points.json"), []
  compile_fn = lambda: calls.append(1) or [r]
  key = aot._point_key(["aot", "--layers=1", "--save=x"], 1)
  assert aot.cached_point(path, key, compile_fn) == [r] and len(calls) == 1
  assert aot.cached_point(path, aot._point_key(["aot", "--save=y", "--layers=1"], 1), compile_fn) == [r]
  assert len(calls) == 1
  aot.cached_point(path, aot._point_key(["aot", "--layers=1"], 2), compile_fn)
  assert len(calls) == 2


def test_shortened_model_keeps_the_block_mix():
  mc = aot.shortened(_mc("Qwen2.5-VL-3B-Instruct"), 9)
  assert mc.text.num_hidden_layers == 9 and mc.vision.depth == 8 and mc.vision.fullatt_block_indexes == (7,)
  q = aot.shortened(_mc("Qwen3-VL-2B-Instruct"), 7)
  assert q.vision.depth == 6 and q.vision.deepstack_visual_indexes == (5,)


def test_hlo_cost_counts_loop_trips():
  """A 7-step scan of [16, 32] @ [32, 24]: XLA's cost_analysis counts the body once; the re-count 7 times."""
  w = jnp.ones((32, 24), jnp.float32)

  def f(x_7x16x32):
    return jax.lax.scan(lambda c, x: (c + jnp.sum(x @ w), None), 0.0, x_7x16x32)[0]

  text = jax.jit(f).lower(jax.ShapeDtypeStruct((7, 16, 32), jnp.float32)).compile().as_text()
  flops, hbm = aot.hlo_cost(text)
  assert flops == 7 * 2 * 16 * 32 * 24
  assert hbm > 7 * 16 * 32 * 4      # every step reads its slice at least


def test_conv_flops_count_only_taps_on_real_input():
  """The TPU compiler's matmul-as-convolution (a 3x16 window over a 1x1 input padded by 2 and 15: one
  real tap per output) counts as the [5120, 1280] x [1280, 3840] matmul; an unpadded window counts all
  its taps; a padded, strided 1-D convolution matches a count of its taps on real input."""
  qkv = aot.conv_flops("5120,3,16,80", "bf16[5120,1280,1,1]", "bf16[3,16,80,1280]",
                       "window={size=3x16 pad=2_2x15_15 rhs_reversal=1x1}, dim_labels=bf01_01oi->b01f")
  assert qkv == 2 * 5120 * 1280 * 3 * 16 * 80
  mlp = aot.conv_flops("6144,11008,1", "bf16[6144,2,1024]", "bf16[2,1024,11008]",
                       "window={size=2}, dim_labels=b0f_0io->bf0")
  assert mlp == 2 * 6144 * 2048 * 11008
  n, w, pad, stride = 10, 3, (2, 1), 2
  out = (n + sum(pad) - w) // stride + 1
  taps = sum(1 for o in range(out) for k in range(w) if 0 <= o * stride + k - pad[0] < n)
  got = aot.conv_flops(f"4,5,{out}", f"f32[4,6,{n}]", f"f32[5,6,{w}]",
                       f"window={{size={w} stride={stride} pad={pad[0]}_{pad[1]}}}, dim_labels=bf0_oi0->bf0")
  assert got == 2 * 4 * 5 * 6 * taps
  # The same through a compiled module (XLA CPU writes the convolution with its own labels).
  x = jax.ShapeDtypeStruct((4, 6, n), jnp.float32)
  k = jax.ShapeDtypeStruct((5, 6, w), jnp.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (stride,), [pad])
  assert aot.hlo_cost(jax.jit(conv).lower(x, k).compile().as_text())[0] == got


def test_parse_hlo_joins_multi_line_kernel_configs():
  """A Mosaic kernel's backend config spans lines, one starting with '}}': the computation goes on
  after it (its later dot is counted)."""
  text = "\n".join([
      "HloModule m",
      "",
      "ENTRY %main (p0: f32[8,16], p1: f32[16,4]) -> f32[8,4] {",
      "  %p0 = f32[8,16]{1,0} parameter(0)",
      "  %p1 = f32[16,4]{1,0} parameter(1)",
      '  %k = f32[8,16]{1,0} custom-call(%p0), custom_call_target="tpu_custom_call", frontend_attributes={m={',
      '"xprof_metadata":"{}"',
      '}}, metadata={op_name="kernel"}',
      "  ROOT %d = f32[8,4]{1,0} dot(%k, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
      "}",
      ""])
  comps, entry = aot.parse_hlo(text)
  assert entry == "main" and [i[0] for i in comps["main"]] == ["p0", "p1", "k", "d"]
  assert aot.hlo_cost(text)[0] == 2 * 8 * 16 * 4


STEPPED_LOOP = """HloModule m

%cond (p: (u32[], f32[8,16])) -> pred[] {
  %p = (u32[], f32[8,16]{1,0}) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %bound = u32[] constant(BOUND)
  ROOT %lt = pred[] compare(%i, %bound), direction=LT
}

%body (q: (u32[], f32[8,16])) -> (u32[], f32[8,16]) {
  %q = (u32[], f32[8,16]{1,0}) parameter(0)
  %j = u32[] get-tuple-element(%q), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%q), index=1
  %w = f32[16,16]{1,0} constant({...})
  %d = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %step = u32[] constant(STEP)
  %next = u32[] add(%j, %step)
  ROOT %t = (u32[], f32[8,16]{1,0}) tuple(%next, %d)
}

ENTRY %main (a: f32[8,16]) -> (u32[], f32[8,16]) {
  %a = f32[8,16]{1,0} parameter(0)
  %zero = u32[] constant(START)
  %init = (u32[], f32[8,16]{1,0}) tuple(%zero, %a)
  ROOT %loop = (u32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body
}
"""


@pytest.mark.parametrize("start,bound,step,trips", [(0, 8, 1, 8), (0, 8, 2, 4), (1, 8, 2, 4), (0, 7, 2, 4)])
def test_hlo_cost_follows_the_induction_variable(start, bound, step, trips):
  """A loop the compiler unrolled steps by 2 to the same bound: half the trips of its bound."""
  text = STEPPED_LOOP.replace("BOUND", str(bound)).replace("STEP", str(step)).replace("START", str(start))
  assert aot.hlo_cost(text)[0] == trips * 2 * 8 * 16 * 16


def test_gathered_outside_loops_tells_hoisted_from_per_step_gathers():
  """A weight gathered before a 3-step scan counts outside (live across the loop); the scanned slice
  gathered in the body counts inside; bytes are the gathered (full) shapes."""
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.asarray(jax.devices()[:4]), ("fsdp",))
  full = NamedSharding(mesh, P())
  w = jax.ShapeDtypeStruct((256, 128), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
  xs = jax.ShapeDtypeStruct((3, 16, 256), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))

  def f(w, xs):
    w = jax.lax.with_sharding_constraint(w, full)
    body = lambda c, x: (c + jnp.sum(jnp.tanh(jax.lax.with_sharding_constraint(x, full) @ w)), None)
    return jax.lax.scan(body, 0.0, xs)[0]

  text = jax.jit(f).lower(w, xs).compile().as_text()
  assert aot.gathered_outside_loops(text) == (256 * 128 * 4, 16 * 256 * 4)


# -- TPU compiles (libtpu) ----------------------------------------------------------------------


def _aot_python():
  exe = os.environ.get("PAPO_AOT_PYTHON")
  if exe:
    return exe
  if importlib.util.find_spec("libtpu") is not None:
    return sys.executable
  pytest.skip("libtpu is not importable (pip install -e '.[aot]', or set PAPO_AOT_PYTHON to an interpreter "
              "that has it); TPU ahead-of-time compiles are skipped")


def _run(args, timeout=600):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
  env.update(JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=ROOT,
             TPU_ACCELERATOR_TYPE="v5litepod-4", TPU_WORKER_HOSTNAMES="localhost")
  return subprocess.run([_aot_python(), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


PALLAS_PROBE = r"""
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from papo_jax import aot
from papo_jax.models import attention
from papo_jax.parallel import use_mesh_rules
devs = aot.get_target("v5e:2x2").devices
mesh = Mesh(np.asarray(devs).reshape(4, 1, 1), ("data", "fsdp", "tensor"))
x = jax.ShapeDtypeStruct((4, 256, 2, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
s = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=NamedSharding(mesh, P("data")))
# A fresh jit each time: jit's trace cache does not see the context.
f = lambda: jax.jit(lambda q, k, v, seg: attention.causal_attention(q, k, v, seg, scale=0.1, backend="pallas_tpu",
                                                                    block=128))
with aot.tpu_attention_target(), use_mesh_rules(mesh):   # the kernel runs per shard (shard_map)
  assert attention._platform() == "tpu" and attention.resolve_backend("auto") == "pallas_tpu"
  tpu = f().lower(x, x, x, s).as_text()
# Outside the context attention sees the host backend again (interpret mode off TPU).
print("MOSAIC" if "tpu_custom_call" in tpu else "NO-MOSAIC", attention._platform(), attention.resolve_backend("auto"))
"""


def test_pallas_attention_lowers_through_mosaic_for_a_tpu_target():
  r = _run(["-c", PALLAS_PROBE], timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "MOSAIC cpu xla" in r.stdout, r.stdout + r.stderr[-2000:]


def test_tiny_config_compiles_for_a_tpu_topology():
  """The tool end to end: the tiny config's train step, prefill and decode for v5e:2x2 (small shapes, XLA
  attention to keep CI fast; the Mosaic path is the test above), a markdown row each, exit status 0."""
  r = _run(["-m", "papo_jax.aot", "--config=configs/tiny.py", "--topology=v5e:2x2", "--prompt_len=64",
            "--programs=train_step,prefill,decode", "--config.model.attention=xla", "--config.data.batch_size=8",
            "--config.rollout.n=2", "--config.rollout.max_new_tokens=8"])
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  out = r.stdout
  for program in ("train_step", "prefill", "decode"):
    assert f"| tiny.py | v5e:2x2 | {program}" in out, out
  assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1} on 4 x TPU v5 lite" in out
  assert out.count(": fits") == 3


def test_engine_step_compiles_with_the_ragged_kernel_for_a_tpu_topology(tmp_path):
  """engine_step / engine_decode of the tiny model in bf16 (head_dim 128, the kernel's lane width) on one
  chip of v5e:2x2: the ragged paged attention kernel lowers through Mosaic, one pallas_call per layer
  reading that layer's page pool; weights and KV pool are reported, a markdown row each, exit status 0."""
  import glob
  import re
  r = _run(["-m", "papo_jax.aot", "--config=configs/tiny.py", "--topology=v5e:2x2", "--prompt_len=64",
            "--programs=engine_step,engine_decode", "--config.model.tiny.hidden_size=256",
            "--config.model.tiny.num_attention_heads=2", "--config.model.dtype=bfloat16",
            "--config.rollout.cache_dtype=bfloat16", "--config.data.batch_size=8", "--config.rollout.n=2",
            "--config.rollout.max_new_tokens=8", "--config.rollout.num_slots=4", "--config.rollout.kv_pages=64",
            "--config.rollout.prefill_chunk=16", "--config.rollout.prefill_lanes=2", f"--hlo_dir={tmp_path}"])
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  out = r.stdout
  for program in ("engine_step", "engine_decode"):
    assert f"| tiny.py | v5e:2x2 | {program} (1 chip: weights" in out, out
    text = open(glob.glob(str(tmp_path / f"{program}.*.hlo.txt"))[0]).read()
    kernel = r"%ragged_paged_attention_kernel\S* = (\S+) custom-call\(.*custom_call_target=\"tpu_custom_call\""
    calls = re.findall(kernel, text)
    assert len(calls) == 2, calls                       # one per decoder layer
    assert all(c.startswith("bf16[") for c in calls)
  assert "KV pool 0.00 GiB (64 pages x 16 = 1024 tokens)" in out
  assert out.count(": fits") == 2


# -- the abstract train batch follows the trainer's layout -------------------------------------


@pytest.mark.parametrize("data,fsdp,n,rows_per_micro", [(2, 2, 2, 8), (1, 4, 4, 4), (4, 1, 3, 12), (2, 1, 4, 6)])
def test_train_batch_specs_match_the_assembled_batch(data, fsdp, n, rows_per_micro):
  """Shapes, dtypes and shardings of train_batch_specs equal what assemble_train_batch + global_train_arrays
  produce for full-size images (the per-shard layout, one copy of each prompt's image per shard)."""
  import numpy as np
  from papo_jax.parallel import batch_shards, global_train_arrays, make_mesh
  from papo_jax.rl import batching
  mc = models.from_hf_dict(aot.ARCHITECTURES["Qwen2.5-VL-3B-Instruct"]).replace(dtype="bfloat16")
  mesh = make_mesh(data, fsdp, 1, devices=jax.devices()[:data * fsdp])
  micro, lp, t, grid = 2, 6, 3, (1, 4, 8)
  s = aot.Shapes(lp, t, rows_per_micro, micro, 1, 1, int(np.prod(grid)), n)
  groups = [batching.Group(np.ones(lp, np.int32), np.ones(lp, np.int32),
                           np.zeros((32, mc.vision.patch_dim), np.float32), np.zeros((32, mc.vision.patch_dim), np.float32),
                           np.asarray([grid]), np.ones((n, t), np.int32), np.ones((n, t), np.int32), np.zeros(n))
            for _ in range(micro * rows_per_micro // n)]
  arrays = batching.assemble_train_batch(groups, micro_batches=micro, pad_id=0, shards=batch_shards(mesh),
                                         pixel_dtype=mc.dtype)
  real = global_train_arrays(arrays, mesh)
  spec, patches = aot.train_batch_specs(mc, mesh, dataclasses.replace(s, response_len=t), micro_batches=micro,
                                        with_mask=True)
  for k, a in real.items():
    sd = getattr(spec, k)
    assert (sd.shape, sd.dtype) == (a.shape, a.dtype), (k, sd.shape, sd.dtype, a.shape, a.dtype)
    assert sd.sharding.spec == a.sharding.spec, (k, sd.sharding.spec, a.sharding.spec)
  assert patches == arrays["pixel_values"].shape[1] * arrays["pixel_values"].shape[2]


def test_trainer_rollout_chunk_from_config():
  """rollouts.rollout_chunk_prompts: a fixed chunk, one sized from kv_budget_gb per chip over the batch
  shards (the budget module's answer), and no chunking when the devices report no memory (CPU)."""
  from papo_jax.config_base import paper_config
  from papo_jax.parallel import make_mesh
  from papo_jax.rollouts import rollout_chunk_prompts
  c = paper_config("papo_g", micro_batches=16)
  mc = _mc("Qwen2.5-VL-3B-Instruct")
  mesh = make_mesh(1, -1, 1)
  assert rollout_chunk_prompts(c, mc, mesh, total_prompts=384) == 0   # CPU devices: no memory_stats
  c.rollout.kv_budget_gb = 6.5
  want = budget.rollout_chunk_prompts(mc, n_samples=5, prompt_len=4096, max_new_tokens=2048,
                                      hbm_bytes_budget=6.5 * 2**30, n_devices=8, total_prompts=384, batch_shards=8,
                                      patches_per_prompt=5120)
  assert rollout_chunk_prompts(c, mc, mesh, total_prompts=384) == want == 24
  c.rollout.chunk_prompts = 48
  assert rollout_chunk_prompts(c, mc, mesh, total_prompts=384) == 48
