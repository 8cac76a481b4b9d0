"""GPTQ, AWQ and round-to-nearest (``gptq``, ``awq``, ``rtn``) through llm-compressor, saved as compressed-tensors.

llm-compressor is the maintained successor of AutoGPTQ and AutoAWQ (both archived or deprecated); its output
(compressed-tensors in safetensors, ``quantization_config`` in config.json) loads with plain
``AutoModelForCausalLM.from_pretrained`` and in vLLM. The artifact is reloaded from disk for evaluation, so
what is measured is what a user deploys. transformers decompresses the packed weights to dense ones when it
loads them here (CPU, or GPU without vLLM's kernels): size on disk is the packed size; speed and memory are
those of the decompressed model.

Weight-only integer quantization with explicit ``config_groups`` (the presets use group 128, which does not
divide SmolLM2's 576 inputs). ``lm_head`` stays full precision, as llm-compressor's examples do.

- ``rtn``: QuantizationModifier alone (no calibration: scales from the weights' min/max).
- ``gptq``: GPTQModifier over the sweep's calibration samples, layer by layer, through llm-compressor's sequential
  loop with a checkpoint per layer (a retried attempt replays the solved layers instead of solving them again); or,
  with ``calibration.share``, solved from a ``calibrate`` job's capture of every layer's Hessian (workers.quantize.calibrate).
- ``awq``: AWQModifier (scale search on calibration activations) followed by QuantizationModifier.

On CPU, llm-compressor's AWQ pins calibration activations in page-locked memory, which needs a CUDA device
("Cannot access accelerator device when none is available"); pinning only speeds host-to-GPU copies, so it is
turned into a no-op when CUDA is absent (BACKENDS.md).

Sample yaml::

    jobs:
      - kind: quantize
        calibration: {dataset: bundled:python-docs, samples: 64, seq_len: 512}
        matrix:
          method: [rtn, gptq, awq]
          bits: [4]
          group_size: [64]
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from pathlib import Path

from qfarm.sweep.methods import GptqOptions
from workers.shared.files import empty_but

# Before llm-compressor is imported: its INFO logs and progress bars would fill the Ray worker logs.
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")
os.environ.setdefault("TQDM_DISABLE", "1")


def weight_args(opts) -> dict:
    """compressed-tensors QuantizationArgs for the job's weights (its typed options: bits, symmetric and group
    size; a ``scheme`` has filled them in, qfarm.sweep.methods.SchemeOptions; FP8_DYNAMIC's are floats)."""
    kind = "float" if _scheme(opts) == "FP8_DYNAMIC" else "int"
    args = {"num_bits": opts.bits, "type": kind, "symmetric": opts.symmetric}
    group = opts.group_size
    args.update({"strategy": "channel"} if group == -1 else {"strategy": "group", "group_size": group})
    return args


def _scheme(opts) -> str | None:
    """The preset ``scheme`` of an rtn/gptq job (AWQ's options have none)."""
    return getattr(opts, "scheme", None)


def actorder(opts) -> str | None:
    """GPTQModifier's ``actorder`` for the job's ``act_order``, given both ways: ``weight`` (columns by activation
    size, groups kept in order: no g_idx, no inference cost; "group" was removed from compressed-tensors) or None
    (stored order). Left unset, llm-compressor 0.14 orders by activation whatever the row says (its default is
    "static", an alias of "weight"): every act_order false row before this fix was an act_order true model."""
    return "weight" if opts.act_order else None


def activation_args(opts) -> dict | None:
    """compressed-tensors QuantizationArgs for the inputs of the job's Linears: a W8A8 / FP8_DYNAMIC scheme's
    dynamic per-token int8 / fp8 (as compressed-tensors' presets); None for a weight-only job."""
    scheme = _scheme(opts)
    if scheme not in ("W8A8", "FP8_DYNAMIC"):
        return None
    return {"num_bits": 8, "type": "float" if scheme == "FP8_DYNAMIC" else "int", "strategy": "token",
            "symmetric": True, "dynamic": True}


SMOOTHING_STRENGTH = 0.8  # llm-compressor's W8A8 example's, when a W8A8 GPTQ job does not set smoothing_strength


