"""GPTQ and AWQ through GPTQModel (``backend: gptqmodel``): the AutoGPTQ/AutoAWQ checkpoint layout, run on int4
kernels.

GPTQModel (ModelCloud) is the maintained successor of AutoGPTQ and AutoAWQ (both archived). It writes
``quantize_config.json`` and ``quantization_config`` with ``quant_method: gptq`` (``format: gptq``, int32-packed
``qweight``/``qzeros``/``scales``/``g_idx``) or ``awq`` (``format: gemm``): what transformers (through optimum),
vLLM, SGLang and TGI load. The artifact is reloaded from disk in the compute dtype (float32 on a CPU, as every
row here) and evaluated on the kernel GPTQModel picks for it: on a CPU ``TorchFusedLinear`` (ATen's int4 matmul
for 4-bit), on a GPU Marlin/Exllama; the row's ``runtime`` names it (``gptqmodel-torch-fused``). Other bit widths
fall back to a dequantizing torch kernel, and the runtime says that too.

The job's options map onto GPTQModel's: ``bits``, ``group_size``, ``symmetric`` -> ``sym``, ``act_order`` ->
``desc_act`` (AutoGPTQ's column permutation) with GPTQModel's own group-aware reordering off (neither library's
extra, so the two backends solve the same problem), ``dampening_frac`` -> ``damp_percent``; the calibration
samples are the ones llm-compressor rows get, in the same order. On a CPU, AWQ is packed for GPTQModel's torch
kernel (its default, GEMM, needs CUDA to pack), which takes bfloat16 only: AWQ's scale search then runs in bfloat16
(``quant_dtype``), and the checkpoint is evaluated in float32 like every row.

Sample yaml::

    jobs:
      - kind: quantize
        method: gptq
        calibration: {dataset: bundled:python-docs, samples: 32, seq_len: 256}
        matrix: {backend: [llm-compressor, gptqmodel], bits: [4], group_size: [64]}
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

# Before GPTQModel is imported: its CPU thread pool defaults to half the cores (one on a 2-core runner, where its
# quantization loop waits on itself: ../shared/BACKENDS.md); its banner and INFO lines would fill the worker logs.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TQDM_DISABLE", "1")


def version() -> str | None:
    from workers.shared.models import package_version

    return package_version("gptqmodel")


def require(what: str) -> None:
    """Fails the job with the reason (a Permanent error: a retry would not install it) when GPTQModel is absent."""
    from qfarm.errors import Permanent

    if version() is None:
        raise Permanent(f"{what} runs on GPTQModel, which is not installed on this worker: pip install "
                        "'qfarm[gptqmodel]' (gptqmodel==7.6.0 optimum==2.3.0), or use backend: llm-compressor")


def _no_process_abort() -> None:
    """GPTQModel's thread pool ends the whole process (``os._exit(1)``) when a task raises, after handing the
    exception to the waiting caller: in a Ray worker that is "worker process died" with the reason lost, and a retry of a
    job that will fail the same way. Keep the hand-over, drop the exit: the job fails with GPTQModel's error."""
    from gptqmodel.utils import threadx

    threadx._DeviceWorker._abort_process = lambda self, exc: None


def _logs_in(folder: Path) -> None:
    """GPTQModel writes a log file per quantization pass under ``./logs`` of the process's working directory (the
    user's, for a local cluster): into the job's scratch folder instead."""
    from gptqmodel.looper import loop_processor

    loop_processor._PROJECT_LOG_DIR = folder


AWQ_ROWS = 64  # GPTQModel's AWQ clips weights 64 (or 256) output rows at a time: it asserts the output size divides


def check_awq_shapes(model) -> None:
    """Refuses (Permanent) a model GPTQModel's AWQ cannot take: a Linear it quantizes whose output size is not a
    multiple of AWQ_ROWS (tiny or odd models; real ones are multiples of 128)."""
    import torch

    from qfarm.errors import Permanent

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head" and module.out_features % AWQ_ROWS:
            raise Permanent(f"GPTQModel's AWQ needs every quantized Linear's output size to be a multiple of {AWQ_ROWS}; "
                            f"{name} has {module.out_features}: use backend: llm-compressor for this model")


