"""Expansion: a validated spec -> the sweep's jobs, each with an id that is a hash of its normalized spec.

The same job (same model, options and evaluation) has the same id in every sweep and on every submit, so
resubmitting a file, or a file that adds one method, reuses what already finished.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import Problem, SpecError, allowed, did_you_mean
from .methods import METHODS, MODEL_KINDS, Options, SleepOptions
from .modelinfo import shape_of
from .refs import RefError, resolve_dataset, resolve_model
from .spec import (
    EvalSpec,
    JobGroup,
    LoadedSpec,
    SweepSpec,
    describe,
    format_path,
    line_of,
    load_spec,
)

MAX_JOBS = 100_000
SPEC_VERSION = 1  # bump when a change to evaluation makes old results incomparable


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    group: int
    label: str
    options: dict[str, Any]
    model: dict[str, Any] | None
    eval: dict[str, Any] | None
    resources: dict[str, Any]
    max_attempts: int
    timeout_s: float | None
    calibration: dict[str, Any] | None = None  # resolved calibration data ref, for methods that calibrate

    def payload(self) -> dict[str, Any]:
        """The JSON-safe description stored in Redis and handed to a worker."""
        return {
            "id": self.id,
            "kind": self.kind,
            "group": self.group,
            "label": self.label,
            "options": self.options,
            "model": self.model,
            "eval": self.eval,
            "resources": self.resources,
            "max_attempts": self.max_attempts,
            "timeout_s": self.timeout_s,
            "calibration": self.calibration,
        }


@dataclass(frozen=True)
class Plan:
    sweep_id: str
    name: str
    jobs: list[Job] = field(default_factory=list)

    def counts_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for job in self.jobs:
            out[job.kind] = out.get(job.kind, 0) + 1
        return out


def digest(obj: Any, n: int) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


class _Collector:
    def __init__(self, lines: dict):
        self.lines = lines
        self.problems: dict[tuple[str, str], Problem] = {}

    def add(self, loc: tuple, message: str) -> None:
        problem = Problem(format_path(loc), message, line_of(self.lines, loc))
        self.problems.setdefault((problem.path, problem.message), problem)


def load_plan(path: str | Path) -> tuple[LoadedSpec, Plan]:
    """Load, validate and expand a spec file. Every problem, schema or semantic, is raised together."""
    try:
        loaded = load_spec(path)
    except SpecError as err:
        if err.raw is None:
            raise
        errors = _Collector(err.lines)
        _semantic_checks(err.raw, err.base_dir, errors)
        known = {(p.path, p.message) for p in err.problems}
        extra = [p for key, p in errors.problems.items() if key not in known and p.path not in {q.path for q in err.problems}]
        raise SpecError(err.problems + extra, err.source) from None
    return loaded, expand(loaded)


def _semantic_checks(raw: dict, base_dir: Path, errors: _Collector) -> None:
    """What expand() would say about the parts of a spec that passed the schema, when others did not."""
    groups = []
    for gi, group in enumerate(raw["jobs"] if isinstance(raw.get("jobs"), list) else []):
        try:
            groups.append((gi, JobGroup.model_validate(group)))
        except ValidationError:
            continue
    model_ref = None
    if any(g.kind in MODEL_KINDS for _, g in groups) and isinstance(raw.get("model"), str):
        model_ref = _model(raw["model"], base_dir, errors)
    try:
        ev = EvalSpec.model_validate(raw.get("eval") or {})
        _eval(ev, base_dir, errors)
    except ValidationError:
        pass
    checks = _MethodChecks(model_ref, base_dir, errors)
    for gi, group in groups:
        for combo, sources in _combinations(gi, group, errors):
            options = _options(gi, group, combo, sources, errors)
            if options is not None:
                checks(gi, group, options, sources)


def expand(loaded: LoadedSpec) -> Plan:
    """Expand every job group's matrix, validate each combination, and return the sweep's jobs."""
    spec, errors = loaded.spec, _Collector(loaded.lines)
    needs_model = any(g.kind in MODEL_KINDS for g in spec.jobs)
    model_ref = eval_spec = None
    if needs_model:
        if spec.model is None:
            errors.add(("model",), "required: the model the jobs run on (e.g. bundled:smollm2-135m)")
        else:
            model_ref = _model(spec.model, loaded.base_dir, errors)
        eval_spec = _eval(spec.eval, loaded.base_dir, errors)
    jobs: dict[str, Job] = {}
    checks = _MethodChecks(model_ref, loaded.base_dir, errors)
    for gi, group in enumerate(spec.jobs):
        for combo, sources in _combinations(gi, group, errors):
            options = _options(gi, group, combo, sources, errors)
            if options is None:
                continue
            calibration = checks(gi, group, options, sources)
            job = _job(spec, gi, group, options, model_ref, eval_spec, calibration)
            jobs.setdefault(job.id, job)
            if len(jobs) > MAX_JOBS:
                errors.add(("jobs", gi), f"the sweep expands to more than {MAX_JOBS} jobs; split it")
                raise SpecError(list(errors.problems.values()), loaded.source)
    if errors.problems:
        raise SpecError(list(errors.problems.values()), loaded.source)
    sweep_id = f"{spec.name}-{digest([spec.name, sorted(jobs)], 8)}"
    return Plan(sweep_id, spec.name, list(jobs.values()))


def _model(text: str, base_dir: Path, errors: _Collector) -> dict | None:
    try:
        ref = resolve_model(text, base_dir)
    except RefError as e:
        errors.add(("model",), str(e))
        return None
    return {"kind": ref.kind, "location": ref.location, "gguf_file": ref.gguf_file, "key": ref.key, "name": text}


def _eval(eval_spec: EvalSpec, base_dir: Path, errors: _Collector) -> dict:
    ev = eval_spec.model_dump()
    ppl = eval_spec.perplexity
    if ppl is not None:
        try:
            ref = resolve_dataset(ppl.dataset, base_dir, ppl.text_field)
            ev["perplexity"]["dataset"] = {"kind": ref.kind, "location": ref.location, "text_field": ref.text_field, "key": ref.key}
        except RefError as e:
            errors.add(("eval", "perplexity", "dataset"), str(e))
    return ev


def _combinations(gi: int, group: JobGroup, errors: _Collector):
    """Yield (combination, {option: YAML path of its value}) for every matrix row not excluded."""
    keys = list(group.matrix)
    for key in keys:
        if not group.matrix[key]:
            errors.add(("jobs", gi, "matrix", key), "an empty list gives no jobs; give at least one value")
    fixed = {k: v for k, v in (group.model_extra or {}).items()}
    for key in set(keys) & set(fixed):
        errors.add(("jobs", gi, key), f"{key!r} is both a fixed option and a matrix key; keep one")
    for ri, row in enumerate(group.exclude):
        unknown = [k for k in row if k not in keys]
        for k in unknown:
            errors.add(("jobs", gi, "exclude", ri, k), f"not a matrix key.{did_you_mean(k, keys)} Matrix keys: {allowed(keys)}")
        if not unknown and not any(_matches(row, dict(zip(keys, c))) for c in itertools.product(*group.matrix.values())):
            errors.add(("jobs", gi, "exclude", ri), "this exclude row matches no combination of the matrix")
    for values in itertools.product(*[list(enumerate(group.matrix[k])) for k in keys]):
        combo = {k: v for k, (_, v) in zip(keys, values)}
        if any(_matches(row, combo) for row in group.exclude):
            continue
        sources = {k: ("jobs", gi, "matrix", k, i) for k, (i, _) in zip(keys, values)}
        sources.update({k: ("jobs", gi, k) for k in fixed})
        yield {**fixed, **combo}, sources


def _matches(row: dict, combo: dict) -> bool:
    return all(k in combo and combo[k] == v and type(combo[k]) is type(v) for k, v in row.items())


def _options(gi: int, group: JobGroup, combo: dict, sources: dict, errors: _Collector) -> Options | None:
    here = ("jobs", gi)
    if group.kind == "sleep":
        model, context = SleepOptions, "kind sleep"
    else:
        method = combo.get("method")
        if method is None:
            errors.add(here, f"every quantize job needs a method (in matrix or as a key). Allowed: {allowed(METHODS)}")
            return None
        if method not in METHODS:
            errors.add(
                sources["method"],
                f"unknown method {method!r}.{did_you_mean(str(method), METHODS)} Allowed: {allowed(METHODS)}",
            )
            return None
        model, context = METHODS[method].options, f"method {method}"
        combo = _for_method(group, combo, model)
    try:
        return model.model_validate(combo)
    except ValidationError as err:
        for e in err.errors():
            name = e["loc"][0] if e["loc"] else None
            loc = sources.get(name, here) + tuple(e["loc"][1:])
            if e["type"] == "extra_forbidden" and len(e["loc"]) == 1:
                options = [k for k in model.model_fields if k != "method"]
                msg = f"option {name!r} does not apply to {context}.{did_you_mean(name, options)} Its options: {allowed(options)}"
            else:
                dotted = ".".join(str(p) for p in e["loc"])
                msg = f"{context}: {dotted}: {describe(e, model, tuple(e['loc']))}"
                if group.matrix and name in group.matrix and "method" in group.matrix:
                    row = {"method": combo.get("method"), name: combo.get(name)}
                    msg += f". To skip this combination, add to exclude: {json.dumps(row)}; or give it its own job group"
            errors.add(loc, msg)
        return None


class _MethodChecks:
    """Checks of one job's options against the model and the filesystem, beyond what its pydantic model can see:
    group sizes that must divide every Linear layer's input, and the calibration dataset (resolved here)."""

    def __init__(self, model_ref: dict | None, base_dir: Path, errors: _Collector):
        self.model_ref, self.base_dir, self.errors = model_ref, base_dir, errors

    @functools.cached_property
    def shape(self):
        """Read once per spec, and only when a job has a group size to check."""
        return shape_of(self.model_ref) if self.model_ref else None

    def __call__(self, gi: int, group: JobGroup, options: Options, sources: dict) -> dict | None:
        group_size = getattr(options, "group_size", None)
        if group_size and group_size > 0 and self.shape is not None:
            self._check_group_size(group, options, sources.get("group_size", ("jobs", gi)), group_size)
        calibration = getattr(options, "calibration", None)
        if calibration is None:
            return None
        try:
            ref = resolve_dataset(calibration.dataset, self.base_dir, calibration.text_field)
        except RefError as e:
            self.errors.add(sources.get("calibration", ("jobs", gi)) + ("dataset",), str(e))
            return None
        return {"kind": ref.kind, "location": ref.location, "text_field": ref.text_field, "key": ref.key,
                "samples": calibration.samples, "seq_len": calibration.seq_len}

    def _check_group_size(self, group: JobGroup, options: Options, loc: tuple, group_size: int) -> None:
        bad = self.shape.not_divisible(group_size)
        if not bad:
            return
        method, shape = options.method, self.shape
        by_size: dict[int, list[str]] = {}
        for name, n in bad.items():
            by_size.setdefault(n, []).append(name.rsplit(".", 1)[-1])
        layers = "; ".join(f"{', '.join(names)} ({n} inputs)" for n, names in by_size.items())
        fits = [str(g) for g in shape.dividing_group_sizes()] + ["-1 (one scale per output channel)"]
        msg = (f"method {method}: group_size {group_size} does not divide the input size of "
               f"{len(bad) * shape.layers} of {len(shape.inputs) * shape.layers} Linear layers of "
               f"{self.model_ref.get('name') or self.model_ref['key']}: {layers}, in each of its {shape.layers} "
               f"blocks. Group sizes that divide every layer: {allowed(fits)}")
        if "group_size" in group.matrix:
            msg += f". To skip it, add to exclude: {json.dumps({'method': method, 'group_size': group_size})}"
        self.errors.add(loc, msg)