def config_groups(opts, layers: dict[str, str] | None = None) -> dict:
    """compressed-tensors' config groups: every Linear in the job's format, or (a search's mixed candidate, ``layers``:
    module name -> format such as ``4b g64``) one group per format naming its layers: per-layer config groups, which
    transformers and vLLM load as they are."""
    from types import SimpleNamespace

    from qfarm.sweep.search import Format

    if layers is None:
        group = {"targets": ["Linear"], "weights": weight_args(opts)}
        activations = activation_args(opts)
        if activations is not None:
            group["input_activations"] = activations
        return {"group_0": group}
    by: dict[str, list[str]] = {}
    for name, fmt in layers.items():
        by.setdefault(fmt, []).append(name)
    out = {}
    for i, (fmt, names) in enumerate(sorted(by.items())):
        f = Format(fmt)
        args = SimpleNamespace(bits=f.bits, group_size=f.group, symmetric=True, scheme=None)
        out[f"group_{i}"] = {"targets": sorted(names), "weights": weight_args(args)}
    return out


def recipe(opts, layers: dict[str, str] | None = None) -> list:
    """llm-compressor's recipe for an rtn/gptq/awq job's typed options (``layers``: a mixed candidate's formats)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    groups = config_groups(opts, layers)
    if opts.method == "gptq":
        gptq = GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=opts.dampening_frac,
                            actorder=actorder(opts))
        if opts.scheme != "W8A8":
            return [gptq]
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=opts.smoothing_strength or SMOOTHING_STRENGTH), gptq]
    quantize = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    if opts.method == "rtn":
        return [quantize]
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(duo_scaling=opts.duo_scaling, n_grid=opts.n_grid), quantize]


def calibration_dataset(ctx, base):
    """The job's calibration samples as a tokenized ``datasets.Dataset``.

    Tokenized once per sweep: the first worker to need a calibration set writes its token ids (safetensors,
    never pickle) under ``<output_root>/_data/``; other workers read that file, and a worker keeps it in
    memory for its next jobs. ``calib_source`` records which of the three served the job.
    """
    import torch
    from datasets import Dataset

    from workers.shared.data import calibration_windows, load_text, shared_tokens

    cal = ctx.job.calibration
    key = (cal["key"], base.path, cal["seq_len"], cal["samples"])
    source = "memory"

    def make():
        nonlocal source
        (ids, total), source = shared_tokens(
            ctx.output_root, key,
            lambda: calibration_windows(base.tokenizer, load_text(cal), cal["seq_len"], cal["samples"]))
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        return data, total

    data, total = ctx.cache.tokens(key, make, ctx, what="calibration")
    samples, seq_len, ev = len(data), cal["seq_len"], ctx.job.evaluation
    ctx.extra.update({"calib_samples": samples, "calib_tokens": samples * seq_len, "calib_source": source,
                      "calib_overlap_tokens": _overlap(ev.perplexity if ev else None, cal, total, samples * seq_len)})
    ctx.extra.update({f"calib_overlap_tokens@{d.name}": _overlap(d, cal, total, samples * seq_len)
                      for d in (ev.domains if ev else [])})
    return data


def _overlap(ppl, cal: dict, total: int, used: int) -> int:
    """Tokens shared by the calibration samples (end of the text) and the perplexity windows of ``ppl`` (its start):
    none where they are different texts."""
    if ppl is None or ppl.dataset["key"] != cal["key"]:
        return 0
    return max(0, ppl.seq_len * ppl.max_windows - (total - used))


@contextlib.contextmanager
def _layer_progress(model, say):
    """Report the decoder layer that calibration has reached (layers run in order in llm-compressor's
    sequential pipeline), so a minutes-long GPTQ/AWQ job shows where it is."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        yield
        return
    reached = [0]

    def hook(index: int):
        def pre_forward(module, args):
            if index + 1 > reached[0]:
                reached[0] = index + 1
                say(index + 1, len(layers))
        return pre_forward

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _calibration_args(ctx, data) -> dict:
    """oneshot's arguments for the job's calibration samples. In qfarm's order: llm-compressor would shuffle them
    with the process's global RNG, so the same job gave other numbers depending on what its worker ran before
    (GPTQ's error feedback is order-sensitive)."""
    return {"dataset": data, "num_calibration_samples": len(data), "max_seq_length": ctx.job.calibration["seq_len"],
            "shuffle_calibration_samples": False}


def _no_pinning_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


# --- shared calibration: one capture of every layer's Hessian, then a solve per job -----------------------------

