"""Comparing result rows, across one or more sweeps: filters, sort, column choice, deltas, the Pareto frontier.

Pure logic on the flat rows of ``qfarm.results.rows`` (no Redis, no ML): the CLI's ``results`` and ``report`` use it.

- ``--where method=gptq`` (also ``!=``, ``<``, ``<=``, ``>``, ``>=``; numbers compare as numbers, ``a|b`` means
  either), several ``--where`` all hold;
- ``--sort perplexity`` ascending, ``--sort -decode_tokens_per_s`` descending, missing values last;
- deltas against each sweep's reference row (method ``none``): ``decode_speedup``, ``prefill_speedup``,
  ``mem_vs_ref`` beside the ``size_vs_ref`` and ``ppl_delta_pct`` the jobs record themselves;
- ``pareto``: True for a succeeded row that no other row beats on every objective of the frontier (by default
  size on disk, perplexity and decode speed: smaller, lower, faster), False for a dominated one, None where a
  row lacks one of the measurements. A difference within 2 standard errors (where both rows have one) is a tie;
- ``--sort COL`` on a column with standard errors says which neighbouring rows are within that noise (``ties``).
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any

from qfarm.errors import UsageError, allowed, did_you_mean
from qfarm.results.columns import MAXIMIZE, MINIMIZE, dynamic_columns, recovery_name, se_of, task_info

# Objectives the frontier can use, and which way is better: the columns with a direction (qfarm.results.columns).
DEFAULT_FRONTIER = ("size_mb", "perplexity", "decode_tokens_per_s")

_OPS = [("!=", operator.ne), ("<=", operator.le), (">=", operator.ge), ("=", operator.eq), ("<", operator.lt),
        (">", operator.gt)]
_CONDITION = re.compile(r"^\s*([A-Za-z_][\w]*)\s*(!=|<=|>=|=|<|>)\s*(.*?)\s*$")


def with_deltas(data: list[dict]) -> list[dict]:
    """Each row with ``decode_speedup``, ``prefill_speedup`` and ``mem_vs_ref`` against its sweep's reference."""
    refs: dict[str, dict] = {}
    for r in data:
        if r.get("method") == "none" and r.get("status") == "succeeded":
            refs.setdefault(r.get("sweep_id"), r)
    out = []
    for r in data:
        ref = refs.get(r.get("sweep_id"))
        r = dict(r)
        r["decode_speedup"] = _ratio(r.get("decode_tokens_per_s"), ref and ref.get("decode_tokens_per_s"))
        r["prefill_speedup"] = _ratio(r.get("prefill_tokens_per_s"), ref and ref.get("prefill_tokens_per_s"))
        r["mem_vs_ref"] = _ratio(r.get("peak_mem_mb"), ref and ref.get("peak_mem_mb"))
        r.update(recoveries(r, ref))
        out.append(r)
    return out


def recoveries(row: dict, ref: dict | None) -> dict:
    """``<task>_recovery`` for each task of the row: its main metric over the reference's (the llm-compressor
    convention; reference over variant for a lower-is-better metric, so that above 1 is always better), with
    ``_se`` from both standard errors (taken as independent: an upper bound for the same documents)."""
    out: dict = {}
    for task, info in task_info([row]).items():
        col, name = info["column"], recovery_name(task)
        num, den = (row, ref or {}) if info.get("higher_is_better", True) else (ref or {}, row)
        value = _ratio(num.get(col), den.get(col))
        se_num, se_den = se_of(num, col), se_of(den, col)
        out[name] = value
        out[f"{name}_se"] = (value * math.hypot(se_num / num[col], se_den / den[col])
                             if value and se_num is not None and se_den is not None else None)
    return out


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return a / b
    return None


