"""The CUDA path: bitsandbytes' CUDA kernels, llm-compressor on a GPU, the harness. Skipped where CUDA is absent."""

from __future__ import annotations

import pytest

from tests.cli import run_sweep

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bnb_sweep_runs_on_the_gpu(cli_env, tmp_path):
    spec = tmp_path / "gpu.yaml"
    spec.write_text("""\
name: gpu-bnb
model: bundled:smollm2-135m
eval:
  perplexity: {seq_len: 256, max_windows: 4}
  speed: {prompt_tokens: 64, new_tokens: 16, runs: 2}
jobs:
  - kind: quantize
    matrix: {method: [none, bnb-int8, bnb-nf4]}
""")
    rows = run_sweep(cli_env, spec, "gpu-bnb")
    assert all(r["device"].startswith("cuda") for r in rows.values())
    assert rows["none"]["kl_div"] == 0.0
    assert rows["bnb-nf4"]["size_mb"] < rows["none"]["size_mb"] / 2
    assert 0 < rows["bnb-int8"]["kl_div"] < rows["bnb-nf4"]["kl_div"]


def test_gptq_and_awq_run_on_the_gpu(cli_env, tmp_path):
    """The default path where CUDA is present: llm-compressor calibrates on the GPU (no pinning patch)."""
    spec = tmp_path / "gpu-llmc.yaml"
    spec.write_text("""\
name: gpu-llmc
model: bundled:smollm2-135m
eval:
  perplexity: {seq_len: 256, max_windows: 4}
  speed: {prompt_tokens: 64, new_tokens: 16, runs: 2}
jobs:
  - {kind: quantize, method: none}
  - kind: quantize
    calibration: {samples: 64, seq_len: 512}
    matrix: {method: [rtn, gptq, awq], bits: [4], group_size: [64]}
""")
    rows = run_sweep(cli_env, spec, "gpu-llmc")
    assert all(r["status"] == "succeeded" and r["device"].startswith("cuda") for r in rows.values())
    assert rows["gptq"]["kl_div"] < rows["rtn"]["kl_div"] and rows["awq"]["kl_div"] < rows["rtn"]["kl_div"]
    assert rows["gptq"]["calib_tokens"] == 64 * 512
