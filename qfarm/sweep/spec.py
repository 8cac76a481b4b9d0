"""The sweep spec: YAML (safe_load only) -> pydantic models, with every error reported at once.

Sample yaml::

    name: smollm2-bnb
    model: bundled:smollm2-135m
    eval:
      perplexity: {dataset: bundled:python-docs, seq_len: 512, max_windows: 16}
      speed: {prompt_tokens: 64, new_tokens: 32, runs: 3}
      prompts: ["What is the capital of France?"]
      tasks: [{name: arc_easy, num_fewshot: 0, limit: 500}]   # lm-evaluation-harness, on every row
      task_paths: [tasks/]                                     # local lm-eval task YAMLs (include_path)
    resources: {gpus: 1}
    jobs:
      - kind: quantize
        matrix:
          method: [none, bnb-int8, bnb-nf4, bnb-fp4]

A job group's keys other than ``kind, name, from, eval, matrix, exclude, resources, max_attempts, timeout_s,
hung_after_s, start_timeout_s`` are
fixed options, applied to every combination of its matrix (``- {kind: quantize, method: bnb-nf4, double_quant: true}``).

Pipelines write ``stages:`` instead of ``jobs:`` (the same list): a stage with ``from: NAME`` runs one job per
combination of its matrix for every job of stage NAME, each once its parent has succeeded::

    stages:
      - {name: finetune, kind: train, method: qlora, dataset: {path: data/train.jsonl}, matrix: {r: [8, 64]}}
      - {name: merge, kind: merge, from: finetune, onto: [base, dequantized]}
      - {name: deploy, kind: quantize, from: merge, matrix: {method: [gptq, bnb-nf4]}}
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from qfarm.errors import Problem, SpecError, allowed, did_you_mean, format_path, line_map, line_of
from qfarm.sweep.methods import user_kinds
from qfarm.sweep.search import SearchSpec

MAX_SPEC_BYTES = 1_000_000


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"must be a number, string, boolean or null, not {type(value).__name__}")


Scalar = Annotated[Any, AfterValidator(_scalar)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PerplexitySpec(Strict):
    dataset: str = "bundled:python-docs"
    text_field: str = "text"
    seq_len: int = Field(512, ge=16, le=32_768)
    max_windows: int = Field(16, ge=1, le=100_000)


class DomainSpec(PerplexitySpec):
    """One evaluation domain of a list-form ``eval.perplexity``: its figures are the row's ``ppl@NAME``,
    ``kl@NAME``, ``top1@NAME`` (each with ``_se``). ``name`` defaults to the dataset's (``wikitext2.txt``: ``wikitext2``)."""

    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


MAX_DOMAINS = 16
ONE_TEXT, DOMAINS = "(one text)", "(domains)"  # eval.perplexity's two forms: pydantic's tags, left out of error paths


def domain_name(domain: PerplexitySpec) -> str:
    """A domain's name: its own, else its dataset's (a file's stem, a bundled set's or hub dataset's last part), made
    of the characters a column name may hold."""
    import re

    given = getattr(domain, "name", None)
    if given:
        return given
    text = str(domain.dataset).split(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1]
    text = text.split(".", 1)[0] if "." in text and not text.startswith(".") else text
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-._")[:64] or "text"


class SpeedSpec(Strict):
    prompt_tokens: int = Field(64, ge=1, le=32_768)
    new_tokens: int = Field(32, ge=1, le=4_096)
    runs: int = Field(3, ge=1, le=100)


class TaskSpec(Strict):
    """One lm-evaluation-harness task (or group), run with the harness's own definition on every row."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
    num_fewshot: Optional[int] = Field(None, ge=0, le=100)  # None: the task's own default (0 where it has none)
    limit: Optional[int] = Field(None, ge=1, le=10_000_000)  # the first N documents of the task's split
    batch_size: int = Field(1, ge=1, le=1_024)
    bootstrap_iters: int = Field(1000, ge=0, le=1_000_000)  # for the standard error of non-mean metrics


class VllmSpec(Strict):
    """Serving figures from vLLM's own engine (offline ``LLM`` API): the same prompts for every row."""

    concurrency: list[int] = Field([1, 8, 32], min_length=1, max_length=16)  # requests in flight at once
    prompt_tokens: int = Field(128, ge=1, le=32_768)
    max_tokens: int = Field(128, ge=1, le=32_768)  # output tokens a request (EOS ignored: every row writes as many)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_model_len: Optional[int] = Field(None, ge=16, le=1_048_576)  # default: prompt_tokens + max_tokens


