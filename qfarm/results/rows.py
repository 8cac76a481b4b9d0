"""Results: one flat row per job (failed and cancelled jobs too, with a one-line reason), and its formats.

``--format json`` prints a list of row objects; every row has at least the keys in ``COLUMNS``, plus
``EXTRA_COLUMNS`` and the job's options, under the names the spec gave them. Missing measurements are null,
never absent. Which columns exist, their headers and formats: ``qfarm.results.columns``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from typing import Any

from qfarm.farm.store import JobRecord
from qfarm.results.columns import CORE, PIPELINE_HIDDEN, TABLE, VIEW, column, dynamic_columns, se_of

COLUMNS = list(CORE)  # every row has these keys, null when not measured
EXTRA_COLUMNS = [c.name for c in TABLE if not c.core and c.group != "computed"]
FORMATS = ("table", "md", "csv", "json", "parquet")


def row(job: JobRecord) -> dict[str, Any]:
    """The job as one flat row."""
    result, spec = job.result or {}, job.job
    out: dict[str, Any] = {c: None for c in COLUMNS + EXTRA_COLUMNS}
    # a mix (a search's candidate, or layer_rules): its group sizes are per layer (layer_formats)
    mixed = ("group_size",) if spec.options.get("mixed") or spec.options.get("layer_rules") else ()
    out.update({k: v for k, v in spec.options.items() if k not in ("method", "bits") + mixed})  # as the spec names them
    search = spec.search or {}
    if search:
        out.update({"search_role": search.get("role"), "search_target": search.get("target"),
                    "search_objective": search.get("objective"), "search_direction": search.get("direction")})
        if search.get("role") in ("uniform", "candidate"):
            out["search_fragment"] = fragment(spec.options, result)
    out.update(result)
    if (search.get("target") or {}).get("gpu_mem_gb") is not None and search.get("role") != "probe":
        from qfarm.sweep.search import gpu_mem_gb

        out["search_gpu_mem_gb"] = gpu_mem_gb(search["target"], out)  # predicted: the size on disk and the KV cache
    out.update({
        "job_id": job.id,
        "status": job.status,
        "kind": spec.kind or None,
        # a search's final job: the candidate it evaluated in full
        "label": (f"{spec.label}: {result['search_final_label']}" if result.get("search_final_label")
                  else spec.label or None),
        "stage": spec.stage or None,
        "parent": spec.parent,
        "lineage": " → ".join(spec.lineage) or None,
        "method": spec.method if spec.method is not None else result.get("method"),
        # as expansion decided them (the method's nominal bits), else as the worker read them (an evaluated checkpoint)
        "bits": spec.bits if spec.bits is not None else result.get("bits"),
        "sweep_id": job.sweep_id,
        "attempts": job.attempts,
        "error": job.error,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "queued_at": job.queued_at,
        "duration_s": job.duration_s,
    })
    return out


def fragment(options: dict, result: dict) -> str:
    """A search candidate as a plain job of a spec's ``jobs:`` (one line of YAML flow), needing no probes: a mixed
    GGUF as its ``tensor_types`` rules and the ``imatrix`` file it was quantized with (under the same output root), a
    mixed rtn/gptq as ``layer_rules`` naming each layer's format as its artifact holds it."""
    from qfarm.sweep.search import block_rules

    opts = dict(options)
    if opts.get("mixed") and opts.get("method") == "gguf" and result.get("tensor_types"):
        opts.pop("mixed")
        opts["tensor_types"] = result["tensor_types"]
        if isinstance(result.get("gguf_imatrix"), dict) and result["gguf_imatrix"].get("file"):
            opts["imatrix"] = result["gguf_imatrix"]["file"]  # the probes' importance, kept beside the file
    elif opts.get("mixed") and opts.get("method") != "gguf" and isinstance(result.get("layer_formats"), dict) \
            and result["layer_formats"]:
        opts.pop("mixed")
        opts["layer_rules"] = block_rules(result["layer_formats"], anchored=True)
    return json.dumps({"kind": "quantize", **opts}, separators=(", ", ": "))


def rows(jobs: Iterable[JobRecord]) -> list[dict[str, Any]]:
    return [row(j) for j in jobs]


