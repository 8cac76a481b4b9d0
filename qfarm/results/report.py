"""``qfarm report``: one self-contained HTML page (inline CSS and SVG, no script, no network) and optional PNGs.

Sections: the comparison table (frontier rows marked ★, failed/skipped rows with their reason), size on disk
vs perplexity with the frontier, memory and speed bars, training loss curves (rows that carry a
``loss_curve``), the prompt answers side by side, and for each sweep its spec and the environment each job
ran in (library versions, device, node), so a result can be reproduced.

Plots are drawn with matplotlib (Agg), imported here only: ``qfarm results`` and the rest of the CLI stay light.
"""

from __future__ import annotations

import html
import io
import platform
import time
from pathlib import Path
from typing import Any

from qfarm.results.columns import domains_of
from qfarm.results.rows import cell_of, visible

PNG_WIDTH_IN, DPI = 8.0, 100
FRONTIER_COLOR = "#d62728"
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:2em auto;max-width:1400px;
     padding:0 1.5em;color:#1b1f24;background:#fff}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}
.meta{color:#57606a} table{border-collapse:collapse;margin:.5em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:.25em .55em;text-align:right;vertical-align:top}
th{background:#f6f8fa} td.l,th.l{text-align:left} tr.failed td{background:#ffebe9}
tr.skipped td,tr.cancelled td{background:#fff8c5}
tr.front td.front{color:#d62728;font-weight:bold} figure{margin:1em 0} figure svg{max-width:100%;height:auto}
pre{background:#f6f8fa;padding:1em;overflow:auto;font-size:12px} .answers td{max-width:28em;text-align:left}
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _label(r: dict) -> str:
    """The job's label with its bits after the method: ``gptq 4b g=64``."""
    label = r.get("label") or r.get("job_id") or "?"
    if r.get("bits") is None or f"{r['bits']}b" in label.split():  # a label whose matrix varies bits says them
        return label
    method, _, rest = label.partition(" ")
    return f"{method} {r['bits']}b {rest}".strip()


# --- plots --------------------------------------------------------------------------------------------------


def _figure(height_in: float):
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "qfarm", "font.size": 9})
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(PNG_WIDTH_IN, height_in), dpi=DPI)


def _bars_height(n: int) -> float:
    return round(max(3.0, 0.32 * n + 1.2), 1)


def plots(data: list[dict]) -> dict[str, Any]:
    """name -> matplotlib Figure, for the rows that have the measurements each plot needs."""
    figs: dict[str, Any] = {}
    ok = [r for r in data if r.get("status") == "succeeded"]
    pts = [r for r in ok if isinstance(r.get("size_mb"), (int, float)) and isinstance(r.get("perplexity"), (int, float))]
    if pts:
        figs["scatter"] = _scatter(pts)
    mem = [r for r in ok if r.get("peak_mem_mb") is not None or r.get("size_mb") is not None]
    if mem:
        figs["memory"] = _bars(mem, [("size_mb", "size on disk (MB)", "#4c72b0"),
                                     ("peak_mem_mb", "peak memory (MB)", "#dd8452")], "Size and peak memory")
    speed = [r for r in ok if r.get("decode_tokens_per_s") is not None]
    if speed:
        figs["speed"] = _bars(speed, [("prefill_tokens_per_s", "prefill tokens/s", "#55a868"),
                                      ("decode_tokens_per_s", "decode tokens/s", "#8172b3")], "Speed")
    domains = domains_of(ok)
    by_domain = [r for r in ok if any(isinstance(r.get(f"ppl_delta_pct@{d}"), (int, float)) for d in domains)]
    if len(domains) > 1 and by_domain:
        figs["domains"] = _domains(by_domain, domains)
    curves = [r for r in ok if r.get("loss_curve")]
    if curves:
        figs["loss"] = _loss(curves)
    searched = [r for r in ok if r.get("search_role") in ("uniform", "candidate", "rung", "final")
                and isinstance(r.get("bits_per_weight"), (int, float))
                and isinstance(r.get(r.get("search_objective") or ""), (int, float))]
    if searched:
        figs["search"] = _search(searched)
    return figs


def _search(rows: list[dict]):
    """A search's candidates: the objective against bits per weight, uniform ones as circles, mixed ones as triangles
    with their predicted objective (hollow, joined to what was measured), the target, the pick starred."""
    fig, ax = _figure(4.5)
    column = rows[0]["search_objective"]
    wanted = rows[0].get("search_target") or {}
    across = "size_mb" if wanted.get("size_mb") is not None else "bits_per_weight"  # the target's measure
    # (a speed target: bits per weight across, the floor not on this axis)
    target = wanted.get(across)
    methods = sorted({r.get("method") or "?" for r in rows})
    cmap = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    halved = any(r["search_role"] == "final" for r in rows)  # screens measured on fewer windows: pale
    for r in rows:
        x, y, color = r[across], r[column], cmap[r.get("method") or "?"]
        mixed = r["search_role"] == "candidate" or (r["search_role"] in ("rung", "final") and bool(r.get("layer_formats")))
        pale = halved and r["search_role"] != "final"
        ax.scatter([x], [y], marker="D" if r["search_role"] == "final" else "^" if mixed else "o",
                   s=160 if r.get("search_pick") else 44, color=color, zorder=3, alpha=0.3 if pale else 1.0,
                   edgecolors="black" if r.get("search_pick") else "none", linewidths=1.5)
        predicted = r.get("search_predicted_kl")
        if mixed and column == "kl_div" and isinstance(predicted, (int, float)) and across == "bits_per_weight":
            px = r.get("search_predicted_bits_per_weight") or x
            ax.scatter([px], [predicted], marker="^", s=44, facecolors="none", edgecolors=color, zorder=2)
            ax.plot([px, x], [predicted, y], color=color, linewidth=0.8, linestyle=":", zorder=1)
        ax.annotate(("★ " if r.get("search_pick") else "") + _label(r), (x, y), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)
    if isinstance(target, (int, float)):
        ax.axvline(target, color=FRONTIER_COLOR, linestyle="--", linewidth=1.2,
                   label=f"target {target:g} " + ("bits/weight" if across == "bits_per_weight" else "MB")
                   + (f" (≤ {wanted['gpu_mem_gb']:g} GB on a GPU at {wanted.get('context')} tokens)"
                      if wanted.get("gpu_mem_gb") is not None else ""))
    for m in methods:
        ax.scatter([], [], color=cmap[m], label=m)
    ax.scatter([], [], marker="^", color="gray", label="mixed (hollow: predicted)")
    if halved:
        ax.scatter([], [], marker="D", color="gray", label="final (in full); pale: the screen")
    values = [r[column] for r in rows]
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight of the quantized layers" if across == "bits_per_weight" else "size on disk (MB)")
    ax.set_ylabel(f"{column} (the search's objective)")
    ax.set_title("Search: candidates against the target")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _pick(data: list[dict]) -> str:
    """Each search's pick, and the plain job that makes it again."""
    picks = [r for r in data if r.get("search_pick")]
    if not picks:
        return ""
    items = "".join(f"<li><b>{_esc(_label(r))}</b> ({_esc(r.get('sweep_id'))}): {_esc(r.get('search_objective'))} "
                    f"{_esc(r.get(r.get('search_objective') or ''))} at {_esc(r.get('bits_per_weight'))} bits per "
                    f"weight, {_esc(round(r['size_mb'], 1) if isinstance(r.get('size_mb'), (int, float)) else '-')} "
                    f"MB. As a plain job: <code>{_esc(r.get('search_fragment'))}</code></li>" for r in picks)
    return f'<h2 id="pick">Search pick</h2><ul>{items}</ul>'


def _num(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _path(data: list[dict]) -> str:
    """Each search's path, in the order its jobs finished: what the probes measured, each candidate's predicted and
    measured size and objective, whether it met the target, and the best so far (the pick in the end)."""
    from qfarm.sweep.search import meets_target, rank_key

    sweeps = sorted({r.get("sweep_id") for r in data if r.get("search_role")}, key=str)
    parts = []
    for sweep in sweeps:
        rows = sorted((r for r in data if r.get("sweep_id") == sweep and r.get("search_role")),
                      key=lambda r: (r.get("finished_at") is None, r.get("finished_at") or 0, str(r.get("job_id"))))
        column = next((r.get("search_objective") for r in rows if r.get("search_objective")), None)
        competing = ("final",) if any(r.get("search_role") == "final" for r in rows) else ("uniform", "candidate")
        best, body = None, []  # (its rank key, objective, label)
        for n, r in enumerate(rows, 1):
            role, ok = r.get("search_role"), r.get("status") == "succeeded"
            if role == "probe":
                what = (f"{_esc(r['probe_tables'])} table(s) (embeddings, head)" if r.get("probe_tables")
                        else f"{_esc(r.get('probe_layers') or '-')} layers")
                found = (f"{what}; their KL alone, summed: "
                         f"{_num(r.get('probe_kl_sum'), '{:.4g}')} (max {_num(r.get('probe_kl_max'), '{:.4g}')}); "
                         f"{_num(r.get('probe_s'), '{:.0f}')} s") if ok else _esc(r.get("status"))
                body.append(f'<tr><td>{n}</td><td class="l">probe</td><td class="l">{_esc(_label(r))}</td>'
                            f'<td class="l" colspan="6">{found}</td></tr>')
                continue
            value = r.get(column or "")
            met = ok and meets_target(r.get("search_target") or {}, r)
            key = rank_key(r.get("search_target") or {}, column, r.get("search_direction"), r) \
                if ok and role in competing else None
            if key is not None and (best is None or key < best[0]):
                best = (key, value, _label(r))
            mark = ' style="font-weight:bold"' if r.get("search_pick") else ""
            body.append(
                f"<tr{mark}><td>{n}</td><td class=\"l\">{_esc(role)}</td><td class=\"l\">"
                f"{'★ ' if r.get('search_pick') else ''}{_esc(_label(r))}</td>"
                f"<td>{_num(r.get('search_predicted_bits_per_weight'), '{:.3f}')} → "
                f"{_num(r.get('bits_per_weight'), '{:.3f}')}</td><td>{_num(r.get('size_mb'), '{:.1f}')}</td>"
                f"<td>{_num(r.get('search_predicted_kl'), '{:.4f}') if column == 'kl_div' else '-'} → "
                f"{_num(value, '{:.4g}') if ok else _esc(r.get('status'))}</td>"
                f"<td>{'yes' if met else 'no'}</td><td class=\"l\">"
                f"{_esc(best[2]) + ' (' + _num(best[1], '{:.4g}') + ')' if best else '-'}</td></tr>")
        parts.append(f'<h3>{_esc(sweep)}: {_esc(column)}</h3><table><thead><tr><th>#</th><th class="l">role</th>'
                     '<th class="l">job</th><th>bits per weight (predicted → measured)</th><th>MB</th>'
                     f'<th>{_esc(column)} (predicted → measured)</th><th>meets the target</th>'
                     f'<th class="l">best so far</th></tr></thead><tbody>{"".join(body)}</tbody></table>')
    if not parts:
        return ""
    return ('<h2 id="search-path">Search path</h2><p class="meta">In the order the jobs finished: the probes (each '
            "layer's sensitivity), then the candidates, each beside what the probes predicted for it (mixed ones), and "
            "the best so far among those that met the target (with successive halving: the screens on their few "
            f"windows, then the finals in full, which alone compete).</p>{''.join(parts)}")


def _domains(rows: list[dict], domains: list[str]):
    """Rows × evaluation domains: each cell the row's change in perplexity on that domain against the reference
    (colour and text), its KL beneath: which method breaks out of which domain."""
    import numpy as np

    grid = np.array([[r.get(f"ppl_delta_pct@{d}") if isinstance(r.get(f"ppl_delta_pct@{d}"), (int, float)) else np.nan
                      for d in domains] for r in rows], dtype=float)
    fig, ax = _figure(_bars_height(len(rows)))
    top = max(float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0, 1e-9)
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-top, vmax=top, aspect="auto")
    for i, r in enumerate(rows):
        for j, d in enumerate(domains):
            kl = r.get(f"kl@{d}")
            text = "—" if np.isnan(grid[i, j]) else f"{grid[i, j]:+.2f} %" + (f"\nKL {kl:.4f}" if isinstance(kl, float) else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if abs(np.nan_to_num(grid[i, j])) > top * 0.6 else "black")
    ax.set_xticks(range(len(domains)), domains)
    ax.set_yticks(range(len(rows)), [_label(r) for r in rows])
    ax.set_title("Δ perplexity vs the reference, by evaluation domain")
    fig.colorbar(image, ax=ax, label="Δ perplexity %", shrink=0.8)
    fig.tight_layout()
    return fig


def _scatter(pts: list[dict]):
    fig, ax = _figure(5.0)
    methods = sorted({r.get("method") or "?" for r in pts})
    cmap = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for m in methods:
        rows = [r for r in pts if (r.get("method") or "?") == m]
        ax.scatter([r["size_mb"] for r in rows], [r["perplexity"] for r in rows], s=42, color=cmap[m], label=m,
                   edgecolors=["black" if r.get("pareto") else "none" for r in rows], linewidths=1.2, zorder=3)
    front = _front_2d(pts)
    # with many points, name only the frontier and the reference (the table names the rest)
    named = pts if len(pts) <= 8 else [r for r in pts if r in front or r.get("method") == "none"]
    for r in named:
        ax.annotate(_label(r), (r["size_mb"], r["perplexity"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ppl = [r["perplexity"] for r in pts]
    if min(ppl) > 0 and max(ppl) / min(ppl) > 20:  # a broken 2-bit model would flatten everything else
        ax.set_yscale("log")
    ax.step([r["size_mb"] for r in front], [r["perplexity"] for r in front], where="post", color=FRONTIER_COLOR,
            linewidth=2, label="frontier (size, perplexity)", zorder=2)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Size vs perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _front_2d(pts: list[dict]) -> list[dict]:
    """The rows no other row beats on both size and perplexity, by increasing size."""
    from qfarm.results.compare import mark_pareto

    marked = mark_pareto(pts, ("size_mb", "perplexity"))
    front = [r for r, m in zip(pts, marked) if m["pareto"]]
    return sorted(front, key=lambda r: (r["size_mb"], r["perplexity"]))


def _bars(rows: list[dict], series, title: str):
    import numpy as np

    fig, ax = _figure(_bars_height(len(rows)))
    y = np.arange(len(rows))
    h = 0.8 / len(series)
    for i, (col, name, color) in enumerate(series):
        vals = [r.get(col) or 0 for r in rows]
        ax.barh(y + i * h - 0.4 + h / 2, vals, height=h, label=name, color=color)
    ax.set_yticks(y, [_label(r) for r in rows])
    ax.invert_yaxis()
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _loss(rows: list[dict]):
    fig, ax = _figure(4.0)
    for r in rows:
        curve = r["loss_curve"]
        ax.plot([p[0] for p in curve], [p[1] for p in curve], label=_label(r))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: the SVG is inline in HTML


# --- HTML ---------------------------------------------------------------------------------------------------


def _table(data: list[dict]) -> str:
    cols = visible(data)
    head = "".join(f'<th class="{"l" if c in ("job_id", "label", "status", "device", "sweep_id") else ""}">'
                   f"{_esc(h)}</th>" for c, h, _ in cols) + '<th class="l">note</th>'
    body = []
    for r in data:
        classes = [r.get("status") or ""] + (["front"] if r.get("pareto") else [])
        cells = []
        for c, _, fmt in cols:
            left = c in ("job_id", "label", "status", "device", "sweep_id")
            cells.append(f'<td class="{"l " if left else ""}{"front" if c == "pareto" else ""}">'
                         f"{_esc(cell_of(r, c, fmt))}</td>")
        cells.append(f'<td class="l">{_esc(r.get("error") or "")}</td>')
        body.append(f'<tr class="{" ".join(classes)}">{"".join(cells)}</tr>')
    return f'<table id="results"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _noise(data: list[dict]) -> str:
    """The pairs of rows whose perplexity or KL differ by no more than 2 standard errors: not a ranking."""
    from qfarm.results.compare import noise_pairs

    items = []
    for column, name in (("perplexity", "perplexity"), ("kl_div", "KL")):
        for a, b in noise_pairs(data, column):
            items.append(f"<li>{_esc(_label(a))} ≈ {_esc(_label(b))} on {name}: {_esc(cell_of(a, column, '{:.4g}'))}"
                         f" vs {_esc(cell_of(b, column, '{:.4g}'))}</li>")
    if not items:
        return ""
    return ('<h2 id="noise">Within the noise</h2><p class="meta">These differ by no more than 2 standard errors '
            f'(over tokens): evaluate more windows before ranking them.</p><ul class="noise">{"".join(items)}</ul>')


def _answers(data: list[dict]) -> str:
    prompts: list[str] = []
    for r in data:
        for a in r.get("answers") or []:
            if a["prompt"] not in prompts:
                prompts.append(a["prompt"])
    if not prompts:
        return ""
    rows = [r for r in data if r.get("answers")]
    head = '<th class="l">prompt</th>' + "".join(f'<th class="l">{_esc(_label(r))}</th>' for r in rows)
    body = []
    for p in prompts:
        cells = []
        for r in rows:
            answer = next((a["answer"] for a in r["answers"] if a["prompt"] == p), "")
            cells.append(f"<td>{_esc(answer)}</td>")
        body.append(f'<tr><td class="l"><b>{_esc(p)}</b></td>{"".join(cells)}</tr>')
    return (f'<h2 id="answers">Answers to the fixed prompts</h2><table class="answers"><thead><tr>{head}</tr>'
            f'</thead><tbody>{"".join(body)}</tbody></table>')


def _failures(data: list[dict]) -> str:
    bad = [r for r in data if r.get("status") not in ("succeeded", None)]
    if not bad:
        return ""
    items = "".join(f"<li><b>{_esc(_label(r))}</b> ({_esc(r.get('job_id'))}): {_esc(r.get('status'))}, "
                    f"{_esc(r.get('error') or 'no reason recorded')}</li>" for r in bad)
    return f'<h2 id="failures">Jobs that did not succeed</h2><ul>{items}</ul>'


def _environment(data: list[dict], records) -> str:
    import yaml

    parts = ['<h2 id="spec">Spec and environment</h2>']
    for rec in records:
        spec = rec.info.get("raw_spec")
        text = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True) if spec else "(not recorded)"
        parts.append(f"<h3>{_esc(rec.id)}</h3><p class=meta>submitted from {_esc(rec.source)}; artifacts under "
                     f"{_esc(rec.output_root)}</p><pre>{_esc(text)}</pre>")
    env_rows = []
    for r in data:
        versions = ", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items())
        env_rows.append("<tr>" + "".join(f'<td class="l">{_esc(v)}</td>' for v in (
            _label(r), r.get("job_id"), r.get("device"), r.get("node"), r.get("worker"), r.get("threads"), versions,
        )) + "</tr>")
    head = "".join(f'<th class="l">{h}</th>' for h in ("job", "id", "device", "node", "worker", "threads", "versions"))
    parts.append(f'<table id="environment"><thead><tr>{head}</tr></thead><tbody>{"".join(env_rows)}</tbody></table>')
    return "".join(parts)


_TITLES = {"scatter": ("frontier", "Size vs perplexity, with the frontier"), "memory": ("memory", "Size and memory"),
           "speed": ("speed", "Speed"), "loss": ("loss", "Training loss"),
           "domains": ("domains", "Quality by evaluation domain"), "search": ("search", "Search")}


def write_report(data: list[dict], records, output: Path, png_dir: Path | None, objectives,
                 note: str | None = None) -> list[Path]:
    """Write the HTML page (and PNGs); return the PNG paths written."""
    import matplotlib.pyplot as plt

    from qfarm import __version__

    figs = plots(data)
    written = []
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
        for name, fig in figs.items():
            path = png_dir / f"{name}.png"
            fig.savefig(path, format="png", dpi=DPI)
            written.append(path)
    sections = []
    for name, fig in figs.items():
        anchor, title = _TITLES[name]
        sections.append(f'<h2 id="{anchor}">{title}</h2><figure id="fig-{name}">{_svg(fig)}</figure>')
        plt.close(fig)
    names = ", ".join(r.id for r in records)
    counts: dict[str, int] = {}
    for r in data:
        counts[r.get("status") or "?"] = counts.get(r.get("status") or "?", 0) + 1
    summary = " · ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    frontier = ", ".join(objectives)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qfarm report: {_esc(names)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>qfarm report</h1>
<p class="meta">Sweeps: {_esc(names)} · {len(data)} jobs: {_esc(summary)} · generated {_esc(time.strftime('%Y-%m-%d %H:%M:%S'))}
by qfarm {_esc(__version__)} (Python {_esc(platform.python_version())})</p>
<h2 id="table">Comparison</h2>
<p class="meta">★ marks the Pareto frontier over ({_esc(frontier)}): no other job is at least as good on all of
them and better on one (differences within 2 standard errors are ties). Deltas are against each sweep's
reference (method none) on the same windows.{f" Note: {_esc(note)}." if note else ""}</p>
{_table(data)}
{_pick(data)}
{_path(data)}
{_noise(data)}
{"".join(sections)}
{_answers(data)}
{_failures(data)}
{_environment(data, records)}
</body></html>
"""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, encoding="utf-8")
    return written


