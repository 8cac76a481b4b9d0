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
from .methods import METHODS, MODEL_KINDS, PARENT_KINDS, TRAIN_METHODS, MergeOptions, Options, SleepOptions
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
    renamed,
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
    stage: str = ""  # the job group's name (or its kind)
    parent: str | None = None  # the job this one starts from (``from:``): it runs once that one succeeded
    lineage: tuple[str, ...] = ()  # labels of its ancestors, oldest first
    data: dict[str, Any] | None = None  # a train job's resolved dataset ref
    task_eval: dict[str, Any] | None = None  # held-out examples of a train job: its task_loss, and its descendants'

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
            "stage": self.stage,
            "parent": self.parent,
            "lineage": list(self.lineage),
            "data": self.data,
            "task_eval": self.task_eval,
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
        extra = renamed(SpecError(list(errors.problems.values())), err.groups_key).problems
        known = {(p.path, p.message) for p in err.problems}
        extra = [p for p in extra if (p.path, p.message) not in known and p.path not in {q.path for q in err.problems}]
        raise SpecError(err.problems + extra, err.source) from None
    try:
        return loaded, expand(loaded)
    except SpecError as err:
        raise renamed(err, loaded.groups_key) from None


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
    stages: dict[str, list[Job]] = {}  # stage name -> its jobs, for the stages that come from it
    for gi, group in enumerate(spec.jobs):
        parents = _parents(gi, group, spec, stages, errors)
        group_eval = _eval(group.eval, loaded.base_dir, errors) if group.eval is not None else eval_spec
        mine: list[Job] = []
        for combo, sources in _combinations(gi, group, errors):
            options = _options(gi, group, combo, sources, errors)
            if options is None:
                continue
            refs = checks(gi, group, options, sources)
            for parent in parents:
                job = _job(spec, gi, group, options, model_ref, group_eval, refs, parent)
                if job.id not in jobs:
                    jobs[job.id] = job
                    mine.append(job)
            if len(jobs) > MAX_JOBS:
                errors.add(("jobs", gi), f"the sweep expands to more than {MAX_JOBS} jobs; split it")
                raise SpecError(list(errors.problems.values()), loaded.source)
        stages[_stage_name(gi, group)] = mine
    if errors.problems:
        raise SpecError(list(errors.problems.values()), loaded.source)
    sweep_id = f"{spec.name}-{digest([spec.name, sorted(jobs)], 8)}"
    return Plan(sweep_id, spec.name, list(jobs.values()))


def _stage_name(gi: int, group: JobGroup) -> str:
    return group.name or f"{group.kind}{gi}"


def _parents(gi: int, group: JobGroup, spec: SweepSpec, stages: dict[str, list[Job]],
             errors: _Collector) -> list[Job | None]:
    """The jobs this group's jobs start from (``from:``): [None] for a group that starts from the model."""
    names = [_stage_name(i, g) for i, g in enumerate(spec.jobs)]
    if len(set(names)) != len(names) and names.count(_stage_name(gi, group)) > 1:
        errors.add(("jobs", gi, "name"), f"stage name {_stage_name(gi, group)!r} is used twice; names must be unique")
    if group.from_ is None:
        if group.kind == "merge":
            errors.add(("jobs", gi), "a merge stage needs from: the name of the train stage whose adapters it merges")
        return [None]
    loc = ("jobs", gi, "from")
    earlier = {_stage_name(i, g): g for i, g in enumerate(spec.jobs[:gi])}
    if group.from_ not in earlier:
        later = group.from_ in names[gi:]
        why = ("stages run in file order: from names an earlier stage." if later
               else f"no stage is named {group.from_!r}.{did_you_mean(group.from_, earlier)}")
        errors.add(loc, f"{why} Earlier stages: {allowed(earlier) or 'none'}")
        return []
    kinds = PARENT_KINDS[group.kind]
    if earlier[group.from_].kind not in kinds:
        can = f"a {' or '.join(sorted(kinds))} stage" if kinds else "nothing: it starts from the sweep's model"
        errors.add(loc, f"a {group.kind} stage cannot start from stage {group.from_!r} (kind "
                        f"{earlier[group.from_].kind}); it can start from {can}")
        return []
    return list(stages.get(group.from_, []))


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
    matrix, fixed = _axes(group)
    keys = list(matrix)
    for key in keys:
        if not matrix[key]:
            errors.add(("jobs", gi, "matrix", key), "an empty list gives no jobs; give at least one value")
    for key in set(keys) & set(fixed):
        errors.add(("jobs", gi, key), f"{key!r} is both a fixed option and a matrix key; keep one")
    for ri, row in enumerate(group.exclude):
        unknown = [k for k in row if k not in keys]
        for k in unknown:
            errors.add(("jobs", gi, "exclude", ri, k), f"not a matrix key.{did_you_mean(k, keys)} Matrix keys: {allowed(keys)}")
        if not unknown and not any(_matches(row, dict(zip(keys, c))) for c in itertools.product(*matrix.values())):
            errors.add(("jobs", gi, "exclude", ri), "this exclude row matches no combination of the matrix")
    for values in itertools.product(*[list(enumerate(matrix[k])) for k in keys]):
        combo = {k: v for k, (_, v) in zip(keys, values)}
        if any(_matches(row, combo) for row in group.exclude):
            continue
        sources = {k: ("jobs", gi, "matrix", k, i) if k in group.matrix else ("jobs", gi, k, i)
                   for k, (i, _) in zip(keys, values)}
        sources.update({k: ("jobs", gi, k) for k in fixed})
        yield {**fixed, **combo}, sources


AXIS_KEYS = frozenset({"onto"})  # a stage-level list of these is an axis: `onto: [base, dequantized]`, one job each