def failed(what: str, e: Exception) -> Exception:
    """GPTQModel's exception as a job error that says where it came from (a bare ``assert`` has no message):
    Permanent for what a retry would meet again (an assertion, a refused setting), else retryable."""
    import traceback

    from qfarm.errors import Permanent

    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno} ({frame.line})" if frame else ""
    kind = Permanent if isinstance(e, (AssertionError, ValueError, NotImplementedError, TypeError)) else RuntimeError
    return kind(f"{what} failed: {type(e).__name__}{': ' + str(e) if str(e) else ''}{where}")


def dynamic_of(layers: dict[str, str] | None, bits: int, group_size: int) -> dict | None:
    """GPTQModel's per-module overrides (QuantizeConfig ``dynamic``) for per-layer formats: each layer not in the
    job's own bits and group size, by its exact module name (``+:^model\\.layers\\.0\\.mlp\\.down_proj$``:
    a literal, which GPTQModel looks up without a regex), ``{bits, group_size}``. None for one format."""
    from qfarm.sweep.search import Format

    if not layers:
        return None
    out = {}
    for name, fmt in sorted(layers.items()):
        f = Format(fmt)
        if (f.bits, f.group) != (bits, group_size):
            out[f"+:^{re.escape(name)}$"] = {"bits": f.bits, "group_size": f.group}
    return out or None


def quantize_config(opts, offload: Path, layers: dict[str, str] | None = None):
    """GPTQModel's QuantizeConfig for a gptq/awq job's typed options (``offload``: its scratch folder, inside the
    job's; ``layers``: per-layer formats, as ``dynamic`` overrides)."""
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization import METHOD

    common = dict(bits=opts.bits, group_size=opts.group_size, sym=opts.symmetric, offload_to_disk=True,
                  offload_to_disk_path=str(offload), dynamic=dynamic_of(layers, opts.bits, opts.group_size))
    if opts.method == "awq":
        return QuantizeConfig(method=METHOD.AWQ, **common)
    return QuantizeConfig(desc_act=opts.act_order, act_group_aware=False, damp_percent=opts.dampening_frac, **common)


def kernel_name(cls: type) -> str:
    """``gptqmodel-<kernel>`` from a GPTQModel QuantLinear class: TorchFusedLinear -> gptqmodel-torch-fused,
    MarlinQuantLinear -> gptqmodel-marlin, TorchAtenAwqLinear -> gptqmodel-torch-aten-awq."""
    name = re.sub(r"(Quant)?Linear$", "", cls.__name__)
    return "gptqmodel-" + re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def quantized_layers(model) -> list[tuple[str, object]]:
    """(name, module) of ``model``'s GPTQModel quantized layers (its QuantLinear kernels, whichever they are)."""
    return [(name, m) for name, m in model.named_modules()
            if type(m).__module__.startswith("gptqmodel.") and hasattr(m, "qweight")]


def kernels(model) -> list[str]:
    """The GPTQModel kernels computing ``model``'s quantized layers (none for a model without them)."""
    import torch

    found = {kernel_name(type(m)) for _, m in quantized_layers(model)}
    dtype = getattr(model, "dtype", torch.float32)
    if found and dtype != torch.float32:  # a kernel that computes in half precision says so (the rows' is float32)
        found = {f"{k} ({str(dtype).replace('torch.', '')})" for k in found}
    return sorted(found)


def load_quantized(path: str, training: bool = False, **kwargs):
    """A GPTQ/AWQ checkpoint as a transformers model on GPTQModel's kernels, in this worker's compute dtype, on its
    device. ``training``: on GPTQModel's plain torch kernel, the one peft trains LoRA through (the fused and
    Marlin kernels have no backward), which computes in bfloat16 where the compute dtype is float32 (a CPU)."""
    import torch
    from gptqmodel import BACKEND, GPTQModel

    from workers.shared.models import compute_dtype, device

    # per-module overrides (a mix of bits): only GPTQModel's plain torch kernel takes every layer's bits (its fused
    # CPU kernel is 4-bit only)
    qc = Path(path) / "quantize_config.json"
    mixed = qc.is_file() and bool(json.loads(qc.read_text()).get("dynamic"))
    backend, dtype = (BACKEND.TORCH if training or mixed else BACKEND.AUTO), compute_dtype(path)
    if (training or mixed) and dtype == torch.float32:  # the torch kernel computes in float16/bfloat16 only
        dtype = torch.bfloat16
    try:
        wrapper = GPTQModel.load(path, backend=backend, device=device(), dtype=dtype, **kwargs)
    except (ValueError, NotImplementedError) as e:
        # no GPTQModel kernel computes these bits in float32 (3-bit: only its float16/bfloat16 torch kernels)
        if dtype != torch.float32 or "dtype" not in str(e) and "quant linear" not in str(e).lower():
            raise
        wrapper = GPTQModel.load(path, backend=backend, device=device(), dtype=torch.bfloat16, **kwargs)
    model = wrapper.model
    model.eval()
    return model


