"""Validation of a parsed spec beyond its schema: every matrix combination's options against its kind's registry
entry, the DAG rules of ``from:``, model and dataset sources, and checks against the model's shape.

Problems are collected (``Collector``) with their YAML paths and lines, never raised one at a time: the caller
(``qfarm.sweep.expand``) raises them all together. Nothing here builds jobs.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from qfarm.errors import Problem, SpecError, allowed, did_you_mean, format_path, line_of
from qfarm.results.columns import column, option_clashes
from qfarm.sweep import hub, lmtasks
from qfarm.sweep.methods import ALL_LINEAR, KINDS, METHODS, Options, trainable_quantized
from qfarm.sweep.modelinfo import gguf_conversion, gguf_tokenizer, shape_of, vocabulary_clash
from qfarm.sweep.sources import SourceError, fingerprint, resolve_dataset, resolve_model
from qfarm.sweep.spec import EvalSpec, JobGroup, LoadedSpec, SweepSpec, describe, domain_name

AXIS_KEYS = frozenset({"onto"})  # a stage-level list of these is an axis: `onto: [base, dequantized]`, one job each


class Collector:
    """Problems found so far, one per (path, message), each with its line in the file."""

    def __init__(self, lines: dict):
        self.lines = lines
        self.problems: dict[tuple[str, str], Problem] = {}

    def add(self, loc: tuple, message: str) -> None:
        problem = Problem(format_path(loc), message, line_of(self.lines, loc))
        self.problems.setdefault((problem.path, problem.message), problem)


MAX_JOBS = 10_000  # a sweep's jobs, by default (qfarm validate/submit --max-jobs raises it)


@dataclass(frozen=True)
class ValidStage:
    """One job group of a sweep that passed validation: where its jobs come ``from`` (a stage name, or None for
    the sweep's model), its evaluation as resolved, and each matrix combination's validated options with the data
    it names resolved (``calibration``, ``data``)."""

    gi: int
    group: JobGroup
    parent: str | None
    eval: dict | None
    combos: tuple[tuple[Options, dict], ...]
    search: dict | None = None  # a stage a ``search:`` made: its jobs' Job.search (role, target, objective)


@dataclass(frozen=True)
class ValidSweep:
    """A spec that passed every check: what ``qfarm.sweep.expand.build`` makes jobs from, checking nothing again."""

    loaded: LoadedSpec
    model: dict | None  # the sweep's model, resolved (None when no job needs one)
    stages: tuple[ValidStage, ...]
    search: Any = None  # the search's plan (qfarm.sweep.search.SearchPlan), for a spec with ``search:``


def sweep(loaded: LoadedSpec, hub_cache: Path | None = None, max_jobs: int = MAX_JOBS) -> ValidSweep:
    """Every check of a loaded spec (its model, evaluation, each stage's ``from``, each matrix combination's
    options against the registry, the model's layers and the filesystem, a train stage against the stage it
    trains on), each made once: the typed sweep, or a SpecError with every problem."""
    spec, errors = loaded.spec, Collector(loaded.lines)
    model_source = eval_spec = None
    if spec.search is not None or any(KINDS[g.kind].needs_model for g in spec.jobs):
        if spec.model is None:
            errors.add(("model",), "required: the model the jobs run on (e.g. bundled:smollm2-135m)")
        else:
            model_source = model(spec.model, loaded.base_dir, errors, spec.revision, hub_cache)
        eval_spec = evaluation(spec.eval, loaded.base_dir, errors)
    if not job_bound(list(enumerate(spec.jobs)), errors, max_jobs):  # before any combination is made
        raise SpecError(list(errors.problems.values()), loaded.source)
    stages = _stages(list(enumerate(spec.jobs)), spec, model_source, eval_spec, loaded.base_dir, errors)
    plan = None
    if spec.search is not None and model_source is not None and not errors.problems:
        plan, found = search_stages(spec, model_source, eval_spec, loaded.base_dir, errors)
        stages += found
    if errors.problems:
        raise SpecError(list(errors.problems.values()), loaded.source)
    return ValidSweep(loaded, model_source, tuple(stages), plan)


class _InSearch(Collector):
    """Problems of a stage a search made, said at the space entry it came from (``search.space[i]...``)."""

    def __init__(self, errors: Collector, entries: dict[int, int]):
        self.errors, self.entries = errors, entries

    def add(self, loc: tuple, message: str) -> None:
        if loc[:1] == ("jobs",) and len(loc) > 1 and loc[1] in self.entries:
            loc = ("search", "space", self.entries[loc[1]]) + tuple(loc[2:])
        self.errors.add(loc, message)


# the kinds of weight layer other than Linear (qfarm.sweep.modelinfo's types), as the errors name them
LAYER_KINDS = {"Conv1D": "GPT-2-style Conv1D layers", "experts": "fused MoE expert weights (3-D parameters)"}


def search_tables(numbers) -> list:
    """The model's embedding table and untied output head as a search's mixed GGUF entries allocate them under a size
    target (qfarm.sweep.search.plan_search), from its config (qfarm.sweep.plan.ModelShape); none without one."""
    from qfarm.sweep.search import Layer

    if numbers is None or not numbers.vocab:
        return []
    return [Layer("token_embd", numbers.hidden, numbers.vocab)] + (
        [] if numbers.tied else [Layer("output", numbers.hidden, numbers.vocab)])


def search_layers(shape) -> list:
    """The model's quantizable layers as a search counts them (qfarm.sweep.search.Layer), from its shape."""
    from qfarm.sweep.search import Layer

    out = []
    for name, n_in in shape.inputs.items():
        if shape.types.get(name, "Linear") != "Linear":
            continue
        n_out = shape.outputs.get(name) or n_in
        out += [Layer(f"{b}.{name}", n_in, n_out) for b in range(shape.counts.get(name, shape.layers))]
    return out


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
SMALL_FILES_BYTES = 16 << 10  # config, generation config, model card, recipe: what an artifact adds beside its tokenizer


def outside_bits(numbers, dtype: str, model_source: dict):
    """A size target's price of what a candidate stores besides its quantized layers, in bits, by its options (a
    callable for qfarm.sweep.search.plan_search), from the model's shape (qfarm.sweep.plan.ModelShape):
    - compressed-tensors (rtn, gptq): embeddings, an untied head and the norms in the float ``dtype`` the artifact
      keeps them in, and the tokenizer's files (a folder's own; from a GGUF, about twice its vocabulary's header);
    - GGUF: the norms in float32, the embeddings in llama.cpp's type for them (a tied one is the output's: Q6_K, or
      Q8_0 in a Q8_0 file, in its fallback where rows do not divide its blocks), the header (vocabulary, merges)."""
    from qfarm.sweep.modelinfo import gguf_metadata
    from qfarm.sweep.search import Format, tensor_type_of

    counts = numbers.params()
    embedding, head, norms = counts["embedding"], counts["lm_head"], counts["norms"]
    header = 0
    if model_source.get("kind") == "gguf":
        meta = gguf_metadata(Path(model_source["location"]) / model_source["gguf_file"], wanted=set(), tensors=True)
        header = int(meta.get("#header_bytes", 0))
        tokenizer = 2 * header
    else:
        folder = Path(model_source.get("config_dir") or model_source.get("location") or ".")
        files = [f for f in folder.iterdir() if f.is_file()] if folder.is_dir() else []
        tokenizer = sum(f.stat().st_size for f in files if f.name.startswith(("tokenizer", "vocab", "merges",
                                                                               "special_tokens")))
        header = tokenizer // 2
    float_bits = 32 if dtype == "float32" else 16

    def matrix_bits(type_name: str, rows: int) -> float:
        fmt = Format(type_name)
        return fmt.layer_bits(numbers.hidden, rows) if fmt.fits(numbers.hidden) else 16.0 * rows * numbers.hidden

    def bits(options: dict, tables: bool = True) -> float:
        """``tables`` False: a GGUF's without its embedding table and untied head (a mix that allocates them)."""
        if options.get("method") == "gguf":
            if not tables:
                return 32.0 * norms + 8.0 * header
            main = tensor_type_of(options.get("gguf_type") or "Q4_K_M")
            output = "Q8_0" if main == "Q8_0" else "Q6_K"
            if main not in ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q5_0", "Q5_1", "Q4_0", "Q4_1"):
                main = output
            embed = matrix_bits(output if numbers.tied else main, numbers.vocab)
            return embed + (matrix_bits(output, numbers.vocab) if head else 0) + 32.0 * norms + 8.0 * header
        return float_bits * (embedding + head + norms) + 8.0 * (tokenizer + SMALL_FILES_BYTES)

    return bits


def gpu_target(search, numbers, texts: list) -> tuple[Any, str, dict]:
    """A ``gpu_mem_gb`` target as the size on disk it leaves the weights: (the search with that ``size_mb`` target,
    what the memory holds besides them, the target as the rows record it: with ``context``, ``overhead_gb`` and
    ``size_mb``); (None, why, {}) when the KV cache and logits alone take it. The weights are held as stored (a GGUF
    in llama.cpp, a compressed-tensors artifact in vLLM's packed kernels), the KV cache in the model's GPU dtype."""
    from qfarm.sweep.plan import compute_bytes, window_bytes
    from qfarm.sweep.search import SearchTarget

    wanted = search.target
    context = wanted.context or max(d.seq_len for d in texts)  # eval.perplexity's texts
    overhead = sum(window_bytes(numbers, context, compute_bytes(numbers, "cuda")).values())
    size_mb = (wanted.gpu_mem_gb * 1e9 - overhead) / 2**20
    held = f"the KV cache and logits at {context} tokens take {overhead / 1e9:.3g} GB"
    if size_mb <= 0:
        return None, f"{held}: more than {wanted.gpu_mem_gb:g} GB before any weight. Raise gpu_mem_gb, or give a " \
                     "shorter context", {}
    target = {**wanted.model_dump(exclude_none=True), "context": context, "overhead_gb": round(overhead / 1e9, 6),
              "size_mb": round(size_mb, 3)}
    return search.model_copy(update={"target": SearchTarget(size_mb=size_mb)}), \
        f"{held}, leaving the weights {size_mb:.1f} MB", target


def search_stages(spec: SweepSpec, model_source: dict, eval_spec: dict | None, base_dir: Path,
                  errors: Collector) -> tuple[Any, list[ValidStage]]:
    """The stages a ``search:`` makes (its uniform and mixed candidates, validated as any job group) and its plan;
    the probes are made by expansion for the mixed candidates that need them."""
    from qfarm.sweep.search import plan_search

    search = spec.search
    ppl = spec.eval.perplexity
    if ppl is None:
        errors.add(("eval", "perplexity"), "a search needs eval.perplexity: its probes and its objective's KL and "
                                           "perplexity are measured on that text")
        return None, []
    texts = ppl if isinstance(ppl, list) else [ppl]  # its one text, or each domain's
    names = [domain_name(d) for d in ppl] if isinstance(ppl, list) else []
    column = search.measured()[0]
    if "@" in column and column.split("@", 1)[1] not in names:
        errors.add(("search", "objective"), f"objective {search.objective}: no evaluation domain of that name. "
                                            f"Domains: {allowed(names) if names else 'none (eval.perplexity is one text)'}")
    if search.target.column == "decode_tokens_per_s" and spec.eval.speed is None:
        errors.add(("search", "target", "decode_tokens_per_s"), "a speed target is measured by eval.speed, and the "
                                                               "sweep's eval has speed: null")
    if search.objective.startswith("task:") and not spec.eval.tasks:
        errors.add(("search", "objective"), f"objective {search.objective} reads an eval.tasks metric, and the "
                                            "sweep's eval has no tasks")
    shape = shape_of(model_source)
    if shape is None:
        errors.add(("search",), "the model's layer shapes cannot be read here, and a search plans from them")
        return None, []
    other = sorted(n for n in shape.inputs if shape.types.get(n, "Linear") != "Linear")
    if other:  # its probes, allocations and predicted sizes are per Linear layer: the rest would be left unpriced
        kinds = sorted({shape.types[n] for n in other})
        errors.add(("search",), f"a search gives each Linear layer its format, and {shape.count(other)} of this "
                                f"model's {shape.count(shape.inputs)} weight layers are "
                                f"{', '.join(LAYER_KINDS.get(k, k) for k in kinds)} ({allowed(other)}), which its probes, "
                                "mixes and predicted sizes do not cover: a mix would leave them in float or in a "
                                "format no allocation chose. Compare formats of this model as plain jobs (jobs:) "
                                "instead")
        return None, []
    from qfarm.sweep.modelinfo import gguf_float_dtype
    from qfarm.sweep.plan import model_shape
    from qfarm.sweep.search import scale_bits

    numbers = model_shape(model_source)
    if model_source.get("kind") == "gguf":  # scales are stored in the float copy's dtype (workers' source_dtype)
        dtype = gguf_float_dtype(str(Path(model_source["location"]) / model_source["gguf_file"]))
    else:
        dtype = numbers.dtype if numbers is not None else "bfloat16"
    outside = outside_bits(numbers, dtype, model_source) if numbers is not None and numbers.vocab else None
    target = search.target.model_dump(exclude_none=True)
    planned, memory = search, ""
    if search.target.column == "gpu_mem_gb":  # a size on disk once the KV cache and logits are paid
        if numbers is None or not numbers.vocab:
            errors.add(("search", "target", "gpu_mem_gb"), "the model's config cannot be read here, and a GPU memory "
                                                           "target is planned from it: give size_mb or bits_per_weight")
            return None, []
        planned, memory, target = gpu_target(search, numbers, texts)
        if planned is None:
            errors.add(("search", "target", "gpu_mem_gb"), memory)
            return None, []
    plan, problems = plan_search(planned, search_layers(shape), scale_bits(dtype), outside, search_tables(numbers))
    for loc, message in problems:
        if memory and loc[:2] == ("target", "size_mb"):
            loc, message = ("target", "gpu_mem_gb"), f"{search.target.describe()} ({memory}): {message}"
        errors.add(("search",) + loc, message)
    if plan is None:
        return None, []
    plan = replace(plan, memory=memory)
    groups, roles, entries = [], {}, {}
    column, direction = search.measured()
    info = {"target": target, "objective": column, "direction": direction}
    if search.halving is not None:
        fewest, most = min(d.max_windows for d in texts), search.halving.rungs()[-1][0]
        if most >= fewest:
            errors.add(("search", "halving", "windows"), f"the screen's {most} window(s) are not fewer "
                                                         f"than the full evaluation's {fewest} (eval.perplexity "
                                                         "max_windows): give fewer, or drop halving")
            return None, []
        info["halving"] = search.halving.model_dump()
    first = len(spec.jobs)
    for role, items in (("uniform", [(i, o) for i, o, _ in plan.uniform]), ("candidate", list(plan.mixed))):
        for k, (i, options) in enumerate(items):
            gi = first + len(groups)
            name = f"search-{options['method']}-{'mixed' if role == 'candidate' else 'uniform'}-{k}"
            shown = {k: [options[k]] for k in ("bits", "group_size", "gguf_type") if k in options and role == "uniform"}
            fixed = {k: v for k, v in options.items() if k not in shown}
            groups.append((gi, JobGroup.model_validate({"kind": "quantize", "name": name, **fixed, "matrix": shown})))
            roles[gi], entries[gi] = role, i
    found = _stages(groups, spec, model_source, eval_spec, base_dir, _InSearch(errors, entries))
    return plan, [replace(stage, search={**info, "role": roles[stage.gi]}) for stage in found]


def _stages(groups: list[tuple[int, JobGroup]], spec: SweepSpec | None, model_source: dict | None,
            eval_spec: dict | None, base_dir: Path, errors: Collector) -> list[ValidStage]:
    """Each group's checks (``sweep``); with no ``spec`` (its schema failed elsewhere) the checks that need only
    the group itself."""
    checks = MethodChecks(model_source, base_dir, errors)
    out: dict[str, ValidStage] = {}
    for gi, group in groups:
        parent = parent_stage(gi, group, spec, errors) if spec is not None else None
        group_eval = eval_spec
        if spec is not None:
            group_eval = evaluation(group.eval, base_dir, errors, ("jobs", gi, "eval")) if group.eval is not None \
                else eval_spec
            vllm_engine(group_eval, group.resources or spec.resources, gi, group.eval is not None, errors)
        parents = out[parent].combos if parent and parent in out else ()
        combos = []
        for combo, sources in combinations(gi, group, errors):
            opts = options(gi, group, combo, sources, errors)
            if opts is None:
                continue
            resolved = checks(gi, group, opts, sources)
            if group.kind == "train" and any(not train_parent(gi, opts, p, errors)
                                             for p, _ in parents):
                continue
            combos.append((opts, resolved))
        out[stage_name(gi, group)] = ValidStage(gi, group, parent or None, group_eval, tuple(combos))
    return list(out.values())


def semantic_checks(raw: dict, base_dir: Path, errors: Collector, hub_cache: Path | None = None,
                    max_jobs: int = MAX_JOBS) -> None:
    """What ``sweep`` would say about the parts of a spec that passed the schema, when others did not."""
    groups = []
    for gi, group in enumerate(raw["jobs"] if isinstance(raw.get("jobs"), list) else []):
        try:
            groups.append((gi, JobGroup.model_validate(group)))
        except ValidationError:
            continue
    model_source = None
    if any(KINDS[g.kind].needs_model for _, g in groups) and isinstance(raw.get("model"), str):
        revision = raw.get("revision") if isinstance(raw.get("revision"), str) else None
        model_source = model(raw["model"], base_dir, errors, revision, hub_cache)
    try:
        evaluation(EvalSpec.model_validate(raw.get("eval") or {}), base_dir, errors)
    except ValidationError:
        pass
    if job_bound(groups, errors, max_jobs):
        _stages(groups, None, model_source, None, base_dir, errors)


def job_bound(groups: list[tuple[int, JobGroup]], errors: Collector, max_jobs: int) -> bool:
    """Whether the sweep can make at most ``max_jobs`` jobs, known from its matrices' lengths before anything is
    expanded: each stage makes at most the product of its matrix lists, times its ``from`` stage's jobs (excludes
    and repeats only lower it). False, with the problem at the stage that passes the limit, when it cannot."""
    made: dict[str, int] = {}
    total = 0
    for gi, group in groups:
        matrix, _ = axes(group)
        sizes = {k: len(v) for k, v in matrix.items() if isinstance(v, list)}
        parent_jobs = made.get(group.from_, 1) if group.from_ else 1
        n = math.prod(sizes.values()) * parent_jobs
        made[stage_name(gi, group)] = n
        total += n
        if total > max_jobs:
            parts = " × ".join(f"{k} {v}" for k, v in sizes.items()) or "1"
            parent = f" × {parent_jobs:,} jobs of stage {group.from_!r}" if group.from_ else ""
            where = ("jobs", gi, "matrix") if group.matrix else ("jobs", gi)
            errors.add(where, f"the sweep would make up to {total:,} jobs (this stage: {parts}{parent}); at most "
                              f"{max_jobs:,} per sweep: split it, or raise the limit with --max-jobs")
            return False
    return True


def stage_name(gi: int, group: JobGroup) -> str:
    return group.name or f"{group.kind}{gi}"


def parent_stage(gi: int, group: JobGroup, spec: SweepSpec, errors: Collector) -> str | None | bool:
    """The stage this group's jobs come ``from`` (its name), None for a group that starts from the model, or
    False when ``from:`` breaks a rule (the problem is added)."""
    names = [stage_name(i, g) for i, g in enumerate(spec.jobs)]
    if names.count(stage_name(gi, group)) > 1:
        errors.add(("jobs", gi, "name"), f"stage name {stage_name(gi, group)!r} is used twice; names must be unique")
    kinds = KINDS[group.kind].parents
    if group.from_ is None:
        if group.kind == "merge":
            errors.add(("jobs", gi), "a merge stage needs from: the name of the train stage whose adapters it merges")
        return None
    loc = ("jobs", gi, "from")
    earlier = {stage_name(i, g): g for i, g in enumerate(spec.jobs[:gi])}
    if group.from_ not in earlier:
        later = group.from_ in names[gi:]
        why = ("stages run in file order: from names an earlier stage." if later
               else f"no stage is named {group.from_!r}.{did_you_mean(group.from_, earlier)}")
        errors.add(loc, f"{why} Earlier stages: {allowed(earlier) or 'none'}")
        return False
    if earlier[group.from_].kind not in kinds:
        can = f"a {' or '.join(sorted(kinds))} stage" if kinds else "nothing: it starts from the sweep's model"
        errors.add(loc, f"a {group.kind} stage cannot start from stage {group.from_!r} (kind "
                        f"{earlier[group.from_].kind}); it can start from {can}")
        return False
    return group.from_




def train_parent(gi: int, options: Options, parent: Options, errors: Collector) -> bool:
    """Whether a train job may start from this quantize job (the problem added when not): LoRA on a GPTQ/AWQ
    checkpoint in GPTQModel's layout, which peft trains through GPTQModel's torch kernel. Both are typed options:
    a train job's, and its parent's (a quantize method's: only some have a ``backend``)."""
    method, backend = parent.method, getattr(parent, "backend", None)
    if options.method != "lora":
        errors.add(("jobs", gi, "method"), f"a {options.method} job loads its own 4-bit base; only lora trains "
                                           "on a quantized stage's model (from: a gptq/awq stage, backend gptqmodel)")
        return False
    trainable = trainable_quantized()
    if backend not in trainable.get(method, ()):
        what = f"{method} (backend {backend or 'llm-compressor'})" if method in trainable else method
        errors.add(("jobs", gi, "from"), f"LoRA trains on a quantized base through GPTQModel's layers: from must name "
                                         f"a gptq or awq stage with backend: gptqmodel, not {what} (an "
                                         "llm-compressor checkpoint loads as dense float weights here; for LoRA on "
                                         "bitsandbytes 4-bit use method: qlora without from)")
        return False
    return True


def model(text: str, base_dir: Path, errors: Collector, revision: str | None = None,
          hub_cache: Path | None = None) -> dict | None:
    """The sweep's model source, resolved (None, with the problem added, when it does not resolve). A hub
    model is pinned to the commit its ``revision`` names now (qfarm.sweep.hub)."""
    try:
        ref = resolve_model(text, base_dir, revision, hub_cache)
    except SourceError as e:
        errors.add((e.field if revision is not None else "model",), str(e))
        return None
    if revision is not None and ref.kind != "hub":
        errors.add(("revision",), f"revision pins a hub model (org/name) to a branch, tag or commit; {text!r} is "
                                  f"a local {'GGUF file' if ref.kind == 'gguf' else 'folder'}: remove revision")
        return None
    quantized = _int4_checkpoint(Path(ref.location)) if ref.kind == "hf_dir" else None
    if quantized:
        errors.add(("model",), f"{text!r} is a {quantized.upper()} checkpoint (AutoGPTQ/AutoAWQ layout): the sweep's "
                               "model is the float reference every row is compared with. Put its float model here and "
                               f"the checkpoint in a `kind: evaluate` job, or quantize with `method: {quantized}, "
                               "backend: gptqmodel` and train LoRA `from:` that stage")
        return None
    out = {"kind": ref.kind, "location": ref.location, "gguf_file": ref.gguf_file, "key": ref.key, "name": text}
    refused = (gguf_tokenizer(out) or {}).get("refused") if ref.kind == "gguf" else None
    if refused:  # what every job would say first, minutes after submit: said here, once (kept by the file's content)
        errors.add(("model",), f"{refused} (the check every job makes first, run here)")
        return None
    if ref.kind == "hub":
        out.update(revision=ref.revision, revision_asked=revision or hub.DEFAULT_REVISION)
        folder = hub.config_folder(hub_cache or hub.cache_dir(None), ref.location, ref.revision)
        if folder is not None:  # its architecture is read from there (modelinfo.shape_of); not part of a job
            out["config_dir"] = str(folder)
    return out


def _int4_checkpoint(folder: Path) -> str | None:
    """``gptq``/``awq`` when the folder's config.json declares that quantization (AutoGPTQ/AutoAWQ layout)."""
    import json

    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return method if method in trainable_quantized() else None


def evaluation(eval_spec: EvalSpec, base_dir: Path, errors: Collector, loc: tuple = ("eval",)) -> dict:
    """The evaluation as a plain dict: its perplexity dataset resolved, its task folders resolved (each with a
    fingerprint of its content: editing a task reruns its jobs) and its task names checked (qfarm.sweep.lmtasks)."""
    ev = eval_spec.model_dump()
    ppl = eval_spec.perplexity
    listed = isinstance(ppl, list)
    seen: dict[str, int] = {}
    for i, domain in enumerate(ppl if listed else [ppl] if ppl is not None else []):
        where = loc + (("perplexity", i) if listed else ("perplexity",))
        out = ev["perplexity"][i] if listed else ev["perplexity"]
        try:
            ref = resolve_dataset(domain.dataset, base_dir, domain.text_field)
            out["dataset"] = {"kind": ref.kind, "location": ref.location, "text_field": ref.text_field, "key": ref.key}
        except SourceError as e:
            errors.add(where + ("dataset",), str(e))
        if listed:
            out["name"] = name = domain_name(domain)
            if name in seen:
                errors.add(where + ("name",), f"domain name {name!r} is taken by eval.perplexity[{seen[name]}]; give "
                                              "each domain its own name: (name: wiki)")
            seen.setdefault(name, i)
    folders = []
    for i, text in enumerate(eval_spec.task_paths):
        folder = (base_dir / text).resolve()
        if not folder.is_dir():
            errors.add(loc + ("task_paths", i), f"{text!r} is not a folder (relative paths start at the spec's folder, "
                                                f"{base_dir}); give a folder of lm-eval task YAML files")
            continue
        folders.append(folder)
    ev["task_paths"] = [{"path": str(f), "fingerprint": fingerprint(f)} for f in folders]
    if eval_spec.tasks:
        _check_tasks(eval_spec, folders, errors, loc)
    return ev


def vllm_engine(ev: dict | None, resources, gi: int, own_eval: bool, errors: Collector) -> None:
    """``engine: vllm`` needs a CUDA GPU for each job: refused here for jobs that ask for none; whether the cluster
    has real GPUs is checked against it (``qfarm.farm.cluster.preflight``: validate with a cluster, and submit)."""
    if not ev or ev.get("engine") != "vllm" or resources.gpus >= 1:
        return
    loc = ("jobs", gi, "eval", "engine") if own_eval else ("eval", "engine")
    errors.add(loc, f"vLLM runs on CUDA GPUs only; jobs[{gi}] asks for resources.gpus: {resources.gpus:g}. "
                    "Give it gpus: 1 (or more), or use engine: native")


def _check_tasks(eval_spec: EvalSpec, folders: list[Path], errors: Collector, loc: tuple) -> None:
    names, harness = lmtasks.known(folders)
    seen = set()
    for i, task in enumerate(eval_spec.tasks):
        if task.name in seen:
            errors.add(loc + ("tasks", i, "name"), f"task {task.name!r} is listed twice; list each task once")
        seen.add(task.name)
        if task.name in names or not harness:
            continue  # (without lm-eval installed here its catalogue is checked by the worker)
        where = "lm-eval's task catalogue" + (" or eval.task_paths" if folders else "")
        errors.add(loc + ("tasks", i, "name"), f"no task, group or tag {task.name!r} in {where}."
                                               f"{did_you_mean(task.name, sorted(names))} "
                                               "List them with: lm_eval ls tasks")


def combinations(gi: int, group: JobGroup, errors: Collector):
    """Yield (combination, {option: YAML path of its value}) for every matrix row not excluded."""
    matrix, fixed = axes(group)
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


def axes(group: JobGroup) -> tuple[dict[str, list], dict[str, Any]]:
    """The group's matrix and fixed options, with a fixed list of an AXIS_KEYS option moved into the matrix."""
    fixed = dict(group.model_extra or {})
    matrix = dict(group.matrix)
    for key in AXIS_KEYS:
        if isinstance(fixed.get(key), list) and key not in matrix:
            matrix[key] = fixed.pop(key)
    return matrix, fixed


def _matches(row: dict, combo: dict) -> bool:
    return all(k in combo and combo[k] == v and type(combo[k]) is type(v) for k, v in row.items())


def options(gi: int, group: JobGroup, combo: dict, sources: dict, errors: Collector) -> Options | None:
    """One combination validated against its kind's (or method's) options model; None with problems added."""
    here = ("jobs", gi)
    kind = KINDS[group.kind]
    try:
        model_cls, context, method = kind.options_for(combo)
    except LookupError as e:
        errors.add(sources.get("method", here) if combo.get("method") is not None else here, str(e))
        return None
    if method is not None and kind.methods is not None:
        combo = _for_method(group, combo, model_cls, kind.methods)
    for name in option_clashes(model_cls.model_fields):
        errors.add(sources.get(name, here), f"{context}: option {name!r} has the name of a measured result column "
                                            f"({column(name).group}), so its row could not hold both; the option "
                                            "must be renamed in qfarm.sweep.methods")
    try:
        return model_cls.model_validate(combo)
    except ValidationError as err:
        for e in err.errors():
            name = e["loc"][0] if e["loc"] else None
            loc = sources.get(name, here) + tuple(e["loc"][1:])
            if e["type"] == "extra_forbidden" and len(e["loc"]) == 1:
                names = [k for k in model_cls.model_fields if k != "method"]
                msg = f"option {name!r} does not apply to {context}.{did_you_mean(name, names)} Its options: {allowed(names)}"
            else:
                dotted = ".".join(str(p) for p in e["loc"])
                msg = f"{context}: {dotted}: {describe(e, model_cls, tuple(e['loc']))}"
                if group.matrix and name in group.matrix and "method" in group.matrix:
                    row = {"method": combo.get("method"), name: combo.get(name)}
                    msg += f". To skip this combination, add to exclude: {json.dumps(row)}; or give it its own job group"
            errors.add(loc, msg)
        return None


def _for_method(group: JobGroup, combo: dict, model_cls: type[Options], methods: dict) -> dict:
    """In a group whose matrix varies the method, a fixed option goes to the methods that have it: a group's
    ``calibration`` is for gptq and awq, not rtn or bnb. An option that none of them has stays an error."""
    models = [methods[m].options for m in group.matrix.get("method", []) if isinstance(m, str) and m in methods]
    if len(models) < 2:
        return combo
    fixed = set(group.model_extra or {})
    drop = {k for k in fixed if k not in model_cls.model_fields and any(k in m.model_fields for m in models)}
    return {k: v for k, v in combo.items() if k not in drop}


class MethodChecks:
    """Checks of one job's options against the model and the filesystem, beyond what its pydantic model can see:
    group sizes that must divide every Linear layer's input, target modules, and the datasets (resolved here)."""

    def __init__(self, model_source: dict | None, base_dir: Path, errors: Collector):
        self.model_source, self.base_dir, self.errors = model_source, base_dir, errors

    @functools.cached_property
    def conversion(self) -> str | None:
        """Why llama.cpp's converter refuses the model folder (asked once per validate, kept on disk), or None."""
        return gguf_conversion(self.model_source)

    @functools.cached_property
    def shape(self):
        """Read once per spec, and only when a job has something to check against it."""
        return shape_of(self.model_source) if self.model_source else None

    def __call__(self, gi: int, group: JobGroup, opts: Options, sources: dict) -> dict[str, dict | None]:
        """The job's resolved data resolved (``calibration``, a train job's ``data``), problems added to errors."""
        method = METHODS.get(getattr(opts, "method", None)) if group.kind == "quantize" else None
        if method is not None and method.quantizes is not None and self.shape is not None:
            self._check_layer_types(method, sources.get("method", ("jobs", gi)))
        if method is not None and method.name == "gguf" and (self.model_source or {}).get("kind") in ("hf_dir", "hub") \
                and self.conversion:
            self.errors.add(sources.get("method", ("jobs", gi)),
                            f"llama.cpp's converter refuses the sweep's model, so every gguf job of it would fail "
                            f"converting it to GGUF: {self.conversion}. Give the model as a GGUF file (model: "
                            "path/to/model.gguf), or drop the gguf jobs")
        group_size = getattr(opts, "group_size", None)
        if group_size and group_size > 0 and self.shape is not None:
            self._check_group_size(group, opts, sources.get("group_size", ("jobs", gi)), group_size)
        out: dict[str, dict | None] = {"calibration": None, "data": None}
        calibration = getattr(opts, "calibration", None)
        if calibration is not None:
            ref = self._dataset(calibration.dataset, calibration.text_field,
                                sources.get("calibration", ("jobs", gi)) + ("dataset",))
            if ref is not None:
                out["calibration"] = {**ref, "samples": calibration.samples, "seq_len": calibration.seq_len}
        checkpoint = getattr(opts, "checkpoint", None)
        if checkpoint is not None:
            out["data"] = self._checkpoint(checkpoint, sources.get("checkpoint", ("jobs", gi)))
        data = getattr(opts, "dataset", None)
        if data is not None:
            out["data"] = self._dataset(data.path, data.text_field, sources.get("dataset", ("jobs", gi)) + ("path",))
        targets = getattr(opts, "target_modules", None)
        if targets and self.shape is not None:
            self._check_targets(targets, sources.get("target_modules", ("jobs", gi)))
            if ALL_LINEAR in targets and getattr(opts, "lora_dropout", 0):
                self._check_expert_dropout(sources.get("lora_dropout", ("jobs", gi)))
        return out

    def _checkpoint(self, text: str, loc: tuple) -> dict | None:
        """An ``evaluate`` job's checkpoint, resolved by the rules of ``model:`` (None, with the problem added)."""
        try:
            ref = resolve_model(text, self.base_dir)
        except SourceError as e:
            self.errors.add(loc, f"checkpoint: {e}".replace("checkpoint: model ", "checkpoint "))
            return None
        if self.model_source and ref.key == self.model_source.get("key"):
            self.errors.add(loc, f"checkpoint {text!r} is the sweep's model itself: the reference row "
                                 "(quantize, method: none) already evaluates it")
            return None
        out = {"kind": ref.kind, "location": ref.location, "gguf_file": ref.gguf_file, "key": ref.key,
               "name": text, **({"revision": ref.revision} if ref.kind == "hub" else {})}
        clash = vocabulary_clash(out, self.model_source) if self.model_source else None
        if clash:  # what the job would refuse after loading both: said here, from the files' headers
            self.errors.add(loc, f"checkpoint {text!r} is not in the sweep's model's vocabulary: {clash} (KL and top-1 "
                                 "agreement would compare different tokens). Evaluate it in a sweep on its own base model")
            return None
        return out

    def _check_expert_dropout(self, loc: tuple) -> None:
        """peft's all-linear includes a MoE model's fused expert weights, as parameters it cannot train with
        dropout (``ParamWrapper``; measured with peft 0.21 on a Mixtral)."""
        experts = [n for n, t in self.shape.types.items() if t == "experts"]
        if experts:
            self.errors.add(loc, f"on this MoE model target_modules {ALL_LINEAR} includes its fused expert weights "
                                 f"({allowed(experts)}), which peft wraps as parameters (ParamWrapper) and cannot "
                                 "train with lora_dropout != 0: set lora_dropout: 0, or name the Linear layers in "
                                 "target_modules")

    def _check_layer_types(self, method, loc: tuple) -> None:
        """Refuse a method for a model whose weight layers include kinds it leaves in float (GPT-2's Conv1D under
        llm-compressor, fused MoE experts under bitsandbytes): its row would look lossless and be mostly float."""
        shape = self.shape
        left = sorted(n for n in shape.inputs if shape.types.get(n, "Linear") not in method.quantizes)
        if not left:
            return
        kinds = sorted({shape.types[n] for n in left})
        fits = [m for m, x in METHODS.items() if x.quantizes is not None and set(shape.types.values()) <= x.quantizes]
        self.errors.add(loc, f"method {method.name} leaves {', '.join(LAYER_KINDS.get(k, k) for k in kinds)} in float, and "
                             f"{shape.count(left)} of this model's {shape.count(shape.inputs)} weight layers are: "
                             f"{allowed(left)}. Its row would be mostly unquantized. Methods that quantize every "
                             f"kind of layer it has: {allowed(fits)}, and gguf where llama.cpp's converter knows "
                             f"its architecture")

    def _check_targets(self, targets: list[str], loc: tuple) -> None:
        """LoRA's ``target_modules`` against the model's own layer names (GPT-2's ``c_attn``, Phi-3's
        ``qkv_proj``, GPT-NeoX's ``query_key_value``); fused MoE experts are 3-D weights, not modules LoRA wraps."""
        types = {name.rsplit(".", 1)[-1]: self.shape.types.get(name, "Linear") for name in self.shape.inputs}
        known = sorted(n for n, t in types.items() if t != "experts")
        for ti, name in enumerate(targets):
            last = name.rsplit(".", 1)[-1]
            if name == ALL_LINEAR:
                if len(targets) > 1:
                    self.errors.add(loc + (ti,), f"{ALL_LINEAR} already names every Linear layer; give it alone")
            elif types.get(last) == "experts":
                self.errors.add(loc + (ti,), f"{name!r} is a fused expert weight of this MoE model (a 3-D parameter "
                                             f"of its experts block, not a Linear layer): LoRA's target_modules "
                                             f"cannot wrap it. Its Linear layers: {allowed(known)}")
            elif last not in known:
                self.errors.add(loc + (ti,), f"the model has no Linear layer {name!r}.{did_you_mean(name, known)} "
                                             f"Its Linear layers: {allowed(known)}")

    def _dataset(self, text: str, text_field: str, loc: tuple) -> dict | None:
        try:
            ref = resolve_dataset(text, self.base_dir, text_field)
        except SourceError as e:
            self.errors.add(loc, str(e))
            return None
        return {"kind": ref.kind, "location": ref.location, "text_field": ref.text_field, "key": ref.key}

    def _check_group_size(self, group: JobGroup, opts: Options, loc: tuple, group_size: int) -> None:
        bad = self.shape.not_divisible(group_size)
        if not bad:
            return
        method, shape = opts.method, self.shape
        by_size: dict[int, list[str]] = {}
        for name, n in bad.items():
            by_size.setdefault(n, []).append(name.rsplit(".", 1)[-1])
        layers = "; ".join(f"{', '.join(names)} ({n} inputs)" for n, names in by_size.items())
        fits = [str(g) for g in shape.dividing_group_sizes()] + ["-1 (one scale per output channel)"]
        msg = (f"method {method}: group_size {group_size} does not divide the input size of "
               f"{shape.count(bad)} of {shape.count(shape.inputs)} Linear layers of "
               f"{self.model_source.get('name') or self.model_source['key']}: {layers}, in each of its {shape.layers} "
               f"blocks. Group sizes that divide every layer: {allowed(fits)}")
        if "group_size" in group.matrix:
            msg += f". To skip it, add to exclude: {json.dumps({'method': method, 'group_size': group_size})}"
        self.errors.add(loc, msg)
