r"""Ahead-of-time TPU compile of what the trainer runs, on any host: memory, FLOPs, roofline.

    pip install -e '.[aot]'        # libtpu: the TPU compiler, no TPU needed
    python -m papo_jax.aot --config=configs/qwen25vl_3b.py:papo_g --topology=v5e:2x4
    python -m papo_jax.aot --config=configs/qwen25vl_7b.py --topology=v5p:2x2x1 --config.optim.micro_batches=64
    python -m papo_jax.aot --config=configs/qwen25vl_3b.py --topology=v5e:2x4 --layers=2   # quick: extrapolated

The model is built abstractly (``nnx.eval_shape``: no weights) from the checkpoint's
``config.json`` when ``model.path`` has one, else from the published architecture of the
config (:data:`ARCHITECTURES`), sharded with the project's logical rules
(``papo_jax/parallel/sharding.py``) on the topology's devices, and these jitted programs
are lowered and compiled for the TPU exactly as ``train.py`` builds them:

* ``train_step``: ``rl/train_step.make_train_step`` over one update (``optim.micro_batches``
  micro-batches; with the log-prob pass the log-probs are precomputed inputs);
* ``logprob_pass``: ``make_logprob_pass`` over a whole step's rows, as the trainer runs it
  (``optim.mini_batches > 1``, or a loss with whole-batch factors: ``StepConfig.needs_logprob_pass``);
* ``prefill`` / ``decode``: the sampler's own jitted programs at the rollout chunk size
  (``rollout.chunk_prompts``, or sized by ``papo_jax/sampling/budget.py``);
* ``engine_step`` / ``engine_decode``: the continuous engine's step (mixed prefill + decode;
  decode only) on one chip, as one engine per chip runs it (bf16 weights and its own page
  pool of ``rollout.kv_pages``, beside the chip's share of the training state), attending
  with the Pallas ragged paged attention kernel.

Per program it prints compile time, per-chip bytes (arguments, outputs, temporaries, code,
plus the training state that stays resident beside it) against the chip's HBM, FLOPs
(XLA's ``cost_analysis``, which counts a loop body once and leaves Pallas kernels out; the
same module's dots re-counted with their loops' trip counts plus the Pallas attention
counted analytically; and the analytic model FLOPs 6·N·tokens / 2·N·tokens, vision tower
and attention included), a roofline time and the implied MFU bound, then a markdown row
per program for docs/tpu.md. It exits with status 1 when a program does not fit, naming
the setting to change.

Attention picks its paths for the platform it is traced for; the host here is ``cpu``, so
tracing runs under :func:`papo_jax.models.attention.target_platform` set to ``tpu`` (the
splash kernels then lower through Mosaic for the TPU instead of interpret mode).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable

if __name__ == "__main__":
  # As a program (before jax is imported): JAX must not look for a local TPU, the TPU is only a
  # compile target; several compiles may load libtpu at once. Importing this module as a
  # library changes no environment.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")   # quiets libtpu's host probing
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

GiB = 2 ** 30
HLO_DIR = ""   # --hlo_dir: where compiled modules are written as text

# ============================================================================================
# Hardware
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip peaks (Cloud TPU documentation): dense bf16 TFLOP/s, HBM GiB, HBM GB/s."""
  name: str
  bf16_tflops: float
  hbm_gib: float
  hbm_gbps: float


CHIPS = {
    "v4": Chip("v4", 275.0, 32.0, 1200.0),
    "v5e": Chip("v5e", 197.0, 16.0, 819.0),
    "v5p": Chip("v5p", 459.0, 95.0, 2765.0),
    "v6e": Chip("v6e", 918.0, 32.0, 1640.0),
}

# Topology names accepted by libtpu's topology description, e.g. v5e:2x4 (v5e-8), v5p:2x2x1
# (v5p-8, 4 chips), v5p:2x2x2 (v5p-16), v6e:2x4, v4:2x2x1 (v4-8).


@dataclasses.dataclass(frozen=True)
class Target:
  topology: str
  chip: Chip
  devices: tuple
  chips: int

  @property
  def per_device(self) -> Chip:
    """A device's share of its chip (v4 exposes both TensorCores of a chip as two devices)."""
    k = len(self.devices) / self.chips
    c = self.chip
    return Chip(c.name, c.bf16_tflops / k, c.hbm_gib / k, c.hbm_gbps / k)


def get_target(topology: str) -> Target:
  from jax.experimental import topologies
  gen, _, dims = topology.partition(":")
  if gen not in CHIPS or not dims:
    raise ValueError(f"--topology {topology!r}: expected GEN:AxB[xC] with GEN one of {sorted(CHIPS)} "
                     "(e.g. v5e:2x4, v5p:2x2x1, v6e:2x4, v4:2x2x1)")
  shape = tuple(int(d) for d in dims.split("x"))
  bounds = (min(shape[0], 2), min(shape[1] if len(shape) > 1 else 1, 2), 1)
  topo = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                      chips_per_host_bounds=bounds, num_slices=1)
  return Target(topology, CHIPS[gen], tuple(topo.devices), math.prod(shape))


# ============================================================================================
# Architectures (published Hugging Face config.json contents; /work/shared/spec/qwen_vl.md §3)
# ============================================================================================

_QWEN25_TOKENS = dict(bos_token_id=151643, eos_token_id=151645, image_token_id=151655, video_token_id=151656,
                      vision_start_token_id=151652, vision_end_token_id=151653)

ARCHITECTURES: dict[str, dict] = {
    "Qwen2.5-VL-3B-Instruct": dict(
        model_type="qwen2_5_vl", vocab_size=151936, hidden_size=2048, intermediate_size=11008,
        num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_theta=1e6, max_position_embeddings=128000, tie_word_embeddings=True,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, **_QWEN25_TOKENS,
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")),
    "Qwen2.5-VL-7B-Instruct": dict(
        model_type="qwen2_5_vl", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
        rope_theta=1e6, max_position_embeddings=128000, tie_word_embeddings=False,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, **_QWEN25_TOKENS,
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")),
    "Qwen3-VL-2B-Instruct": dict(
        model_type="qwen3_vl", tie_word_embeddings=True, image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653,
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                         max_position_embeddings=262144, tie_word_embeddings=True, attention_bias=False,
                         rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20],
                                       "mrope_interleaved": True},
                         rope_theta=5e6, bos_token_id=151643, eos_token_id=151645),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           hidden_act="gelu_pytorch_tanh", num_position_embeddings=2304,
                           deepstack_visual_indexes=[5, 11, 17])),
}

# configs/<name>.py -> its checkpoint's architecture.
CONFIG_ARCHITECTURE = {"qwen25vl_3b": "Qwen2.5-VL-3B-Instruct", "qwen25vl_7b": "Qwen2.5-VL-7B-Instruct",
                       "qwen3vl_2b": "Qwen3-VL-2B-Instruct"}


def hf_architecture(c, config_path: str = "", arch: str = "") -> dict:
  """The config.json dict for a run config: the checkpoint's, the named architecture, or the tiny model's."""
  if c.model.init == "pretrained" and c.model.path and os.path.exists(os.path.join(c.model.path, "config.json")):
    with open(os.path.join(c.model.path, "config.json")) as f:
      return json.load(f)
  if c.model.init == "tiny_random":   # the trainer's tiny checkpoint config, with its tokenizer's ids
    import tempfile
    from papo_jax.data import tiny_tokenizer
    from papo_jax.models.tiny import tiny_model_config
    with tempfile.TemporaryDirectory() as d:
      ids = tiny_tokenizer.build_tiny_checkpoint_files(d, family=c.model.tiny.family)
    return tiny_model_config(c.model.tiny, ids)
  name = arch or CONFIG_ARCHITECTURE.get(os.path.splitext(os.path.basename(config_path.split(":")[0]))[0], "")
  if name not in ARCHITECTURES:
    raise ValueError(f"no checkpoint config.json under model.path={c.model.path!r} and no known architecture "
                     f"for {config_path!r}; pass --arch, one of {sorted(ARCHITECTURES)}")
  return ARCHITECTURES[name]


