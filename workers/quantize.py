"""The ``quantize`` job kind: base model -> method's artifact -> reload -> the evaluation harness.

Each method lives in its own file under ``workers/`` and is named by ``qfarm.methods.METHODS`` as a
``"module:Class"`` string with two calls (a Protocol, not a base class):

- ``quantize(ctx, base) -> str | None``: write the artifact under ``ctx.output_dir`` in the method's native
  format and return its folder (None for a method with nothing to save);
- ``load(ctx, artifact, base) -> model``: load what will be evaluated, from that artifact.
"""

from __future__ import annotations

import importlib
import time
from typing import Any, Protocol

from qfarm.methods import METHODS
from workers.evaluate import PeakMemory, evaluate
from workers.models import device_label, dir_bytes, prepared_base, start, tensor_bytes, versions


class Quantizer(Protocol):
    def quantize(self, ctx, base) -> str | None: ...

    def load(self, ctx, artifact: str | None, base) -> Any: ...


def method_impl(name: str) -> Quantizer:
    module, cls = METHODS[name].worker.split(":")
    return getattr(importlib.import_module(module), cls)()


def run(ctx) -> dict:
    start(ctx)
    name = ctx.options["method"]
    impl = method_impl(name)
    with PeakMemory() as mem:
        base, prepare_s, cached = prepared_base(ctx, from_input=True)
        ctx.progress(f"quantizing ({name})")
        t0 = time.time()
        with PeakMemory() as quant_mem:
            artifact = impl.quantize(ctx, base)
        quant_s = time.time() - t0
        ctx.progress("loading the artifact")
        t0 = time.time()
        model = impl.load(ctx, artifact, base)
        load_s = base.load_s if artifact is None else time.time() - t0
        metrics = evaluate(ctx, model, base, is_reference=METHODS[name].is_reference)
    ref_bytes = tensor_bytes(base.model)
    in_memory = getattr(model, "nbytes", None) or tensor_bytes(model)  # llama.cpp models say their own size
    size = dir_bytes(artifact) if artifact else in_memory
    result = {
        "method": name,
        "bits": ctx.options.get("bits"),
        "size_mb": size / 2**20,
        "size_source": "disk" if artifact else "memory",
        "ref_size_mb": ref_bytes / 2**20,
        "size_vs_ref": size / ref_bytes,
        "model_mem_mb": in_memory / 2**20,
        "peak_mem_mb": mem.mb,
        "load_s": load_s,
        "quant_s": quant_s,
        "quant_peak_mem_mb": quant_mem.mb,
        "prepare_s": prepare_s,
        "base_cache_hit": cached,
        "device": device_label(),
        "artifact": artifact,
        "versions": versions(),
        **ctx.extra,
        **getattr(model, "extra", {}),
        **metrics,
    }
    del model
    return result
