"""The ``merge`` job kind: a train job's adapter merged into a base, checked, saved, reloaded and evaluated.

``onto: base`` merges into the float model the sweep started from. ``onto: dequantized`` (QLoRA) merges into
the 4-bit base the adapter was trained on, dequantized to float: the weights the adapter actually learned
against. Before saving, the merged model's logits are compared with the adapter model's (the model as trained:
base, 4-bit for QLoRA, plus the unmerged adapter) on held-out examples: ``merge_max_abs_diff``,
``merge_mean_abs_diff`` and ``merge_top1_agree`` say how faithful the merge is. For QLoRA, merging onto the float
base is not exact (the adapter corrected 4-bit weights that are not there), onto the dequantized base it is.

The merged model is saved as a float Hugging Face folder (``<output_dir>/merged``): the job's artifact, which a
``quantize`` stage coming from this one quantizes.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from workers.data import held_out
from workers.evaluate import PeakMemory, evaluate
from workers.files import inside
from workers.models import device, device_label, dir_bytes, prepared_base, start, tensor_bytes, versions
from workers.train import load_trainable_base


def logits_diff(a, b, examples: list[list[int]]) -> dict:
    """How far model ``b``'s logits are from ``a``'s on the same examples: max/mean abs diff, top-1 agreement."""
    import torch

    worst, total, count, agree, tokens = 0.0, 0.0, 0, 0, 0
    with torch.inference_mode():
        for ids in examples:
            x = torch.tensor([ids], dtype=torch.long)
            la = a(x.to(a.device)).logits[0].float().cpu()
            lb = b(x.to(b.device)).logits[0].float().cpu()
            d = (la - lb).abs()
            worst = max(worst, d.max().item())
            total += d.sum().item()
            count += d.numel()
            agree += (la.argmax(-1) == lb.argmax(-1)).sum().item()
            tokens += len(ids)
    return {"merge_max_abs_diff": worst, "merge_mean_abs_diff": total / max(count, 1),
            "merge_top1_agree": agree / max(tokens, 1), "merge_check_tokens": tokens}


def merged_model(base_path: str, adapter: str, parent_options: dict, onto: str):
    """The adapter merged into the chosen base, as a float model."""
    import torch
    from peft import PeftModel

    if onto == "dequantized":
        model = load_trainable_base(base_path, parent_options)  # the 4-bit base, as trained on
        model = model.dequantize()
        model = model.to(torch.float32)
    else:
        model = load_trainable_base(base_path, {**parent_options, "method": "lora"})  # the float base
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def run(ctx) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start(ctx)
    opts, parent = ctx.options, ctx.job["input"]
    adapter = inside(ctx.output_root, parent["artifact"])
    out = Path(ctx.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    with PeakMemory() as mem:
        base, prepare_s, cached = prepared_base(ctx)
        ctx.progress(f"merging the adapter (onto: {opts['onto']})")
        t0 = time.time()
        merged = merged_model(base.path, adapter, parent["options"], opts["onto"])
        merge_s = time.time() - t0

        ctx.progress("checking the merge against the adapter model")
        trained = PeftModel.from_pretrained(load_trainable_base(base.path, parent["options"]), adapter)
        trained.eval()
        merged.eval()
        examples = held_out(ctx.job["task_eval"], base.tokenizer)[: opts["check_samples"]]
        check = logits_diff(trained, merged, examples)
        del trained

        ctx.progress("saving the merged model")
        target = out / "merged"
        merged.to(getattr(torch, opts["dtype"])).save_pretrained(target)
        base.tokenizer.save_pretrained(target)
        del merged
        ctx.progress("loading the merged model")
        t0 = time.time()
        dtype = torch.float32 if device() == "cpu" else torch.float16
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, device_map={"": device()})
        model.eval()
        load_s = time.time() - t0
        metrics = evaluate(ctx, model, base, is_reference=False)
    size = dir_bytes(str(target))
    ref_bytes = tensor_bytes(base.model)
    result = {
        "method": f"merge-{opts['onto']}",
        "onto": opts["onto"],
        "merge_s": merge_s,
        **check,
        "size_mb": size / 2**20,
        "size_source": "disk",
        "ref_size_mb": ref_bytes / 2**20,
        "size_vs_ref": size / ref_bytes,
        "model_mem_mb": tensor_bytes(model) / 2**20,
        "peak_mem_mb": mem.mb,
        "load_s": load_s,
        "prepare_s": prepare_s,
        "base_cache_hit": cached,
        "device": device_label(),
        "artifact": str(target),
        "versions": versions(),
        **metrics,
    }
    del model
    return result
