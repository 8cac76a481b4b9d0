"""The result columns: one table that every producer, ``results``, ``compare`` and ``report`` read.

A column is a key of a result row. ``header`` (with ``view``, its place) puts it in the default terminal and
markdown table; ``direction`` makes it a frontier objective (``min``: lower is better, ``max``: higher);
``group`` says which part of the product writes it. Core columns are in every row, null when not measured.
A job's options appear in its row under the names the spec gave them (``gguf_type``, ``group_size``); a measured
column that merely repeats an option of the same name says ``echoes_option`` — any other option of that name
would clash with it, and ``option_clashes`` refuses it at validate time.

Adding a column is one row here plus the producer that writes the key (see README, "Extending qfarm").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal, Optional


@dataclass(frozen=True)
class Column:
    name: str
    header: Optional[str] = None  # shown by default under this header
    format: str = "{:.4g}"
    unit: str = ""
    direction: Optional[Literal["min", "max"]] = None  # a frontier objective, and which way is better
    group: str = "run"
    view: Optional[int] = None  # its place in the default table (columns with a header)
    core: bool = False  # in every row, null when not measured (the JSON/CSV contract)
    pipeline_hidden: bool = False  # a pipeline's default table leaves it out, to make room for training columns
    echoes_option: bool = False  # the option of the same name, repeated by its producer
    priority: float = 50  # a narrow terminal drops the default table's columns highest priority first (qfarm.results.fit)

    def text(self, value) -> str:
        return self.format.format(value)


C = Column
TABLE: tuple[Column, ...] = (
    # the contract: every row has these (csv/json column order)
    C("job_id", "job", "{}", group="run", view=1, priority=16, core=True),
    C("status", "status", "{}", group="run", view=7, priority=1, core=True),
    C("method", None, "{}", group="run", core=True, echoes_option=True),
    C("bits", "bits", "{}", group="size", view=6, priority=6, core=True, pipeline_hidden=True, echoes_option=True),
    C("size_mb", "size MB", "{:.1f}", "MB", "min", "size", view=8, priority=3, core=True),
    C("size_vs_ref", "×ref", "{:.2f}", "×", "min", "size", view=9, priority=14, core=True, pipeline_hidden=True),
    C("peak_mem_mb", "peak MB", "{:.0f}", "MB", "min", "memory", view=10, priority=17, core=True),
    C("load_s", "load s", "{:.2f}", "s", "min", "speed", view=11, priority=27, core=True, pipeline_hidden=True),
    C("perplexity", "ppl", "{:.3f}", "", "min", "quality", view=12, priority=2, core=True),
    C("ppl_delta_pct", "Δppl %", "{:+.2f}", "%", "min", "quality", view=13, priority=4, core=True),
    C("kl_div", "KL", "{:.4f}", "nats", "min", "quality", view=14, priority=5, core=True),
    C("top1_agree", "top-1", "{:.3f}", "", "max", "quality", view=15, priority=13, core=True, pipeline_hidden=True),
    C("prefill_tokens_per_s", "prefill tok/s", "{:.1f}", "tok/s", "max", "speed", view=16, priority=19, core=True,
      pipeline_hidden=True),
    C("decode_tokens_per_s", "decode tok/s", "{:.1f}", "tok/s", "max", "speed", view=17, priority=7, core=True),
    C("device", "device", "{}", group="run", view=26, priority=28, core=True, pipeline_hidden=True),
    C("duration_s", "time s", "{:.1f}", "s", "min", "run", view=27, priority=29, core=True),
    # the farm's bookkeeping
    C("sweep_id", "sweep", "{}", group="run", view=0, priority=0.5),
    C("kind", group="run", format="{}"),
    C("label", "method", "{}", group="run", view=4, priority=0),
    C("attempts", group="run"),
    C("error", group="run", format="{}"),
    C("started_at", unit="s", group="run"),
    C("finished_at", unit="s", group="run"),
    C("queued_at", unit="s", group="run"),
    C("node", group="run", format="{}"),
    C("worker", group="run", format="{}"),
    C("threads", group="run"),
    C("work_s", unit="s", group="run"),
    C("artifact", group="run", format="{}"),
    C("model_card", group="run", format="{}"),  # the artifact folder's README.md (workers.shared.card)
    C("model_card_error", group="run", format="{}"),
    C("versions", group="run", format="{}"),
    # size and memory
    C("model_mem_mb", unit="MB", direction="min", group="memory"),
    C("ref_size_mb", unit="MB", group="size"),  # the reference checkpoint on disk, in its own dtype
    C("ref_size_source", group="size", format="{}"),
    C("size_source", group="size", format="{}"),
    C("quant_s", unit="s", direction="min", group="size"),
    C("quant_peak_mem_mb", unit="MB", group="memory"),
    # the artifact read back (workers.quantize.artifacts): what its own metadata says it is (checked against the row's
    # options before it is evaluated), the dtype its unquantized tensors are stored in (the source checkpoint's),
    # and its parameters as the architecture counts them (never more than the reference's)
    C("artifact_config", group="size", format="{}"),
    C("stored_dtype", group="size", format="{}"),
    C("artifact_params", group="size"),
    C("plan_gpu_gb", unit="GB", group="memory"),  # the memory plan (qfarm.sweep.plan) beside what was measured
    C("plan_host_gb", unit="GB", group="memory"),
    C("run_dtype", group="memory", format="{}"),  # what the row's model computed in (the checkpoint's on a GPU)
    C("device_map", group="memory", format="{}"),  # where its weights were: cpu, cuda:0, spread over N GPUs, offload
    C("offload_gb", unit="GB", group="memory"),  # weights offloaded to host RAM (the job's GPUs could not hold them)
    C("gpus_used", group="memory"),
    C("base_during_job", group="memory", format="{}"),  # the cached base while the job's own model ran: parked/dropped/kept
    C("prepare_s", unit="s", group="run"),
    C("base_cache_hit", group="run", format="{}"),
    C("kernel", group="speed", format="{}"),
    # calibration
    C("calib_samples", group="calibration"),
    C("calib_tokens", group="calibration"),
    C("calib_source", group="calibration", format="{}"),
    C("calib_overlap_tokens", group="calibration"),
    C("calib_capture", group="calibration", format="{}"),  # the calibrate job a shared GPTQ job solved from
    C("capture", group="calibration", format="{}", echoes_option=True),  # what a calibrate job captured (hessian)
    C("capture_layers", group="calibration"),  # decoder layers it wrote
    C("capture_s", unit="s", direction="min", group="calibration"),  # its pass over the calibration data
    # quality: standard errors over tokens (shown as ± beside the figure)
    C("perplexity_se", group="quality"),
    C("ppl_delta_pct_se", unit="%", group="quality"),
    C("kl_div_se", unit="nats", group="quality"),
    C("top1_agree_se", group="quality"),
    C("ref_perplexity", group="quality"),
    C("ppl_windows", group="quality"),
    C("ppl_tokens", group="quality"),
    C("answers", group="quality", format="{}"),
    C("bits_per_byte", unit="bits/byte", direction="min", group="quality"),  # tokenizer-independent
    C("ref_bits_per_byte", unit="bits/byte", group="quality"),
    C("tokens_per_byte", group="quality"),
    C("ref_cache", group="quality", format="{}"),  # the reference: computed by this job, shared (read), memory (cached)
    C("ref_logprobs", group="quality", format="{}"),  # kept whole, or recomputed window by window (the budget)
    # checks of the reference's inputs (workers.evaluate.checks, workers.quantize.reference)
    C("ppl_bos", group="checks", format="{}"),
    C("tokenizer_check", group="checks", format="{}"),
    # a hub model's pin: the commit every job used, what the spec asked for, whether a token reached the worker
    C("model_revision", group="run", format="{}"),
    C("model_revision_asked", group="run", format="{}"),
    C("hub_token", group="run", format="{}"),
    C("source_check", group="checks", format="{}"),
    C("source_kl", unit="nats", group="checks"),
    C("source_top1_agree", group="checks"),
    C("source_perplexity", group="checks"),
    # lm-evaluation-harness tasks (workers.evaluate.tasks): their <task>_<metric> columns are named after the tasks
    C("tasks", group="tasks", format="{}"),  # per task: main column, metric, which way is better, documents
    C("lm_eval_version", group="tasks", format="{}"),
    # speed
    C("ttft_ms", unit="ms", direction="min", group="speed"),
    C("ms_per_token", unit="ms", direction="min", group="speed"),
    C("speed_prompt_tokens", group="speed"),
    C("speed_new_tokens", group="speed"),
    C("speed_runs", group="speed"),
    C("prefill_tokens_per_s_p10", unit="tok/s", group="speed"),
    C("prefill_tokens_per_s_p90", unit="tok/s", group="speed"),
    C("decode_tokens_per_s_p10", unit="tok/s", group="speed"),
    C("decode_tokens_per_s_p90", unit="tok/s", group="speed"),
    C("runtime", "runtime", "{}", group="speed", view=25.5, priority=25, pipeline_hidden=True),  # what produced the speeds
    # vLLM's engine (eval.engine: vllm; workers.evaluate.serving): output tokens/s at each concurrency, TTFT, GPU memory
    C("vllm_tokens_per_s_c1", unit="tok/s", direction="max", group="vllm"),
    C("vllm_tokens_per_s_c8", unit="tok/s", direction="max", group="vllm"),
    C("vllm_tokens_per_s_c32", "vLLM tok/s @32", "{:.0f}", "tok/s", "max", "vllm", view=17.5, priority=18),
    C("vllm_ttft_ms_p50", unit="ms", direction="min", group="vllm"),
    C("vllm_ttft_ms_p99", unit="ms", direction="min", group="vllm"),
    C("vllm_ttft_concurrency", group="vllm"),
    C("vllm_gpu_mem_mb", unit="MB", group="vllm"),
    C("vllm_prompt_tokens", group="vllm"),
    C("vllm_max_tokens", group="vllm"),
    C("vllm_version", group="vllm", format="{}"),
    C("vllm_skipped", group="vllm", format="{}"),  # why a row of an engine: vllm sweep was not served by vLLM
    # GGUF / llama.cpp
    C("gguf_tensor_types", group="gguf", format="{}"),
    # an evaluate job's checkpoint as read from it: float, compressed-tensors, bitsandbytes, gptq, awq, gguf Q4_K_M
    C("checkpoint_format", group="run", format="{}"),
    # the library that quantized a gptq/awq row (llm-compressor, gptqmodel) and its version
    C("backend", group="size", format="{}", echoes_option=True),
    C("backend_version", group="size", format="{}"),
    C("quant_dtype", group="size", format="{}"),  # what quantization computed in, when not the compute dtype
    C("train_kernel", group="train", format="{}"),  # what computed a LoRA's quantized base while it trained
    C("quantized_base", group="train", format="{}"),  # the GPTQ/AWQ checkpoint a LoRA trained on
    C("base_task_loss", unit="nats", group="train"),  # ... and its task loss without the adapter: where training started
    C("train_dtype", group="train", format="{}"),  # ... and in which dtype (bfloat16 for GPTQModel's torch kernel)
    C("bits_per_weight", None, "{:.3f}", direction="min", group="size"),  # quantized layers: stored bits / weights
    C("file_bits_per_weight", group="gguf"),  # the whole file's bits over all its weights (embeddings, metadata)
    C("layer_formats", group="size", format="{}"),  # each quantized layer's stored format (ggml type, or 4b g64)
    C("tensor_type_fallbacks", group="gguf", format="{}"),  # tensor_types rules llama.cpp could not follow, and why
    C("gguf_source", group="gguf", format="{}"),
    C("llama_cpp_version", group="gguf", format="{}"),
    C("llama_cpp_threads", group="gguf"),
    # pipelines: where a job sits
    C("stage", "stage", "{}", group="pipeline", view=3, priority=8),
    C("parent", group="pipeline", format="{}"),
    C("lineage", "from", "{}", group="pipeline", view=5, priority=9),
    # training
    C("r", group="train", echoes_option=True),
    C("lora_alpha", group="train", echoes_option=True),
    C("lora_dropout", group="train", echoes_option=True),
    C("train_loss", "train loss", "{:.3f}", direction="min", group="train", view=18, priority=10),
    C("train_loss_first", group="train"),
    C("train_loss_best", group="train"),
    C("train_s", "train s", "{:.0f}", "s", group="train", view=21, priority=21),
    C("step_s", unit="s", group="train"),
    C("train_steps", group="train"),
    C("train_examples", group="train"),
    C("train_tokens", group="train"),
    C("train_tokens_per_s", unit="tok/s", group="train"),
    C("trainable_params", "trainable", "{:,}", group="train", view=20, priority=20, pipeline_hidden=True),
    C("trainable_pct", unit="%", group="train"),
    C("train_peak_mem_mb", unit="MB", group="train"),
    C("adapter_mb", unit="MB", group="train"),
    C("held_out_examples", group="train"),
    C("loss_curve", group="train", format="{}"),
    # where a retried attempt resumed (None: from the start): the checkpoint step of a train job, the number of
    # layers of a shared GPTQ job that an earlier attempt had solved
    C("resumed_from", group="train"),
    C("task_loss", "task loss", "{:.3f}", direction="min", group="train", view=19, priority=15),
    C("ref_task_loss", group="train"),
    C("task_loss_delta", group="train"),
    C("task_examples", group="train"),
    # merging
    C("onto", group="merge", format="{}", echoes_option=True),
    C("merge_s", unit="s", group="merge"),
    C("merge_max_abs_diff", "merge Δmax", "{:.2g}", group="merge", view=22, priority=22),
    C("merge_mean_abs_diff", group="merge"),
    C("merge_top1_agree", "merge top-1", "{:.3f}", group="merge", view=23, priority=23),
    C("merge_check_tokens", group="merge"),
    C("kernel_max_abs_diff", "kernel Δmax", "{:.2g}", group="merge", view=24, priority=24),
    C("kernel_mean_abs_diff", group="merge"),
    C("kernel_top1_agree", group="merge"),
    C("kernel_check_tokens", group="merge"),
    C("kernel_default", group="merge", format="{}"),
    # the farm's own test jobs
    C("slept_s", unit="s", group="sleep"),
    # computed when results are shown (qfarm.results.compare)
    C("pareto", "front", "{}", group="computed", view=2, priority=11),
    # a search (qfarm.sweep.search): each row's part in it, and the pick (computed: qfarm.results.compare)
    C("search_role", "search", "{}", group="search", view=2.2, priority=11.5),
    C("search_pick", "pick", "{}", group="computed", view=2.1, priority=10.5),
    C("search_target", group="search", format="{}"),  # the search's target: {"bits_per_weight": 4.25}
    C("search_objective", group="search", format="{}"),  # the column it minimises (or maximises)
    C("search_direction", group="search", format="{}"),  # min or max
    C("search_fragment", group="search", format="{}"),  # the candidate as a plain job of a spec's jobs: (YAML flow)
    C("probe_layers", group="search", format="{}"),  # a probe's share of the layers
    C("probe_tables", group="search", format="{}"),  # the embedding table and untied head it priced too (GGUF mixes)
    C("probe_kl_sum", group="search", format="{:.4g}"),  # its layers' measured KLs, each alone in its coarsest format
    C("probe_kl_max", group="search", format="{:.4g}"),
    C("probe_tokens", group="search", format="{}"),
    C("probe_s", group="search", format="{:.1f}"),
    C("search_target_bits_per_weight", group="search", format="{:.3f}"),  # a mixed candidate's own point
    C("search_predicted_kl", group="search", format="{:.4f}"),  # the probes' summed KL for its allocation
    C("search_predicted_bits_per_weight", group="search", format="{:.3f}"),
    # a gpu_mem_gb target: the artifact's size on disk and the KV cache and logits at its context (predicted)
    C("search_gpu_mem_gb", unit="GB", group="search", format="{:.3f}"),
    C("search_formats_used", group="search", format="{}"),  # how many layers took each format
    C("search_table_formats", group="search", format="{}"),  # a GGUF mix's embedding table (and head): their types
    # successive halving: a final's candidate (its job and label), and what its screen measured and where it ranked
    C("search_final_of", group="search", format="{}"),
    C("search_final_label", group="search", format="{}"),
    C("search_screen", group="search", format="{}"),
    C("search_probe_windows", group="search", format="{}"),
    C("tensor_types", group="gguf", format="{}", echoes_option=True),  # a mixed GGUF's rules, as the plain option
    C("gguf_imatrix", group="gguf", format="{}"),  # the importance matrix llama.cpp quantized with: from, file, tensors
    C("ties", "within noise", "{}", group="computed", view=25, priority=26),  # rows within 2 se on the sort column
    C("decode_speedup", unit="×", direction="max", group="computed"),
    C("prefill_speedup", unit="×", direction="max", group="computed"),
    C("mem_vs_ref", unit="×", group="computed"),
)
del C

BY_NAME: dict[str, Column] = {c.name: c for c in TABLE}
CORE: tuple[str, ...] = tuple(c.name for c in TABLE if c.core)
VIEW: tuple[Column, ...] = tuple(sorted((c for c in TABLE if c.header), key=lambda c: c.view))
MINIMIZE: tuple[str, ...] = tuple(c.name for c in TABLE if c.direction == "min")
MAXIMIZE: tuple[str, ...] = tuple(c.name for c in TABLE if c.direction == "max")
PIPELINE_HIDDEN: frozenset[str] = frozenset(c.name for c in TABLE if c.pipeline_hidden)


TASK_VIEW = 15.5  # where the tasks' columns go in the default table: after the perplexity figures
TASK_PRIORITY = 12  # and how long a narrow terminal keeps them: after the frontier mark, before top-1


def column_name(*parts: str) -> str:
    """A result column's name made of a task's, metric's or filter's names: lower case, other runs as ``_``."""
    return re.sub(r"[^0-9a-z]+", "_", "_".join(parts).lower()).strip("_")


def recovery_name(task: str) -> str:
    return column_name(task, "recovery")


def task_info(data: Iterable[dict]) -> dict[str, dict]:
    """The tasks the rows were evaluated on (``tasks`` of each row), first seen first."""
    out: dict[str, dict] = {}
    for r in data:
        for task, info in (r.get("tasks") or {}).items():
            if isinstance(info, dict) and isinstance(info.get("column"), str):
                out.setdefault(task, info)
    return out


def task_columns(data: Iterable[dict]) -> list[Column]:
    """The columns the rows' tasks add: each task's main metric and its recovery, shown and usable as
    frontier objectives (direction from the harness's ``higher_is_better``; recovery is higher-is-better)."""
    out = []
    for i, (task, info) in enumerate(task_info(data).items()):
        way = "max" if info.get("higher_is_better", True) else "min"
        out.append(Column(info["column"], f"{task} {info.get('metric', '')}".strip(), "{:.3f}", direction=way,
                          group="tasks", view=TASK_VIEW + i / 100, priority=TASK_PRIORITY + i / 100))
        out.append(Column(recovery_name(task), f"{task} rec.", "{:.3f}", "×", "max", "computed",
                          view=TASK_VIEW + (i + 0.5) / 100, priority=TASK_PRIORITY + 1 + i / 100))
    return out


DOMAIN_VIEW = 14.5  # where the other domains' Δppl go in the default table: after the first domain's KL
DOMAIN_PRIORITY = 12.5
# a domain's figures (workers.evaluate.harness.domain_columns): (prefix, header, format, direction)
DOMAIN_FIGURES = (("ppl", "ppl", "{:.3f}", "min"), ("ppl_delta_pct", "Δppl %", "{:+.2f}", "min"),
                  ("kl", "KL", "{:.4f}", "min"), ("top1", "top-1", "{:.3f}", "max"),
                  ("ref_ppl", "ref ppl", "{:.3f}", None), ("bits_per_byte", "bits/byte", "{:.3f}", None),
                  ("calib_overlap_tokens", "calib overlap", "{}", None))


def domains_of(data: Iterable[dict]) -> list[str]:
    """The evaluation domains of the rows (``ppl_domains`` of each: a list-form ``eval.perplexity``), first seen first."""
    out: dict[str, None] = {}
    for r in data:
        for name in r.get("ppl_domains") or []:
            if isinstance(name, str):
                out.setdefault(name)
    return list(out)


def domain_columns(data: Iterable[dict]) -> list[Column]:
    """The columns the rows' evaluation domains add: ``ppl@NAME``, ``ppl_delta_pct@NAME``, ``kl@NAME``, ``top1@NAME``
    (frontier objectives, each with ``_se`` in the row), ``ref_ppl@NAME``, ``bits_per_byte@NAME``,
    ``calib_overlap_tokens@NAME``. The default table shows every domain's Δppl but the first's (the plain columns
    are the first domain's)."""
    out = []
    for i, name in enumerate(domains_of(data)):
        for j, (prefix, header, fmt, way) in enumerate(DOMAIN_FIGURES):
            shown = prefix == "ppl_delta_pct" and i > 0
            out.append(Column(f"{prefix}@{name}", f"{header} {name}" if shown else None, fmt, direction=way,
                              group="quality", view=DOMAIN_VIEW + i / 100 if shown else None,
                              priority=DOMAIN_PRIORITY + i / 100 if shown else 50))
    return out


def dynamic_columns(data: Iterable[dict]) -> list[Column]:
    """The columns that depend on what the rows were evaluated on: lm-eval tasks' and evaluation domains'."""
    data = list(data)
    return task_columns(data) + domain_columns(data)


def se_of(row: dict, name: str) -> float | None:
    """The standard error a row has for column ``name`` (``<name>_se``), if any."""
    se = row.get(f"{name}_se")
    return se if isinstance(se, (int, float)) and not isinstance(se, bool) else None


def column(name: str) -> Column:
    """The column of that name; a column nobody declared (a job's option) is shown as it is."""
    return BY_NAME.get(name) or Column(name)


def option_clashes(names: Iterable[str]) -> list[str]:
    """The option names that a row could not hold beside the measured column of the same name."""
    return [n for n in names if n in BY_NAME and not BY_NAME[n].echoes_option]
