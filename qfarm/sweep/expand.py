"""Expansion: a validated spec -> the sweep's jobs, each with an id that is a hash of its normalized spec.

The same job (same model, options and evaluation) has the same id in every sweep and on every submit, so
resubmitting a file, or a file that adds one method, reuses what already finished. Every check of what a
user wrote lives in ``qfarm.sweep.validate``; this module builds jobs from what passed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qfarm.errors import SpecError
from qfarm.sweep import validate
from qfarm.sweep.job import Job
from qfarm.sweep.methods import KINDS, SCHEMES, UNSET_NOT_IDENTITY, Options
from qfarm.sweep.search import halving_rungs
from qfarm.sweep.spec import JobGroup, LoadedSpec, SweepSpec, load_spec, renamed
from qfarm.sweep.validate import MAX_JOBS, Collector, axes, stage_name

SPEC_VERSION = 2  # bump when a change to evaluation makes old results incomparable (2: artifacts stored in the
# source dtype and checked against their rows, act_order applied on llm-compressor)


@dataclass(frozen=True)
class ExpandedSweep:
    """A sweep's jobs as expansion built them (``build``): its id, name, jobs and resolved model. Not the memory plan
    (``qfarm.sweep.plan``)."""

    sweep_id: str
    name: str
    jobs: list[Job] = field(default_factory=list)
    model: dict | None = None  # the sweep's model as resolved (with where a hub model's config was read: config_dir)
    implicit: frozenset[str] = frozenset()  # the reference jobs expansion made because the spec has none for them

    @property
    def spec_jobs(self) -> list[Job]:
        """The jobs the spec's stages make, shared captures included, without the references made for them."""
        return [j for j in self.jobs if j.id not in self.implicit]

    def counts_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for job in self.jobs:
            out[job.kind] = out.get(job.kind, 0) + 1
        return out


def digest(obj: Any, n: int) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def load_sweep(path: str | Path, hub_cache: Path | None = None, max_jobs: int = MAX_JOBS,
              cuda: bool = True) -> tuple[LoadedSpec, ExpandedSweep]:
    """Load, validate and expand a spec file (``load_valid`` then ``build``). Every problem, schema or semantic,
    is raised together."""
    valid = load_valid(path, hub_cache, max_jobs)
    return valid.loaded, build(valid, cuda, max_jobs)


def load_valid(path: str | Path, hub_cache: Path | None = None, max_jobs: int = MAX_JOBS) -> validate.ValidSweep:
    """Load and validate a spec file: the typed sweep (every job's options validated, its data resolved), or a
    SpecError with every problem, schema or semantic. A hub model's revision is resolved looking in ``hub_cache``
    (qfarm.sweep.hub.cache_dir) when the hub is out of reach. A sweep that could make more than ``max_jobs`` jobs is
    refused before any combination is made."""
    try:
        loaded = load_spec(path)
    except SpecError as err:
        if err.raw is None:
            raise
        errors = Collector(err.lines)
        validate.semantic_checks(err.raw, err.base_dir, errors, hub_cache, max_jobs)
        extra = renamed(SpecError(list(errors.problems.values())), err.groups_key).problems
        known = {(p.path, p.message) for p in err.problems}
        extra = [p for p in extra if (p.path, p.message) not in known and p.path not in {q.path for q in err.problems}]
        raise SpecError(err.problems + extra, err.source) from None
    try:
        return validate.sweep(loaded, hub_cache, max_jobs)
    except SpecError as err:
        raise renamed(err, loaded.groups_key) from None


