"""Results: one flat row per job (failed and cancelled jobs too, with a one-line reason), and its formats.

``--format json`` prints a list of row objects; every row has at least the keys in ``COLUMNS``, plus
``EXTRA_COLUMNS`` and the job's options. Missing measurements are null, never absent.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Iterable

from .store import JobRecord

COLUMNS = [
    "job_id", "status", "method", "bits", "size_mb", "size_vs_ref", "peak_mem_mb", "load_s", "perplexity",
    "ppl_delta_pct", "kl_div", "top1_agree", "prefill_tokens_per_s", "decode_tokens_per_s", "device", "duration_s",
]
EXTRA_COLUMNS = [
    "sweep_id", "kind", "label", "attempts", "error", "started_at", "finished_at", "queued_at", "model_mem_mb",
    "ref_size_mb", "size_source", "quant_s", "quant_peak_mem_mb", "calib_samples", "calib_tokens",
    "calib_source", "calib_overlap_tokens", "prepare_s", "ttft_ms", "ms_per_token", "ref_perplexity",
    "ppl_windows", "ppl_tokens", "base_cache_hit", "node", "worker", "threads", "artifact", "answers",
]
FORMATS = ("table", "md", "csv", "json")

# (column, header, format) for the terminal and markdown tables.
_SHOWN = [
    ("job_id", "job", "{}"), ("label", "method", "{}"), ("bits", "bits", "{}"), ("status", "status", "{}"),
    ("size_mb", "size MB", "{:.1f}"), ("size_vs_ref", "×ref", "{:.2f}"), ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("load_s", "load s", "{:.2f}"), ("perplexity", "ppl", "{:.3f}"), ("ppl_delta_pct", "Δppl %", "{:+.2f}"),
    ("kl_div", "KL", "{:.4f}"), ("top1_agree", "top-1", "{:.3f}"),
    ("prefill_tokens_per_s", "prefill tok/s", "{:.1f}"), ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("device", "device", "{}"), ("duration_s", "time s", "{:.1f}"),
]


def row(job: JobRecord) -> dict[str, Any]:
    """The job as one flat row."""
    result = job.result or {}
    options = dict(job.spec.get("options") or {})
    out: dict[str, Any] = {c: None for c in COLUMNS + EXTRA_COLUMNS}
    out.update({f"opt_{k}": v for k, v in options.items() if k not in ("method", "bits")})
    out.update(result)
    out.update({
        "job_id": job.id,
        "status": job.status,
        "kind": job.spec.get("kind"),
        "label": job.spec.get("label"),
        "method": options.get("method", result.get("method")),
        "bits": options.get("bits", result.get("bits")),
        "sweep_id": job.sweep_id,
        "attempts": job.attempts,
        "error": job.error,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "queued_at": job.queued_at,
        "duration_s": job.duration_s,
    })
    return out


def rows(jobs: Iterable[JobRecord]) -> list[dict[str, Any]]:
    return [row(j) for j in jobs]


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _visible(data: list[dict]) -> list[tuple[str, str, str]]:
    """Columns worth showing: drop the ones that are empty for every row (e.g. speed on sleep jobs)."""
    return [c for c in _SHOWN if c[0] in ("job_id", "label", "status") or any(r.get(c[0]) is not None for r in data)]


def to_json(data: list[dict]) -> str:
    return json.dumps(data, indent=2, default=str)


def to_csv(data: list[dict]) -> str:
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in data for k in r)) or COLUMNS
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for r in data:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return buf.getvalue()


def to_markdown(data: list[dict]) -> str:
    cols = _visible(data)
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " | note |", "|" + "---|" * (len(cols) + 1)]
    for r in data:
        cells = [_cell(r.get(c), f).replace("|", "\\|") for c, _, f in cols]
        lines.append("| " + " | ".join(cells) + f" | {(r.get('error') or '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def rich_table(data: list[dict], title: str | None = None):
    from rich.table import Table

    cols = _visible(data)
    table = Table(title=title, show_lines=False, header_style="bold")
    notes = any(r.get("error") for r in data)
    for c, header, _ in cols:
        table.add_column(header, justify="left" if c in ("job_id", "label", "status", "device") else "right",
                         no_wrap=c in ("job_id", "label", "status"))
    if notes:
        table.add_column("note", overflow="fold", min_width=20)
    style = {"failed": "red", "cancelled": "yellow", "running": "cyan", "queued": "dim"}
    for r in data:
        cells = [_cell(r.get(c), f) for c, _, f in cols] + ([r.get("error") or ""] if notes else [])
        table.add_row(*cells, style=style.get(r["status"]))
    return table


def answers_text(data: list[dict], width: int = 100) -> str:
    """The prompt answers, side by side by prompt: for each prompt, one line per job."""
    by_prompt: dict[str, list[tuple[str, str]]] = {}
    for r in data:
        for a in r.get("answers") or []:
            by_prompt.setdefault(a["prompt"], []).append((r["label"] or r["job_id"], a["answer"]))
    out = []
    for prompt, items in by_prompt.items():
        out.append(f"Q: {prompt}")
        for label, answer in items:
            flat = " ".join(answer.split())
            out.append(f"  {label:>10}: {flat[: width - 14]}{'…' if len(flat) > width - 14 else ''}")
    return "\n".join(out)


def render(data: list[dict], fmt: str) -> str:
    if fmt == "json":
        return to_json(data)
    if fmt == "csv":
        return to_csv(data)
    if fmt == "md":
        return to_markdown(data)
    raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