def cell(value: Any, fmt: str, se: float | None = None) -> str:
    """One value as a table shows it: - for null, ★ for a frontier row, JSON for nested values, ``±se`` after a
    measured figure that has a standard error."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "★" if value else ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)[:80]
    try:
        text = fmt.format(value)
    except (ValueError, TypeError):
        return str(value)
    return f"{text} ±{se:.2g}" if se else text


def cell_of(row: dict, name: str, fmt: str) -> str:
    return cell(row.get(name), fmt, se_of(row, name))


def visible(data: list[dict], columns: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(name, header, format) of the columns asked for, or of the default view without the ones empty in every
    row (e.g. speed on sleep jobs), the sweep column only for rows of several sweeps, the frontier column only
    once computed, each lm-eval task's main metric and recovery, and (a pipeline) without the columns that make room for
    its training and merge columns."""
    tasks = {c.name: c for c in dynamic_columns(data)}  # lm-eval tasks', evaluation domains'
    if columns:
        return [(c, (tasks.get(c) or column(c)).header or c, (tasks.get(c) or column(c)).format) for c in columns]
    sweeps = {r.get("sweep_id") for r in data}
    out = []
    pipeline = any(r.get("parent") for r in data)
    for c in sorted(VIEW + tuple(c for c in tasks.values() if c.header), key=lambda c: c.view):
        if (c.name == "sweep_id" and len(sweeps) < 2) or (c.name == "stage" and not pipeline):
            continue
        if pipeline and c.name in PIPELINE_HIDDEN:
            continue
        if c.name in ("job_id", "label", "status") or any(r.get(c.name) is not None for r in data):
            out.append((c.name, c.header, c.format))
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
        from qfarm.errors import QfarmError

        raise QfarmError("--format parquet needs pyarrow: pip install 'qfarm[report]' (`make install` installs it; "
                         "`make demo` does not)") from None
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
    cols = visible(data, columns)
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " | note |", "|" + "---|" * (len(cols) + 1)]
    for r in data:
        cells = [cell_of(r, c, f).replace("|", "\\|") for c, _, f in cols]
        lines.append("| " + " | ".join(cells) + f" | {(r.get('error') or '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def rich_table(data: list[dict], title: str | None = None, columns: list[str] | None = None,
               width: int | None = None):
    """The comparison table for a terminal: ``width`` None draws every column, else the default view's columns
    are kept by priority (qfarm.results.columns) until the table fits, the job labels whole (qfarm.results.fit); columns the
    user named with ``--columns`` are all kept."""
    from qfarm.results.fit import Col, fit

    tasks = {c.name: c for c in dynamic_columns(data)}  # lm-eval tasks', evaluation domains'
    left = ("job_id", "label", "status", "device", "stage", "lineage", "sweep_id", "runtime")
    shown = visible(data, columns)
    cols = [Col(c, header, (tasks.get(c) or column(c)).priority if not columns else 0,
                "left" if c in left else "right") for c, header, _ in shown]
    formats = {c: f for c, _, f in shown}
    notes = any(r.get("error") for r in data)
    if notes:  # why a row failed is kept longer than most figures, folded onto more lines
        cols.append(Col("error", "note", 7.5, fold=True, min_width=20))
    cells = [{**{c.key: cell_of(r, c.key, formats[c.key]) for c in cols if c.key in formats},
              "error": r.get("error") or ""} for r in data]
    style = {"failed": "red", "cancelled": "yellow", "skipped": "yellow", "running": "cyan", "queued": "dim"}
    table, _ = fit(cols, cells, width, title=title, styles=[style.get(r["status"]) for r in data])
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
            head = f"  {label:>10}: "
            room = max(20, width - len(head) - 1)
            out.append(f"{head}{flat[:room]}{'…' if len(flat) > room else ''}")
    return "\n".join(out)


def render(data: list[dict], fmt: str, columns: list[str] | None = None) -> str:
    if fmt == "json":
        return to_json(only(data, columns))
    if fmt == "csv":
        return to_csv(only(data, columns))
    if fmt == "md":
        return to_markdown(data, columns)
    raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