def build(valid: validate.ValidSweep, cuda: bool = True, max_jobs: int = MAX_JOBS) -> ExpandedSweep:
    """The sweep's jobs, from a sweep that passed validation: every matrix combination of every stage, once per
    job of the stage it comes ``from``, with the shared captures the GPTQ jobs need before them. ``cuda``: whether
    the cluster's GPUs are CUDA devices (False: logical GPU slots, every job computes on a CPU), which enters the
    ids of the jobs that ask for GPUs. Nothing is checked here but the bound on the jobs made."""
    spec, loaded = valid.loaded.spec, valid.loaded
    jobs: dict[str, Job] = {}
    stages: dict[str, list[Job]] = {}  # stage name -> its jobs, for the stages that come from it
    implicit: dict[str, Job] = {}  # reference jobs the comparing jobs need, made here unless the spec has them
    screened: list[tuple[Job, str, dict, dict]] = []  # a halving search's candidates: (job, reference, full eval, halving)
    for stage in valid.stages:
        gi, group = stage.gi, stage.group
        parents = [None] if stage.parent is None else stages.get(stage.parent, [])
        mine: list[Job] = []
        references: dict[str | None, Job] = {}  # the stage's reference job, by parent: made once, not once a combination
        halving = (stage.search or {}).get("halving")
        for options, resolved in stage.combos:
            for parent in parents:
                job = _job(spec, gi, group, options, valid.model,
                           _screened(stage.eval, halving_rungs(halving)[0][0]) if halving else stage.eval, resolved,
                           parent, cuda)
                if stage.search is not None:
                    job = replace(job, search=stage.search)
                # before the candidate that reads them; on the full evaluation's text and ids, screened or not
                for probe in _probes(replace(job, eval=stage.eval) if halving else job, cuda):
                    jobs.setdefault(probe.id, probe)
                    job = replace(job, needs=job.needs + (probe.id,))
                capture = _capture(job, cuda)
                if capture is not None:  # before the jobs that need it: labelled() reads parents first
                    jobs.setdefault(capture.id, capture)
                    job = replace(job, needs=(capture.id,) + job.needs)
                if job.compares:
                    key = parent.id if parent is not None else None
                    if key not in references:
                        references[key] = reference_of(spec, gi, group, valid.model, stage.eval, parent, cuda)
                    ref = references[key]
                    implicit.setdefault(ref.id, ref)
                    job = replace(job, needs=job.needs + (ref.id,))
                if halving and job.compares:
                    screened.append((job, ref.id, stage.eval, halving))
                if job.id not in jobs:
                    jobs[job.id] = job
                if all(j.id != job.id for j in mine):  # a job an earlier stage has too still feeds this stage's children
                    mine.append(jobs[job.id])
            if len(jobs) > max_jobs:  # shared captures come on top of the bound
                errors = Collector(loaded.lines)
                errors.add(("jobs", gi), f"the sweep expands to more than {max_jobs:,} jobs; split it, or raise "
                                         "the limit with --max-jobs")
                raise renamed(SpecError(list(errors.problems.values()), loaded.source), loaded.groups_key)
        stages[stage_name(gi, group)] = mine
    for final in _finals(screened, cuda):  # after every candidate they rank
        jobs.setdefault(final.id, final)
    made = frozenset(implicit) - set(jobs)
    jobs = _with_references(jobs, implicit)
    sweep_id = f"{spec.name}-{digest([spec.name, sorted(jobs)], 8)}"
    return ExpandedSweep(sweep_id, spec.name, labelled(list(jobs.values())), valid.model, made)


# what a job computes on, by the device class its resources ask for (workers.shared.models.compute_dtype)
COMPUTE = {"gpu": "cuda, the checkpoint's dtype", "cpu": "cpu, float32"}


def _job(spec: SweepSpec, gi: int, group: JobGroup, options: Options, model_source, eval_spec,
         resolved: dict[str, dict | None], parent: Job | None = None, cuda: bool = True) -> Job:
    kind = KINDS[group.kind]
    calibration, data = resolved.get("calibration"), resolved.get("data")
    fields = type(options).model_fields
    if calibration is not None:  # the identity of the data, not how it was spelled
        options = options.model_copy(update={"calibration": options.calibration.model_copy(
            update={"dataset": calibration["key"]})})
    if data is not None and "dataset" in fields:
        options = options.model_copy(update={"dataset": options.dataset.model_copy(update={"path": data["key"]})})
    opts = {k: v for k, v in options.model_dump().items() if not (v is None and k in UNSET_NOT_IDENTITY)}
    ident = {**opts, "checkpoint": data["key"]} if data is not None and "checkpoint" in fields else opts
    if group.kind == "merge" and parent is not None and parent.method != "qlora" and parent.parent is None:
        opts["onto"] = "base"  # a LoRA adapter was trained on the float base: "dequantized" is that same base
    identity = {
        "v": SPEC_VERSION,
        "kind": group.kind,
        "options": ident,  # an evaluated checkpoint by its content, as spelled in the row
        "model": model_source["key"] if kind.needs_model and model_source else None,
        "eval": _eval_identity(eval_spec) if kind.needs_model else None,
    }
    if kind.needs_model:  # a CPU row is never reused for a GPU run: device class and dtype rule are in the id
        identity["compute"] = COMPUTE["gpu" if cuda and (group.resources or spec.resources).gpus else "cpu"]
    if parent is not None:
        identity["from"] = parent.id
    job_id = "j" + digest(identity, 12)
    task_eval = parent.task_eval if parent is not None else None
    if group.kind == "train" and data is not None:
        task_eval = {"dataset": data, "format": options.dataset.format, "eval_samples": options.dataset.eval_samples,
                     "seq_len": options.seq_len, "train_job": job_id}
    method_name = getattr(options, "method", None)  # the kinds with methods (quantize, train) have this option
    method = kind.method(method_name)
    if kind.needs_model and eval_spec and eval_spec.get("engine") == "vllm":
        eval_spec = _vllm_eval(eval_spec, group.kind, method)
    return Job(
        id=job_id,
        kind=group.kind,
        group=gi,
        label=method_name or group.kind,  # the final label is given once every job is known: labelled()
        options=opts,
        model={k: v for k, v in model_source.items() if k != "config_dir"} if kind.needs_model and model_source else None,
        eval=eval_spec if kind.needs_model else None,
        resources=(group.resources or spec.resources).model_dump(),
        max_attempts=group.max_attempts or spec.max_attempts,
        timeout_s=group.timeout_s or spec.timeout_s,
        hung_after_s=group.hung_after_s or spec.hung_after_s,
        start_timeout_s=group.start_timeout_s or spec.start_timeout_s,
        calibration=calibration,
        stage=stage_name(gi, group),
        parent=parent.id if parent is not None else None,
        data=data,
        task_eval=task_eval if kind.needs_model else None,
        worker=kind.worker,
        needs_model=kind.needs_model,
        impl=method.impl(options) if method is not None else None,
        bits=method.nominal_bits(options) if method is not None else getattr(options, "bits", None),
        axes=tuple(k for k in axes(group)[0] if k != "method"),
    )


