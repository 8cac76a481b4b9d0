"""The job record: one typed job from spec to row.

``qfarm.sweep.expand.build`` makes a ``Job`` from a validated sweep; its ``payload()`` is what Redis stores (JSON) and
the scheduler hands a worker, with where to write (``output_dir``) and what it takes from the jobs it needs
(``input``). ``Job.from_payload`` reads that JSON back into the same type, its options into the very options model
the spec was validated with (``qfarm.sweep.methods``), every default applied there and only there. Workers read fields
(``ctx.job.bits``, ``ctx.opts.group_size``, ``ctx.job.input.artifact``), not dict keys with defaults of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cached_property
from types import SimpleNamespace
from typing import Any

from qfarm.errors import Permanent


@dataclass(frozen=True)
class Input:
    """What a job takes from the jobs before it (the scheduler's ``readiness``): its parent's id, kind, label,
    options and artifact (``from:``), the 4-bit base an adapter was trained on, and the artifacts of the jobs it
    ``needs`` (a shared capture), by job id."""

    id: str | None = None
    kind: str | None = None
    label: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    artifact: str | None = None
    quantized_base: str | None = None
    needs: dict[str, str | None] = field(default_factory=dict)
    # the jobs it waits ``after`` (a search's screened candidates, for its final jobs), each however it ended:
    # {id, status, label, options, result: the row's qfarm.sweep.search.SCREEN_KEYS and objective}
    after: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict | None) -> Input:
        data = data if isinstance(data, dict) else {}
        return cls(**{f.name: data[f.name] for f in fields(cls) if data.get(f.name) is not None})

    @cached_property
    def opts(self):
        """The parent's options, typed as its own job reads them (``Job.opts``); None without a parent."""
        if self.kind is None:
            return None
        return typed_options(self.kind, self.options)


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
    hung_after_s: float | None = None  # no heartbeat for this long while running: the worker is killed, the job retried
    start_timeout_s: float | None = None  # its worker not started by then (no node holds it): killed; see scheduler
    calibration: dict[str, Any] | None = None  # resolved calibration data ref, for methods that calibrate
    stage: str = ""  # the job group's name (or its kind)
    parent: str | None = None  # the job this one starts from (``from:``): it runs once that one succeeded
    lineage: tuple[str, ...] = ()  # labels of its ancestors, oldest first
    data: dict[str, Any] | None = None  # a train job's resolved dataset ref; an evaluate job's checkpoint ref
    task_eval: dict[str, Any] | None = None  # held-out examples of a train job: its task_loss, and its descendants'
    worker: str = ""  # the kind's worker entry point ("module:function"): workers never read the registry
    needs_model: bool = False  # its worker loads a model: the scheduler has such workers import the ML stack early
    impl: str | None = None  # the method's implementation ("module:Class"), for kinds whose methods have one
    bits: int | None = None  # the nominal bits of the weights (the ``bits`` column): decided once, by expand
    axes: tuple[str, ...] = ()  # the option keys its group's matrix varies: always in its label (not stored)
    needs: tuple[str, ...] = ()  # jobs that must succeed before it runs, whose output it reads (a shared capture)
    after: tuple[str, ...] = ()  # jobs that must have ended (however) before it runs: a search's final reads them
    # a ``search:`` sweep's job: {"role": probe | uniform | candidate, "target": {...}, "objective": ...}
    # (qfarm.sweep.search); not in its id: a uniform candidate is the plain job a grid would run
    search: dict[str, Any] | None = None
    # given by the scheduler when it hands the job to a worker (not part of what a sweep stores)
    output_dir: str | None = None
    input: Input = field(default_factory=Input)

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
            "hung_after_s": self.hung_after_s,
            "start_timeout_s": self.start_timeout_s,
            "calibration": self.calibration,
            "stage": self.stage,
            "parent": self.parent,
            "lineage": list(self.lineage),
            "data": self.data,
            "task_eval": self.task_eval,
            "worker": self.worker,
            "needs_model": self.needs_model,
            "impl": self.impl,
            "bits": self.bits,
            "needs": list(self.needs),
            **({"search": self.search} if self.search else {}),  # a search's job only
            **({"after": list(self.after)} if self.after else {}),  # a search's final only
        }

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> Job:
        """A stored payload (and what the scheduler added: ``output_dir``, ``input``) as a Job. Keys a record of an
        older qfarm lacks take the field's default; its options are typed when first read (``opts``)."""
        known = {f.name for f in fields(cls)} - {"input", "lineage", "needs", "axes", "after"}
        kwargs = {k: data[k] for k in known if k in data}
        types = {"id": str, "kind": str, "options": dict}
        missing = [k for k, t in types.items() if not isinstance(data.get(k), t)]
        if missing:
            raise Permanent(f"a job record without {', '.join(missing)}: not one qfarm wrote")
        kwargs.setdefault("group", 0)
        kwargs.setdefault("label", data["kind"])
        for name in ("model", "eval", "timeout_s"):
            kwargs.setdefault(name, None)
        kwargs.setdefault("bits", data["options"].get("bits"))  # a record from before expand wrote the nominal bits
        kwargs.setdefault("resources", {})
        kwargs.setdefault("max_attempts", _spec_default("max_attempts"))
        kwargs.setdefault("needs_model", data["kind"] != "sleep")  # a record from before it was written
        return cls(**kwargs, lineage=tuple(data.get("lineage") or ()), needs=tuple(data.get("needs") or ()),
                   after=tuple(d for d in data.get("after") or () if isinstance(d, str)),
                   input=Input.from_dict(data.get("input")))

    @classmethod
    def from_record(cls, job_id: str, spec: Any) -> Job:
        """A stored job as the scheduler, the ETA and the results read it: never refused (a record of an older
        qfarm, or one a test wrote by hand, may lack anything): the record's id, and what it lacks at its default.
        Its options are read through ``view`` there, not validated."""
        spec = spec if isinstance(spec, dict) else {}
        return cls.from_payload({**spec, "id": job_id, "kind": spec["kind"] if isinstance(spec.get("kind"), str) else "",
                                 "options": spec["options"] if isinstance(spec.get("options"), dict) else {}})

    @cached_property
    def view(self):
        """The options for what reads any job, whole or not (the ETA's prior, the memory plan of a payload written by
        hand): by attribute, every default filled in by the options model (validated where they validate, else
        ``option_view``), an option this job's method does not have reading as None. Never raises."""
        try:
            return _attrs(self.opts.model_dump())
        except (Permanent, AttributeError):  # AttributeError: a kind this registry lacks (plain stored options)
            return option_view(self.kind, self.options)

    @cached_property
    def stored(self):
        """The options exactly as the record holds them, by attribute (an option it lacks reads as None, nested ones
        too): what the ETA prices, the work the record says it will do. Every record expansion writes holds every
        option, so this reads as ``opts`` there. Never raises."""
        return _attrs(self.options)

    @cached_property
    def evaluation(self):
        """The evaluation, typed (``qfarm.sweep.spec.StoredEval``: the spec's defaults, in that one place); None for
        a job that evaluates nothing (a capture). Permanent where the record's does not validate."""
        from pydantic import ValidationError

        from qfarm.sweep.spec import StoredEval

        if self.eval is None:
            return None
        try:
            return StoredEval.model_validate(self.eval)
        except ValidationError as e:
            raise Permanent(f"the job's evaluation does not validate here: {e}") from None

    @cached_property
    def opts(self):
        """The options, typed: the options model the spec was validated with (``qfarm.sweep.methods``), read back with
        every default the record holds. Permanent where they no longer validate (a record of another version)."""
        return typed_options(self.kind, self.options)

    @property
    def compares(self) -> bool:
        """Whether it is measured against a reference it does not make itself (the registry's ``Kind.compares``; the
        ``Method.reference`` job is the reference): it needs the sweep's reference job and reads its figures from
        disk, never loading the float model. False for a kind this process's registry lacks."""
        from qfarm.sweep.methods import KINDS

        kind = KINDS.get(self.kind)
        method = kind.method(self.method) if kind is not None else None
        return kind is not None and kind.compares and not (method is not None and method.reference)

    @property
    def method(self) -> str | None:
        """The method's name (quantize, train), else None: the one option every reader asks before typing the rest
        (it decides which options model types them)."""
        method = self.options.get("method")
        return method if isinstance(method, str) else None