CAPTURE = "hessians"  # the capture's folder under its job's folder: one safetensors file per decoder layer
SOLVED = "solved_layers"  # a shared GPTQ job's solved layers, under its folder until its artifact is saved
Q_PARAMS = ("weight", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale")


@functools.cache
def _shared_modifiers():
    """llm-compressor's GPTQModifier, split in two at the Hessian (classes made on first use: importing
    llm-compressor is heavy, and only workers do it).

    ``Capture`` runs the sequential pipeline on the float model without quantizing anything: at the end of each
    decoder layer it writes the layer's Hessians (summed 2·xxᵀ and sample counts, as llm-compressor accumulates them)
    to ``layer_NNNN.safetensors`` and frees them, so one layer's Hessians are in memory at a time.
    ``Solve`` runs on the data-free pipeline: it reads the capture a layer at a time into the state GPTQModifier
    would have accumulated and lets the library's own ``compress_module_list`` solve it; each solved layer's
    quantized weights and qparams are written under ``progress`` first, and a retried attempt loads those instead of
    solving them again."""
    from llmcompressor.modifiers.quantization import GPTQModifier
    from pydantic import PrivateAttr
    from safetensors import safe_open

    class Capture(GPTQModifier):
        _folder: str = PrivateAttr("")
        _layers: int = PrivateAttr(0)

        def compress_modules(self):
            if not self._num_samples:
                return
            tensors = {}
            for module in list(self._num_samples):
                name = self._module_names[module]
                tensors[name] = self._hessians.pop(module).to("cpu").contiguous()
                tensors[f"{name}.num_samples"] = self._num_samples.pop(module).to("cpu").reshape(1)
            _save_atomic(tensors, Path(self._folder) / f"layer_{self._layers:04d}.safetensors")
            self._layers += 1

    class Solve(GPTQModifier):
        requires_calibration_data: bool = False  # llm-compressor then picks its data-free pipeline
        _capture: str = PrivateAttr("")
        _progress: str = PrivateAttr("")
        _say: object = PrivateAttr(None)
        _resumed: int = PrivateAttr(0)

        def compress_modules(self):
            by_name = {name: module for module, name in self._module_names.items()}
            files = sorted(Path(self._capture).glob("layer_*.safetensors"))
            if not files:
                raise FileNotFoundError(f"the calibration capture {self._capture} holds no layer")
            progress = Path(self._progress)
            progress.mkdir(parents=True, exist_ok=True)
            for i, file in enumerate(files):
                done = progress / file.name
                with safe_open(str(file), "pt") as f:
                    names = [k for k in f.keys() if not k.endswith(".num_samples")]
                    missing = [n for n in names if n not in by_name]
                    if missing:
                        raise ValueError(f"the calibration capture does not match this model: no module {missing[0]}")
                    modules = [by_name[n] for n in names]
                    if done.is_file():  # solved by an earlier attempt of this job
                        _load_layer_state(by_name.__getitem__, done)
                        self._resumed += 1
                    else:
                        for n, module in zip(names, modules):
                            self._hessians[module] = f.get_tensor(n).to(module.weight.device)
                            self._num_samples[module] = f.get_tensor(f"{n}.num_samples").reshape(()).to(
                                module.weight.device)
                        self.compress_module_list(modules)
                        _save_atomic(_layer_state(modules, self._module_names), done)
                if self._say is not None:
                    self._say(i + 1, len(files), self._resumed)

    return Capture, Solve


_RESUME: dict = {}  # the folder and progress callback of the GPTQ job running llm-compressor's pipeline in this process


def _layer_state(modules, names: dict) -> dict:
    """The quantized weights and qparams of the quantized Linears among ``modules`` (all GPTQ changes), by
    ``<module name>:<attribute>``, on the CPU."""
    import torch

    return {f"{names[m]}:{attr}": getattr(m, attr).detach().to("cpu").contiguous()
            for m in modules if m in names and getattr(m, "quantization_scheme", None) is not None
            for attr in Q_PARAMS if isinstance(getattr(m, attr, None), torch.Tensor)}


def _module_state(modules, names: dict) -> dict:
    """Every direct parameter of ``modules`` by ``<module name>:<name>``, on the CPU: what a sequential epoch end
    of GPTQ or AWQ (with the quantization that follows it) may have changed in them."""
    return {f"{names[m]}:{attr}": p.detach().to("cpu").contiguous()
            for m in dict.fromkeys(modules) if m in names for attr, p in m.named_parameters(recurse=False)}


def _smoothed_now(session) -> list:
    """The smooth and balance layers of the mappings the coming sequential epoch end will smooth (those whose
    activations the subgraph just cached: llm-compressor's own test in each modifier's ``_apply_smoothing``), for
    AWQ (``_resolved_mappings``, ``_smooth_activation_stats``) and SmoothQuant (``resolved_mappings_``,
    ``scales_``); none for a modifier without mappings."""
    modules = []
    for modifier in session.lifecycle.recipe.modifiers:
        stats = getattr(modifier, "_smooth_activation_stats", None)
        stats = getattr(modifier, "scales_", None) if stats is None else stats
        mappings = getattr(modifier, "_resolved_mappings", None) or getattr(modifier, "resolved_mappings_", None)
        for mapping in mappings or []:
            if stats is not None and mapping.smooth_name in stats:
                modules += [mapping.smooth_layer, *mapping.balance_layers]
    return modules


def _load_layer_state(module_of, file: Path) -> None:
    """Puts back what ``_layer_state`` wrote to ``file``; ``module_of``: a module's name -> the module."""
    from compressed_tensors.utils import update_offload_parameter
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        for key in f.keys():
            name, attr = key.rsplit(":", 1)
            update_offload_parameter(module_of(name), attr, f.get_tensor(key))


def _save_atomic(tensors: dict, target: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(target.with_suffix(".tmp")))
    os.replace(target.with_suffix(".tmp"), target)


@functools.cache
def _resumable_pipeline() -> str:
    """Registers llm-compressor's sequential pipeline (0.14's loop: calibrate a subgraph, solve it, propagate its
    quantized outputs) with a checkpoint after each subgraph: every parameter of the modules the subgraph's epoch
    end changed (its own modules: GPTQ's quantized weights, qparams; AWQ's smoothed weights and norms, and the
    smooth and balance layers of each AWQ mapping smoothed then, wherever they lie), written under
    ``_RESUME["folder"]`` once the subgraph is done. A retried attempt loads each subgraph written before, in order,
    and only propagates through it (one forward pass, no hooks, no solve, no grid search), so the next subgraph's
    inputs are the ones the first attempt had. Returns the pipeline's name."""
    import torch
    from compressed_tensors.offload import disable_offloading, set_onload_device
    from llmcompressor.core import LifecycleCallbacks, active_session
    from llmcompressor.modifiers.utils.hooks import HooksMixin
    from llmcompressor.pipelines.cache import IntermediatesCache
    from llmcompressor.pipelines.registry import CalibrationPipeline
    from llmcompressor.pipelines.sequential.helpers import trace_subgraphs
    from llmcompressor.utils.dev import get_main_device
    from llmcompressor.utils.helpers import DisableQuantization, calibration_forward_context
    from llmcompressor.utils.pytorch.module import infer_sequential_targets

    @CalibrationPipeline.register("qfarm_resumable")
    class Resumable(CalibrationPipeline):
        @staticmethod
        def __call__(model, dataloader, dataset_args):
            folder, say = Path(_RESUME["folder"]), _RESUME.get("say") or (lambda i, n, resumed: None)
            folder.mkdir(parents=True, exist_ok=True)
            session = active_session()
            onload = get_main_device()
            set_onload_device(model, onload)
            targets = infer_sequential_targets(model, dataset_args.sequential_targets)
            subgraphs = trace_subgraphs(model, next(iter(dataloader)), targets, dataset_args.tracing_ignore,
                                        dataset_args.sequential_targets_per_subgraph)
            names = {m: n for n, m in model.named_modules()}
            LifecycleCallbacks.calibration_start()
            with contextlib.ExitStack() as stack:
                stack.enter_context(calibration_forward_context(model))
                stack.enter_context(DisableQuantization(model))
                activations = IntermediatesCache.from_dataloader(
                    dataloader, onload, torch.device(dataset_args.sequential_offload_device))
                session.state.loss_masks, session.state.sequential_prefetch = None, False
                for index, subgraph in enumerate(subgraphs):
                    done = folder / f"subgraph_{index:04d}.safetensors"
                    with disable_offloading():
                        if done.is_file():  # solved by an earlier attempt of this job
                            _load_layer_state(model.get_submodule, done)
                            _RESUME["resumed"] = _RESUME.get("resumed", 0) + 1
                        else:
                            for batch, inputs in enumerate(activations.iter(subgraph.input_names)):
                                session.state.current_batch_idx = batch
                                subgraph.forward(model, **inputs)
                            touched = list(subgraph.submodules(model)) + _smoothed_now(session)
                            LifecycleCallbacks.sequential_epoch_end(subgraph.submodules(model))
                            _save_atomic(_module_state(touched, names), done)
                        say(index + 1, len(subgraphs), _RESUME.get("resumed", 0))
                        with HooksMixin.disable_hooks():  # the quantized outputs, the next subgraph's inputs
                            for batch, inputs in enumerate(activations.iter(subgraph.input_names)):
                                output = subgraph.forward(model, **inputs)
                                if index < len(subgraphs) - 1:
                                    activations.update(batch, output)
                                    activations.delete(batch, subgraph.consumed_names)
                LifecycleCallbacks.calibration_end()

    return "qfarm_resumable"


def sequential(ctx, model, opts, data, progress: Path, say=None, layers: dict[str, str] | None = None) -> int:
    """GPTQ or AWQ through llm-compressor with its sequential pipeline, resumable per subgraph
    (``_resumable_pipeline``) from ``progress``; returns the subgraphs an earlier attempt had done."""
    from llmcompressor import oneshot

    _RESUME.clear()
    _RESUME.update(folder=str(progress), say=say)
    _no_pinning_without_cuda()  # here, not only in the worker's quantize: whoever runs the pipeline needs it
    try:
        oneshot(model=model, recipe=recipe(opts, layers), pipeline=_resumable_pipeline(), **_calibration_args(ctx, data))
        return _RESUME.get("resumed", 0)
    finally:
        _RESUME.clear()


def capture_hessians(ctx, model, data, folder: Path) -> int:
    """Write each decoder layer's GPTQ Hessians of ``model`` (float, changed in place: use a copy) on the
    calibration ``data`` under ``folder``; every layer sees the float model's activations. Returns the layers written."""
    from llmcompressor import oneshot

    Capture, _ = _shared_modifiers()
    folder.mkdir(parents=True, exist_ok=True)
    groups = {"group_0": {"targets": ["Linear"], "weights": weight_args(GptqOptions(method="gptq", bits=8, group_size=-1))}}
    capture = Capture(config_groups=groups, ignore=["lm_head"])
    capture._folder = str(folder)
    _no_pinning_without_cuda()
    with _layer_progress(model, lambda i, n: ctx.progress(f"capturing GPTQ Hessians, layer {i}/{n}")):
        # propagate_error=False: no second pass per layer, the next layer takes the float outputs of this one
        oneshot(model=model, recipe=[capture], propagate_error=False, **_calibration_args(ctx, data))
    return capture._layers


def solve_shared(ctx, model, opts, capture: str, progress: Path, layers: dict[str, str] | None = None) -> int:
    """GPTQ on ``model`` from a capture's Hessians (qfarm.sweep.expand's ``calibrate`` job); returns the layers an
    earlier attempt had solved (loaded from ``progress``, not solved again)."""
    from llmcompressor import oneshot

    _, Solve = _shared_modifiers()
    solve = Solve(config_groups=config_groups(opts, layers), ignore=["lm_head"], dampening_frac=opts.dampening_frac,
                  actorder=actorder(opts))
    solve._capture, solve._progress = capture, str(progress)
    what = f"gptq {_width(opts)}: solving from the shared capture"
    solve._say = lambda i, n, resumed: ctx.progress(
        f"{what}, layer {i}/{n}" + (f" ({resumed} solved by an earlier attempt)" if resumed else ""))
    oneshot(model=model, recipe=[solve])
    return solve._resumed


def _width(opts) -> str:
    """How progress lines name a job's weights: ``4-bit``, or ``mixed`` for per-layer formats."""
    from qfarm.sweep.methods import per_layer

    return "mixed" if per_layer(opts) else f"{opts.bits}-bit"


def ruled_layers(model, opts) -> dict[str, str]:
    """Each quantizable layer's format under the job's ``layer_rules`` (the rest in its bits and group size);
    Permanent for a rule that decides no layer, or a group size that does not divide a layer's inputs."""
    from qfarm.errors import Permanent
    from qfarm.sweep.search import Format, layers_by_rules
    from workers.search.probe import quantizable

    found = dict(quantizable(model))
    try:
        layers = layers_by_rules(list(found), opts.layer_rules, f"{opts.bits}b g{opts.group_size}")
    except ValueError as e:
        raise Permanent(f"layer_rules: {e}") from None
    for name, fmt in layers.items():
        if not Format(fmt).fits(found[name].in_features):
            raise Permanent(f"layer_rules: {name} has {found[name].in_features} inputs, which {fmt}'s groups do "
                            "not divide: give it another group size")
    return layers


def per_layer_formats(ctx, base, model) -> dict[str, str] | None:
    """Each quantizable layer's format (``4b g64``) for a job with per-layer formats, recorded in its row
    (``layer_formats``): a search's mixed candidate's from its probes, ``layer_rules``' by rule; None for a job in one
    format. ``model``: any copy of the model (its Linear layers' names and inputs are read)."""
    opts = ctx.opts
    if getattr(opts, "mixed", None):  # a search candidate (rtn, gptq): each layer's format from its probes
        from qfarm.sweep.search import scale_bits
        from workers.quantize.artifacts import source_dtype
        from workers.search.mixed import allocation

        layers = allocation(ctx, scale_bits(source_dtype(ctx.job, base.path)))
    elif getattr(opts, "layer_rules", None):  # per-layer formats by rule (a search pick's fragment, or by hand)
        layers = ruled_layers(model, opts)
    else:
        return None
    ctx.extra["layer_formats"] = layers
    return layers


def capture_of(ctx) -> str | None:
    """The folder of the capture a shared GPTQ job solves from (the artifact of the job it needs), inside the output
    root; None for a job that calibrates itself."""
    needs = ctx.job.input.needs
    calibration = getattr(ctx.opts, "calibration", None)
    if not getattr(calibration, "share", False):
        return None
    from workers.shared.files import inside

    # the needed jobs' folders that hold a capture (a search candidate also needs its probes)
    artifacts = [a for a in needs.values() if isinstance(a, str) and (Path(inside(ctx.output_root, a)) / CAPTURE).is_dir()]
    if len(artifacts) != 1:
        raise ValueError("a GPTQ job with calibration.share needs exactly one calibrate job's capture")
    return str(Path(inside(ctx.output_root, artifacts[0])) / CAPTURE)


class LLMCompressor:
    def quantize(self, ctx, base) -> str:
        from llmcompressor import oneshot

        from workers.shared.models import load_float, package_version

        opts, out = ctx.opts, ctx.output_dir
        capture = capture_of(ctx)
        solved = Path(out) / SOLVED
        resumable = opts.method in ("gptq", "awq")
        empty_but(Path(out), solved if resumable else None)  # a retry keeps what an earlier attempt solved
        # oneshot changes the model in place: quantize a fresh copy, never the cached base (the reference). In host
        # RAM: on a GPU worker its sequential pipeline onloads one decoder layer at a time to the GPU (GPTQ/AWQ),
        # never a second full copy there (RTN's data-free pipeline quantizes it where it lies)
        model, tokenizer = load_float(base.path, host=True)
        layers = per_layer_formats(ctx, base, model)
        if capture:
            ctx.extra.update({"calib_source": "shared capture", "calib_capture": Path(capture).parent.name})
            resumed = solve_shared(ctx, model, opts, capture, solved, layers)
        elif resumable:  # llm-compressor's sequential pipeline, checkpointed per subgraph (decoder layer)
            ctx.progress("tokenizing calibration data")
            data = calibration_dataset(ctx, base)
            what = f"{opts.method} {_width(opts)}: calibrating and quantizing"
            resumed = sequential(ctx, model, opts, data, solved, lambda i, n, r: ctx.progress(
                f"{what}, subgraph {i}/{n}" + (f" ({r} done by an earlier attempt)" if r else "")), layers)
        else:  # RTN: data-free
            what = f"rtn {_width(opts)}: quantizing"
            ctx.progress(what)
            with _layer_progress(model, lambda i, n: ctx.progress(f"{what}, layer {i}/{n}")):
                oneshot(model=model, recipe=recipe(opts, layers))
        if resumable:
            ctx.extra["resumed_from"] = resumed or None  # layers (subgraphs) an earlier attempt had done
        self._save(model, tokenizer, out)
        shutil.rmtree(solved, ignore_errors=True)
        ctx.extra.update(backend="llm-compressor", backend_version=package_version("llmcompressor"))
        return out

    @staticmethod
    def _save(model, tokenizer, out: str) -> None:
        model.save_pretrained(out, save_compressed=True)
        tokenizer.save_pretrained(out)

    def load(self, ctx, artifact, base):
        from workers.shared.models import load_float

        where: dict = {}
        model, _ = load_float(artifact, where)
        ctx.extra.update(where)
        return model