def reference_of(spec: SweepSpec, gi: int, group: JobGroup, model_source, eval_spec, parent: Job | None,
                 cuda: bool) -> Job:
    """The reference job a comparing job of ``group`` needs: a ``quantize`` job of the registry's reference method
    (``none``) on the same model (or parent), evaluation and device class, in the group's stage and resources. Its id
    is the one the spec's own ``method: none`` job of that stage would have, so a spec that has one runs that one."""
    quantize = KINDS["quantize"]
    method = next(m for m in (quantize.methods or {}).values() if m.reference)
    options = method.options.model_validate({"method": method.name})
    job = _job(spec, gi, group.model_copy(update={"kind": quantize.name}), options, model_source, eval_spec, {}, parent,
               cuda)
    return replace(job, stage=stage_name(gi, group), axes=())


def _with_references(jobs: dict[str, Job], implicit: dict[str, Job]) -> dict[str, Job]:
    """The jobs with each needed reference the spec does not have placed just before the first job that needs it
    (a reference row reads first); one the spec has stays where the spec put it."""
    out: dict[str, Job] = {}
    for job in jobs.values():
        for dep in job.needs:
            if dep in implicit and dep not in jobs and dep not in out:
                out[dep] = implicit[dep]
        out[job.id] = job
    return out


def _capture(job: Job, cuda: bool) -> Job | None:
    """The ``calibrate`` job a GPTQ job with ``calibration.share`` needs: one per model (or parent artifact),
    calibration data and device class, so every such job of the sweep solves from the same capture. Its id
    holds neither the quantization options nor the evaluation: they do not change what it captures."""
    method = KINDS[job.kind].method(job.method)
    if method is None or not method.captures or not job.opts.calibration.share:
        return None
    kind = KINDS["calibrate"]
    opts = {"capture": "hessian", "calibration": job.opts.calibration.model_dump(exclude={"share"})}
    identity = {"v": SPEC_VERSION, "kind": kind.name, "options": opts, "model": (job.model or {}).get("key"),
                "compute": COMPUTE["gpu" if cuda and job.resources.get("gpus") else "cpu"], "from": job.parent}
    return replace(job, id="j" + digest(identity, 12), kind=kind.name, label=kind.name, options=opts, eval=None,
                   task_eval=None, worker=kind.worker, impl=None, bits=None, axes=(), needs=(), search=None)


def _probes(job: Job, cuda: bool) -> list[Job]:
    """The ``probe`` jobs a mixed search candidate reads (its ``mixed.probe``): the model's layers in ``parts``
    shares, each priced in every format of the search's mixed entries, on the same model, evaluation text and
    device class. The candidates of one search need the same probes, whatever their methods."""
    mixed = job.options.get("mixed")
    if not mixed:
        return []
    kind, probe = KINDS["probe"], mixed["probe"]
    shares = [({"formats": probe["formats"], "part": part, "parts": probe["parts"]}, f"probe {part + 1}/{probe['parts']}")
              for part in range(probe["parts"])]
    if mixed.get("tables"):  # a GGUF mix under a size target: its embedding table and head, in the ggml types
        from qfarm.sweep.search import Format

        shares.append(({"formats": [f for f in probe["formats"] if Format(f).family == "gguf"], "tables": True},
                       "probe tables"))
    out = []
    for share, label in shares:
        opts = kind.options.model_validate({**share, "windows": probe["windows"],
                                            "seq_len": probe["seq_len"]}).model_dump()
        identity = {"v": SPEC_VERSION, "kind": kind.name, "options": opts, "model": (job.model or {}).get("key"),
                    "eval": _eval_identity(job.eval), "compute": COMPUTE["gpu" if cuda and job.resources.get("gpus")
                                                                       else "cpu"]}
        out.append(replace(job, id="j" + digest(identity, 12), kind=kind.name, label=label, options=opts,
                           task_eval=None, worker=kind.worker, impl=None, bits=None, axes=(), needs=(),
                           calibration=None, search={**(job.search or {}), "role": "probe"}))
    return out


