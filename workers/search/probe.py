"""The ``probe`` job kind: how much each quantizable layer, alone in one format, moves the model's output.

A probe takes its share (``part`` of ``parts``) of the model's Linear layers but the output head. Over the first
windows of the sweep's evaluation text it records, per layer, the squares of the layer's inputs summed over the
tokens (llama.cpp's importance matrix), then for every format of the search the importance-weighted error of the
layer's weights stored in it (round-to-nearest with compressed-tensors' own scale rule for ``4b g64``; llama.cpp's
own ggml quantizer for a ggml type, in the type llama.cpp falls back to where its blocks do not divide the rows).
One forward per layer measures the KL from the float model's distribution with the layer alone in its coarsest
format; each other format's KL is that figure scaled by the ratio of the errors. ``sensitivity.json`` holds every
layer's figures; the mixed candidates read it (workers.search.mixed).

A probe of the tables (``tables``: for a GGUF mix under a size target) prices the embedding table and an untied
output head instead, in the ggml types, the same way: each type's error (weighted by the head's inputs' squares,
or for an untied embedding by how often each token occurs in the windows), one forward in the coarsest.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from workers.evaluate.harness import PeakMemory
from workers.shared.models import folder_columns, start

SENSITIVITY = "sensitivity.json"
IMPORTANCE = "importance.safetensors"  # per layer: its inputs' mean squares over the probe's tokens (an imatrix)


def save_importance(path: Path, mean: dict, tokens: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(v, dtype=np.float32) for name, v in mean.items()}, str(path),
              metadata={"tokens": str(tokens)})


def fake_int(weight, bits: int, group: int):
    """``weight`` rounded to symmetric ``bits``-bit integers with one scale per ``group`` inputs, and back: the
    numbers compressed-tensors' round-to-nearest stores (its own qparams and fake-quantize functions)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weight.detach().float()
    rows, n = w.shape
    g = n if group == -1 else group
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                            **({"strategy": "channel"} if group == -1 else {"strategy": "group", "group_size": group}))
    x = w.reshape(rows, n // g, g)
    scale, zero = calculate_qparams(x.amin(-1), x.amax(-1), args)
    if group == -1:
        scale, zero = scale.reshape(rows, 1), zero.reshape(rows, 1)
    return fake_quantize(w, scale, zero, args).to(weight.dtype)


def _ggml():
    """ggml's quantizer from the llama.cpp that llama-cpp-python ships (the one qfarm's gguf jobs run)."""
    import ctypes

    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml.so", "libggml-base.dylib", "libggml.dylib"):
        if (folder / name).is_file():
            lib = ctypes.CDLL(str(folder / name))
            lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            lib.ggml_quantize_init.argtypes = [ctypes.c_int]
            return lib
    raise RuntimeError(f"llama-cpp-python's ggml library is not in {folder}")


def fake_ggml(weight, type_name: str, importance=None):
    """``weight`` stored by ggml in ``type_name`` (a ggml type: Q4_K, Q8_0, IQ4_NL, ...) and read back; with
    ``importance`` (a float per input column: llama.cpp's importance matrix) as the quantizer weighs its errors, as a
    mixed GGUF candidate's file is quantized (workers.quantize.gguf)."""
    import gguf
    import numpy as np
    import torch

    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    src = np.ascontiguousarray(weight.detach().float().cpu().numpy())
    rows, n = src.shape
    dst = np.zeros(rows * (n // block) * size, dtype=np.uint8)
    lib = _ggml()
    lib.ggml_quantize_init(int(qtype))
    weights = None if importance is None else np.ascontiguousarray(np.asarray(importance, dtype=np.float32))
    lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data, 0, rows, n,
                            None if weights is None else weights.ctypes.data)
    back = gguf.quants.dequantize(dst.reshape(rows, -1), qtype).reshape(rows, n)
    return torch.from_numpy(np.ascontiguousarray(back)).to(device=weight.device, dtype=weight.dtype)


def quantized(weight, fmt, importance=None) -> tuple:
    """(the weight in the probe's format and back, the format it is stored in on this layer)."""
    if fmt.family == "int":
        return fake_int(weight, fmt.bits, fmt.group), fmt.name
    stored = fmt.stored_type(weight.shape[1])
    return fake_ggml(weight, stored, importance), stored


def quantizable(model) -> list[tuple[str, object]]:
    """The model's Linear layers but its output head: what llm-compressor and llama.cpp quantize."""
    import torch

    head = model.get_output_embeddings()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def tables(model) -> list[tuple[str, object, bool]]:
    """The model's embedding table and its output head where it is not tied to it, as (GGUF tensor name, module,
    whether its inputs weigh its error: the head's do), the names llama.cpp gives them (``token_embd.weight``,
    ``output.weight``). A tied table is one tensor in a GGUF, read by both: quantizing it moves both."""
    from workers.quantize.gguf import TABLES

    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
    out = [(TABLES[0], embed, tied)]
    if head is not None and not tied:
        out.append((TABLES[1], head, True))
    return out


def weighted_error(original, new, columns=None, rows=None, chunk: int = 8192) -> float:
    """The squared error of a weight (outputs × inputs) weighted by ``columns`` (its inputs' squares: a layer, a
    head) or ``rows`` (how often each token occurs: an embedding table), a slice of rows at a time (a large
    vocabulary's table in float64 is GBs)."""
    total = 0.0
    for lo in range(0, original.shape[0], chunk):
        d = (new[lo:lo + chunk].double() - original[lo:lo + chunk].double()).pow(2)
        if columns is not None:
            d = d * columns.to(d.device)
        if rows is not None:
            d = d * rows[lo:lo + chunk].to(d.device).unsqueeze(1)
        total += d.sum().item()
    return total


def run(ctx) -> dict:
    import torch

    from qfarm.sweep.search import Format
    from workers.evaluate.harness import runner
    from workers.shared.data import load_text, windows_and_bytes
    from workers.shared.models import prepared_base

    start(ctx)
    out = Path(ctx.output_dir)
    shutil.rmtree(out, ignore_errors=True)  # a retried attempt starts clean
    out.mkdir(parents=True)
    opts = ctx.opts
    formats = [Format(f) for f in opts.formats]
    with PeakMemory() as mem:
        base, prepare_s, _ = prepared_base(ctx)
        model = base.model  # the worker's float model, on its device: each layer changed, then put back (finally)
        ppl = ctx.job.evaluation.perplexity
        wins, _ = windows_and_bytes(base.tokenizer, load_text(ppl.dataset), opts.seq_len, opts.windows,
                                    base.conventions.get("bos_id"))
        every = [] if opts.tables else quantizable(model)  # a probe of the tables prices no layer
        lo, hi = opts.part * len(every) // opts.parts, (opts.part + 1) * len(every) // opts.parts
        mine = every[lo:hi]
        importance = {name: torch.zeros(layer.weight.shape[1], dtype=torch.float64) for name, layer in mine}

        def hook(name):
            def record(module, args):
                x = args[0].detach().double()
                importance[name] += x.reshape(-1, x.shape[-1]).pow(2).sum(0).cpu()
            return record

        handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in mine]
        priced = [f for f in formats if f.family == "gguf"]  # the types a GGUF table may take
        mine_tables = tables(model) if opts.tables else []
        head = model.get_output_embeddings()
        if any(weighed for _, _, weighed in mine_tables) and head is not None:
            importance["#head"] = torch.zeros(head.weight.shape[1], dtype=torch.float64)
            handles.append(head.register_forward_pre_hook(hook("#head")))
        run_model = runner(model)
        try:
            with torch.inference_mode():
                ref = [run_model.logprobs(w) for w in wins]
        finally:
            for h in handles:
                h.remove()
        tokens = int(wins.numel())
        mean = {name: (v / max(tokens, 1)).float().numpy() for name, v in importance.items()}  # llama.cpp's scale

        def price(module, entry: dict, fmts, weigh, weights=None) -> dict:
            """``entry`` with each format's error of ``module``'s weight (``weigh``: weighted_error's weights) and the
            KL with it alone in its coarsest format (every other format's KL: that scaled by the errors' ratio);
            ``weights``: the importance the quantizer is given. The weight is put back."""
            original = module.weight.data
            for fmt in fmts:  # one quantized copy at a time (a big model's layer is GBs in float)
                if not fmt.fits(original.shape[1]):
                    continue
                new, stored = quantized(original, fmt, weights)
                entry["error"][fmt.name], entry["stored"][fmt.name] = weighted_error(original, new, **weigh), stored
                del new
            if entry["error"]:
                coarsest = max(entry["error"], key=lambda f: entry["error"][f])
                module.weight.data = quantized(original, Format(coarsest), weights)[0].to(original.device)
                try:
                    with torch.inference_mode():
                        kl = [(r.exp() * (r - run_model.logprobs(w))).sum(-1).double() for r, w in zip(ref, wins)]
                finally:
                    module.weight.data = original
                measured = max(torch.cat(kl).mean().item(), 0.0)
                top = entry["error"][coarsest] or 1.0
                entry.update(measured=coarsest, kl_measured=measured,
                             kl={f: measured * e / top for f, e in entry["error"].items()})
            return entry

        found: dict[str, dict] = {}
        t0 = time.time()
        for i, (name, layer) in enumerate(mine):
            ctx.progress(f"probe {opts.part + 1}/{opts.parts}: layer {i + 1}/{len(mine)} ({name})")
            n_out, n_in = layer.weight.shape
            found[name] = price(layer, {"index": lo + i, "in": int(n_in), "out": int(n_out), "error": {}, "stored": {}},
                                formats, {"columns": importance[name]}, mean[name])
        table_found: dict[str, dict] = {}
        if mine_tables:  # how often each token occurs: an untied embedding's rows weighed by it
            counts = torch.bincount(wins.reshape(-1).cpu(), minlength=model.get_input_embeddings().weight.shape[0])
        for name, module, weighed in mine_tables:  # no importance to the quantizer: llama.cpp is given none for them
            ctx.progress(f"probe {opts.part + 1}/{opts.parts}: {name}")
            n_out, n_in = module.weight.shape
            entry = price(module, {"in": int(n_in), "out": int(n_out), "error": {}, "stored": {},
                                   "weighed_by": "inputs" if weighed else "tokens"}, priced,
                          {"columns": importance["#head"]} if weighed else {"rows": counts.double()})
            if entry["error"]:
                table_found[name] = entry
        probe_s = time.time() - t0
        mean.pop("#head", None)
    save_importance(out / IMPORTANCE, mean, tokens)
    figures = [v["kl_measured"] for v in (*found.values(), *table_found.values()) if "kl_measured" in v]
    (out / SENSITIVITY).write_text(json.dumps({"formats": [f.name for f in formats], "part": opts.part,
                                               "parts": opts.parts, "windows": len(wins), "seq_len": opts.seq_len,
                                               "layers": found, "tables": table_found}, indent=1))
    return {
        "method": "probe",
        "probe_layers": len(found),
        "probe_tables": len(table_found) or None,
        "probe_kl_sum": sum(figures) if figures else None,
        "probe_kl_max": max(figures) if figures else None,
        "probe_tokens": int(len(wins) * (wins.shape[1] - 1)),
        "probe_s": probe_s,
        "prepare_s": prepare_s,
        **folder_columns(ctx, str(out), mem.mb),
    }
