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


@pytest.fixture(scope="session")
def llama3b(tmp_path_factory, shared_data):
    """The ~3B random bfloat16 Llama, built once per test session (its save is most of a minute on an H100)."""
    from tests.tiny import corpus_of

    return _random_llama(tmp_path_factory.mktemp("llama3b") / "model",
                         corpus_of(shared_data / "guanaco_llama2_1k" / "train.jsonl", 300))


def gpu_table(rows: dict) -> str:
    """The README's GPU table from a sweep's rows: device, versions, and per row size, peak GPU memory against the
    plan, load, perplexity, KL, decode speed and quantization time."""
    import torch

    head = (f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}\n"
            "| row | size MB | peak GPU GB | plan GPU GB | load s | ppl | KL | decode tok/s | quant s | base |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [f"| {label} | {fmt(r['size_mb'], '.0f')} | {fmt(r['peak_mem_mb'] * 2**20 / 1e9, '.2f')} | "
             f"{fmt(r['plan_gpu_gb'], '.2f')} | {fmt(r['load_s'], '.1f')} | {fmt(r['perplexity'], '.3f')} | "
             f"{fmt(r['kl_div'], '.4f')} | {fmt(r['decode_tokens_per_s'], '.1f')} | {fmt(r['quant_s'], '.1f')} | "
             f"{r['base_during_job'] or '-'} |" for label, r in rows.items()]
    return "\n".join([head, *lines])


def _random_llama(folder, corpus, layers: int = 40, hidden: int = 2560):
    """A randomly initialised Llama of ~2.8B parameters in bfloat16, built from a config (no hub): what a user's
    bf16 checkpoint looks like to qfarm, at a size where memory matters."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.tiny import make_tiny_model

    make_tiny_model(folder, corpus)  # its tokenizer (and a tiny model, replaced below)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=6912, num_hidden_layers=layers,
                         num_attention_heads=20, num_key_value_heads=4, max_position_embeddings=2048,
                         torch_dtype="bfloat16", tie_word_embeddings=False)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def test_a_3b_bf16_model_runs_in_its_dtype_and_its_memory_is_planned(cli_env, shared_data, tmp_path, llama3b):
    """bnb-nf4, RTN and GPTQ of a ~3B bfloat16 Llama on the GPU: computed in bfloat16, the float model held by the
    reference job alone, and the measured peak within 2x of the plan (the plan says what it expects per job)."""
    folder = llama3b
    spec = tmp_path / "big.yaml"
    spec.write_text(f"""\
name: gpu-3b
model: {folder}
eval:
  perplexity: {{dataset: {shared_data}/wikitext2/wiki.test.raw, seq_len: 512, max_windows: 4}}
jobs:
  - kind: quantize
    matrix: {{method: [none, bnb-nf4, rtn]}}
  - {{kind: quantize, method: gptq, calibration: {{dataset: {shared_data}/wikitext2/wiki.test.raw, samples: 16, seq_len: 256}}}}
""")
    rows = run_sweep(cli_env, spec, "gpu-3b")
    print(gpu_table(rows))  # the README's GPU table
    assert all(r["status"] == "succeeded" and r["device"].startswith("cuda") for r in rows.values())
    assert {r["run_dtype"] for r in rows.values() if r["method"] != "bnb-nf4"} == {"bfloat16"}
    for label, r in rows.items():
        measured_gb = r["peak_mem_mb"] * 2**20 / 1e9
        print(f"{label}: plan {r['plan_gpu_gb']:.2f} GB, measured {measured_gb:.2f} GB")  # the note's numbers
        assert 0.5 < r["plan_gpu_gb"] / measured_gb < 2, label
        if label != "none":  # the reference job wrote its log-probs: no row loads the float model beside its own
            assert r["base_during_job"] == "not loaded" and r["ref_cache"] in ("shared", "memory"), label


def test_a_model_over_one_gpus_room_is_offloaded_and_says_so(monkeypatch, llama3b):
    """A job whose weights do not fit its GPU's room (capped here with QFARM_GPU_MEM_GB) is placed partly in host
    RAM, says how much, and still computes the same logits as on the GPU alone."""
    from workers.shared.models import load_float

    folder = llama3b
    where: dict = {}
    monkeypatch.setenv("QFARM_GPU_MEM_GB", "4")  # 5.5 GB of bfloat16 weights, 4 GB of room
    model, tok = load_float(str(folder), where)
    assert where["offload_gb"] > 1 and "offloaded to host RAM" in where["device_map"]
    assert "cpu" in set(map(str, model.hf_device_map.values()))
    ids = torch.tensor([tok("the cat sat on the mat").input_ids], device="cuda")
    with torch.inference_mode():
        offloaded = model(ids).logits.float().cpu()
    del model
    torch.cuda.empty_cache()
    monkeypatch.delenv("QFARM_GPU_MEM_GB")
    whole, _ = load_float(str(folder), where)
    assert where["device_map"] == "cuda:0"
    with torch.inference_mode():
        assert torch.allclose(whole(ids).logits.float().cpu(), offloaded, atol=1e-2)


def test_gptqmodel_rows_decode_on_a_cuda_int4_kernel_and_lora_trains_on_them(cli_env, shared_data, tmp_path):
    """GPTQModel on a GPU: the GPTQ/AWQ rows run on a CUDA int4 kernel (Marlin/Exllama, named in `runtime`), decode
    beside the dense fp16/bf16 reference on the same model, and a LoRA trains on the GPTQ model."""
    data = shared_data / "guanaco_llama2_1k" / "train.jsonl"
    spec = tmp_path / "gpu-gptqmodel.yaml"
    spec.write_text(f"""\
name: gpu-gptqmodel
model: bundled:smollm2-135m
eval:
  perplexity: {{seq_len: 256, max_windows: 4}}
  speed: {{prompt_tokens: 64, new_tokens: 64, runs: 3}}
stages:
  - {{kind: quantize, method: none}}
  - name: q
    kind: quantize
    backend: gptqmodel
    calibration: {{samples: 32, seq_len: 256}}
    matrix: {{method: [gptq, awq]}}
  - {{kind: train, from: q, method: lora, dataset: {{path: {data}, eval_samples: 16}}, max_steps: 10, seq_len: 128}}
""")
    rows = run_sweep(cli_env, spec, "gpu-gptqmodel")
    assert all(r["status"] == "succeeded" and r["device"].startswith("cuda") for r in rows.values()), rows
    for label in ("gptq", "awq"):
        row = rows[label]
        assert row["runtime"].startswith("gptqmodel-") and "torch" not in row["runtime"], row["runtime"]
        assert 0 < row["kl_div"] < 1.0 and row["decode_tokens_per_s"] > 0
        print(f"{label}: {row['runtime']} decode {row['decode_tokens_per_s']:.1f} tok/s vs dense "
              f"{rows['none']['decode_tokens_per_s']:.1f} ({row['decode_tokens_per_s'] / rows['none']['decode_tokens_per_s']:.2f}×)")
    (lora,) = [r for r in rows.values() if r["kind"] == "train"]
    assert lora["train_loss"] < lora["train_loss_first"] and lora["train_kernel"].startswith("gptqmodel-torch")