def _screened(ev: dict | None, windows: int) -> dict | None:
    """A halving search's candidate's evaluation (its screen): each text's first ``windows`` windows, no lm-eval
    tasks; the rest as the sweep's. The reference's figures on those windows are the first of those the sweep's
    reference job wrote for the full evaluation (``prefix_of``: workers.evaluate.harness.eval_windows), so a screen
    never loads the float model."""
    if ev is None:
        return None
    ppl = ev.get("perplexity")
    cut = lambda d: {**d, "max_windows": min(windows, d.get("max_windows") or windows),  # noqa: E731
                     "prefix_of": d.get("max_windows")}
    return {**ev, "perplexity": [cut(d) for d in ppl] if isinstance(ppl, list) else cut(ppl) if ppl else ppl,
            "tasks": []}


def _finals(screened: list[tuple[Job, str, dict, dict]], cuda: bool) -> list[Job]:
    """A halving search's jobs after its screens (workers.search.final): on each later rung, and in the end the
    ``final`` jobs, ``keep`` of them (at most one a job of the rung before), the one of rank k evaluating the artifact
    of the job the rung before ranked k-th, on the next rung's windows (a ``rung`` job) or in full (a ``final``).
    Each waits ``after`` every job of the rung before, however it ends: a failed one just does not compete."""
    if not screened:
        return []
    first, ref_id, full_eval, halving = screened[0]
    after = tuple(dict.fromkeys(job.id for job, *_ in screened))
    kind, rungs = KINDS["final"], halving_rungs(halving)
    out = []
    for n, (windows, keep) in enumerate(rungs):
        last = n == len(rungs) - 1
        ev = full_eval if last else _screened(full_eval, rungs[n + 1][0])
        keep, made = min(keep, len(after)), []
        for rank in range(1, keep + 1):
            opts = kind.options.model_validate({"rank": rank, "of": len(after), "windows": windows}).model_dump()
            identity = {"v": SPEC_VERSION, "kind": kind.name, "options": opts, "model": (first.model or {}).get("key"),
                        "eval": _eval_identity(ev), "after": sorted(after),
                        "compute": COMPUTE["gpu" if cuda and first.resources.get("gpus") else "cpu"]}
            made.append(replace(first, id="j" + digest(identity, 12), kind=kind.name,
                                label=f"final {rank}/{keep}" if last else f"rung {n + 2} {rank}/{keep}",
                                options=opts, eval=_vllm_eval(ev, kind.name, None)
                                if ev and ev.get("engine") == "vllm" else ev,
                                task_eval=None, worker=kind.worker, impl=None, bits=None,
                                axes=(), needs=(ref_id,), after=after, calibration=None, data=None, parent=None,
                                lineage=(), search={**(first.search or {}), "role": "final" if last else "rung"}))
        out += made
        after = tuple(job.id for job in made)
    return out


def _vllm_eval(ev: dict, kind: str, method) -> dict:
    """A job's evaluation under ``engine: vllm``: served by vLLM where its checkpoint is one vLLM loads (the
    registry's ``Method.vllm``: float and compressed-tensors), else native only, saying why in the row."""
    if kind == "quantize" and method is not None and method.vllm:
        return ev
    what = f"{method.name} checkpoints" if method is not None else f"{kind} jobs"
    return {**ev, "engine": "native", "vllm": None, "vllm_skipped": f"{what} are not served by vLLM in qfarm"}


# --- labels ---------------------------------------------------------------------------------------

# "": the value alone (gguf Q4_K_M)
_SHORT = {"backend": "", "group_size": "g", "act_order": "act_order", "gguf_type": "", "scheme": "", "checkpoint": "",
          "lora_alpha": "alpha", "lora_dropout": "dropout"}
_UNLABELLED = ("method",)
_ALWAYS = ("scheme", "checkpoint", "backend")  # in the label whenever set: what the row is