def _for_method(group: JobGroup, combo: dict, model: type[Options]) -> dict:
    """In a group whose matrix varies the method, a fixed option goes to the methods that have it: a group's
    ``calibration`` is for gptq and awq, not rtn or bnb. An option that none of them has stays an error."""
    methods = [METHODS[m].options for m in group.matrix.get("method", []) if isinstance(m, str) and m in METHODS]
    if len(methods) < 2:
        return combo
    fixed = set(group.model_extra or {})
    drop = {k for k in fixed if k not in model.model_fields and any(k in m.model_fields for m in methods)}
    return {k: v for k, v in combo.items() if k not in drop}


def _job(spec: SweepSpec, gi: int, group: JobGroup, options: Options, model_ref, eval_spec,
         calibration: dict | None = None) -> Job:
    opts = options.model_dump()
    if calibration is not None:
        opts["calibration"]["dataset"] = calibration["key"]  # the identity of the data, not how it was spelled
    uses_model = group.kind in MODEL_KINDS
    identity = {
        "v": SPEC_VERSION,
        "kind": group.kind,
        "options": opts,
        "model": model_ref["key"] if uses_model and model_ref else None,
        "eval": _eval_identity(eval_spec) if uses_model else None,
    }
    job_id = "j" + digest(identity, 12)
    label = opts.get("method") or group.kind
    varied = [k for k in group.matrix if k not in ("method", "bits", "index")]
    for k in varied:
        if k in opts:
            name = _SHORT.get(k, k)
            label += f" {name}={_scalar_text(opts[k])}" if name else f" {_scalar_text(opts[k])}"
    if group.kind == "sleep":
        label = f"sleep[{opts['index']}]"
    resources = (group.resources or spec.resources).model_dump()
    return Job(
        id=job_id,
        kind=group.kind,
        group=gi,
        label=label,
        options=opts,
        model=model_ref if uses_model else None,
        eval=eval_spec if uses_model else None,
        resources=resources,
        max_attempts=group.max_attempts or spec.max_attempts,
        timeout_s=group.timeout_s or spec.timeout_s,
        calibration=calibration,
    )


_SHORT = {"group_size": "g", "act_order": "act_order", "gguf_type": ""}  # "": the value alone (gguf Q4_K_M)


def _scalar_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _eval_identity(eval_spec: dict | None) -> Any:
    if not eval_spec:
        return None
    ev = json.loads(json.dumps(eval_spec))
    if ev.get("perplexity") and isinstance(ev["perplexity"].get("dataset"), dict):
        ev["perplexity"]["dataset"] = ev["perplexity"]["dataset"]["key"]
    return ev