def _axes(group: JobGroup) -> tuple[dict[str, list], dict[str, Any]]:
    """The group's matrix and fixed options, with a fixed list of an AXIS_KEYS option moved into the matrix."""
    fixed = dict(group.model_extra or {})
    matrix = dict(group.matrix)
    for key in AXIS_KEYS:
        if isinstance(fixed.get(key), list) and key not in matrix:
            matrix[key] = fixed.pop(key)
    return matrix, fixed


def _matches(row: dict, combo: dict) -> bool:
    return all(k in combo and combo[k] == v and type(combo[k]) is type(v) for k, v in row.items())


def _options(gi: int, group: JobGroup, combo: dict, sources: dict, errors: _Collector) -> Options | None:
    here = ("jobs", gi)
    if group.kind == "sleep":
        model, context = SleepOptions, "kind sleep"
    elif group.kind == "merge":
        model, context = MergeOptions, "kind merge"
    elif group.kind == "train":
        method = combo.get("method")
        if method not in TRAIN_METHODS:
            where = sources.get("method", here)
            said = f"unknown training method {method!r}.{did_you_mean(str(method), TRAIN_METHODS)}" if method else \
                "every train job needs a method (in matrix or as a key)"
            errors.add(where, f"{said} Allowed: {allowed(TRAIN_METHODS)}")
            return None
        model, context = TRAIN_METHODS[method], f"method {method}"
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

    def __call__(self, gi: int, group: JobGroup, options: Options, sources: dict) -> dict[str, dict | None]:
        """The job's resolved data refs (``calibration``, a train job's ``data``), problems added to errors."""
        group_size = getattr(options, "group_size", None)
        if group_size and group_size > 0 and self.shape is not None:
            self._check_group_size(group, options, sources.get("group_size", ("jobs", gi)), group_size)
        out: dict[str, dict | None] = {"calibration": None, "data": None}
        calibration = getattr(options, "calibration", None)
        if calibration is not None:
            ref = self._dataset(calibration.dataset, calibration.text_field,
                                sources.get("calibration", ("jobs", gi)) + ("dataset",))
            if ref is not None:
                out["calibration"] = {**ref, "samples": calibration.samples, "seq_len": calibration.seq_len}
        data = getattr(options, "dataset", None)
        if data is not None:
            out["data"] = self._dataset(data.path, data.text_field, sources.get("dataset", ("jobs", gi)) + ("path",))
        targets = getattr(options, "target_modules", None)
        if targets and self.shape is not None:
            known = sorted({name.rsplit(".", 1)[-1] for name in self.shape.inputs})
            for ti, name in enumerate(targets):
                if name.rsplit(".", 1)[-1] not in known:
                    loc = sources.get("target_modules", ("jobs", gi)) + (ti,)
                    self.errors.add(loc, f"the model has no Linear layer {name!r}.{did_you_mean(name, known)} "
                                         f"Its Linear layers: {allowed(known)}")
        return out

    def _dataset(self, text: str, text_field: str, loc: tuple) -> dict | None:
        try:
            ref = resolve_dataset(text, self.base_dir, text_field)
        except RefError as e:
            self.errors.add(loc, str(e))
            return None
        return {"kind": ref.kind, "location": ref.location, "text_field": ref.text_field, "key": ref.key}

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
         refs: dict[str, dict | None], parent: Job | None = None) -> Job:
    opts = options.model_dump()
    calibration, data = refs.get("calibration"), refs.get("data")
    if calibration is not None:
        opts["calibration"]["dataset"] = calibration["key"]  # the identity of the data, not how it was spelled
    if data is not None:
        opts["dataset"]["path"] = data["key"]
    if group.kind == "merge" and parent is not None and parent.options.get("method") != "qlora":
        opts["onto"] = "base"  # a LoRA adapter was trained on the float base: "dequantized" is that same base
    uses_model = group.kind in MODEL_KINDS
    identity = {
        "v": SPEC_VERSION,
        "kind": group.kind,
        "options": opts,
        "model": model_ref["key"] if uses_model and model_ref else None,
        "eval": _eval_identity(eval_spec) if uses_model else None,
    }
    if parent is not None:
        identity["from"] = parent.id
    job_id = "j" + digest(identity, 12)
    label = opts.get("method") or group.kind
    matrix, _ = _axes(group)
    varied = [k for k in matrix if k not in ("method", "bits", "index")]
    for k in varied:
        if k in opts:
            name = _SHORT.get(k, k)
            label += f" {name}={_scalar_text(opts[k])}" if name else f" {_scalar_text(opts[k])}"
    if group.kind == "sleep":
        label = f"sleep[{opts['index']}]"
    task_eval = parent.task_eval if parent is not None else None
    if group.kind == "train" and data is not None:
        ds = opts["dataset"]
        task_eval = {"dataset": data, "format": ds["format"], "eval_samples": ds["eval_samples"],
                     "seq_len": opts["seq_len"], "train_job": job_id}
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
        stage=_stage_name(gi, group),
        parent=parent.id if parent is not None else None,
        lineage=(parent.lineage + (parent.label,)) if parent is not None else (),
        data=data,
        task_eval=task_eval if uses_model else None,
    )


_SHORT = {"group_size": "g", "act_order": "act_order", "gguf_type": "", "lora_alpha": "alpha", "lora_dropout": "dropout"}  # "": the value alone (gguf Q4_K_M)


def _scalar_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _eval_identity(eval_spec: dict | None) -> Any:
    if not eval_spec:
        return None
    ev = json.loads(json.dumps(eval_spec))
    if ev.get("perplexity") and isinstance(ev["perplexity"].get("dataset"), dict):
        ev["perplexity"]["dataset"] = ev["perplexity"]["dataset"]["key"]
    return ev