def labelled(jobs: list[Job]) -> list[Job]:
    """The jobs with their labels: the method (or kind), then every option that varies among the sweep's jobs of
    that method (or that its group's matrix lists), in the options' order: ``rtn 4b g=64``, ``gguf Q8_0``,
    ``qlora r=16 alpha=32``. Each lineage is its ancestors' labels. ``jobs`` lists parents before children."""
    flat = {j.id: _flat(j.options) for j in jobs}
    seen: dict[tuple, dict[str, set[str]]] = {}
    for j in jobs:
        values = seen.setdefault((j.kind, j.method), {})
        for k, v in flat[j.id].items():
            values.setdefault(k, set()).add(json.dumps(v, sort_keys=True))
    out: dict[str, Job] = {}
    for j in jobs:
        values = seen[(j.kind, j.method)]
        implied = _implied_by_scheme(flat[j.id].get("scheme"))
        shown = [k for k in flat[j.id] if k not in _UNLABELLED and k not in implied
                 and (len(values[k]) > 1 or k in j.axes or (k in _ALWAYS and flat[j.id][k] is not None))]
        label = " ".join([j.method or j.kind] + [_part(k, flat[j.id][k]) for k in shown])
        if j.kind == "sleep":
            label = f"sleep[{j.opts.index}]"
        elif j.kind in ("probe", "final"):
            label = j.label
        elif j.options.get("mixed"):  # a search candidate: its formats are decided in its job
            mixed = j.options["mixed"]
            bpw = mixed["target_bits_per_weight"] - mixed["point"] * mixed["step"]
            label = f"{j.method} mixed ≤{bpw:g}bpw"
        elif j.options.get("layer_rules"):  # per-layer formats by rule: its bits and group size are per layer
            rules = j.options["layer_rules"]
            digest = hashlib.sha256(json.dumps(rules).encode()).hexdigest()[:6]
            rest = [_part(k, flat[j.id][k]) for k in shown if k not in ("layer_rules", "bits", "group_size")]
            label = " ".join([j.method] + rest + [f"mixed ({len(rules)} rules, {digest})"])
        parent = out.get(j.parent) if j.parent else None
        lineage = parent.lineage + (parent.label,) if parent is not None else ()
        out[j.id] = replace(j, label=label, lineage=lineage)
    return list(out.values())


def _implied_by_scheme(scheme: Any) -> tuple[str, ...]:
    """The options a preset scheme sets, which its label does not repeat (``gptq W8A8``, ``rtn FP8_DYNAMIC``,
    ``gptq W4A16_ASYM g=32``)."""
    preset = SCHEMES.get(scheme) if isinstance(scheme, str) else None
    if preset is None:
        return ()
    return ("bits", "symmetric") if preset["grouped"] else ("bits", "symmetric", "group_size")


def _flat(options: dict[str, Any]) -> dict[str, Any]:
    """Options with one level of nested options spelled by their own key (``calibration.samples`` -> ``samples``
    unless a top-level option has that name)."""
    out = {k: v for k, v in options.items() if not isinstance(v, dict)}
    for k, v in options.items():
        if isinstance(v, dict):
            out.update({(sub if sub not in options else f"{k}.{sub}"): x for sub, x in v.items()})
    return out


def _part(key: str, value: Any) -> str:
    if key == "bits":
        return f"{_scalar_text(value)}b"
    name = _SHORT.get(key, key)
    return f"{name}={_scalar_text(value)}" if name else _scalar_text(value)


def _scalar_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "+".join(_scalar_text(v) for v in value)
    if isinstance(value, str) and "/" in value:
        return value.rstrip("/").rsplit("/", 1)[-1]  # a data file: its name
    return str(value).lower() if isinstance(value, bool) else str(value)


def _eval_identity(eval_spec: dict | None) -> Any:
    if not eval_spec:
        return None
    ev = json.loads(json.dumps(eval_spec))
    ppl = ev.get("perplexity")
    for domain in ppl if isinstance(ppl, list) else [ppl] if ppl else []:  # a text's content key, not where it lies
        if isinstance(domain.get("dataset"), dict):
            domain["dataset"] = domain["dataset"]["key"]
    if ev.get("task_paths"):
        ev["task_paths"] = [p["fingerprint"] for p in ev["task_paths"]]  # the tasks' content, not where they lie
    if not ev.get("tasks"):
        ev.pop("tasks", None)  # a sweep without tasks (or vLLM) keeps the job ids it had before they existed
        ev.pop("task_paths", None)
    if ev.get("engine", "native") == "native":
        ev.pop("engine", None)
        ev.pop("vllm", None)
    return ev