class EvalSpec(Strict):
    # one text, or several domains (a list: every row gets each one's figures, the first's in the plain columns)
    perplexity: Optional[Annotated[Union[Annotated[PerplexitySpec, Tag(ONE_TEXT)],
                                         Annotated[list[DomainSpec], Tag(DOMAINS), Field(min_length=1, max_length=MAX_DOMAINS)]],
                                   Discriminator(lambda v: DOMAINS if isinstance(v, list) else ONE_TEXT)]] = PerplexitySpec()
    speed: Optional[SpeedSpec] = SpeedSpec()
    prompts: list[str] = []
    max_new_tokens: int = Field(32, ge=1, le=4_096)
    tasks: list[TaskSpec] = Field([], max_length=200)  # lm-eval tasks: accuracy columns per row
    task_paths: list[str] = Field([], max_length=32)  # folders of local lm-eval task YAMLs (its include_path)
    engine: Literal["native", "vllm"] = "native"  # vllm: serving figures from vLLM too (CUDA rows of vLLM formats)
    vllm: VllmSpec = VllmSpec()


class StoredPerplexity(PerplexitySpec):
    """``eval.perplexity`` as a job record holds it: its dataset resolved to a data source (qfarm.sweep.sources)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    dataset: Any = PerplexitySpec.model_fields["dataset"].default
    # a halving screen's text: its windows are the first of the full evaluation's ``prefix_of`` windows, whose
    # reference figures the sweep's reference job wrote (workers.evaluate.harness.eval_windows reads them from there)
    prefix_of: Optional[int] = None


class StoredDomain(StoredPerplexity):
    """One domain of a list-form ``eval.perplexity`` as a record holds it: its name decided at validate."""

    name: str


class StoredEval(EvalSpec):
    """A job's evaluation as its record holds it (``Job.evaluation``): the spec's fields and defaults (these are
    subclasses), with what expansion resolved: the perplexity dataset's source, the task folders' paths and
    fingerprints, and why vLLM does not serve this row (``vllm_skipped``, the registry's ``Method.vllm``).

    ``perplexity`` is the first (or only) domain; ``domains`` every domain of a list-form ``eval.perplexity``
    (empty for the one-text form, whose rows carry no ``@NAME`` columns)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    perplexity: Optional[StoredPerplexity] = StoredPerplexity()
    domains: list[StoredDomain] = []

    @property
    def texts(self) -> list[StoredPerplexity]:
        """Every text perplexity is measured on: the domains, else the one text (none without ``perplexity``)."""
        return list(self.domains) or ([self.perplexity] if self.perplexity is not None else [])

    @model_validator(mode="before")
    @classmethod
    def _domains(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("perplexity"), list):
            listed = data["perplexity"]
            data = {**data, "domains": listed, "perplexity": listed[0] if listed else None}
        return data
    task_paths: list[dict[str, Any]] = []
    vllm: Optional[VllmSpec] = VllmSpec()
    vllm_skipped: Optional[str] = None


class Resources(Strict):
    """What one job needs. ``gpus`` are Ray GPU slots (logical ones on a machine without a GPU)."""

    gpus: float = Field(1, ge=0, le=1_024)
    cpus: float = Field(1, ge=0, le=1_024)
    gpu_type: Optional[str] = None  # Ray accelerator type, e.g. H100, A10G
    min_gpu_mem_gb: Optional[float] = Field(None, gt=0, le=10_000)  # only nodes whose GPUs have this much
    custom: dict[str, float] = {}  # any custom Ray resource, e.g. {gpu_h100: 1}


def _known_kind(value: str) -> str:
    kinds = user_kinds()
    if value not in kinds:
        raise ValueError(f"unknown job kind {value!r}.{did_you_mean(value, kinds)} Allowed: {allowed(kinds)}")
    return value


class JobGroup(BaseModel):
    """One entry of ``jobs:``. Keys beyond the declared ones are fixed options for every combination."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: Annotated[str, AfterValidator(_known_kind)]  # a kind of the registry a spec may name (qfarm.sweep.methods)
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    from_: Optional[str] = Field(None, alias="from")  # the name of an earlier stage: one job per job of it
    eval: Optional[EvalSpec] = None  # this stage's own evaluation, instead of the sweep's
    matrix: dict[str, list[Scalar]] = {}
    exclude: list[dict[str, Scalar]] = []
    resources: Optional[Resources] = None
    max_attempts: Optional[int] = Field(None, ge=1, le=100)
    timeout_s: Optional[float] = Field(None, gt=0)
    hung_after_s: Optional[float] = Field(None, ge=10, le=86_400)  # no heartbeat this long: the worker is hung
    start_timeout_s: Optional[float] = Field(None, ge=1, le=86_400)  # a worker not started by then is killed


class MlflowSpec(Strict):
    """``tracking: {mlflow: ...}``: each job goes to MLflow as it finishes (qfarm.results.tracking)."""

    tracking_uri: Optional[str] = Field(None, min_length=1, max_length=500)  # default MLFLOW_TRACKING_URI, else
    experiment: Optional[str] = Field(None, min_length=1, max_length=250)   # <output root>/mlflow.db; the sweep id
    copy_artifacts: bool = False

    @field_validator("tracking_uri")
    @classmethod
    def _inside(cls, value: Optional[str]) -> Optional[str]:
        from qfarm.results.tracking import spec_uri_problem

        problem = spec_uri_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value


class TrackingSpec(Strict):
    mlflow: Optional[MlflowSpec] = None


class SweepSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    model: Optional[str] = None
    revision: Optional[str] = Field(None, max_length=200)  # a hub model's branch, tag or commit (default main)
    description: Optional[str] = None
    eval: EvalSpec = EvalSpec()
    resources: Resources = Resources()
    max_attempts: int = Field(3, ge=1, le=100)
    timeout_s: Optional[float] = Field(None, gt=0)
    hung_after_s: Optional[float] = Field(None, ge=10, le=86_400)  # default: the scheduler's HEARTBEAT_TTL_S (60)
    start_timeout_s: Optional[float] = Field(None, ge=1, le=86_400)  # default: DEFAULT_START_TIMEOUT_S (600)
    tracking: Optional[TrackingSpec] = None  # results into MLflow as jobs finish
    search: Optional[SearchSpec] = None  # the best model for a budget (qfarm.sweep.search): its jobs are made for it
    jobs: list[JobGroup]  # at least one, unless the spec has a search

    @model_validator(mode="before")
    @classmethod
    def _search_alone(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("search") is not None and "jobs" not in data:
            return {**data, "jobs": []}
        return data

    @field_validator("jobs")
    @classmethod
    def _some_jobs(cls, value: list, info):
        if not value and info.data.get("search") is None:
            raise ValueError("List should have at least 1 item after validation, not 0 (or give a search:)")
        return value


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec with what is needed to report on it: its file, folder and YAML line map."""

    spec: SweepSpec
    source: str
    base_dir: Path
    lines: dict[tuple, int]
    raw: dict
    groups_key: str = "jobs"  # what the file calls its job groups: jobs, or stages


def as_jobs(raw: dict, lines: dict[tuple, int]) -> tuple[dict, dict[tuple, int], str]:
    """A file that writes ``stages:`` is read as ``jobs:`` (one model for both); problems are renamed back."""
    if "stages" not in raw or "jobs" in raw:
        return raw, lines, "jobs"
    raw = {("jobs" if k == "stages" else k): v for k, v in raw.items()}
    lines = {(("jobs",) + k[1:] if k[:1] == ("stages",) else k): v for k, v in lines.items()}
    return raw, lines, "stages"


def renamed(err: SpecError, key: str) -> SpecError:
    """``err`` with its ``jobs...`` paths said as the file wrote them (``stages...``)."""
    if key == "jobs":
        return err
    problems = [replace(p, path=key + p.path[4:]) if p.path.startswith("jobs") else p for p in err.problems]
    return SpecError(problems, err.source, {"raw": err.raw, "lines": err.lines, "base_dir": err.base_dir,
                                            "groups_key": key})


# --- YAML ---------------------------------------------------------------------------------------


MAX_SPEC_NODES = 100_000  # scalars, lists and mappings in one spec
MAX_SCALAR_CHARS = 100_000  # one value
MAX_DEPTH = 64  # lists and mappings inside each other (a real spec nests about 6 deep)


def _check_flow_depth(text: str, source: str) -> None:
    """Refuse flow collections (``[[[...``, ``{{{...``) nested deeper than MAX_DEPTH before YAML's parser sees them:
    PyYAML's scanner keeps a possible key per open bracket and walks them all at every token, so 20,000 of them
    cost it a minute before its first event. A linear pass over the text, skipping quoted strings and comments."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return
    depth, line, quote, comment, prev = 0, 1, None, False, "\n"
    for ch in text:
        if ch == "\n":
            line, comment = line + 1, False
        elif comment:
            pass
        elif quote is not None:
            if ch == quote and prev != "\\":
                quote = None
        elif ch in "\"'" and prev in " \t\n[{,:":
            quote = ch
        elif ch == "#" and prev in " \t\n":
            comment = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError([Problem("", f"invalid YAML: nested too deeply (more than {MAX_DEPTH} lists or "
                                             "mappings inside each other)", line)], source)
        elif ch in "]}":
            depth = max(0, depth - 1)
        prev = ch


def _check_events(text: str, source: str) -> None:
    """Refuse what a spec never needs and an attacker would use: YAML aliases (``*name``, a few hundred bytes of
    them expand to billions of values), more than MAX_SPEC_NODES values, nesting deeper than MAX_DEPTH, a value
    over MAX_SCALAR_CHARS. Enforced event by event, while parsing: nothing past the first excess is read."""
    _check_flow_depth(text, source)
    nodes = depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1 if event.start_mark else None
        if isinstance(event, yaml.AliasEvent):
            raise SpecError([Problem("", f"YAML aliases (*{event.anchor}) are not allowed in a spec: write the value "
                                         "out, or use a matrix", line)], source)
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError([Problem("", f"invalid YAML: nested too deeply (more than {MAX_DEPTH} lists or "
                                             "mappings inside each other)", line)], source)
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
        if isinstance(event, (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            nodes += 1
            if nodes > MAX_SPEC_NODES:
                raise SpecError([Problem("", f"the spec has more than {MAX_SPEC_NODES} values; split it", line)], source)
        if isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_SCALAR_CHARS:
            raise SpecError([Problem("", f"a value of {len(event.value)} characters; at most {MAX_SCALAR_CHARS}",
                                     line)], source)


def _check_duplicate_keys(node: yaml.Node, source: str, path: tuple = ()) -> None:
    """A key given twice in one mapping is an error naming both lines (YAML would keep the last silently)."""
    problems: list[Problem] = []
    stack = [(node, path)]
    while stack:
        current, where = stack.pop()
        if isinstance(current, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in current.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                line = key.start_mark.line + 1
                if name is not None and name in seen:
                    problems.append(Problem(format_path(where + (name,)), f"duplicate key {name!r} (lines {seen[name]} "
                                                                          f"and {line}); give it once", line))
                elif name is not None:
                    seen[name] = line
                stack.append((value, where + ((name,) if name is not None else ())))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend((item, where + (i,)) for i, item in enumerate(current.value))
    if problems:
        raise SpecError(problems, source)


def read_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SpecError([Problem("", f"cannot read the file: {e.strerror or e}")], source) from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError([Problem("", f"the file is {len(data)} bytes; a spec may have at most {MAX_SPEC_BYTES}")], source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError([Problem("", f"the file is not UTF-8 text (byte {e.start} is invalid)")], source) from None
    try:
        _check_events(text, source)  # before anything is built: aliases and size are refused here
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_duplicate_keys(node, source)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError([Problem("", f"invalid YAML: {what}", line)], source) from None
    except RecursionError:
        raise SpecError([Problem("", "invalid YAML: nested too deeply")], source) from None
    if not isinstance(raw, dict):
        kind = "empty" if raw is None else f"a {type(raw).__name__}"
        raise SpecError([Problem("", f"a spec must be a mapping with keys name, model, jobs; this file is {kind}")], source)
    return raw, line_map(node) if node is not None else {}


# --- pydantic errors -> Problems ------------------------------------------------------------------


def _model_at(model: Any, loc: tuple) -> Any:
    """Follow ``loc`` through field annotations to the model class found there (or None)."""
    current = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) in (list, dict):
            current = get_args(current)[-1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) in (Union, Optional, Annotated):
        args = [a for a in get_args(tp) if a is not type(None)]
        tp = args[0]
    return tp


def problems_from(err: ValidationError, model: type[BaseModel], prefix: tuple, lines: dict) -> list[Problem]:
    """Turn pydantic's errors into Problems with YAML paths, allowed values and did-you-mean."""
    problems: list[Problem] = []
    for e in err.errors():
        own = tuple(p for p in e["loc"] if p not in (ONE_TEXT, DOMAINS))
        loc = prefix + own
        problems.append(Problem(format_path(loc), describe(e, model, own), line_of(lines, loc)))
    return problems


def describe(e: dict, model: type[BaseModel], loc: tuple) -> str:
    kind, value = e["type"], e.get("input")
    if kind == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        keys = list(owner.model_fields) if owner else []
        hint = did_you_mean(loc[-1], keys)
        return f"unknown key {loc[-1]!r}.{hint} Allowed: {allowed(keys)}" if keys else f"unknown key {loc[-1]!r}"
    if kind == "missing":
        return "required, but missing"
    if kind == "literal_error":
        expected = e.get("ctx", {}).get("expected", "")
        return f"{value!r} is not allowed.{did_you_mean(value, _literals(expected))} Allowed: {expected}"
    if kind == "string_pattern_mismatch":
        return (f"{value!r} is not a valid name: use letters, digits, '.', '_' and '-', at most 64, starting with a "
                "letter or digit")
    msg = e["msg"].removeprefix("Value error, ")
    return f"{msg[0].lower()}{msg[1:]} (got {_short(value)})" if value is not None else msg


def _literals(expected: str) -> list[str]:
    return [p.strip().strip("'") for p in expected.replace(" or ", ", ").split(",") if p.strip()]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- entry point ---------------------------------------------------------------------------------


def load_spec(path: str | Path) -> LoadedSpec:
    """Read, parse and validate a spec file, raising SpecError with every problem found."""
    path = Path(path)
    raw, lines = read_yaml(path)
    source = str(path)
    problems: list[Problem] = []
    if "stages" in raw and "jobs" in raw:
        problems.append(Problem("stages", "give jobs or stages, not both (they are the same list)",
                                line_of(lines, ("stages",))))
    raw, lines, groups_key = as_jobs(raw, lines)
    jobs = raw.get("jobs")
    for i, group in enumerate(jobs if isinstance(jobs, list) else []):
        kinds = user_kinds()
        if isinstance(group, dict) and "kind" in group and group["kind"] not in tuple(kinds):
            problems.append(
                Problem(
                    f"jobs[{i}].kind",
                    f"unknown job kind {group['kind']!r}.{did_you_mean(group['kind'], kinds)} Allowed: {allowed(kinds)}",
                    line_of(lines, ("jobs", i, "kind")),
                )
            )
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        known_kind = {p.path for p in problems}
        # a search with no jobs: its own problems are said, not a missing job group
        searched = raw.get("search") is not None and "jobs" not in raw
        problems += [p for p in problems_from(err, SweepSpec, (), lines)
                     if p.path not in known_kind and not (searched and p.path == "jobs")]
    if problems:
        context = {"raw": raw, "lines": lines, "base_dir": path.resolve().parent, "groups_key": groups_key}
        raise renamed(SpecError(problems, source, context), groups_key) from None
    return LoadedSpec(spec, source, path.resolve().parent, lines, raw, groups_key)
