"""The ``calibrate`` job kind: one capture of what GPTQ needs of the calibration data, for every GPTQ job of a sweep
that shares it (``calibration.share: true``; qfarm.sweep.expand makes this job and has those jobs need it).

It runs the calibration samples through a float copy of the model with llm-compressor's sequential pipeline, each
layer fed the float outputs of the one before, and writes each decoder layer's Hessians (safetensors) under its job
folder. Its row is a job like any other: its time, its size on disk and its peak memory; a failed capture fails
(skips) the jobs that need it, and a resubmit reuses a capture that succeeded.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

from workers.evaluate.harness import PeakMemory
from workers.shared.models import base_path, folder_columns, load_float, start


def run(ctx) -> dict:
    from workers.quantize.llmc import CAPTURE, calibration_dataset, capture_hessians

    start(ctx)
    out = Path(ctx.output_dir)
    shutil.rmtree(out, ignore_errors=True)  # a retried attempt starts clean
    with PeakMemory() as mem:
        path, prepare_s = base_path(ctx, from_input=True)
        t0 = time.time()
        model, tokenizer = load_float(path, host=True)  # a copy: the capture attaches llm-compressor's observers
        load_s = time.time() - t0
        ctx.progress("tokenizing calibration data")
        data = calibration_dataset(ctx, SimpleNamespace(path=path, tokenizer=tokenizer))
        t0 = time.time()
        layers = capture_hessians(ctx, model, data, out / CAPTURE)
        capture_s = time.time() - t0
        del model
    return {
        "method": "calibrate",
        "capture": ctx.opts.capture,
        "capture_layers": layers,
        "capture_s": capture_s,
        "load_s": load_s,
        "prepare_s": prepare_s,
        **folder_columns(ctx, str(out), mem.mb),
    }