def objectives_of(data: list[dict] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(lower-is-better, higher-is-better) columns: the table's, and those of the rows' lm-eval tasks and evaluation
    domains (``kl@wiki``)."""
    tasks = dynamic_columns(data)
    return (MINIMIZE + tuple(c.name for c in tasks if c.direction == "min"),
            MAXIMIZE + tuple(c.name for c in tasks if c.direction == "max"))


def parse_frontier(text: str | None, data: list[dict] = ()) -> tuple[str, ...]:
    if not text:
        return DEFAULT_FRONTIER
    cols = tuple(c.strip() for c in text.split(",") if c.strip())
    lower, higher = objectives_of(data)
    known = lower + higher
    for c in cols:
        if c not in known:
            raise UsageError(f"--frontier: {c!r} is not an objective.{did_you_mean(c, known)} "
                             f"Lower is better: {allowed(lower)}; higher is better: {allowed(higher)}")
    if len(cols) < 2:
        raise UsageError("--frontier needs at least two objectives, e.g. size_mb,perplexity")
    return cols


def mark_pareto(data: list[dict], objectives=DEFAULT_FRONTIER) -> list[dict]:
    """Rows with ``pareto`` set (see the module docstring). Ties do not dominate each other: values within 0.1 %,
    or within the noise (2 standard errors of the difference, where both rows have one), are equal."""
    lower = objectives_of(data)[0]

    def point(r: dict):
        if r.get("status") != "succeeded":
            return None
        values = [r.get(c) for c in objectives]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return None
        sign = [1 if c in lower else -1 for c in objectives]  # all "smaller is better"
        return (tuple(s * v for s, v in zip(sign, values)), tuple(noise_se(r, c) for c in objectives))

    points = [point(r) for r in data]
    known = [p for p in points if p is not None]
    out = []
    for r, p in zip(data, points):
        r = dict(r)
        r["pareto"] = None if p is None else not any(_dominates(o, p) for o in known)
        out.append(r)
    return out


TIE = 1e-3  # values within 0.1% are equal: two 4-bit files differing by a few KB of metadata tie on size
NOISE_SE = 2.0  # differences within this many standard errors are ties


def _dominates(a: tuple, b: tuple) -> bool:
    """``a`` at least as good as ``b`` on every objective and better on one (smaller is better), ties within
    TIE or the noise."""
    (va, sa), (vb, sb) = a, b
    slack = [_slack(x, y, ex, ey) for x, y, ex, ey in zip(va, vb, sa, sb)]
    return (all(x <= y + d for x, y, d in zip(va, vb, slack)) and any(x < y - d for x, y, d in zip(va, vb, slack)))


def noise_se(row: dict, column: str) -> float | None:
    """The standard error to rank ``column`` by. Perplexity: the paired one against the reference (same windows,
    same tokens: ``ppl_delta_pct_se`` in perplexity units, a domain's ``ppl_delta_pct@NAME_se``), which is what
    separates two variants; else its own."""
    if column == "perplexity" or column.startswith("ppl@"):  # a domain's too (``ppl@wiki``)
        at = column[len("ppl"):] if column != "perplexity" else ""
        paired, ref = se_of(row, f"ppl_delta_pct{at}"), row.get(f"ref_ppl{at}" if at else "ref_perplexity")
        if paired is not None and isinstance(ref, (int, float)):
            return paired / 100 * ref
    return se_of(row, column)


def _slack(x: float, y: float, se_x: float | None, se_y: float | None) -> float:
    noise = NOISE_SE * math.hypot(se_x, se_y) if se_x is not None and se_y is not None else 0.0
    return max(TIE * max(abs(x), abs(y)), noise)


def within_noise(a: dict, b: dict, column: str) -> bool:
    """Whether two rows' values of ``column`` differ by no more than 2 standard errors of the difference."""
    x, y, ex, ey = a.get(column), b.get(column), noise_se(a, column), noise_se(b, column)
    if not all(isinstance(v, (int, float)) for v in (x, y)) or ex is None or ey is None:
        return False
    return abs(x - y) <= NOISE_SE * math.hypot(ex, ey)


def noise_pairs(data: list[dict], column: str) -> list[tuple[dict, dict]]:
    """Pairs of succeeded rows whose ``column`` values are within the noise of each other."""
    ok = [r for r in data if r.get("status") == "succeeded" and noise_se(r, column) is not None]
    return [(a, b) for i, a in enumerate(ok) for b in ok[i + 1:] if within_noise(a, b, column)]


def filter_rows(data: list[dict], conditions: list[str]) -> list[dict]:
    checks = [_condition(c, data) for c in conditions]
    return [r for r in data if all(check(r) for check in checks)]


def _condition(text: str, data: list[dict]):
    m = _CONDITION.match(text)
    if not m:
        raise UsageError(f"--where {text!r}: write COLUMN=VALUE (also !=, <, <=, >, >=; a|b for either), "
                         "e.g. --where method=gptq --where 'bits<=4'")
    column, op_text, raw = m.groups()
    columns = _columns(data)
    if data and column not in columns:
        raise UsageError(f"--where {text!r}: no column {column!r}.{did_you_mean(column, columns)} "
                         f"Columns: {allowed(columns)}")
    op = dict(_OPS)[op_text]
    wanted = [_value(v) for v in raw.split("|")] if op_text in ("=", "!=") else [_value(raw)]

    def check(r: dict) -> bool:
        have = r.get(column)
        if op_text == "=":
            return any(_same(have, w) for w in wanted)
        if op_text == "!=":
            return not any(_same(have, w) for w in wanted)
        w = wanted[0]
        if isinstance(have, (int, float)) and not isinstance(have, bool) and isinstance(w, (int, float)):
            return op(have, w)
        return have is not None and op(str(have), str(w))

    return check


def _value(text: str) -> Any:
    text = text.strip()
    if text.lower() == "null":  # not "none": that is a method's name
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _same(have: Any, want: Any) -> bool:
    if isinstance(have, bool) or isinstance(want, bool):
        return have is want
    if isinstance(have, (int, float)) and isinstance(want, (int, float)):
        return float(have) == float(want)
    return (have is None and want is None) or (have is not None and str(have) == str(want))


def sort_rows(data: list[dict], key: str | None) -> list[dict]:
    if not key:
        return data
    descending = key.startswith("-")
    column = key.lstrip("-+")
    columns = _columns(data)
    if data and column not in columns:
        raise UsageError(f"--sort {key!r}: no column {column!r}.{did_you_mean(column, columns)} "
                         f"Columns: {allowed(columns)}")
    present = [r for r in data if r.get(column) is not None]
    missing = [r for r in data if r.get(column) is None]

    def k(r: dict):
        v = r[column]
        return (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v))

    ordered = sorted(present, key=k, reverse=descending) + missing
    return _ties(ordered, column)


def _ties(ordered: list[dict], column: str) -> list[dict]:
    """Each row with ``ties``: the labels of the rows next to it in this order whose ``column`` is within the
    noise of its own (None when there are none, or no standard errors)."""
    out = []
    for i, r in enumerate(ordered):
        near = [o for o in ordered[max(0, i - 1):i] + ordered[i + 1:i + 2] if within_noise(r, o, column)]
        r = dict(r)
        r["ties"] = ", ".join(f"≈ {o.get('label') or o.get('job_id')}" for o in near) or None
        out.append(r)
    return out


def pick_columns(data: list[dict], text: str | None) -> list[str] | None:
    """The columns a user asked for (validated), or None for the default view."""
    if not text:
        return None
    cols = [c.strip() for c in text.split(",") if c.strip()]
    columns = _columns(data)
    for c in cols:
        if data and c not in columns:
            raise UsageError(f"--columns: no column {c!r}.{did_you_mean(c, columns)} Columns: {allowed(columns)}")
    return cols


def _columns(data: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in data for k in r))


