"""A worker's bounded cache: loaded base models, tokenized eval windows, the reference's log-probabilities.

N jobs of a sweep on one base model load it once per worker, not N times. Bounds (environment):
``QFARM_CACHE_MODELS`` base models kept (default 1), ``QFARM_REF_CACHE_MB`` for reference log-probs in total
(default 2048; past it they are recomputed window by window, never held whole).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable

from qfarm import settings


class Loaded:
    """A job's base model: its folder, tokenizer and conventions at once, its weights (``model``) the first time
    something asks for them. A job whose reference figures were written by the sweep's reference job (and whose
    method builds its own model from the folder: bitsandbytes loads quantizing, llm-compressor and GPTQModel their
    own copy, llama.cpp its file) never asks: the float model is not loaded beside its own (``loaded`` says whether
    it was). ``skeleton`` is the architecture on the meta device (no memory): parameter counts, the vocabulary."""

    def __init__(self, model: Any, tokenizer: Any, load_s: float, path: str, conventions: dict,
                 where: dict | None = None, parked: bool = False, load: Callable[[Loaded], Any] | None = None):
        self._model, self.tokenizer, self.load_s, self.path = model, tokenizer, load_s, path
        self.conventions = conventions  # BOS convention and tokenizer check (workers.evaluate.checks.conventions)
        self.where = where if where is not None else {}  # where its weights were placed (models.placement)
        self.parked = parked  # moved to host RAM while a job's own model has the GPU
        self._load, self._skeleton = load, None
        self.ctx = None  # the job it was last handed to (what counts a load)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def held(self) -> Any:
        """The weights as they are now (None when not loaded), neither loaded nor moved by asking."""
        return self._model

    @property
    def model(self) -> Any:
        """The float weights on this worker's device: loaded, or brought back from host RAM, when first asked for."""
        if (self._model is None or self.parked) and self._load is not None:
            self._model = self._load(self)
        return self._model

    @model.setter
    def model(self, value: Any) -> None:
        self._model = value

    @property
    def skeleton(self) -> Any:
        """The model's architecture on the meta device: its parameters' shapes and ties, no weights."""
        if self._model is not None:
            return self._model
        if self._skeleton is None:
            from workers.shared.models import skeleton

            self._skeleton = skeleton(self.path)
        return self._skeleton


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
        """The base model at ``path`` for this job: its tokenizer and conventions now, its weights when first asked
        for (``Loaded.model``), from this worker's cache when they are there."""
        from transformers import AutoTokenizer

        from workers.evaluate.checks import conventions

        def make() -> Loaded:
            self.refs.clear()  # reference log-probs belong to the model being evicted or replaced
            self.ref_numbers.clear()
            tokenizer = AutoTokenizer.from_pretrained(path)
            return Loaded(None, tokenizer, 0.0, path, conventions(path, tokenizer), load=self._load_weights)

        loaded, hit = self.models.get(path, make)
        loaded.ctx = ctx
        if hit and loaded.loaded:
            ctx.count("model_cache_hits")
        return loaded, hit

    def _load_weights(self, loaded: Loaded) -> Any:
        """The float weights, when a job first asks for them: back from host RAM where an earlier job parked them
        (seconds, not a load from disk), else loaded."""
        from workers.shared.models import device, float_model

        if loaded.parked and loaded._model is not None:
            loaded._model.to(device())
            loaded.parked = False
            if loaded.ctx is not None:
                loaded.ctx.count("model_unparks")
            return loaded._model
        start, where = time.time(), {}
        model = float_model(loaded.path, where)
        loaded.load_s, loaded.where, loaded.parked = time.time() - start, where, False
        self.model_loads += 1
        if loaded.ctx is not None:
            loaded.ctx.count("model_loads")
        return model

    def park(self, loaded: Loaded, on_gpu: bool) -> str:
        """Give the GPU back while a job's own model needs it (the plan's second phase): a base on one GPU moves
        to host RAM (back on the next ``base()``), one spread over several GPUs or offloaded is dropped (accelerate's
        dispatch does not move as a whole). Only on a GPU, and only once the reference's figures are kept: what the
        job does next must not need the base. Returns what it did: ``parked``, ``dropped`` or ``kept``, or ``not
        loaded`` when the job never needed its weights."""
        if not loaded.loaded:
            return "not loaded"
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
        if not loaded.loaded:
            return "not loaded"
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
