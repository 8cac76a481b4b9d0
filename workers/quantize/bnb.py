"""bitsandbytes: LLM.int8() (``bnb-int8``), 4-bit NF4 (``bnb-nf4``) and FP4 (``bnb-fp4``).

Quantized at load time by transformers, saved with ``save_pretrained`` (bnb serializes 8- and 4-bit weights),
and reloaded from that folder for evaluation, so what is measured is what a user would deploy. Runs on CPU
with bitsandbytes >= 0.49 (its CPU backend), on CUDA with its kernels.

The 4-bit compute dtype is honoured on every CPU. bitsandbytes 0.50 on a CPU with AVX-512 BF16 switches an
inference forward (eval mode, no grad) to a fused kernel that repacks the weight and computes in bfloat16 whatever
``bnb_4bit_compute_dtype`` says: ~0.3 % relative error a layer, ~1 logit over SmolLM2's 30 layers, where the same
model on an AVX2 CPU computes dequantize + fp32 matmul exactly. :func:`use_cpu_kernel` keeps that fused kernel
for ``compute_dtype: bfloat16`` only, and every row with 4-bit layers names the kernel it ran (``kernel``).
The repacking is also one-way for what reads the weight afterwards: it rounds absmax to bf16, and transformers'
``model.dequantize()`` of a repacked layer reads the new layout as the old one (weights off by more than their
own size); :func:`unpacked` refuses to hand such a model on.

Sample yaml::

    jobs:
      - kind: quantize
        matrix:
          method: [bnb-int8, bnb-nf4, bnb-fp4]
      - {kind: quantize, method: bnb-nf4, double_quant: true, compute_dtype: bfloat16}
"""

from __future__ import annotations

import gc
import shutil


def config(opts):
    """transformers' BitsAndBytesConfig for a job's typed options (qfarm.sweep.methods: BnbInt8Options, Bnb4bitOptions)."""
    import torch
    from transformers import BitsAndBytesConfig

    if opts.method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=opts.threshold)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4" if opts.method == "bnb-nf4" else "fp4",
        bnb_4bit_use_double_quant=opts.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, opts.compute_dtype),
    )


def four_bit_layers(model) -> list:
    """The model's bitsandbytes 4-bit linear layers ([] when bitsandbytes is absent or the model has none)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return []
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _fused_cpu() -> bool:
    """Whether this CPU has bitsandbytes' fused AVX-512 BF16 4-bit kernel."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def use_cpu_kernel(model, fused: bool | None = None) -> str | None:
    """Choose the CPU kernel of every 4-bit layer before the model's first forward, and name it.

    ``fused=None`` follows each layer's compute dtype: bitsandbytes' fused bf16 kernel (where this CPU has it)
    only for bfloat16 compute, dequantize + matmul in the compute dtype otherwise. ``True``/``False`` force it
    (the merge check measures the fused kernel's own error that way). None when the model has no 4-bit layers.
    """
    import torch

    layers = four_bit_layers(model)
    if not layers:
        return None
    fused_here = _fused_cpu()
    for layer in layers:
        wanted = layer.compute_dtype == torch.bfloat16 if fused is None else fused
        if not wanted and _packed(layer):
            raise RuntimeError("a 4-bit layer already ran bitsandbytes' fused CPU kernel, which repacked its weight "
                               "lossily; choose the kernel right after loading, before any forward")
        layer.support_avx512bf16_for_cpu = fused_here and wanted
    return kernel_of(model)


def kernel_of(model) -> str | None:
    """What computes the model's 4-bit layers, e.g. ``bnb cpu: dequantize + float32 matmul``."""
    layers = four_bit_layers(model)
    if not layers:
        return None
    names = set()
    for layer in layers:
        dtype = str(layer.compute_dtype or layer.weight.quant_state.dtype).replace("torch.", "")
        if layer.weight.device.type != "cpu":
            names.add(f"bnb {layer.weight.device.type}: 4-bit kernels, {dtype} compute")
        elif getattr(layer, "support_avx512bf16_for_cpu", False):
            names.add("bnb cpu: fused avx512-bf16 kernel, bfloat16 compute")
        else:
            names.add(f"bnb cpu: dequantize + {dtype} matmul")
    return " / ".join(sorted(names))


def _packed(layer) -> bool:
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def unpacked(model):
    """``model``, checked to hold its 4-bit weights in bitsandbytes' storage layout (what ``dequantize()``,
    ``save_pretrained`` and a merge read), not the fused CPU kernel's repacked one."""
    if any(_packed(layer) for layer in four_bit_layers(model)):
        raise RuntimeError("4-bit weights are in bitsandbytes' repacked CPU layout (a forward ran the fused kernel): "
                           "dequantizing them would scramble the weights; load the model again")
    return model


def quantized_bytes(path: str, int8: bool = False) -> float:
    """The weight bytes of ``path`` quantized by bitsandbytes: 1 byte an int8 weight, ~0.56 a 4-bit one."""
    from workers.shared.models import weight_bytes

    return weight_bytes(path, 1.0 if int8 else 0.5625)


class BitsAndBytes:
    def quantize(self, ctx, base) -> str:
        from transformers import AutoModelForCausalLM

        from workers.shared.models import compute_dtype, placement

        out = ctx.output_dir
        shutil.rmtree(out, ignore_errors=True)  # a retried attempt starts clean
        where, _ = placement(base.path, nbytes=quantized_bytes(base.path, ctx.opts.method == "bnb-int8"))
        model = AutoModelForCausalLM.from_pretrained(base.path, quantization_config=config(ctx.opts),
                                                     dtype=compute_dtype(base.path), **where)
        model.save_pretrained(out)
        base.tokenizer.save_pretrained(out)
        del model
        gc.collect()
        return out

    def load(self, ctx, artifact, base):
        from transformers import AutoModelForCausalLM

        from workers.shared.models import compute_dtype, placement

        where, said = placement(artifact, nbytes=quantized_bytes(artifact, ctx.opts.method == "bnb-int8"))
        # in this worker's compute dtype, as every row: the artifact stores its float tensors in the source's dtype
        model = AutoModelForCausalLM.from_pretrained(artifact, dtype=compute_dtype(artifact), **where)
        model.eval()
        ctx.extra.update(said)
        use_cpu_kernel(model)
        return model