SPEED = frozenset({"decode_tokens_per_s", "prefill_tokens_per_s", "ttft_ms", "ms_per_token", "decode_speedup",
                   "prefill_speedup"})


def frontier_for(data: list[dict], objectives: tuple[str, ...], chosen: bool) -> tuple[tuple[str, ...], str | None]:
    """The frontier's objectives for these rows, and a note when the default had to change: speeds measured by
    different runtimes (llama.cpp, transformers-bnb, dense) are not comparable, so the default leaves them out; so
    does a sweep that measured no speed."""
    speed = [c for c in objectives if c in SPEED]
    if chosen or not speed or len(objectives) - len(speed) < 2:
        return objectives, None
    runtimes = {r.get("runtime") for r in data if r.get("status") == "succeeded" and r.get("runtime")
                and any(isinstance(r.get(c), (int, float)) for c in speed)}  # of the rows that measured a speed
    kept = tuple(c for c in objectives if c not in SPEED)
    if not runtimes:  # no row measured speed (eval.speed: null): the frontier is over the rest, nothing to say
        return kept, None
    if len(runtimes) < 2:
        return objectives, None
    return kept, (f"the frontier leaves out {', '.join(speed)}: the rows' speeds come from different runtimes "
                  f"({', '.join(sorted(runtimes))}); --frontier {','.join(objectives)} includes them anyway")


def compare(data: list[dict], where: list[str] = (), sort: str | None = None,
            frontier: tuple[str, ...] = DEFAULT_FRONTIER) -> list[dict]:
    """Deltas, then the frontier over the rows that pass the filters, then the order asked for."""
    return compare_noted(data, where, sort, frontier)[0]


def compare_noted(data: list[dict], where: list[str] = (), sort: str | None = None,
                  frontier: tuple[str, ...] = DEFAULT_FRONTIER, chosen: bool = True):
    """``compare``, where (not ``chosen``: the default objectives) the frontier may leave speed out: (rows, the
    objectives used, the note that says why they changed or None; see ``frontier_for``)."""
    data = filter_rows(mark_search_pick(with_deltas(data)), list(where))
    objectives, note = frontier_for(data, frontier, chosen)
    return sort_rows(mark_pareto(data, objectives), sort), objectives, note


def mark_search_pick(data: list[dict]) -> list[dict]:
    """Rows with ``search_pick`` set for a search's candidates (qfarm.sweep.search): true for the one, per sweep,
    whose measured objective is best among those whose measured bits per weight (or size on disk) meet the target
    (an equal objective goes to the smaller); false for its other candidates; null for rows of no search and probes.
    A search with successive halving (``final`` rows) picks among its finals only: its screens (and ``rung`` rows)
    were measured on fewer windows."""
    from qfarm.sweep.search import rank_key

    halved = {r.get("sweep_id") for r in data if r.get("search_role") == "final"}  # the finals compete, not screens
    best: dict[str, dict] = {}
    for r in data:
        roles = ("final",) if r.get("sweep_id") in halved else ("uniform", "candidate")
        if r.get("search_role") not in roles or r.get("status") != "succeeded":
            continue
        key = rank_key(r.get("search_target") or {}, r.get("search_objective"), r.get("search_direction"), r)
        if key is None:
            continue
        mine = best.get(r.get("sweep_id"))
        if mine is None or key < mine["key"]:
            best[r.get("sweep_id")] = {"key": key, "job": r.get("job_id")}
    out = []
    for r in data:
        if r.get("search_role") in ("uniform", "candidate", "rung", "final"):
            r = {**r, "search_pick": (best.get(r.get("sweep_id")) or {}).get("job") == r.get("job_id")}
        out.append(r)
    return out
