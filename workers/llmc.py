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
- ``gptq``: GPTQModifier over the sweep's calibration samples, layer by layer.
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
import os
import shutil

# Before llm-compressor is imported: its INFO logs and progress bars would fill the Ray worker logs.
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")
os.environ.setdefault("TQDM_DISABLE", "1")


def weight_args(options: dict) -> dict:
    """compressed-tensors QuantizationArgs for the job's weights."""
    args = {"num_bits": options["bits"], "type": "int", "symmetric": bool(options.get("symmetric", True))}
    group = options.get("group_size", 64)
    args.update({"strategy": "channel"} if group == -1 else {"strategy": "group", "group_size": group})
    if options.get("act_order"):
        args["actorder"] = "weight"  # "group" was removed from compressed-tensors; "weight" is its replacement
    return args


def recipe(options: dict) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    groups = {"group_0": {"targets": ["Linear"], "weights": weight_args(options)}}
    method = options["method"]
    if method == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=options["dampening_frac"])]
    quantize = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    if method == "rtn":
        return [quantize]
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(duo_scaling=options["duo_scaling"], n_grid=options["n_grid"]), quantize]


def calibration_dataset(ctx, base):
    """The job's calibration samples as a tokenized ``datasets.Dataset``.

    Tokenized once per sweep: the first worker to need a calibration set writes its token ids (safetensors,
    never pickle) under ``<output_root>/_data/``; other workers read that file, and a worker keeps it in
    memory for its next jobs. ``calib_source`` records which of the three served the job.
    """
    import torch
    from datasets import Dataset

    from workers.data import calibration_windows, load_text, shared_tokens

    cal = ctx.job["calibration"]
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
    samples, seq_len = len(data), cal["seq_len"]
    ctx.extra.update({"calib_samples": samples, "calib_tokens": samples * seq_len, "calib_source": source,
                      "calib_overlap_tokens": _overlap(ctx.job.get("eval"), cal, total, samples * seq_len)})
    return data


def _overlap(ev: dict | None, cal: dict, total: int, used: int) -> int:
    """Tokens shared by the calibration samples (end of the text) and the perplexity windows (its start)."""
    ppl = (ev or {}).get("perplexity")
    if not ppl or ppl["dataset"]["key"] != cal["key"]:
        return 0
    return max(0, ppl["seq_len"] * ppl["max_windows"] - (total - used))


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


def _no_pinning_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


class LLMCompressor:
    def quantize(self, ctx, base) -> str:
        from llmcompressor import oneshot

        from workers.models import load_float

        options, out = ctx.options, ctx.output_dir
        shutil.rmtree(out, ignore_errors=True)  # a retried attempt starts clean
        # oneshot changes the model in place: quantize a fresh copy, never the cached base (the reference). In host
        # RAM: on a GPU worker its sequential pipeline onloads one decoder layer at a time to the GPU (GPTQ/AWQ),
        # never a second full copy there (RTN's data-free pipeline quantizes it where it lies)
        model, tokenizer = load_float(base.path, host=True)
        kwargs = {}
        if options["method"] != "rtn":
            ctx.progress("tokenizing calibration data")
            data = calibration_dataset(ctx, base)
            # in qfarm's order: llm-compressor would shuffle them with the process's global RNG, so the same job
            # gave other numbers depending on what its worker ran before (GPTQ's error feedback is order-sensitive)
            kwargs = {"dataset": data, "num_calibration_samples": len(data),
                      "max_seq_length": ctx.job["calibration"]["seq_len"], "shuffle_calibration_samples": False}
            _no_pinning_without_cuda()
        step = "quantizing" if options["method"] == "rtn" else "calibrating and quantizing"
        what = f"{options['method']} {options['bits']}-bit: {step}"
        ctx.progress(what)
        with _layer_progress(model, lambda i, n: ctx.progress(f"{what}, layer {i}/{n}")):
            oneshot(model=model, recipe=recipe(options), **kwargs)
        model.save_pretrained(out, save_compressed=True)
        tokenizer.save_pretrained(out)
        del model
        return out

    def load(self, ctx, artifact, base):
        from workers.models import load_float

        where: dict = {}
        model, _ = load_float(artifact, where)
        ctx.extra.update(where)
        return model
