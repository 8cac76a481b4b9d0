"""The ``quantize`` job kind: base model -> method's artifact -> reload -> the evaluation harness.

Each method lives in its own file under ``workers/``; the registry (``qfarm.sweep.methods.METHODS``) names it as a
``"module:Class"`` string, which the job's payload carries (``impl``). It has two calls (a Protocol, not a base
class):

- ``quantize(ctx, base) -> str | None``: write the artifact under ``ctx.output_dir`` in the method's native
  format and return its folder (None for a method with nothing to save);
- ``load(ctx, artifact, base) -> model``: load what will be evaluated, from that artifact.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from qfarm.sweep.job import Job
from workers.actor import entry_point
from workers.evaluate.harness import PeakMemory, evaluate, reference_first
from workers.quantize import artifacts
from workers.shared.models import dir_bytes, prepared_base, shared_columns, start, tensor_bytes


class Quantizer(Protocol):
    def quantize(self, ctx, base) -> str | None: ...

    def load(self, ctx, artifact: str | None, base) -> Any: ...


def method_impl(job: Job) -> Quantizer:
    return entry_point(job.impl, "method")()


def run(ctx) -> dict:
    start(ctx)
    name = ctx.job.method
    impl = method_impl(ctx.job)
    with PeakMemory() as mem:
        base, prepare_s, cached = prepared_base(ctx, from_input=True)
        if name != "none":  # the reference itself evaluates the base where it is
            ctx.extra["base_during_job"] = reference_first(ctx, base)
        ctx.progress(f"quantizing ({name})")
        t0 = time.time()
        with PeakMemory() as quant_mem:
            artifact = impl.quantize(ctx, base)
        quant_s = time.time() - t0
        if artifact is not None:  # stored as deployed, and saying what the row says, before anything is measured
            ctx.extra.update(artifacts.finish(ctx, base, artifact))
        ctx.progress("loading the artifact")
        t0 = time.time()
        model = impl.load(ctx, artifact, base)
        load_s = base.load_s if artifact is None else time.time() - t0
        if artifact is not None:
            ctx.extra.update(artifacts.check_parameters(model, base.skeleton))
        metrics = evaluate(ctx, model, base)
    in_memory = getattr(model, "nbytes", None) or tensor_bytes(model)  # llama.cpp models say their own size
    result = {
        "method": name,
        "bits": ctx.job.bits,  # decided once, at expansion (the method's nominal bits)
        **shared_columns(ctx, base, size_bytes=dir_bytes(artifact) if artifact else None,
                         size_source="disk", model=model, model_bytes=in_memory,
                         peak_mb=mem.mb, prepare_s=prepare_s, cached=cached, artifact=artifact),
        "load_s": load_s,
        "quant_s": quant_s,
        "quant_peak_mem_mb": quant_mem.mb,
        **ctx.extra,
        **getattr(model, "extra", {}),
        **metrics,
    }
    del model
    result.update(serving(ctx, artifact, base))
    return result


def serving(ctx, artifact: str | None, base) -> dict:
    """vLLM's serving figures (``eval.engine: vllm``) of the artifact, or of the reference's own folder."""
    ev = ctx.job.evaluation
    if ev.vllm_skipped:
        return {"vllm_skipped": ev.vllm_skipped}
    if ev.engine != "vllm":
        return {}
    from workers.evaluate.serving import vllm_metrics
    from workers.shared.data import load_text

    ds = ev.perplexity.dataset if ev.perplexity is not None else {"kind": "bundled", "location": "python-docs"}
    return vllm_metrics(ctx, artifact or base.path, base.tokenizer, load_text(ds)[:2_000_000])
