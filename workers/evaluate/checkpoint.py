"""The ``evaluate`` job kind: an existing checkpoint (a published quant, a model made elsewhere or by an earlier
sweep) through the same evaluation as every row, against the sweep's reference.

What it is is read from the checkpoint itself: a ``.gguf`` file runs in llama.cpp (as a ``gguf`` row does); a
Hugging Face folder or hub model loads by its ``quantization_config`` — none (float), ``compressed-tensors``
(decompressed to dense weights, as llm-compressor rows are), ``bitsandbytes`` (its 4/8-bit layers on this device's
kernels), ``gptq``/``awq`` (AutoGPTQ/AutoAWQ layout: GPTQModel's kernels, refused with the reason when GPTQModel is
not installed). Its vocabulary must be the reference's, or the job fails saying so: KL and top-1 agreement compare
the two models token by token.

Sample yaml::

    jobs:
      - {kind: quantize, method: none}
      - {kind: evaluate, checkpoint: ./published/SmolLM2-135M-GPTQ-4bit}
      - {kind: evaluate, checkpoint: ./published/smollm2-135m-q4_k_m.gguf}
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from qfarm.errors import Permanent
from qfarm.sweep.methods import GGUF_TYPES
from workers.evaluate.harness import PeakMemory, evaluate, reference_first
from workers.shared.models import dir_bytes, prepared_base, shared_columns, start, tensor_bytes

PROBE = "The quick brown fox jumps over the lazy dog. def main():\n    return 42  # café, naïve, 東京"


def run(ctx) -> dict:
    from qfarm.sweep.sources import confirm

    start(ctx)
    ref = ctx.job.data or {}
    confirm(ref, "checkpoint")
    with PeakMemory() as mem:
        base, prepare_s, cached = prepared_base(ctx)
        vocab = base.skeleton.config.vocab_size  # no weights read: the reference's figures may be on disk
        ctx.extra["base_during_job"] = reference_first(ctx, base)
        ctx.progress(f"loading the checkpoint {ref.get('name')}")
        t0 = time.time()
        model, where, described = load_checkpoint(ctx, ref)
        load_s = time.time() - t0
        same_vocabulary(model, base.tokenizer, vocab, where)
        metrics = evaluate(ctx, model, base)
    size = Path(where).stat().st_size if where.endswith(".gguf") else dir_bytes(where) if Path(where).is_dir() else None
    in_memory = getattr(model, "nbytes", None) or tensor_bytes(model)
    result = {
        "method": "checkpoint",  # what the report and compare group it under; checkpoint_format says which
        **described,
        **shared_columns(ctx, base, size_bytes=size, size_source="disk" if size is not None else "memory",
                         model=model, model_bytes=in_memory, peak_mb=mem.mb, prepare_s=prepare_s, cached=cached,
                         artifact=None),  # not ours: no model card is written into the user's checkpoint
        "load_s": load_s,
        **ctx.extra,
        **getattr(model, "extra", {}),
        **metrics,
    }
    if size is None:  # a hub model's files are in the hub cache, not a folder of ours: its size in memory
        result.update(size_mb=in_memory / 2**20, size_source="memory")
    if ctx.job.evaluation.vllm_skipped:  # eval.engine: vllm serves the sweep's own checkpoints, not these (yet)
        result["vllm_skipped"] = ctx.job.evaluation.vllm_skipped
    return result


def load_checkpoint(ctx, ref: dict):
    """(the model the harness evaluates, the file or folder it came from, its row columns: ``checkpoint_format``,
    ``bits``)."""
    if ref.get("kind") == "gguf":
        from workers.quantize.gguf import LlamaCppModel, context_for

        path = str(Path(ref["location"]) / ref["gguf_file"])
        model = LlamaCppModel(path, context_for(ctx), ctx.threads)
        kind = gguf_file_type(path)
        return model, path, {"checkpoint_format": f"gguf {kind}" if kind else "gguf", "bits": GGUF_TYPES.get(kind)}
    location = ref["location"]
    kwargs = {"revision": ref["revision"]} if ref.get("kind") == "hub" and ref.get("revision") else {}
    qc = _quantization_config(location, kwargs)
    method = qc.get("quant_method") if qc else None
    if method in ("gptq", "awq"):  # AutoGPTQ/AutoAWQ layout: on GPTQModel's kernels
        from workers.quantize.gptqmodel import load_quantized, require

        require(f"checkpoint {ref.get('name')}, a {method.upper()} checkpoint (AutoGPTQ/AutoAWQ layout),")
        model = load_quantized(location, **kwargs)
        return model, location, {"checkpoint_format": method, "bits": _hf_bits(qc)}
    from transformers import AutoModelForCausalLM

    from workers.shared.models import compute_dtype, placement

    where, said = placement(location)
    # float, or compressed-tensors decompressed to dense weights: in the compute dtype; bitsandbytes, gptq, awq, ...:
    # the checkpoint's own layers as they are
    dtype = {"dtype": compute_dtype(location)} if method in (None, "compressed-tensors") else {}
    model = AutoModelForCausalLM.from_pretrained(location, **where, **dtype, **kwargs)
    model.eval()
    ctx.extra.update(said)
    if method == "bitsandbytes":
        from workers.quantize.bnb import use_cpu_kernel

        use_cpu_kernel(model)
    return model, location, {"checkpoint_format": method or "float", "bits": _hf_bits(qc)}


def _quantization_config(location: str, kwargs: dict) -> dict | None:
    from transformers import AutoConfig

    folder = Path(location)
    if folder.is_dir():
        config = json.loads((folder / "config.json").read_text())
    else:
        config = AutoConfig.from_pretrained(location, **kwargs).to_dict()
    qc = config.get("quantization_config")
    return qc if isinstance(qc, dict) else None


def _hf_bits(qc: dict | None) -> int | None:
    """The weights' bits a checkpoint's quantization_config declares (None: float, or not said)."""
    if not qc:
        return None
    if qc.get("quant_method") == "bitsandbytes":
        return 4 if qc.get("load_in_4bit") else 8 if qc.get("load_in_8bit") else None
    if isinstance(qc.get("bits"), int):  # gptq, awq
        return qc["bits"]
    bits = {(g.get("weights") or {}).get("num_bits") for g in (qc.get("config_groups") or {}).values()
            if isinstance(g, dict)}
    return bits.pop() if len(bits) == 1 else None


def gguf_file_type(path: str) -> str | None:
    """llama.cpp's name of the file's type (Q4_K_M, Q8_0, ...) from its ``general.file_type``, or None."""
    from qfarm.sweep.modelinfo import gguf_metadata
    from workers.quantize.gguf import ftype

    try:
        value = gguf_metadata(Path(path)).get("general.file_type")
    except (OSError, ValueError):
        return None
    for name in GGUF_TYPES:
        try:
            if ftype(name) == value:
                return name
        except ValueError:  # a type this llama.cpp does not have
            continue
    return None


def same_vocabulary(model, tokenizer, size: int, where: str) -> None:
    """Refuse a checkpoint whose tokens are not the reference's: the reference model's vocabulary size (``size``),
    and the same ids for a probe text (for a Hugging Face checkpoint, its own tokenizer's whole vocabulary when it
    ships one)."""
    if hasattr(model, "llm"):  # llama.cpp
        theirs = model.llm.n_vocab()
        probe = model.llm.tokenize(PROBE.encode(), add_bos=False, special=False)
    else:
        theirs = model.config.vocab_size
        probe = None
        try:
            from transformers import AutoTokenizer

            own = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError, KeyError, TypeError):  # no tokenizer of its own: its size decides
            own = None
        if own is not None and own.get_vocab() != tokenizer.get_vocab():
            raise Permanent(f"the checkpoint's tokenizer ({where}) is not the reference's: its vocabulary differs "
                            "(KL and top-1 agreement would compare different tokens); evaluate it in a sweep on its "
                            "own base model")
    if theirs != size:
        raise Permanent(f"the checkpoint has {theirs} tokens, the reference {size}: not the same vocabulary (KL and "
                        "top-1 agreement would compare different tokens)")
    ours = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    if probe is not None and list(probe) != list(ours):
        raise Permanent(f"the checkpoint tokenizes a probe text differently from the reference's tokenizer "
                        f"({len(probe)} against {len(ours)} tokens, first difference at token "
                        f"{next((i for i, (a, b) in enumerate(zip(probe, ours)) if a != b), min(len(probe), len(ours)))}): "
                        "not the same vocabulary")