def target_attention(name: str) -> str:
  """``auto`` resolves to the TPU kernel when compiling for a TPU (the host's backend is irrelevant)."""
  return "pallas_tpu" if name == "auto" else name


def model_config(c, hf: dict, *, layers: int | None = None):
  """ModelConfig with the run's dtypes/remat/attention; ``layers`` shortens the decoder and the vision tower
  in proportion (for extrapolation)."""
  from papo_jax import models
  from papo_jax.models.limits import max_image_patches
  mc = models.from_hf_dict(hf, dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat,
                           attention=target_attention(c.model.attention), attention_block=c.model.attention_block,
                           gather_weights=c.model.gather_weights)
  mc = mc.replace(max_image_patches=max_image_patches(c.data.max_pixels, mc.vision.patch_size), hf_dict=None)
  if layers is not None:
    mc = shortened(mc, layers)
  return mc


def shortened(mc, layers: int):
  """The decoder cut to ``layers`` and the vision tower to the same fraction of its blocks."""
  t, v = mc.text, mc.vision
  layers = max(1, min(layers, t.num_hidden_layers))
  depth = max(1, round(v.depth * layers / t.num_hidden_layers))
  # Keep the full-attention blocks' share: every (depth_full / n_full)-th block, at least one.
  period = v.depth // max(1, len(v.fullatt_block_indexes)) if v.fullatt_block_indexes else 0
  full = tuple(i for i in range(depth) if period and i % period == period - 1) or (
      (depth - 1,) if v.fullatt_block_indexes else ())
  deep = tuple(i for i in v.deepstack_visual_indexes if i < depth)[:layers]
  return mc.replace(text=dataclasses.replace(t, num_hidden_layers=layers),
                    vision=dataclasses.replace(v, depth=depth, fullatt_block_indexes=full,
                                               deepstack_visual_indexes=deep))


# ============================================================================================
# Analytic FLOPs
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class MatmulParams:
  """Weights that multiply each token (2 FLOPs per weight per token in a forward pass)."""
  text_per_token: int       # all decoder layers
  head_per_token: int       # lm_head (only where logits are formed)
  vision_per_patch: int     # patch embed + blocks + merger(s) share per patch


def matmul_params(mc) -> MatmulParams:
  t, v = mc.text, mc.vision
  d, hd = t.hidden_size, t.head_dim
  layer = d * hd * (2 * t.num_attention_heads + 2 * t.num_key_value_heads) + 3 * d * t.intermediate_size
  dv = v.hidden_size
  mlp = (2 if mc.model_type == "qwen3_vl" else 3) * dv * v.intermediate_size
  block = 4 * dv * dv + mlp
  unit = v.spatial_merge_size ** 2
  merger = (dv * unit) ** 2 + dv * unit * v.out_hidden_size          # per merged token
  mergers = 1 + len(v.deepstack_visual_indexes)
  per_patch = v.patch_dim * dv + v.depth * block + mergers * merger // unit
  return MatmulParams(t.num_hidden_layers * layer, d * t.vocab_size, per_patch)


def attention_flops_causal(mc, rows: int, length: int) -> float:
  """Forward FLOPs of causal attention over ``length`` tokens (QK^T and PV, lower triangle)."""
  t = mc.text
  return 2.0 * rows * length * length * t.num_attention_heads * t.head_dim * t.num_hidden_layers


def attention_flops_decode(mc, rows: int, cache_len: int) -> float:
  """Forward FLOPs of one decode step attending densely over ``cache_len`` slots."""
  t = mc.text
  return 4.0 * rows * cache_len * t.num_attention_heads * t.head_dim * t.num_hidden_layers


def attention_flops_vision(mc, patches: int, patches_per_image: int) -> float:
  """Forward FLOPs of the vision tower's attention: windowed blocks (window² patches) and full blocks."""
  v = mc.vision
  full = len(v.fullatt_block_indexes) if mc.model_type != "qwen3_vl" else v.depth
  window = (v.window_size // v.patch_size) ** 2 if mc.model_type != "qwen3_vl" else patches_per_image
  per = 4.0 * patches * v.hidden_size
  return per * (full * patches_per_image + (v.depth - full) * min(window, patches_per_image))


def forward_flops(mc, *, rows: int, length: int, logit_tokens: int, patches: int, patches_per_image: int,
                  attention: bool = True) -> float:
  """One forward pass: 2·N per token (decoder over rows·length, head over logit tokens, vision over patches)."""
  p = matmul_params(mc)
  f = 2.0 * (p.text_per_token * rows * length + p.head_per_token * logit_tokens + p.vision_per_patch * patches)
  if attention:
    f += attention_flops_causal(mc, rows, length) + attention_flops_vision(mc, patches, patches_per_image)
  return f


def train_step_flops(mc, *, rows: int, length: int, response: int, patches: int, patches_per_image: int,
                     extra_forwards: int = 0) -> float:
  """Model FLOPs of one update: forward + backward (3x forward) of the policy, plus forward-only passes
  (masked images, reference) not precomputed. Remat recompute is not model FLOPs and is left out."""
  fwd = forward_flops(mc, rows=rows, length=length, logit_tokens=rows * response, patches=patches,
                      patches_per_image=patches_per_image)
  return (3 + extra_forwards) * fwd


def decode_flops(mc, *, rows: int, prompt_len: int, steps: int) -> float:
  """All decode steps (the loop's maximum trip count): 2·N per token plus attention over the cache."""
  p = matmul_params(mc)
  per_step = 2.0 * (p.text_per_token + p.head_per_token) * rows
  return steps * per_step + steps * attention_flops_decode(mc, rows, prompt_len + steps + 1)


# ============================================================================================
# HLO re-count: dot/convolution FLOPs and HBM bytes with loop trip counts
# ============================================================================================

_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|f8\w*|bf16|f16|f32|f64|c64|c128)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_NO_TRAFFIC = {"parameter", "tuple", "get-tuple-element", "constant", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "iota"}


def _dims(s: str) -> tuple[int, ...]:
  return tuple(int(x) for x in s.split(",") if x)


def _shape_bytes(shape: str) -> int:
  total = 0
  for dt, dims in _SHAPE.findall(shape):
    total += math.prod(_dims(dims)) * _BYTES.get(dt, 1)
  return total


def _split_instruction(line: str):
  m = re.match(r"\s*(?:ROOT )?%([^\s=]+) = (.*)$", line)
  if not m:
    return None
  name, rest = m.groups()
  if rest.startswith("("):
    depth = 0
    for j, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        break
    shape, rest = rest[:j + 1], rest[j + 2:]
  else:
    shape, _, rest = rest.partition(" ")
  op, _, args = rest.partition("(")
  depth, j = 1, 0
  for j, ch in enumerate(args):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      break
  return name, shape, op, re.findall(r"%([^\s,()]+)", args[:j]), args[j + 1:]


def _instruction_lines(text: str):
  """The module's lines with multi-line instructions joined: a Mosaic kernel's backend config carries
  newlines, so some of its lines start at column 0, even with ``}}`` (not a computation's end)."""
  out = []
  for line in text.splitlines():
    if out and line and not line[0].isspace() and line.rstrip() != "}" and not re.match(r"(ENTRY )?%\S+ \(", line) \
        and out[-1].startswith(" "):
      out[-1] += " " + line
    else:
      out.append(line)
  return out


def parse_hlo(text: str) -> tuple[dict, str]:
  """{computation: [(name, shape, op, operands, attrs)]} and the entry computation's name."""
  comps, entry, cur = {}, "", None
  for line in _instruction_lines(text):
    m = re.match(r"^(ENTRY )?%(\S+) \(.*\) -> .*\{\s*$", line)
    if m:
      cur = m.group(2)
      comps[cur] = []
      if m.group(1):
        entry = cur
      continue
    if line.rstrip() == "}":
      cur = None
      continue
    if cur is not None:
      ins = _split_instruction(line)
      if ins:
        comps[cur].append(ins)
  return comps, entry