def dequantized(path: str):
    """A GPTQ/AWQ checkpoint as a float32 transformers model whose Linears hold its quantized weights dequantized
    exactly ((q - zero) · scale in float32, from GPTQModel's own unpacking with the float16 scales widened first):
    what a LoRA trained on it is merged into."""
    import torch
    from gptqmodel import BACKEND, GPTQModel

    model = GPTQModel.load(path, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16).model
    for name, module in quantized_layers(model):
        probe = torch.randn(4, module.in_features, generator=torch.Generator().manual_seed(0)).half()
        with torch.no_grad():
            seen = module(probe).float() - (module.bias.float() if module.bias is not None else 0)
        module.scales = module.scales.float()
        weight = module.dequantize_weight().float()  # [in, out] for GPTQModel's kernels; square ones tell by a probe
        if weight.shape != (module.out_features, module.in_features) or (
                weight.shape[0] == weight.shape[1]
                and (probe.float() @ weight - seen).abs().max() < (probe.float() @ weight.t() - seen).abs().max()):
            weight = weight.t()
        dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        dense.weight.data = weight.contiguous()
        if module.bias is not None:
            dense.bias.data = module.bias.detach().float()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)
    model = model.to(torch.float32)
    # loaded in float16 for the kernel: the float tensors (embeddings, norms, head, biases) as the checkpoint stores them
    from safetensors import safe_open

    state = model.state_dict()
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key in state and state[key].is_floating_point():
                    state[key].copy_(f.get_tensor(key).float())
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # a float model now: saved as one
    model.is_quantized = False
    return model


class GPTQModelBackend:
    def quantize(self, ctx, base) -> str:
        import torch
        from gptqmodel import BACKEND, GPTQModel

        from workers.quantize.llmc import _layer_progress, _width, calibration_dataset, per_layer_formats
        from workers.shared.models import compute_dtype, device

        require(f"backend gptqmodel ({ctx.opts.method})")
        opts, out = ctx.opts, Path(ctx.output_dir)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        ctx.progress("tokenizing calibration data")
        data = calibration_dataset(ctx, base)
        samples = [{"input_ids": row["input_ids"], "attention_mask": row["attention_mask"]} for row in data]
        offload = out / "offload"
        layers = per_layer_formats(ctx, base, base.skeleton)  # a mix: GPTQModel's per-module overrides
        qc = quantize_config(opts, offload, layers)
        what = f"{opts.method} {_width(opts)} (GPTQModel): calibrating and quantizing"
        ctx.progress(what)
        torch.manual_seed(0)
        dtype, pack = compute_dtype(base.path), {}
        if opts.method == "awq" and device() == "cpu":
            # GPTQModel packs AWQ for its torch kernel on a CPU (GEMM needs CUDA), which takes float16/bfloat16 only
            dtype, pack = torch.bfloat16, {"backend": BACKEND.AWQ_TORCH}
            ctx.extra["quant_dtype"] = "bfloat16"
        _no_process_abort()
        _logs_in(offload / "logs")
        model = GPTQModel.load(base.path, qc, device=device(), dtype=dtype)
        if opts.method == "awq":
            check_awq_shapes(model.model)
        # calibration_sort=None: the samples in qfarm's order (GPTQModel sorts them by length by default)
        try:
            with _layer_progress(model.model, lambda i, n: ctx.progress(f"{what}, layer {i}/{n}")):
                model.quantize(samples, batch_size=1, calibration_sort=None, **pack)
        except Exception as e:
            raise failed(f"GPTQModel {opts.method}", e) from e
        ctx.progress("saving the GPTQModel checkpoint")
        model.save(str(out))
        base.tokenizer.save_pretrained(str(out))
        del model
        shutil.rmtree(offload, ignore_errors=True)
        ctx.extra.update(backend="gptqmodel", backend_version=version())
        return str(out)

    def load(self, ctx, artifact, base):
        return load_quantized(artifact)
