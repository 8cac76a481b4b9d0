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
    assert rows["bnb-nf4"]["size_mb"] < rows["none"]["model_mem_mb"] / 2
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


def test_qlora_train_and_merge_on_the_gpu(cli_env, shared_data, tmp_path):
    """QLoRA on bitsandbytes' CUDA 4-bit kernels, then both merges; the dequantized merge stays exact on a GPU."""
    spec = tmp_path / "gpu-qlora.yaml"
    spec.write_text(f"""\
name: gpu-qlora
model: bundled:smollm2-135m
eval:
  perplexity: {{seq_len: 256, max_windows: 4}}
  speed: null
stages:
  - name: finetune
    kind: train
    method: qlora
    dataset: {{path: {shared_data / 'guanaco_llama2_1k' / 'train.jsonl'}, eval_samples: 16}}
    r: 16
    max_steps: 20
    seq_len: 256
    learning_rate: 5.0e-4
  - {{name: merge, kind: merge, from: finetune, onto: [base, dequantized]}}
""")
    rows = run_sweep(cli_env, spec, "gpu-qlora", key="label")
    ft = rows["qlora"]
    assert ft["device"].startswith("cuda") and ft["task_loss"] < ft["ref_task_loss"]
    merged = {r["onto"]: r for r in rows.values() if r["kind"] == "merge"}
    assert merged["dequantized"]["merge_max_abs_diff"] < merged["base"]["merge_max_abs_diff"]


def test_vllm_serves_the_reference_and_compressed_tensors_rows(cli_env, tmp_path):
    """eval.engine: vllm on a real GPU: throughput at each concurrency, TTFT, GPU memory, for the float reference
    and an RTN (compressed-tensors) row; the bnb row is measured natively and says why it was not served."""
    pytest.importorskip("vllm", reason="vLLM is not installed on this GPU machine")
    spec = tmp_path / "gpu-vllm.yaml"
    spec.write_text("""\
name: gpu-vllm
model: bundled:smollm2-135m
eval:
  perplexity: {seq_len: 256, max_windows: 2}
  speed: null
  engine: vllm
  vllm: {concurrency: [1, 8, 32], prompt_tokens: 128, max_tokens: 64, gpu_memory_utilization: 0.5}
jobs:
  - kind: quantize
    matrix: {method: [none, rtn, bnb-nf4]}
""")
    rows = run_sweep(cli_env, spec, "gpu-vllm")
    for m in ("none", "rtn"):
        r = rows[m]
        assert r["status"] == "succeeded" and r["vllm_version"], r["error"]
        assert 0 < r["vllm_tokens_per_s_c1"] < r["vllm_tokens_per_s_c32"]  # batching raises throughput
        assert 0 < r["vllm_ttft_ms_p50"] <= r["vllm_ttft_ms_p99"] and r["vllm_gpu_mem_mb"] > 0
    assert rows["bnb-nf4"]["vllm_skipped"] and rows["bnb-nf4"]["vllm_tokens_per_s_c1"] is None