def _window_taps(n: int, w: int, out: int, stride: int, lo: int, lhs_dilate: int, rhs_dilate: int) -> int:
  """(output position, window tap) pairs of one spatial dimension that read a real input element
  (not padding, not a dilation hole)."""
  pairs = 0
  for k in range(w):
    if lhs_dilate == 1:
      first = max(0, -((k * rhs_dilate - lo) // stride))                   # o * stride + k * rd - lo >= 0
      last = min(out - 1, (n - 1 + lo - k * rhs_dilate) // stride)
      pairs += max(0, last - first + 1)
    else:
      pairs += sum(1 for o in range(out) if 0 <= (p := o * stride + k * rhs_dilate - lo) <= (n - 1) * lhs_dilate
                   and p % lhs_dilate == 0)
  return pairs


def conv_flops(out_dims: str, lhs_shape: str, rhs_shape: str, attrs: str) -> float:
  """FLOPs of an HLO convolution: 2 x output batch x output features x input features per group x the
  window taps that meet real input. The TPU compiler writes matmuls as convolutions whose window
  runs over padding (e.g. a [5120, 1280] x [1280, 3, 16, 80] projection as a 3x16 window over a
  1x1 input padded by 2 and 15): only one tap per output position is real there, so counting the
  whole window would overstate the FLOPs 48-fold."""
  lhs, rhs = _SHAPE.search(lhs_shape), _SHAPE.search(rhs_shape)
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
  if not (lhs and rhs and labels):
    return 0.0
  ll, rl, ol = labels.groups()
  ld, rd, od = _dims(lhs.group(2)), _dims(rhs.group(2)), _dims(out_dims)
  if "o" not in rl or "i" not in rl or "b" not in ol:
    return 0.0
  spatial = sorted(c for c in rl if c.isdigit())
  win = re.search(r"window=\{([^}]*)\}", attrs)
  win = win.group(1) if win else ""

  def field(name, default):
    m = re.search(name + r"=([\dx_-]+)", win)
    if not m:
      return [default] * len(spatial)
    return m.group(1).split("x")

  pads = field("pad", "0_0")
  strides, lds, rds = field("stride", "1"), field("lhs_dilate", "1"), field("rhs_dilate", "1")
  taps = 1
  for j, c in enumerate(spatial):
    lo = int(pads[j].split("_")[0])
    taps *= _window_taps(ld[ll.index(c)], rd[rl.index(c)], od[ol.index(c)], int(strides[j]), lo, int(lds[j]),
                         int(rds[j]))
  return 2.0 * od[ol.index("b")] * rd[rl.index("o")] * rd[rl.index("i")] * taps


def loop_trip_count(comps: dict, const_vals: dict, cond: str, body: str, init: str) -> int | None:
  """A while loop's trip count from its induction variable: the condition compares tuple element k
  with a constant bound, the body adds a constant step to element k, the init tuple sets it (a
  constant, else 0). None when the loop is not of that form. (The TPU compiler unrolls some loops,
  e.g. collective matmuls, stepping by 2 up to the same bound.)"""
  ins = {n: (op, ops, a) for c in (cond, body) for n, _, op, ops, a in comps.get(c, [])}
  index = lambda n: (int(m.group(1)) if n in ins and ins[n][0] == "get-tuple-element"
                     and (m := re.search(r"index=(\d+)", ins[n][2])) else None)

  def through_copies(n):
    while n in ins and ins[n][0] in ("copy", "convert", "bitcast") and ins[n][1]:
      n = ins[n][1][0]
    return n

  if not comps.get(cond) or not comps.get(body):
    return None
  _, _, op, ops, attrs = comps[cond][-1]
  d = re.search(r"direction=(\w+)", attrs)
  if op != "compare" or len(ops) != 2 or not d:
    return None
  a, b = (through_copies(x) for x in ops)
  direction = d.group(1)
  if index(a) is None and index(b) is not None:
    a, b, direction = b, a, {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
  k, bound = index(a), const_vals.get(b)
  if k is None or bound is None or direction not in ("LT", "LE"):
    return None
  root = comps[body][-1]
  if root[2] != "tuple" or k >= len(root[3]):
    return None
  upd = ins.get(root[3][k])
  if not upd or upd[0] != "add" or len(upd[1]) != 2:
    return None
  x, y = (through_copies(o) for o in upd[1])
  if index(x) != k:
    x, y = y, x
  step = const_vals.get(y)
  if index(x) != k or not step or step <= 0:
    return None
  start = 0
  for c in comps.values():
    for n, _, op2, ops2, _ in c:
      if n == init and op2 == "tuple" and k < len(ops2):
        start = const_vals.get(ops2[k], 0)
  end = bound + (direction == "LE")
  return max(0, -(-(end - start) // step))


def hlo_cost(text: str) -> tuple[float, float]:
  """(dot + convolution FLOPs, HBM bytes) of a compiled module with every while body counted
  ``trip count`` times (XLA's cost_analysis counts each body once). Custom calls (Pallas
  kernels) add their operand/output bytes but no FLOPs."""
  comps, entry = parse_hlo(text)
  shapes = {name: shape for ins in comps.values() for name, shape, *_ in ins}
  const_vals = {}
  for line in text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([^\s=]+) = [su](?:32|64)\[\]\S* constant\((-?\d+)\)", line)
    if m:
      const_vals[m.group(1)] = int(m.group(2))
  memo: dict[tuple[str, bool], tuple[float, float]] = {}

  def trips(cond_name: str, body_name: str = "", init: str = "") -> int:
    n = loop_trip_count(comps, const_vals, cond_name, body_name, init)
    if n is not None:
      return n
    vals = [const_vals[n] for n, *_ in comps.get(cond_name, []) if n in const_vals]
    return max([v for v in vals if v > 0] or [1])

  def cost(comp: str, fused: bool) -> tuple[float, float]:
    key = (comp, fused)
    if key in memo:
      return memo[key]
    memo[key] = (0.0, 0.0)
    flops = bytes_ = 0.0
    for name, shape, op, operands, attrs in comps.get(comp, []):
      out = _SHAPE.search(shape)
      if op == "dot" and out:
        lhs = _SHAPE.search(shapes.get(operands[0], ""))
        cd = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
        k = math.prod(_dims(lhs.group(2))[i] for i in _dims(cd.group(1))) if lhs and cd else 1
        flops += 2.0 * math.prod(_dims(out.group(2))) * k
      elif op == "convolution" and out and len(operands) > 1:
        flops += conv_flops(out.group(2), shapes.get(operands[0], ""), shapes.get(operands[1], ""), attrs)
      if not fused and op not in _NO_TRAFFIC:
        bytes_ += _shape_bytes(shape) + sum(_shape_bytes(shapes.get(o, "")) for o in operands)
      sub = []
      if op == "fusion":
        sub = [(c, True, 1) for c in re.findall(r"calls=%([^\s,]+)", attrs)]
      elif op == "while":
        body = re.search(r"body=%([^\s,]+)", attrs)
        cond = re.search(r"condition=%([^\s,]+)", attrs)
        if body:
          sub = [(body.group(1), fused, trips(cond.group(1), body.group(1), operands[0] if operands else "")
                  if cond else 1)]
      elif op == "call":
        sub = [(c, fused, 1) for c in re.findall(r"to_apply=%([^\s,]+)", attrs)]
      elif op == "conditional":
        branches = re.findall(r"%([^\s,{}]+)", (re.search(r"branch_computations=\{([^}]*)\}", attrs) or
                                                re.search(r"(true_computation=.*)", attrs) or [None, ""])[1] or "")
        if branches:
          worst = max((cost(b, fused) for b in branches), key=lambda fb: fb[0])
          flops, bytes_ = flops + worst[0], bytes_ + worst[1]
      for c, f, mult in sub:
        cf, cb = cost(c, f)
        flops, bytes_ = flops + mult * cf, bytes_ + mult * cb
    memo[key] = (flops, bytes_)
    return memo[key]

  return cost(entry, False)


def gathered_outside_loops(text: str) -> tuple[float, float]:
  """(bytes all-gathered outside every while loop, bytes all-gathered inside one, per execution of
  the gather). Under FSDP a weight gathered inside the micro-batch loop lives for one micro-batch;
  one gathered before it (hoisted as loop-invariant) stays live across the whole scan."""
  comps, _ = parse_hlo(text)
  reach: dict[str, set] = {c: set() for c in comps}
  for c, ins in comps.items():
    for *_, attrs in ins:
      reach[c] |= set(re.findall(r"(?:calls|to_apply|body|condition)=%([^\s,]+)", attrs))
      m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
      if m:
        reach[c] |= set(re.findall(r"%([^\s,{}]+)", m.group(1)))
  stack = [re.search(r"body=%([^\s,]+)", attrs).group(1) for ins in comps.values()
           for _, _, op, _, attrs in ins if op == "while" and "body=%" in attrs]
  in_loop: set = set()
  while stack:
    c = stack.pop()
    if c not in in_loop:
      in_loop.add(c)
      stack += list(reach.get(c, ()))
  outside = inside = 0.0
  for c, ins in comps.items():
    for _, shape, op, _, _ in ins:
      if op in ("all-gather", "all-gather-start"):
        b = max(_shape_bytes(f"{d}[{n}]") for d, n in _SHAPE.findall(shape))   # start: (operand, result)
        inside, outside = (inside + b, outside) if c in in_loop else (inside, outside + b)
  return outside, inside


# ============================================================================================
# Reports
# ============================================================================================


@dataclasses.dataclass
class Report:
  name: str
  compile_s: float
  argument: float           # per-chip bytes
  output: float
  alias: float
  temp: float
  code: float
  resident: float           # training state alive beside the program but not among its arguments
  xla_flops: float          # cost_analysis (loop bodies once, no Pallas)
  hlo_flops: float          # dots/convolutions x trip counts
  kernel_flops: float       # Pallas attention (analytic)
  model_flops: float        # analytic model FLOPs per chip
  hbm_bytes: float          # HBM traffic x trip counts
  hint: str = ""
  note: str = ""
  gathered_outside_loops: float = 0.0   # all-gather output bytes outside while loops (hoisted FSDP weights)

  @property
  def peak_bytes(self) -> float:
    return self.argument + self.output - self.alias + self.temp + self.code + self.resident


def roofline(r: Report, dev: Chip) -> tuple[float, float]:
  """(roofline seconds, MFU bound): max(compute time of everything executed, HBM time); MFU counts model FLOPs."""
  executed = max(r.hlo_flops + r.kernel_flops, r.model_flops)
  t = max(executed / (dev.bf16_tflops * 1e12), r.hbm_bytes / (dev.hbm_gbps * 1e9))
  return t, (r.model_flops / (dev.bf16_tflops * 1e12) / t if t > 0 else 0.0)


def fits(r: Report, dev: Chip) -> bool:
  return r.peak_bytes <= dev.hbm_gib * GiB


def _g(x: float) -> str:
  return f"{x / GiB:.2f}"


def _oom(r: Report) -> bool:
  return "compiler OOM" in r.note


def format_report(r: Report, dev: Chip) -> str:
  if _oom(r):
    return (f"== {r.name}  {r.note}\n   per chip GiB: args {_g(r.argument)}  temp >= {_g(r.temp)}  resident state "
            f"{_g(r.resident)}  = {_g(r.peak_bytes)}+ of {dev.hbm_gib:.0f}: DOES NOT FIT -> {r.hint}\n"
            f"   model FLOPs per chip (analytic) {r.model_flops:.3e}")
  t, mfu = roofline(r, dev)
  hbm = dev.hbm_gib * GiB
  status = "fits" if fits(r, dev) else f"DOES NOT FIT -> {r.hint}"
  lines = [
      f"== {r.name}  (compiled in {r.compile_s:.1f}s){'  ' + r.note if r.note else ''}",
      f"   per chip GiB: args {_g(r.argument)}  out {_g(r.output)}  aliased {_g(r.alias)}  temp {_g(r.temp)}  "
      f"code {_g(r.code)}  resident state {_g(r.resident)}  = {_g(r.peak_bytes)} of {dev.hbm_gib:.0f} "
      f"({100 * r.peak_bytes / hbm:.0f}%): {status}",
      f"   per chip FLOPs: XLA cost_analysis {r.xla_flops:.3e} | x loop trips {r.hlo_flops:.3e} + Pallas "
      f"(analytic) {r.kernel_flops:.3e} | model (analytic) {r.model_flops:.3e}",
      f"   roofline {t * 1e3:.1f} ms (HBM traffic {r.hbm_bytes / 1e9:.1f} GB at {dev.hbm_gbps:.0f} GB/s, "
      f"{dev.bf16_tflops:.0f} TFLOP/s) -> MFU bound {100 * mfu:.0f}%",

      f"   all-gathered outside loops (live across them, e.g. hoisted FSDP weights): "
      f"{_g(r.gathered_outside_loops)} GiB",
  ]
  return "\n".join(lines)


TABLE_HEADER = ("| config | topology | program | fits | GiB/chip (HBM) | temp GiB | compile s | model TFLOP/chip | "
                "roofline ms | MFU bound |\n|---|---|---|---|---|---|---|---|---|---|")


def table_row(label: str, topology: str, r: Report, dev: Chip) -> str:
  if _oom(r):
    return (f"| {label} | {topology} | {r.name} ({r.note}) | no | >= {_g(r.peak_bytes)} ({dev.hbm_gib:.0f}) | "
            f">= {_g(r.temp)} | - | {r.model_flops / 1e12:.1f} | - | - |")
  t, mfu = roofline(r, dev)
  return (f"| {label} | {topology} | {r.name}{' (' + r.note + ')' if r.note else ''} | "
          f"{'yes' if fits(r, dev) else 'no'} | {_g(r.peak_bytes)} ({dev.hbm_gib:.0f}) | {_g(r.temp)} | "
          f"{r.compile_s:.0f} | {r.model_flops / 1e12:.1f} | {t * 1e3:.0f} | {100 * mfu:.0f}% |")


def peak_table() -> str:
  rows = ["| chip | bf16 TFLOP/s | HBM GiB | HBM GB/s |", "|---|---|---|---|"]
  rows += [f"| {c.name} | {c.bf16_tflops:.0f} | {c.hbm_gib:.0f} | {c.hbm_gbps:.0f} |" for c in CHIPS.values()]
  return "\n".join(rows)


# ============================================================================================
# Compiling for the TPU
# ============================================================================================


@contextlib.contextmanager
def tpu_attention_target():
  """Makes attention take its TPU paths while tracing (splash kernels lowered by Mosaic, not
  interpreted): :func:`papo_jax.models.attention.target_platform` set to ``tpu``."""
  from papo_jax.models import attention
  with attention.target_platform("tpu"):
    yield


def _with_sharding(tree, shardings):
  """Abstract arrays carrying their NamedShardings (nnx Variables keep their metadata)."""
  from flax import nnx

  def one(a, s):
    if isinstance(a, nnx.Variable):
      v = a.get_value()
      return a.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  return jax.tree.map(one, tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _bytes_per_device(tree) -> float:
  def one(a):
    shard = a.sharding.shard_shape(a.shape) if getattr(a, "sharding", None) is not None else a.shape
    return math.prod(shard) * jnp.dtype(a.dtype).itemsize
  return float(sum(one(a) for a in jax.tree.leaves(tree)))


def _spec(mesh, shape, names):
  from jax.sharding import NamedSharding, PartitionSpec
  from papo_jax.parallel.sharding import DEFAULT_RULES, _fit_spec, logical_to_mesh_spec
  spec = _fit_spec(logical_to_mesh_spec(names, DEFAULT_RULES, mesh), shape, mesh) if names else PartitionSpec()
  return NamedSharding(mesh, spec)


def _sds(mesh, shape, dtype, names=None):
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=_spec(mesh, tuple(shape), names))


def _round_up(n: int, m: int) -> int:
  return max(m, -(-n // m) * m)


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The trainer's batch geometry for one config."""
  prompt_len: int
  response_len: int
  rows_per_micro: int
  micro_per_update: int
  mini_batches: int
  images_per_row: int
  patches_per_image: int
  n_samples: int = 1        # rollout.n: a shard encodes a prompt's image once for its n rows

  @property
  def length(self) -> int:
    return self.prompt_len + self.response_len


def shapes_for(c, mc, *, prompt_len: int = 0, images_per_row: int = 1) -> Shapes:
  rows = c.data.batch_size * c.rollout.n
  per_update = c.optim.mini_batches * c.optim.micro_batches
  if rows % per_update:
    raise ValueError(f"config field optim.micro_batches: {rows} rows do not split into {c.optim.mini_batches} "
                     f"mini x {c.optim.micro_batches} micro batches")
  lp = prompt_len or max(tuple(c.data.prompt_length_buckets) or (c.data.max_prompt_length,))
  return Shapes(lp, c.rollout.max_new_tokens, rows // per_update, c.optim.micro_batches, c.optim.mini_batches,
                images_per_row, c.data.max_pixels // mc.vision.patch_size ** 2, c.rollout.n)


def train_batch_specs(mc, mesh, s: Shapes, *, micro_batches: int, with_mask: bool, logps: tuple[str, ...] = (),
                      dtype=None):
  """Abstract TrainBatch exactly as the trainer feeds it (``rl/batching.assemble_train_batch`` with
  ``shards=batch_shards(mesh)``, ``pixel_dtype=model.dtype``, then ``global_train_arrays``).

  Rows [M, b, ...] and the per-shard images are split over the batch axes on axis 1:
  pixel_values / masked_pixel_values [M, S, N, P] in the compute dtype, image_grid_thw
  [M, S, I, 3], row_image_start [M, b]. A shard holds each distinct prompt's images once,
  so N and I are sized for the most prompts any shard of the update's group-major rows
  (r = g * n + k) touches, each with ``images_per_row`` images of the largest patch count.
  Returns (batch, patches encoded per micro-batch over all shards).
  """
  from papo_jax.parallel import batch_shards
  from papo_jax.rl.train_step import TrainBatch
  m, b, t, l = micro_batches, s.rows_per_micro, s.response_len, s.length
  shards = batch_shards(mesh)
  if b % shards:
    raise ValueError(f"config field optim.micro_batches: micro-batches of {b} rows do not split into "
                     f"{shards} batch shards (mesh data x fsdp)")
  per_shard, n = b // shards, max(1, s.n_samples)
  # Distinct prompts per shard, as batching.shard_images counts them (the worst shard).
  prompts = max(len({r // n for r in range(r0, r0 + per_shard)}) for r0 in range(0, m * b, per_shard))
  n_patch = _round_up(prompts * s.images_per_row * s.patches_per_image, 64)
  n_img = _round_up(prompts * s.images_per_row, 4)
  row, shard = (None, "batch"), (None, "batch")
  pix_dtype = dtype or mc.dtype
  pix = (m, shards, n_patch, mc.vision.patch_dim)
  fields = dict(
      input_ids=_sds(mesh, (m, b, l), jnp.int32, row), attention_mask=_sds(mesh, (m, b, l), jnp.int32, row),
      response_mask=_sds(mesh, (m, b, t), jnp.int32, row), advantages=_sds(mesh, (m, b), jnp.float32, row),
      pixel_values=_sds(mesh, pix, pix_dtype, shard),
      image_grid_thw=_sds(mesh, (m, shards, n_img, 3), jnp.int32, shard),
      row_image_start=_sds(mesh, (m, b), jnp.int32, row),
      masked_pixel_values=_sds(mesh, pix, pix_dtype, shard) if with_mask else None)
  for k in logps:
    fields[k] = _sds(mesh, (m, b, t), jnp.float32, row)
  return TrainBatch(**fields), shards * n_patch


class CompilerOOM(Exception):
  """The TPU compiler refused the program: its temporaries alone exceed the chip's HBM."""

  def __init__(self, message: str, lowered, required: float):
    super().__init__(message)
    self.lowered, self.required = lowered, required


def _compile(name: str, fn: Callable[[], Any], mesh) -> tuple[Any, float]:
  """(compiled, seconds); raises CompilerOOM (with the lowered program) when XLA reports HBM exhaustion."""
  from papo_jax.parallel import use_mesh_rules
  t0 = time.perf_counter()
  with tpu_attention_target(), use_mesh_rules(mesh):
    lowered = fn()
    t1 = time.perf_counter()
    print(f"   {name}: traced and lowered in {t1 - t0:.0f}s; compiling for the TPU", flush=True)
    try:
      compiled = lowered.compile()
    except Exception as e:  # jax.errors.JaxRuntimeError; the message carries the sizes
      msg = str(e)
      if "RESOURCE_EXHAUSTED" not in msg:
        raise
      m = re.search(r"required for [^(]*\(([\d.]+)([KMGT])\)", msg)
      req = float(m.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)] if m else float("inf")
      raise CompilerOOM(msg.splitlines()[0][:300], lowered, req) from None
  print(f"   {name}: XLA/Mosaic compile {time.perf_counter() - t1:.0f}s", flush=True)
  return compiled, time.perf_counter() - t0


def _oom_report(name: str, err: CompilerOOM, *, resident: float, model_flops: float, hint: str) -> Report:
  """What is known of a program the compiler refused: its arguments and at least the temporaries it named."""
  try:
    args = _bytes_per_device(err.lowered.args_info)
  except Exception:  # ArgInfo without a sharding in some versions
    args = 0.0
  return Report(name, 0.0, args, 0.0, 0.0, err.required, 0.0, resident, 0.0, 0.0, 0.0, model_flops, 0.0, hint,
                note="compiler OOM: temp is XLA's lower bound")


def _measure(name: str, compiled, compile_s: float, *, resident: float, model_flops: float, kernel_flops: float,
             hint: str) -> Report:
  ma = compiled.memory_analysis()
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  text = compiled.as_text()
  if HLO_DIR:
    os.makedirs(HLO_DIR, exist_ok=True)
    with open(os.path.join(HLO_DIR, f"{name}.{time.strftime('%H%M%S')}.hlo.txt"), "w") as f:
      f.write(text)
  hlo_flops, hbm = hlo_cost(text)
  return Report(name, compile_s, float(ma.argument_size_in_bytes), float(ma.output_size_in_bytes),
                float(ma.alias_size_in_bytes), float(ma.temp_size_in_bytes), float(ma.generated_code_size_in_bytes),
                resident, float(ca.get("flops", 0.0)), hlo_flops, kernel_flops, model_flops, hbm, hint,
                gathered_outside_loops=gathered_outside_loops(text)[0])


def compile_programs(c, mc, target: Target, *, programs=("train_step", "logprob_pass", "prefill", "decode"),
                     prompt_len: int = 0, images_per_row: int = 1, chunk_prompts: int = 0,
                     full_mc=None, log=print) -> list[Report]:
  """Lowers and compiles the trainer's programs for ``target``; one Report per program (per chip)."""
  from flax import nnx
  from papo_jax import models
  from papo_jax.parallel import make_mesh, state_shardings, use_mesh_rules
  from papo_jax.config_base import optimizer, step_config
  from papo_jax.rl.train_step import init_train_state, make_logprob_pass, make_train_step
  from papo_jax.sampling import ContinuousEngine, SamplingConfig, Sampler
  from papo_jax.sampling.budget import rollout_chunk_prompts
  from papo_jax.sampling.factory import engine_config
  from papo_jax.sampling.paged_attention import paged_backend

  full_mc = full_mc or mc
  mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=target.devices)
  n_dev = len(target.devices)
  dev = target.per_device
  log(f"mesh {dict(mesh.shape)} on {n_dev} x {target.devices[0].device_kind} ({target.topology})")

  graphdef, abstract = nnx.split(models.abstract_model(mc))
  param_sh = state_shardings(abstract, mesh)
  params = _with_sharding(abstract, param_sh)
  tx = optimizer(c)
  state_abs = jax.eval_shape(lambda p: init_train_state(p, tx), abstract)
  state_sh = state_shardings(state_abs, mesh)
  state = _with_sharding(state_abs, state_sh)
  cfg = step_config(c)
  ref = (_with_sharding(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(c.model.ref_dtype)), abstract),
                        param_sh) if cfg.needs_ref else None)   # (tree.map reaches the Variables' values)
  params_b, opt_b = _bytes_per_device(params), _bytes_per_device(state.opt_state)
  ref_b = _bytes_per_device(ref) if ref is not None else 0.0
  log(f"training state per chip: params {_g(params_b)} GiB  AdamW {_g(opt_b)} GiB  reference {_g(ref_b)} GiB"
      + ("" if full_mc is mc else " (shortened model)"))
  # The rollout budget is what the full model's training state leaves free.
  full_state_b = params_b + opt_b + ref_b
  if full_mc is not mc:
    full_params = _with_sharding(*(lambda a: (a, state_shardings(a, mesh)))(
        nnx.split(models.abstract_model(full_mc))[1]))
    p_b = _bytes_per_device(full_params)
    full_state_b = p_b * (3 + (jnp.dtype(c.model.ref_dtype).itemsize / jnp.dtype(c.model.param_dtype).itemsize
                               if cfg.needs_ref else 0))

  s = shapes_for(c, mc, prompt_len=prompt_len, images_per_row=images_per_row)
  with_mask = bool(c.data.mask.enabled)
  mb = s.mini_batches
  pre = mb > 1 or cfg.needs_logprob_pass   # the trainer's rule (train.setup): log-probs precomputed
  scalar = _sds(mesh, (), jnp.float32)
  extra = int(cfg.needs_mask and not pre) + int(cfg.needs_ref and not pre)
  reports = []

  def program(name, lower, *, resident, model_flops, kernel_flops, hint, note="", on=None):
    """Compiles one program and reports it (a compiler OOM becomes a not-fitting report). ``on``: the
    program's own mesh (default: the training mesh); FLOPs are given for all of its devices."""
    on = on or mesh
    chips = on.devices.size
    try:
      compiled, dt = _compile(name, lower, on)
      r = _measure(name, compiled, dt, resident=resident, model_flops=model_flops / chips,
                   kernel_flops=kernel_flops / chips, hint=hint)
    except CompilerOOM as e:
      compiled, r = None, _oom_report(name, e, resident=resident, model_flops=model_flops / chips, hint=hint)
    r.note = "; ".join(x for x in (note, r.note) if x)
    reports.append(r)
    log(format_report(r, dev))
    return compiled

  if "train_step" in programs:
    logps = ()
    if pre:
      logps = ("old_logp",) + (("mask_logp",) if cfg.needs_mask else ()) + (("ref_logp",) if cfg.needs_ref else ()) \
          + (("dependency",) if cfg.full_kl_dependency else ())
    batch, n_patch = train_batch_specs(mc, mesh, s, micro_batches=s.micro_per_update, with_mask=with_mask, logps=logps)
    step = jax.jit(make_train_step(graphdef, tx, cfg), donate_argnums=(0,), out_shardings=(state_sh, None))
    ref_arg = None if pre else ref
    rows = s.micro_per_update * s.rows_per_micro
    patches = s.micro_per_update * n_patch
    flops = train_step_flops(full_mc, rows=rows, length=s.length, response=s.response_len, patches=patches,
                             patches_per_image=s.patches_per_image, extra_forwards=extra)
    kernel = 0.0
    if mc.attention == "pallas_tpu":   # attention runs in kernels: fwd + bwd (2x) [+ remat fwd]
      att = attention_flops_causal(mc, rows, s.length) + attention_flops_vision(mc, patches, s.patches_per_image)
      kernel = (3 + extra + int(mc.remat)) * att
    program("train_step", lambda: step.lower(state, ref_arg, batch, scalar, scalar),
            resident=ref_b if pre else 0.0, model_flops=flops, kernel_flops=kernel,
            hint="raise optim.micro_batches (fewer rows per micro-batch), shard wider (mesh.fsdp), "
                 "or set model.remat=True")

  if "logprob_pass" in programs and pre:
    m = s.mini_batches * s.micro_per_update
    batch, n_patch = train_batch_specs(mc, mesh, s, micro_batches=m, with_mask=with_mask)
    fn = jax.jit(make_logprob_pass(graphdef, cfg))
    rows, patches = m * s.rows_per_micro, m * n_patch
    passes = 1 + int(cfg.needs_mask) + int(cfg.needs_ref)
    fwd = forward_flops(full_mc, rows=rows, length=s.length, logit_tokens=rows * s.response_len, patches=patches,
                        patches_per_image=s.patches_per_image)
    kernel = 0.0
    if mc.attention == "pallas_tpu":
      kernel = passes * (attention_flops_causal(mc, rows, s.length)
                         + attention_flops_vision(mc, patches, s.patches_per_image))
    program("logprob_pass", lambda: fn.lower(params, ref, batch), resident=opt_b, model_flops=passes * fwd,
            kernel_flops=kernel, hint="raise optim.micro_batches (the pass maps over micro-batches of that size)")

  want_sampler = [p for p in ("prefill", "decode") if p in programs]
  if want_sampler:
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    chunk = chunk_prompts or int(c.rollout.get("chunk_prompts", 0))
    if not chunk:
      budget_gb = float(c.rollout.get("kv_budget_gb", 0.0))
      budget = budget_gb * GiB if budget_gb > 0 else 0.9 * dev.hbm_gib * GiB - full_state_b
      chunk = rollout_chunk_prompts(full_mc, n_samples=c.rollout.n, prompt_len=s.prompt_len,
                                    max_new_tokens=s.response_len, hbm_bytes_budget=max(budget, 1.0), n_devices=n_dev,
                                    total_prompts=c.data.batch_size, batch_shards=batch_shards,
                                    cache_dtype=c.rollout.cache_dtype, compute_dtype=c.model.dtype,
                                    patches_per_prompt=s.images_per_row * s.patches_per_image)
      log(f"rollout chunk: {chunk} prompts (from a budget of {_g(budget)} GiB per chip)")
    n = c.rollout.n
    sampler = Sampler(graphdef, SamplingConfig(max_new_tokens=s.response_len, temperature=c.rollout.temperature,
                                               top_p=c.rollout.top_p, top_k=c.rollout.top_k,
                                               cache_dtype=c.rollout.cache_dtype,
                                               stop_token_ids=(mc.eos_token_id or 0,),
                                               pad_token_id=mc.pad_token_id or 0), mesh=mesh)
    n_patch = _round_up(chunk * s.images_per_row * s.patches_per_image, 64)
    ids = _sds(mesh, (chunk, s.prompt_len), jnp.int32)
    pv = _sds(mesh, (n_patch, mc.vision.patch_dim), jnp.float32)
    grid = _sds(mesh, (_round_up(chunk * s.images_per_row, 4), 3), jnp.int32)
    key_aval = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key_aval.shape, key_aval.dtype, sharding=_spec(mesh, (), None))
    note = f"{chunk} prompts x {n}"
    fwd = forward_flops(full_mc, rows=chunk, length=s.prompt_len, logit_tokens=chunk, patches=n_patch,
                        patches_per_image=s.patches_per_image)
    kernel = 0.0
    if mc.attention == "pallas_tpu":
      kernel = attention_flops_causal(mc, chunk, s.prompt_len) + attention_flops_vision(mc, n_patch,
                                                                                       s.patches_per_image)
    hint = "lower rollout.chunk_prompts / rollout.kv_budget_gb"
    lower_prefill = lambda: sampler._prefill.lower(params, ids, ids, pv, grid, key, n=n, max_new_tokens=s.response_len)
    if "prefill" in programs:
      compiled = program("prefill", lower_prefill, resident=opt_b + ref_b, model_flops=fwd, kernel_flops=kernel,
                         hint=hint, note=note)
    else:
      try:
        compiled = _compile("prefill", lower_prefill, mesh)[0]
      except CompilerOOM:
        compiled = None
    if "decode" in programs:
      if compiled is not None:
        pre = _with_sharding(compiled.out_info, compiled.output_shardings)
      else:   # prefill did not compile: its outputs laid out as the sampler constrains them
        with tpu_attention_target(), use_mesh_rules(mesh):
          info = lower_prefill().out_info
        pre = decode_input_specs(mesh, info)
      program("decode", lambda: sampler._decode.lower(params, **pre), resident=opt_b + ref_b,
              model_flops=decode_flops(full_mc, rows=chunk * n, prompt_len=s.prompt_len, steps=s.response_len - 1),
              kernel_flops=0.0, hint=hint, note=note + f", {s.response_len} tokens")

  want_engine = [p for p in ("engine_step", "engine_decode") if p in programs]
  if want_engine:
    # One engine per chip: its own weights in the compute dtype and page pool, beside this chip's
    # share of the training state (parameters, AdamW, reference: all resident during rollouts).
    one = make_mesh(1, 1, 1, devices=target.devices[:1])
    ec = engine_config(c.rollout)
    prompts = chunk_prompts or int(c.rollout.get("chunk_prompts", 0)) or -(-c.data.batch_size // target.chips)
    engine = ContinuousEngine(graphdef, SamplingConfig(
        max_new_tokens=s.response_len, temperature=c.rollout.temperature, top_p=c.rollout.top_p,
        top_k=c.rollout.top_k, cache_dtype=c.rollout.cache_dtype, stop_token_ids=(mc.eos_token_id or 0,),
        pad_token_id=mc.pad_token_id or 0, top_p_candidates=c.rollout.top_p_candidates), ec)
    replicated = _spec(one, (), None)
    weights = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(c.model.dtype), sharding=replicated),
                           abstract)
    # The step reads the decoder's weights only; the vision tower's (the engine's encode program
    # reads them: the full model's, also when the decoder is shortened) stay resident beside it,
    # as does this chip's share of the training state.
    itemsize = jnp.dtype(c.model.dtype).itemsize
    full_abstract = models.abstract_model(full_mc)
    vision_b = float(sum(math.prod(a.shape) for a in jax.tree.leaves(nnx.state(full_abstract.visual))) * itemsize)
    full_engine = ContinuousEngine(None, engine.cfg, ec)
    kv_full = full_engine.kv_bytes(full_mc)
    w_full = sum(math.prod(a.shape) for a in jax.tree.leaves(nnx.state(full_abstract))) * itemsize
    tokens = ec.num_pages * ec.page_size
    buf_b = prompts * s.prompt_len * mc.text.hidden_size * itemsize
    note = (f"1 chip: weights {_g(w_full)} GiB (vision {_g(vision_b)} of it resident) + KV pool "
            f"{_g(kv_full)} GiB ({ec.num_pages} pages x {ec.page_size} = {tokens} tokens) + {prompts} prompts encoded "
            f"{_g(buf_b)} GiB, {ec.num_slots} decode lanes")
    hint = "lower rollout.kv_pages (or rollout.num_slots / prefill_chunk)"
    for name in want_engine:
      prefill = name == "engine_step"
      args = engine_step_specs(mc, one, ec, prompts=prompts, prompt_len=s.prompt_len, max_new_tokens=s.response_len,
                               prefill=prefill, cache_dtype=c.rollout.cache_dtype)
      flops, att = engine_step_flops(full_mc, decode_lanes=ec.num_slots,
                                     prefill_tokens=ec.prefill_lanes * ec.prefill_chunk if prefill else 0,
                                     logit_rows=ec.num_slots + (ec.prefill_lanes if prefill else 0),
                                     prompt_len=s.prompt_len, max_new_tokens=s.response_len)
      with tpu_attention_target():
        on_kernel = paged_backend(mc.attention, mc.text.head_dim) == "pallas_tpu"
      kernel = att * mc.text.num_hidden_layers / full_mc.text.num_hidden_layers if on_kernel else 0.0
      program(name, lambda: lower_for_device(one, lambda: engine._step.lower(weights, *args, n=c.rollout.n)), on=one,
              resident=params_b + opt_b + ref_b + vision_b, model_flops=flops, kernel_flops=kernel, hint=hint,
              note=note + ("" if prefill else ", no prefill lane"))
  return reports


def lower_for_device(mesh, lower: Callable[[], Any]):
  """``lower()`` with the mesh's device kind visible to Pallas TPU lowering (some of the ragged kernel's
  Mosaic rules ask for the TPU generation, which they otherwise take from the host's first device)."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return lower()


def engine_step_specs(mc, mesh, ec, *, prompts: int, prompt_len: int, max_new_tokens: int, prefill: bool,
                      cache_dtype: str):
  """Abstract (cache, prompt buffer, step inputs, chunk keys, chunk first sample ids) of one engine step,
  as ``ContinuousEngine.generate`` feeds it for one chunk of ``prompts`` prompts: all ``num_slots``
  decode lanes, ``prefill_lanes`` lanes of ``prefill_chunk`` (none for the decode-only program),
  page tables for ``prompt_len + max_new_tokens`` and ``prompt_len`` tokens."""
  from papo_jax.sampling.engine import PagedKVCache, PromptBuffer, StepInputs
  t, page = mc.text, ec.page_size
  s, p, c = ec.num_slots, (ec.prefill_lanes if prefill else 0), ec.prefill_chunk
  ms, mp = -(-(prompt_len + max_new_tokens) // page), -(-prompt_len // page)
  i32 = lambda *shape: _sds(mesh, shape, jnp.int32)
  pool = _sds(mesh, (ec.num_pages, page, 2 * t.num_key_value_heads, t.head_dim), cache_dtype)
  cache = PagedKVCache(tuple(pool for _ in range(t.num_hidden_layers)))
  n = prompts * prompt_len
  buf = PromptBuffer(_sds(mesh, (n, t.hidden_size), mc.dtype), i32(3, n), _sds(mesh, (0, 1, t.hidden_size), mc.dtype),
                     i32(n), _sds(mesh, (n,), jnp.bool_))
  # Fields by their shape suffix (decode lanes S, prefill lanes P x chunk C, page tables, copies X).
  dims = {"S": (s,), "SxM": (s, ms), "PxC": (p, c), "PxMp": (p, mp), "P": (p,), "X": (ec.num_slots,)}
  inp = StepInputs(**{f: _sds(mesh, dims[f.rsplit("_", 1)[1]], jnp.bool_ if f in ("dec_active_S", "pre_valid_PxC")
                              else jnp.int32) for f in StepInputs._fields})
  # One prompt chunk: its key and first sample id.
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 1))
  return (cache, buf, inp, jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=_spec(mesh, (), None)), i32(1))


def engine_step_flops(mc, *, decode_lanes: int, prefill_tokens: int, logit_rows: int, prompt_len: int,
                      max_new_tokens: int) -> tuple[float, float]:
  """(model FLOPs, attention FLOPs) of one engine step, every lane busy: 2·N per token over the decode
  lanes and the prefill chunk, the head over the sampled rows, decode lanes attending at mid-response
  (``prompt_len + max_new_tokens / 2`` keys), the chunk's queries at mid-prompt (``prompt_len / 2`` keys)."""
  p = matmul_params(mc)
  t = mc.text
  per_key = 4.0 * t.num_attention_heads * t.head_dim * t.num_hidden_layers
  att = per_key * (decode_lanes * (prompt_len + max_new_tokens / 2) + prefill_tokens * prompt_len / 2)
  return 2.0 * (p.text_per_token * (decode_lanes + prefill_tokens) + p.head_per_token * logit_rows) + att, att


def decode_input_specs(mesh, info: dict) -> dict:
  """The decode program's inputs (prefill's outputs) with the sampler's own layout: cache
  ``(None, batch, cache_length, kv_heads, head_dim)``, per-row arrays over the batch axes."""
  from papo_jax.sampling.sampler import CACHE_AXES

  def spec(path, a):
    name = jax.tree_util.keystr(path)
    if "cache" in name:
      names = CACHE_AXES
    elif "pos" in name:
      names = (None, "batch", None)
    else:
      names = ("batch",) + (None,) * (len(a.shape) - 1)
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=_spec(mesh, a.shape, names[:len(a.shape)]))
  return jax.tree_util.tree_map_with_path(spec, info)


def extrapolate(small: list[Report], large: list[Report], n_small: int, n_large: int, n_full: int) -> list[Report]:
  """Per-program linear extrapolation in depth: value(L) = v(a) + (v(b) - v(a)) (L - a) / (b - a).

  Memory, XLA/HLO FLOPs and HBM bytes are extrapolated; code size is the larger; model FLOPs,
  Pallas FLOPs and resident bytes are already for the full model (analytic / from layer count).
  """
  out = []
  f = (n_full - n_small) / max(1, n_large - n_small)
  for a, b in zip(small, large):
    if "compiler OOM" in a.note + b.note:   # nothing to extrapolate: already too large when shortened
      worst, n = (a, n_small) if "compiler OOM" in a.note else (b, n_large)
      out.append(dataclasses.replace(worst, note=worst.note + f" at {n} of {n_full} layers"))
      continue
    lin = lambda x, y: max(0.0, x + (y - x) * f)
    out.append(dataclasses.replace(
        b, compile_s=a.compile_s + b.compile_s, argument=lin(a.argument, b.argument), output=lin(a.output, b.output),
        alias=lin(a.alias, b.alias), temp=lin(a.temp, b.temp), code=max(a.code, b.code),
        resident=lin(a.resident, b.resident), xla_flops=lin(a.xla_flops, b.xla_flops),
        hlo_flops=lin(a.hlo_flops, b.hlo_flops), kernel_flops=b.kernel_flops, hbm_bytes=lin(a.hbm_bytes, b.hbm_bytes),
        gathered_outside_loops=lin(a.gathered_outside_loops, b.gathered_outside_loops),
        note=(b.note + "; " if b.note else "") + f"extrapolated from {n_small}/{n_large} layers"))
  return out


def scale_kernel_flops(reports: list[Report], mc_short, mc_full):
  """Pallas FLOPs were counted on the shortened model: scale them to the full depth."""
  ratio = mc_full.text.num_hidden_layers / mc_short.text.num_hidden_layers
  return [dataclasses.replace(r, kernel_flops=r.kernel_flops * ratio) for r in reports]


# ============================================================================================
# Command line
# ============================================================================================


def define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Run config (a configs/*.py file, optionally :variant).")
  flags.DEFINE_string("topology", "v5e:2x4", "TPU topology: v5e:2x4, v5p:2x2x1, v5p:2x2x2, v6e:2x4, v4:2x2x1.")
  flags.DEFINE_integer("layers", 0, "Compile N and 2N decoder layers (vision in proportion) and extrapolate.")
  flags.DEFINE_string("arch", "", f"Architecture when model.path has no config.json: {sorted(ARCHITECTURES)}.")
  flags.DEFINE_list("programs", ["train_step", "logprob_pass", "prefill", "decode"],
                    "Programs to compile: train_step, logprob_pass, prefill, decode, engine_step, engine_decode.")
  flags.DEFINE_integer("prompt_len", 0, "Prompt bucket (0: the largest of data.prompt_length_buckets).")
  flags.DEFINE_integer("images_per_row", 1, "Images per prompt.")
  flags.DEFINE_integer("chunk_prompts", 0, "Rollout chunk in prompts (0: rollout.chunk_prompts or the KV budget).")
  flags.DEFINE_string("label", "", "Config label of the markdown rows (default: the --config argument).")
  flags.DEFINE_string("hlo_dir", "", "Write each compiled module's text there (<program>.<time>.hlo.txt).")
  flags.DEFINE_string("save", "", "JSON file: each compiled point's reports are stored as they finish, and a point "
                      "stored there by the same command line is reused instead of compiled again.")
  flags.mark_flags_as_required(["config"])


def _config_argument(argv) -> str:
  for i, x in enumerate(argv):
    if x.startswith("--config="):
      return x.split("=", 1)[1]
    if x == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def _point_key(argv, layers) -> str:
  """A compiled point's identity: the command line (without --save) and the depth compiled."""
  args = [x for x in argv[1:] if not x.startswith("--save")]
  return json.dumps([sorted(args), layers])


def cached_point(path: str, key: str, compile_fn: Callable[[], list[Report]]) -> list[Report]:
  """``compile_fn()``'s reports, read from / stored in the JSON file ``path`` under ``key`` (no file: no cache)."""
  stored = {}
  if path and os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
  if key in stored:
    print(f"\nreusing the reports stored in {path} for {key}")
    return [Report(**r) for r in stored[key]]
  reports = compile_fn()
  if path:
    if os.path.exists(path):   # another point may have been stored meanwhile
      with open(path) as f:
        stored = json.load(f)
    stored[key] = [dataclasses.asdict(r) for r in reports]
    with open(path, "w") as f:
      json.dump(stored, f, indent=1)
  return reports


def main(argv):
  del argv
  from absl import flags
  F = flags.FLAGS
  c = F.config
  global HLO_DIR
  HLO_DIR = F.hlo_dir
  target = get_target(F.topology)
  config_arg = _config_argument(sys.argv)
  hf = hf_architecture(c, config_arg, F.arch)
  full = model_config(c, hf)
  dev = target.per_device
  print(peak_table())
  print(f"\nmodel: {full.model_type} {full.text.num_hidden_layers} layers, vision {full.vision.depth} blocks; "
        f"remat={full.remat} attention={full.attention} dtype={full.dtype} params={full.param_dtype}")
  kw = dict(programs=tuple(F.programs), prompt_len=F.prompt_len, images_per_row=F.images_per_row,
            chunk_prompts=F.chunk_prompts, full_mc=full)
  if F.layers:
    a, b = F.layers, min(2 * F.layers, full.text.num_hidden_layers)
    if b == a:
      reports = compile_programs(c, full, target, **kw)
    else:
      print(f"\n--layers={a}: compiling {a} and {b} decoder layers; figures below are EXTRAPOLATED linearly to "
            f"{full.text.num_hidden_layers} layers")
      ma, mb_ = shortened(full, a), shortened(full, b)
      ra = scale_kernel_flops(cached_point(F.save, _point_key(sys.argv, a),
                                           lambda: compile_programs(c, ma, target, **kw)), ma, full)
      # A program already too large when shortened is not compiled again.
      again = tuple(r.name for r in ra if not _oom(r))
      rb = scale_kernel_flops(cached_point(F.save, _point_key(sys.argv, b), lambda: compile_programs(
          c, mb_, target, **{**kw, "programs": again})), mb_, full) if again else []
      by_name = {r.name: r for r in rb}
      reports = extrapolate(ra, [by_name.get(r.name, r) for r in ra], a, b, full.text.num_hidden_layers)
      print("\nextrapolated to the full depth:")
      for r in reports:
        print(format_report(r, dev))
  else:
    reports = compile_programs(c, full, target, **kw)
  label = F.label or os.path.basename(config_arg)
  print("\n" + TABLE_HEADER)
  for r in reports:
    print(table_row(label, F.topology, r, dev))
  bad = [r for r in reports if not fits(r, dev)]
  for r in bad:
    print(f"error: {r.name} needs {_g(r.peak_bytes)} GiB per chip, above {dev.hbm_gib:.0f} GiB: {r.hint}",
          file=sys.stderr)
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  from absl import app
  define_flags()
  app.run(main)
