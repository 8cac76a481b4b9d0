"""Results: one flat row per job (failed and cancelled jobs too, with a one-line reason), and its formats.

``--format json`` prints a list of row objects; every row has at least the keys in ``COLUMNS``, plus
``EXTRA_COLUMNS`` and the job's options. Missing measurements are null, never absent.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from typing import Any

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
    # pipelines (train -> merge -> quantize): where a job sits, and what training and merging measured
    "stage", "parent", "lineage", "r", "lora_alpha", "lora_dropout", "train_loss", "train_loss_first",
    "train_loss_best", "train_s", "step_s", "train_steps", "train_tokens_per_s", "trainable_params",
    "trainable_pct", "train_peak_mem_mb", "adapter_mb", "task_loss", "ref_task_loss", "task_loss_delta",
    "onto", "merge_max_abs_diff", "merge_mean_abs_diff", "merge_top1_agree", "loss_curve",
    # what computed the 4-bit layers, and (merge of a QLoRA adapter) that CPU default kernel's own error
    "kernel", "kernel_default", "kernel_max_abs_diff", "kernel_mean_abs_diff", "kernel_top1_agree",
]
FORMATS = ("table", "md", "csv", "json", "parquet")

# (column, header, format) for the terminal and markdown tables.
_SHOWN = [
    ("sweep_id", "sweep", "{}"), ("job_id", "job", "{}"), ("pareto", "front", "{}"), ("stage", "stage", "{}"),
    ("label", "method", "{}"), ("lineage", "from", "{}"), ("bits", "bits", "{}"), ("status", "status", "{}"),
    ("size_mb", "size MB", "{:.1f}"), ("size_vs_ref", "×ref", "{:.2f}"), ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("load_s", "load s", "{:.2f}"), ("perplexity", "ppl", "{:.3f}"), ("ppl_delta_pct", "Δppl %", "{:+.2f}"),
    ("kl_div", "KL", "{:.4f}"), ("top1_agree", "top-1", "{:.3f}"),
    ("prefill_tokens_per_s", "prefill tok/s", "{:.1f}"), ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("train_loss", "train loss", "{:.3f}"), ("task_loss", "task loss", "{:.3f}"),
    ("trainable_params", "trainable", "{:,}"), ("train_s", "train s", "{:.0f}"),
    ("merge_max_abs_diff", "merge Δmax", "{:.2g}"), ("merge_top1_agree", "merge top-1", "{:.3f}"),
    ("kernel_max_abs_diff", "kernel Δmax", "{:.2g}"),
    ("device", "device", "{}"), ("duration_s", "time s", "{:.1f}"),
]


# A pipeline's table has its training and merge columns: these make room for them (--columns shows any).
_PIPELINE_HIDDEN = {"bits", "size_vs_ref", "load_s", "top1_agree", "prefill_tokens_per_s", "trainable_params", "device"}


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
        "stage": job.spec.get("stage"),
        "parent": job.spec.get("parent"),
        "lineage": " → ".join(job.spec.get("lineage") or []) or None,
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
    if isinstance(value, bool):
        return "★" if value else ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)[:80]
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _visible(data: list[dict], columns: list[str] | None = None) -> list[tuple[str, str, str]]:
    """The columns asked for, or the default view without the ones empty in every row (e.g. speed on sleep
    jobs), the sweep column only for rows of several sweeps, and the frontier column only once computed."""
    if columns:
        known = {c[0]: c for c in _SHOWN}
        return [known.get(c, (c, c, "{:.4g}")) for c in columns]
    sweeps = {r.get("sweep_id") for r in data}
    out = []
    pipeline = any(r.get("parent") for r in data)
    for c in _SHOWN:
        if (c[0] == "sweep_id" and len(sweeps) < 2) or (c[0] == "stage" and not pipeline):
            continue
        if pipeline and c[0] in _PIPELINE_HIDDEN:
            continue
        if c[0] in ("job_id", "label", "status") or any(r.get(c[0]) is not None for r in data):
            out.append(c)
    return out


def to_json(data: list[dict]) -> str:
    return json.dumps(data, indent=2, default=str)


def only(data: list[dict], columns: list[str] | None) -> list[dict]:
    """Rows cut down to ``columns`` (in that order); all of them when None."""
    if not columns:
        return data
    return [{c: r.get(c) for c in columns} for r in data]


def to_csv(data: list[dict]) -> str:
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in data for k in r)) or COLUMNS
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", restval="")
    writer.writeheader()
    for r in data:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return buf.getvalue()


def to_parquet(data: list[dict], path: str) -> None:
    """One Parquet file; nested values (answers, versions, calibration) as JSON text, so every column is flat."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        from .errors import QfarmError

        raise QfarmError("--format parquet needs pyarrow: pip install pyarrow (it comes with qfarm's ml extra)") from None
    keys = list(dict.fromkeys(k for r in data for k in r)) or COLUMNS
    flat = [{k: json.dumps(r.get(k)) if isinstance(r.get(k), (list, dict)) else r.get(k) for k in keys} for r in data]
    columns = {}
    for k in keys:
        values = [row[k] for row in flat]
        kinds = {type(v) for v in values if v is not None}
        if kinds == {int, float}:
            values = [None if v is None else float(v) for v in values]
        elif len(kinds) > 1:
            values = [None if v is None else str(v) for v in values]
        columns[k] = values
    pq.write_table(pa.table(columns), path)


def to_markdown(data: list[dict], columns: list[str] | None = None) -> str:
    cols = _visible(data, columns)
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " | note |", "|" + "---|" * (len(cols) + 1)]
    for r in data:
        cells = [_cell(r.get(c), f).replace("|", "\\|") for c, _, f in cols]
        lines.append("| " + " | ".join(cells) + f" | {(r.get('error') or '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def rich_table(data: list[dict], title: str | None = None, columns: list[str] | None = None):
    from rich.table import Table

    cols = _visible(data, columns)
    table = Table(title=title, show_lines=False, header_style="bold")
    notes = any(r.get("error") for r in data)
    for c, header, _ in cols:
        table.add_column(header, justify="left" if c in ("job_id", "label", "status", "device", "stage", "lineage") else "right",
                         no_wrap=c in ("job_id", "label", "status"))
    if notes:
        table.add_column("note", overflow="fold", min_width=20)
    style = {"failed": "red", "cancelled": "yellow", "skipped": "yellow", "running": "cyan", "queued": "dim"}
    for r in data:
        cells = [_cell(r.get(c), f) for c, _, f in cols] + ([r.get("error") or ""] if notes else [])
        table.add_row(*cells, style=style.get(r["status"]))
    return table


def answers_text(data: list[dict], width: int = 100) -> str:
    """The prompt answers, side by side by prompt: for each prompt, one line per job."""
    by_prompt: dict[str, list[tuple[str, str]]] = {}
    for r in data:
        label = r["label"] or r["job_id"]
        if r.get("lineage"):
            label += f" (from {r['lineage']})"
        for a in r.get("answers") or []:
            by_prompt.setdefault(a["prompt"], []).append((label, a["answer"]))
    out = []
    for prompt, items in by_prompt.items():
        out.append(f"Q: {prompt}")
        for label, answer in items:
            flat = " ".join(answer.split())
            out.append(f"  {label:>10}: {flat[: width - 14]}{'…' if len(flat) > width - 14 else ''}")
    return "\n".join(out)


def render(data: list[dict], fmt: str, columns: list[str] | None = None) -> str:
    if fmt == "json":
        return to_json(only(data, columns))
    if fmt == "csv":
        return to_csv(only(data, columns))
    if fmt == "md":
        return to_markdown(data, columns)
    raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
