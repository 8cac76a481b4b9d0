"""The reference's size is its checkpoint on disk in its own dtype (what a user downloads), not the float32 copy a
worker computes with: a bf16 folder counts 2 bytes a parameter, a float32 one 4."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qfarm.sweep.job import Job
from tests.tiny import make_tiny_model


@pytest.mark.parametrize("dtype,width", [("bfloat16", 2), ("float32", 4)])
def test_a_folder_is_measured_by_its_weight_files_in_their_own_dtype(tmp_path, dtype, width):
    import torch
    from transformers import AutoModelForCausalLM

    from workers.shared.models import checkpoint_bytes, load_float, tensor_bytes

    folder = make_tiny_model(tmp_path / "m", ["a b c d e f g h"] * 4)
    AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).save_pretrained(folder)
    model, _ = load_float(str(folder))  # loaded as float32 on CPU, as workers do
    params = sum(p.numel() for p in model.parameters())
    base = SimpleNamespace(path=str(folder), model=model)
    job = Job.from_payload({"id": "j1", "kind": "quantize", "options": {"method": "none"}, "model": {"kind": "hf_dir"}})
    size, source = checkpoint_bytes(SimpleNamespace(job=job), base)
    assert source == "checkpoint files"
    assert size == pytest.approx(params * width, rel=0.02)  # + the safetensors header
    assert tensor_bytes(model) >= params * 4  # what the worker holds is float32 either way (+ buffers)
