r"""HTML pages of one logged step's samples: what the model looked at.

    python -m papo_jax.inspect --workdir=/tmp/papo_tiny              # the last logged step
    python -m papo_jax.inspect --workdir=/tmp/papo_tiny --step=25 --out=/tmp/pages

For each sample that ``samples.jsonl`` holds for the step: its image and masked copy, the
prompt, answer and rewards, and the response with every token coloured by its visual
dependency (:mod:`papo_jax.diagnostics`; the most image-dependent tokens boxed), under a
legend; an index page adds the histogram of the dependency over every response token of
the step's batch. Plain HTML and inline SVG with the images embedded: no scripts, no
network, the folder can be copied anywhere. Prints the index page's path.

``--workdir`` may be a URL (``gs://``, any fsspec URL); the pages then go to a local
folder (``--out``, default under ``$PAPO_JAX_CACHE``), else to ``<workdir>/inspect/step_<N>``.
"""

from __future__ import annotations

import base64
import html
import json
import os
import sys

from absl import app, flags

from papo_jax import workdir as workdir_lib

FLAGS = flags.FLAGS

COLOUR_LO = (255, 255, 255)   # dependency 0
COLOUR_HI = (215, 48, 39)     # dependency at the step's scale (its largest logged value)
COLOUR_BAR = (70, 110, 170)   # histogram bars

STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 960px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 20px; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }
th { background: #f3f3f3; text-align: left; }
.images { display: flex; gap: 16px; } .images figure { margin: 0; }
.images img { width: 256px; image-rendering: pixelated; border: 1px solid #999; }
img.thumb { width: 64px; image-rendering: pixelated; }
pre { white-space: pre-wrap; background: #f7f7f7; padding: 8px; }
.response { white-space: pre-wrap; font-family: monospace; font-size: 15px; line-height: 1.9;
            border: 1px solid #ccc; padding: 10px; }
.tok { padding: 2px 0; }
.top { font-weight: bold; outline: 2px solid #000; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 13px; margin: 8px 0; }
.bar { width: 240px; height: 14px; border: 1px solid #999; }
.note { color: #666; font-size: 13px; }
"""


# ============================================================================================
# Pieces of a page (pure functions)
# ============================================================================================


def colour(d: float, scale: float) -> tuple[int, int, int]:
  """The background of a token of dependency ``d``: white at 0 to COLOUR_HI at ``scale``."""
  t = min(max(float(d) / scale, 0.0), 1.0) if scale > 0 else 0.0
  return tuple(int(round(lo + (hi - lo) * t)) for lo, hi in zip(COLOUR_LO, COLOUR_HI))


def _rgb(c) -> str:
  return f"rgb({c[0]},{c[1]},{c[2]})"


def step_scale(rows: list[dict]) -> float:
  """One colour scale for a step's pages: the largest dependency of its logged tokens (1 if none)."""
  top = max((max(r["dependency"]) for r in rows if r.get("dependency")), default=0.0)
  return top if top > 0 else 1.0


def response_html(tokens: list[str], dependency: list[float], top: list[int], scale: float) -> str:
  """The response as one span per token, its background the token's dependency (value in the tooltip)."""
  top, parts = set(top), []
  for i, (tok, d) in enumerate(zip(tokens, dependency)):
    c = colour(d, scale)
    fg = "#fff" if sum(c) < 450 else "#000"
    cls = "tok top" if i in top else "tok"
    parts.append(f'<span class="{cls}" style="background:{_rgb(c)};color:{fg}" '
                 f'title="token {i}: dependency {d:.4g}">{html.escape(tok)}</span>')
  return f'<div class="response">{"".join(parts)}</div>'


def legend_html(scale: float) -> str:
  stops = ", ".join(f"{_rgb(colour(scale * k / 4, scale))} {25 * k}%" for k in range(5))
  ticks = " ".join(f"{scale * k / 4:.3g}" for k in range(5))
  return (f'<div class="legend"><span>visual dependency</span><span>0</span>'
          f'<div class="bar" style="background: linear-gradient(to right, {stops})"></div>'
          f'<span>{scale:.3g}</span><span class="note">(ticks {ticks}; boxed: the response\'s top tokens; '
          f'hover a token for its value)</span></div>')


def histogram_svg(hist: dict, width: int = 640, height: int = 260) -> str:
  """Inline SVG bars of ``dependency.json``'s counts, one bar per bin, labelled by its edges."""
  counts, edges = hist["counts"], hist["edges"]
  left, bottom, top = 56, 56, 20
  plot_w, plot_h = width - left - 12, height - bottom - top
  peak = max(max(counts), 1)
  bw = plot_w / len(counts)
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" role="img" aria-label="dependency histogram">',
         f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#444"/>',
         f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#444"/>',
         f'<text x="{left - 6}" y="{top + 4}" font-size="11" text-anchor="end">{peak}</text>',
         f'<text x="{left - 6}" y="{top + plot_h}" font-size="11" text-anchor="end">0</text>',
         f'<text x="14" y="{top + plot_h / 2}" font-size="12" transform="rotate(-90 14 {top + plot_h / 2})" '
         f'text-anchor="middle">tokens</text>']
  for i, n in enumerate(counts):
    h = plot_h * n / peak
    x = left + i * bw
    out.append(f'<rect x="{x + 2:.1f}" y="{top + plot_h - h:.1f}" width="{bw - 4:.1f}" height="{h:.1f}" '
               f'fill="{_rgb(COLOUR_BAR)}" stroke="#333">'
               f'<title>[{edges[i]:g}, {edges[i + 1]:g}): {n} tokens</title></rect>')
    if n:
      out.append(f'<text x="{x + bw / 2:.1f}" y="{top + plot_h - h - 3:.1f}" font-size="10" '
                 f'text-anchor="middle">{n}</text>')
    out.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" font-size="10" text-anchor="middle">{edges[i]:g}</text>')
  out.append(f'<text x="{left + plot_w:.1f}" y="{top + plot_h + 14}" font-size="10" '
             f'text-anchor="middle">{edges[-1]:g}</text>')
  out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 12}" font-size="12" text-anchor="middle">'
             f'visual dependency (k3 estimate of KL(image ‖ masked image) per token; bins at fixed edges)</text>')
  out.append("</svg>")
  return "".join(out)


def _page(title: str, body: str) -> str:
  return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
          f'<style>{STYLE}</style></head><body>{body}</body></html>\n')


def _rewards_table(row: dict) -> str:
  cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{v:.3f}</td></tr>"
                  for k, v in row.items() if k.startswith("reward/"))
  return f"<table>{cells}</table>"


def sample_page(row: dict, index: int, total: int, step: int, scale: float, images: list[dict]) -> str:
  """One sample: images, prompt, answer, rewards, the coloured response."""
  figs = []
  for im in images:
    for key, caption in (("image", "image"), ("masked", "masked copy")):
      if im.get(key):
        figs.append(f'<figure><img src="{im[key]}" alt="{caption}"><figcaption>{caption}</figcaption></figure>')
  nav = ('<a href="index.html">index</a>'
         + (f' · <a href="sample_{index - 1}.html">previous</a>' if index > 0 else "")
         + (f' · <a href="sample_{index + 1}.html">next</a>' if index + 1 < total else ""))
  body = [f"<p>{nav}</p><h1>step {step} · sample {index + 1} of {total}</h1>"]
  if figs:
    body.append(f'<div class="images">{"".join(figs)}</div>')
  body.append(f"<h2>prompt</h2><pre>{html.escape(row.get('prompt', ''))}</pre>")
  body.append(f"<h2>answer</h2><pre>{html.escape(str(row.get('answer', '')))}</pre>")
  body.append(f"<h2>rewards</h2>{_rewards_table(row)}")
  body.append("<h2>response</h2>")
  if row.get("tokens") is not None:
    top = [t["index"] for t in row.get("top_tokens", [])]
    body.append(legend_html(scale))
    body.append(response_html(row["tokens"], row["dependency"], top, scale))
    body.append(f'<p class="note">mean dependency {row.get("dependency_mean", 0.0):.4g} over '
                f'{len(row["tokens"])} tokens; top tokens: '
                + ", ".join(f"<b>{html.escape(repr(t['token']))}</b> {t['dependency']:.4g}"
                            for t in row.get("top_tokens", [])) + "</p>")
  else:
    body.append(f"<pre>{html.escape(row.get('response', ''))}</pre>"
                '<p class="note">no visual dependency: this run makes no masked copies (plain GRPO).</p>')
  return _page(f"step {step} sample {index + 1}", "".join(body))


def index_page(step: int, rows: list[dict], hist: dict | None, scale: float, images: list[list[dict]],
               steps: list[int]) -> str:
  """The step's samples in a table (links to their pages) and the batch's dependency histogram."""
  body = [f"<h1>step {step}: {len(rows)} logged samples</h1>",
          '<p class="note">logged steps: ' + ", ".join(str(s) for s in steps) + "</p>"]
  if hist is not None and hist.get("tokens"):
    body.append(f"<h2>visual dependency over the batch's {hist['tokens']} response tokens</h2>")
    body.append(f'<p>mean {hist["mean"]:.4g} · median {hist["p50"]:.4g} · p90 {hist["p90"]:.4g} · '
                f'p99 {hist["p99"]:.4g} · max {hist["max"]:.4g}</p>')
    body.append(histogram_svg(hist))
  elif hist is None:
    body.append('<p class="note">no dependency histogram for this step (the run makes no masked copies).</p>')
  body.append("<h2>samples</h2><table><tr><th>#</th><th>image</th><th>answer</th><th>reward/overall</th>"
              "<th>mean dependency</th><th>top tokens</th><th>response</th></tr>")
  for i, (row, ims) in enumerate(zip(rows, images)):
    thumb = f'<img class="thumb" src="{ims[0]["image"]}" alt="image">' if ims and ims[0].get("image") else ""
    top = ", ".join(html.escape(repr(t["token"])) for t in row.get("top_tokens", []))
    dep = f'{row["dependency_mean"]:.4g}' if "dependency_mean" in row else "–"
    resp = row.get("response", "")
    resp = resp if len(resp) <= 80 else resp[:77] + "..."
    body.append(f'<tr><td><a href="sample_{i}.html">{i + 1}</a></td><td>{thumb}</td>'
                f'<td>{html.escape(str(row.get("answer", "")))}</td>'
                f'<td>{row.get("reward/overall", float("nan")):.3f}</td><td>{dep}</td><td>{top}</td>'
                f'<td><a href="sample_{i}.html">{html.escape(resp)}</a></td></tr>')
  body.append("</table>")
  if any(r.get("tokens") is not None for r in rows):
    body.append(legend_html(scale))
  return _page(f"step {step} samples", "".join(body))


# ============================================================================================
# Files
# ============================================================================================


def _data_uri(workdir: str, rel: str | None) -> str | None:
  """A PNG of the workdir as a data: URI (the pages stand alone), None when it is missing."""
  if not rel:
    return None
  path = workdir_lib.join(workdir, rel)
  if not workdir_lib.exists(path):
    return None
  return "data:image/png;base64," + base64.b64encode(workdir_lib.read_bytes(path)).decode()


def load_step(workdir: str, step: int | None = None) -> tuple[int, list[dict], dict | None, list[int]]:
  """(step, its samples.jsonl rows, its dependency.json or None, every logged step); ``step``
  None: the last logged one."""
  from papo_jax.diagnostics import HIST_FILE, step_dir
  rows = workdir_lib.read_jsonl(workdir_lib.join(workdir, "samples.jsonl"))
  steps = sorted({int(r["step"]) for r in rows})
  if not steps:
    raise ValueError(f"{workdir}: no samples logged (samples.jsonl is missing or empty; see log.samples_every)")
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise ValueError(f"{workdir}: step {step} has no samples; logged steps: {steps}")
  hist_path = workdir_lib.join(workdir, step_dir(step), HIST_FILE)
  hist = json.loads(workdir_lib.read_text(hist_path)) if workdir_lib.exists(hist_path) else None
  return step, [r for r in rows if int(r["step"]) == step], hist, steps


def default_out(workdir: str, step: int) -> str:
  if workdir_lib.is_url(workdir):
    return os.path.join(workdir_lib.cache_dir(workdir, "inspect"), f"step_{step}")
  return workdir_lib.join(workdir, "inspect", f"step_{step}")


def render(workdir: str, step: int | None = None, out: str | None = None) -> str:
  """Writes ``index.html`` and ``sample_<i>.html`` for one logged step; returns the index's path."""
  step, rows, hist, steps = load_step(workdir, step)
  out = out or default_out(workdir, step)
  os.makedirs(out, exist_ok=True)
  scale = step_scale(rows)
  images = [[{k: _data_uri(workdir, im.get(k)) for k in ("image", "masked")} for im in r.get("images", [])]
            for r in rows]
  for i, (row, ims) in enumerate(zip(rows, images)):
    with open(os.path.join(out, f"sample_{i}.html"), "w", encoding="utf-8") as f:
      f.write(sample_page(row, i, len(rows), step, scale, ims))
  index = os.path.join(out, "index.html")
  with open(index, "w", encoding="utf-8") as f:
    f.write(index_page(step, rows, hist, scale, images, steps))
  return index


def define_flags():
  flags.DEFINE_string("workdir", None, "A training workdir (local path or URL).")
  flags.DEFINE_integer("step", None, "The logged step to show (default: the last one).")
  flags.DEFINE_string("out", None, "Where the pages go (default: <workdir>/inspect/step_<N>).")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  try:
    index = render(FLAGS.workdir, FLAGS.step, FLAGS.out)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(index)


if __name__ == "__main__":
  define_flags()
  app.run(main)