def as_job(job: Job | dict) -> Job:
    """A payload (what a sweep submits, or a test writes by hand) as the Job it describes; a Job as it is."""
    return job if isinstance(job, Job) else Job.from_record(str(job.get("id") or ""), job)


def _spec_default(name: str):
    from qfarm.sweep.spec import SweepSpec

    return SweepSpec.model_fields[name].default


def typed_options(kind_name: str, options: dict):
    """A job's stored options as the options model of its kind (or method) reads them back; for a kind this
    process's registry does not have (workers need not read the registry: the payload names their entry point), the
    stored options as they are, each an attribute."""
    from pydantic import ValidationError

    from qfarm.sweep.methods import KINDS

    kind = KINDS.get(kind_name)
    if kind is None:  # a kind this process's registry lacks: the stored options hold every default already
        return _Options(**options)
    try:
        model, _, _ = kind.options_for(options)
        return model.model_validate(options, context={"stored": True})
    except (LookupError, ValidationError) as e:
        raise Permanent(f"the job's options do not validate here: {e}") from None


def option_view(kind_name: str | None, options: dict):
    """A job's options with its options model's defaults filled in, not validated: attribute access for what reads
    a job that need not be whole (a memory plan of a payload written by hand: a test, a bench). The defaults come
    from the options model, as everywhere; an option the model does not have reads as None."""
    from qfarm.sweep.methods import KINDS

    kind = KINDS.get(kind_name)
    try:
        model = kind.options_for(options)[0] if kind is not None else None
    except LookupError:
        model = None
    defaults = {} if model is None else {
        name: f.get_default(call_default_factory=True) for name, f in model.model_fields.items() if not f.is_required()}
    return _Options(**{**defaults, **{k: _attrs(v) for k, v in options.items()}})


def _attrs(value: Any) -> Any:
    """A stored dict (a nested option: calibration, dataset) read by attribute, as its typed model would be."""
    return _Options(**{str(k): _attrs(v) for k, v in value.items()}) if isinstance(value, dict) else value


class _Options(SimpleNamespace):
    def __getattr__(self, name: str):  # an option this job's method does not have
        return None
