"""A worker's bounded cache: loaded base models, tokenized eval windows, the reference's log-probabilities.

N jobs of a sweep on one base model load it once per worker, not N times. Bounds (environment):
``QFARM_CACHE_MODELS`` base models kept (default 1), ``QFARM_REF_CACHE_MB`` for reference log-probs in total
(default 2048; past it they are recomputed window by window, never held whole).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from qfarm import settings


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    load_s: float
    path: str
    conventions: dict  # BOS convention and tokenizer check (workers.evaluate.checks.conventions)
    where: dict = field(default_factory=dict)  # where its weights were placed (workers.shared.models.placement)
    parked: bool = False  # moved to host RAM while a job's own model has the GPU


class _LRU:
    def __init__(self, max_items: int, evict_first: bool = False, on_evict: Callable[[], None] = lambda: None):
        self.max_items = max_items
        self.items: OrderedDict = OrderedDict()
        # models: what goes is dropped *before* the new one is made, so two never sit in memory at once
        self.evict_first, self.on_evict = evict_first, on_evict

    def get(self, key, make: Callable[[], Any]) -> tuple[Any, bool]:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key], True
        if self.evict_first and self.items and len(self.items) >= max(self.max_items, 1):
            while self.items and len(self.items) >= max(self.max_items, 1):
                self.items.popitem(last=False)
            self.on_evict()
        value = make()
        if self.max_items > 0:  # 0 turns the cache off (for benchmarks): every job loads afresh
            self.items[key] = value
        while len(self.items) > self.max_items:
            self.items.popitem(last=False)
        return value, False

    def clear(self) -> None:
        self.items.clear()


def _free() -> None:
    """Give an evicted model's memory back now: to the process (gc) and, on a GPU, to CUDA's pool."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class Cache:
    def __init__(self):
        self.models = _LRU(int(settings.number("QFARM_CACHE_MODELS")), evict_first=True, on_evict=_free)
        self.windows = _LRU(4)
        self.refs = _LRU(2)
        self.ref_numbers = _LRU(8)
        self.ref_budget_bytes = int(settings.number("QFARM_REF_CACHE_MB") * 2**20)
        self.model_loads = 0

    def base(self, path: str, ctx) -> tuple[Loaded, bool]:
        from workers.evaluate.checks import conventions
        from workers.shared.models import load_float

        def make() -> Loaded:
            self.refs.clear()  # reference log-probs belong to the model being evicted or replaced
            self.ref_numbers.clear()
            start = time.time()
            where: dict = {}
            model, tokenizer = load_float(path, where)
            self.model_loads += 1
            ctx.count("model_loads")
            return Loaded(model, tokenizer, time.time() - start, path, conventions(path, tokenizer), where)

        loaded, hit = self.models.get(path, make)
        if hit:
            ctx.count("model_cache_hits")
            if loaded.parked:  # back from host RAM: seconds, not a load from disk
                from workers.shared.models import device

                loaded.model.to(device())
                loaded.parked = False
                ctx.count("model_unparks")
        return loaded, hit

    def park(self, loaded: Loaded, on_gpu: bool) -> str:
        """Give the GPU back while a job's own model needs it (the plan's second phase): a base on one GPU moves
        to host RAM (back on the next ``base()``), one spread over several GPUs or offloaded is dropped (accelerate's
        dispatch does not move as a whole). Only on a GPU, and only once the reference's figures are kept: what the
        job does next must not need the base. Returns what it did: ``parked``, ``dropped`` or ``kept``."""
        if not on_gpu or loaded.parked:
            return "kept"
        spread = len({str(d) for d in (getattr(loaded.model, "hf_device_map", None) or {}).values()}) > 1
        if spread:
            return self.drop(loaded)
        loaded.model.to("cpu")
        loaded.parked = True
        _free()
        return "parked"

    def drop(self, loaded: Loaded) -> str:
        """Drop a cached base now (its memory back to the process, or CUDA's pool): the next job that needs it loads
        it again. For a host-RAM budget, or a model that does not move as a whole."""
        for key, value in list(self.models.items.items()):
            if value is loaded:
                del self.models.items[key]
        loaded.model = None
        _free()
        return "dropped"

    def tokens(self, key: tuple, make: Callable[[], Any], ctx, what: str = "eval_data") -> Any:
        """Tokenized text (eval windows, calibration samples), counted as ``<what>_tokenizations`` or ``_cache_hits``."""
        value, hit = self.windows.get((what,) + key, make)
        ctx.count(f"{what}_cache_hits" if hit else f"{what}_tokenizations")
        return value

    def reference_number(self, key: tuple, make: Callable[[], float]) -> tuple[float, bool]:
        """A number measured on the reference (its task loss): kept with its log-probs, dropped with its model."""
        return self.ref_numbers.get(key, make)

    def reference(self, key: tuple, make: Callable[[], Any]) -> tuple[Any, bool]:
        """Reference figures, kept for the next job. ``QFARM_REF_CACHE_MB`` bounds the log-probs kept in total:
        older entries go first, and a reference whose log-probs alone exceed it keeps none (workers.evaluate.harness
        recomputes them window by window)."""
        if key in self.refs.items:
            return self.refs.get(key, make)
        value = make()
        if self.models.max_items > 0:
            while self.refs.items and sum(v.nbytes for v in self.refs.items.values()) + value.nbytes > self.ref_budget_bytes:
                self.refs.items.popitem(last=False)
            self.refs.items[key] = value
            while len(self.refs.items) > self.refs.max_items:
                self.refs.items.popitem(last=False)
        return value, False
