"""The ``merge`` job kind: a train job's adapter merged into a base, checked, saved, reloaded and evaluated.

``onto: base`` merges into the float model the sweep started from. ``onto: dequantized`` (QLoRA, or LoRA trained
``from:`` a GPTQ/AWQ stage) merges into the 4-bit base the adapter was trained on, dequantized to float: the weights
the adapter actually learned against. Nothing is merged into int4 weights (the update would mostly round away): a
merged model is float, and a ``quantize`` stage from the merge re-quantizes it (dequantize -> merge -> requantize).
Before saving, the merged model's logits are compared with the adapter model's (the model as trained:
base, 4-bit for QLoRA, plus the unmerged adapter) on held-out examples: ``merge_max_abs_diff``,
``merge_mean_abs_diff`` and ``merge_top1_agree`` say how faithful the merge is. For QLoRA, merging onto the float
base is not exact (the adapter corrected 4-bit weights that are not there), onto the dequantized base it is.

Like is compared with like: the adapter model computes its 4-bit layers as dequantize + float32 matmul, the
arithmetic of the float merged model (~1e-4 apart, on any CPU). bitsandbytes' own default on a CPU with AVX-512
BF16 is a fused bf16 kernel instead; a QLoRA merge also measures that kernel against the float32 path on the same
examples (``kernel_max_abs_diff``, ``kernel_top1_agree``; 0 and 1 on a CPU without it, ~1 logit on SmolLM2 with
it), so the table tells "the merge is exact" apart from "the 4-bit kernel is approximate on this CPU".

The merged model is saved as a float Hugging Face folder (``<output_dir>/merged``): the job's artifact, which a
``quantize`` stage coming from this one quantizes.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from workers.evaluate.harness import PeakMemory, evaluate, reference_first
from workers.quantize.bnb import kernel_of, unpacked
from workers.shared.data import held_out
from workers.shared.files import inside
from workers.shared.models import compute_dtype, dir_bytes, placement, prepared_base, shared_columns, start
from workers.train import load_trainable_base

FLOAT32 = "float32"  # the merge and its check: both sides in float32 arithmetic, whatever the device


def logits_of(model, examples: list[list[int]]) -> list:
    """The model's float32 logits on each example, on the CPU."""
    import torch

    with torch.inference_mode():
        return [model(torch.tensor([ids], dtype=torch.long).to(model.device)).logits[0].float().cpu()
                for ids in examples]


def logits_diff(a: list, b: list, prefix: str = "merge") -> dict:
    """How far logits ``b`` are from ``a`` (the same examples): max/mean abs diff, top-1 agreement."""
    worst, total, count, agree, tokens = 0.0, 0.0, 0, 0, 0
    for la, lb in zip(a, b, strict=True):
        d = (la - lb).abs()
        worst = max(worst, d.max().item())
        total += d.sum().item()
        count += d.numel()
        agree += (la.argmax(-1) == lb.argmax(-1)).sum().item()
        tokens += la.shape[0]
    return {f"{prefix}_max_abs_diff": worst, f"{prefix}_mean_abs_diff": total / max(count, 1),
            f"{prefix}_top1_agree": agree / max(tokens, 1), f"{prefix}_check_tokens": tokens}


def check(base_path: str, adapter: str, trained_with, merged, examples: list[list[int]],
          quantized: str | None = None) -> dict:
    """The merged model against the adapter model as trained, in the same float32 arithmetic; for a QLoRA
    adapter, also bitsandbytes' default CPU kernel against that float32 path (``kernel_*``). For an adapter trained
    on a GPTQ/AWQ checkpoint (``quantized``), the adapter model is that checkpoint on GPTQModel's kernel + adapter.
    ``trained_with``: the train job's typed options."""
    from peft import PeftModel

    if quantized:
        from workers.quantize.gptqmodel import load_quantized

        model = PeftModel.from_pretrained(load_quantized(quantized), adapter).eval()
        out = logits_diff(logits_of(model, examples), logits_of(merged, examples))
        del model
        return out

    def trained(fused: bool | None = None):
        model = PeftModel.from_pretrained(load_trainable_base(base_path, trained_with, fused, FLOAT32), adapter)
        return model.eval()

    model = trained()
    exact = logits_of(model, examples)
    out = logits_diff(exact, logits_of(merged, examples))
    del model
    if trained_with.method == "qlora":
        native = trained(fused=True)  # what bitsandbytes runs by default on this CPU
        out.update(logits_diff(exact, logits_of(native, examples), "kernel"))
        out["kernel_default"] = kernel_of(native)
        del native
    return out


def merged_model(base_path: str, adapter: str, trained_with, onto: str, quantized: str | None = None):
    """The adapter merged into the chosen base, as a float model. ``trained_with``: the train job's typed options;
    ``quantized``: the GPTQ/AWQ checkpoint the adapter was trained on (merging into its int4 weights would round the
    update away: it is dequantized first)."""
    import torch
    from peft import PeftModel

    if quantized and onto == "dequantized":
        from workers.quantize.gptqmodel import dequantized

        model = dequantized(quantized)
    elif onto == "dequantized":
        model = load_trainable_base(base_path, trained_with, dtype=FLOAT32)  # the 4-bit base, as trained on
        model = unpacked(model).dequantize()
        model = model.to(torch.float32)
    else:
        model = load_trainable_base(base_path, trained_with, dtype=FLOAT32, four_bit=False)  # the float base
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def run(ctx) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    start(ctx)
    opts, parent = ctx.opts, ctx.job.input
    adapter = inside(ctx.output_root, parent.artifact)
    out = Path(ctx.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    with PeakMemory() as mem:
        base, prepare_s, cached = prepared_base(ctx)
        ctx.extra["base_during_job"] = reference_first(ctx, base)
        ctx.progress(f"merging the adapter (onto: {opts.onto})")
        t0 = time.time()
        quantized = inside(ctx.output_root, parent.quantized_base) if parent.quantized_base else None
        merged = merged_model(base.path, adapter, parent.opts, opts.onto, quantized)
        merge_s = time.time() - t0

        ctx.progress("checking the merge against the adapter model")
        merged.eval()
        examples = held_out(ctx.job.task_eval, base.tokenizer)[: opts.check_samples]
        checked = check(base.path, adapter, parent.opts, merged, examples, quantized)

        ctx.progress("saving the merged model")
        target = out / "merged"
        merged.to(getattr(torch, opts.dtype)).save_pretrained(target)
        base.tokenizer.save_pretrained(target)
        del merged
        ctx.progress("loading the merged model")
        t0 = time.time()
        where, said = placement(str(target))
        model = AutoModelForCausalLM.from_pretrained(target, dtype=compute_dtype(str(target)), **where)
        ctx.extra.update(said)
        model.eval()
        load_s = time.time() - t0
        metrics = evaluate(ctx, model, base)
    result = {
        "method": f"merge-{opts.onto}",
        "onto": opts.onto,
        "merge_s": merge_s,
        **checked,
        **shared_columns(ctx, base, size_bytes=dir_bytes(str(target)), size_source="disk", model=model, peak_mb=mem.mb,
                         prepare_s=prepare_s, cached=cached, artifact=str(target)),
        "load_s": load_s,
        **ctx.extra,
        **metrics,
    }
    del model
    return result
