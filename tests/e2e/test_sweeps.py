"""Real sweeps on the real bundled SmolLM2-135M, through the CLI, as a user runs them."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from qfarm.sweep.sources import bundled_model_path
from tests.cli import files_containing, lay_out_hub_cache, qfarm, redis_dump, submitted_id

pytestmark = pytest.mark.e2e


def test_demo_sweep(cli_env, model_root, store):
    env = dict(cli_env, QFARM_OUTPUT_ROOT=str(model_root))
    out = qfarm(env, "submit", "jobs/demo.yaml", "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep = submitted_id(out.stdout)
    assert "The capital of France" in out.stdout or "Paris" in out.stdout  # the answers are printed
    res = qfarm(env, "results", sweep, "--format", "json")
    rows = {r["method"]: r for r in json.loads(res.stdout)}
    assert sorted(rows) == ["bnb-fp4", "bnb-int8", "bnb-nf4", "none"]
    assert all(r["status"] == "succeeded" for r in rows.values())
    ref, nf4, int8 = rows["none"], rows["bnb-nf4"], rows["bnb-int8"]
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in rows.values())
    assert ref["kl_div"] == 0.0 and ref["top1_agree"] == 1.0 and ref["ppl_delta_pct"] == 0.0
    # the reference's size is its checkpoint on disk in its own dtype: the bundled Q4_1 GGUF file, not the
    # float32 copy every method computes with (that one is model_mem_mb)
    gguf = bundled_model_path("smollm2-135m")
    assert ref["size_source"] == f"disk (file {gguf.name})" and ref["ref_size_source"] == f"file {gguf.name}"
    assert ref["size_mb"] == ref["ref_size_mb"] == gguf.stat().st_size / 2**20 and ref["model_mem_mb"] > 500
    assert all(r["size_vs_ref"] == pytest.approx(r["size_mb"] / ref["size_mb"]) for r in rows.values())
    assert nf4["size_mb"] < 0.5 * ref["model_mem_mb"] and nf4["size_source"] == "disk"
    assert nf4["size_mb"] < int8["size_mb"] < ref["model_mem_mb"]
    assert 0 < int8["kl_div"] < nf4["kl_div"]  # 8-bit is closer to the reference than 4-bit
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in rows.values())
    assert all(len(r["answers"]) == 2 and all(a["answer"] for a in r["answers"]) for r in rows.values())
    assert all(Path(r["artifact"], "config.json").is_file() for r in (nf4, int8))
    # each of the 2 worker actors loads the base model once, however many jobs it runs
    assert 1 <= store.stats(sweep)["model_loads"] <= 2
    # the memory plan made from the config alone is within 2x of what each job measured (RSS, on a CPU worker)
    for r in rows.values():
        assert 0.5 < r["plan_host_gb"] * 1e9 / (r["peak_mem_mb"] * 2**20) < 2, (r["label"], r["plan_host_gb"], r["peak_mem_mb"])


def test_gptq_awq_rtn_on_real_data_reload_and_order_sanely(cli_env, model_root, shared_data, tmp_path, store):
    """llm-compressor's methods on the real model: calibrated on C4, evaluated on WikiText-2 (both real data)."""
    env = dict(cli_env, QFARM_OUTPUT_ROOT=str(model_root))
    c4 = shared_data / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
    spec = tmp_path / "llmc.yaml"
    spec.write_text(f"""\
name: e2e-llmc
model: bundled:smollm2-135m
eval:
  perplexity: {{dataset: {shared_data / 'wikitext2' / 'wiki.test.raw'}, seq_len: 256, max_windows: 4}}
  speed: {{prompt_tokens: 16, new_tokens: 4, runs: 1}}
  prompts: ["What is the capital of France?"]
  max_new_tokens: 8
jobs:
  - {{kind: quantize, method: none}}
  - kind: quantize
    calibration: {{dataset: {c4}, text_field: text, samples: 16, seq_len: 256}}
    matrix: {{method: [rtn, gptq], bits: [4], group_size: [64]}}
  - {{kind: quantize, method: rtn, matrix: {{bits: [2, 8]}}, group_size: 64}}
  - {{kind: quantize, method: awq, bits: 4, group_size: 64, n_grid: 4, calibration: {{dataset: {c4}, samples: 4, seq_len: 128}}}}
  - {{kind: quantize, method: gptq, backend: gptqmodel, bits: 4, group_size: 64, calibration: {{dataset: {c4}, text_field: text, samples: 16, seq_len: 256}}}}
""")
    out = qfarm(env, "submit", str(spec), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep = submitted_id(out.stdout)
    everything = json.loads(qfarm(env, "results", sweep, "--format", "json").stdout)
    (gm,) = [r for r in everything if r["backend"] == "gptqmodel"]
    rows = {(r["method"], r["bits"]): r for r in everything if r["backend"] != "gptqmodel"}
    assert sorted(rows, key=str) == sorted([("none", None), ("rtn", 4), ("rtn", 8), ("gptq", 4), ("rtn", 2),
                                            ("awq", 4)], key=str)
    assert all(r["status"] == "succeeded" for r in rows.values()), {k: r["error"] for k, r in rows.items()}
    ref = rows[("none", None)]
    quantized = [r for k, r in rows.items() if k[0] != "none"]
    for r in quantized:  # saved as compressed-tensors, reloaded from disk, measured on disk
        config = json.loads(Path(r["artifact"], "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
        assert r["size_source"] == "disk" and r["size_mb"] < ref["model_mem_mb"]
        assert r["quant_s"] > 0 and r["quant_peak_mem_mb"] > 100 and r["answers"][0]["answer"]
        assert r["ref_perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)  # same windows, same reference
    assert rows[("rtn", 2)]["size_mb"] < rows[("gptq", 4)]["size_mb"] < rows[("rtn", 8)]["size_mb"] < ref["model_mem_mb"]
    # 8-bit is close to the reference; GPTQ beats round-to-nearest at 4 bits; 2-bit is clearly worse
    assert abs(rows[("rtn", 8)]["ppl_delta_pct"]) < 2 and rows[("rtn", 8)]["kl_div"] < 0.02
    assert rows[("gptq", 4)]["perplexity"] < rows[("rtn", 4)]["perplexity"]
    assert rows[("gptq", 4)]["kl_div"] < rows[("rtn", 4)]["kl_div"]
    assert rows[("rtn", 8)]["kl_div"] < rows[("gptq", 4)]["kl_div"]
    assert rows[("rtn", 2)]["perplexity"] > 2 * ref["perplexity"]
    assert rows[("awq", 4)]["kl_div"] < rows[("rtn", 4)]["kl_div"]
    # calibration: real C4 samples (sharing one tokenization between jobs: tests/integration/test_data.py)
    gptq = rows[("gptq", 4)]
    assert gptq["calib_samples"] == 16 and gptq["calib_tokens"] == 16 * 256
    assert rows[("rtn", 4)]["calib_samples"] is None and rows[("awq", 4)]["calib_samples"] == 4
    # one tokenization per calibration set: of the two jobs on the same samples (llm-compressor's and GPTQModel's
    # GPTQ) one tokenized them, the other read its file or its worker's memory; awq's set was tokenized once
    read, tokenized = sorted([gptq["calib_source"], gm["calib_source"]])
    assert tokenized == "tokenized" and read in ("disk", "memory"), (gptq, gm)
    assert rows[("awq", 4)]["calib_source"] == "tokenized"
    # the counter counts each worker's misses: a worker that read the other's file counts one too
    assert store.stats(sweep)["calibration_tokenizations"] == 2 + (gptq["worker"] != gm["worker"])
    # GPTQModel on the same calibration samples: the AutoGPTQ layout, run on its int4 kernel, beats round-to-nearest
    # on KL and stays within 2x of llm-compressor's GPTQ (same algorithm, two implementations)
    config = json.loads(Path(gm["artifact"], "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["bits"] == 4 and config["group_size"] == 64
    assert gm["status"] == "succeeded" and gm["runtime"] == "gptqmodel-torch-fused" and gm["calib_tokens"] == 16 * 256
    # (on 4 WikiText windows its perplexity is within the noise of RTN's: 51.9 vs 50.3 once; KL is the finer measure)
    assert gm["kl_div"] < rows[("rtn", 4)]["kl_div"] and gm["kl_div"] < 2 * gptq["kl_div"], (gm["kl_div"], gptq["kl_div"])
    assert gm["size_mb"] < ref["model_mem_mb"] / 2  # 4-bit Linears packed; embeddings and head stay float
    # each saved checkpoint is ready to publish: a model card naming the bundled model's origin and its license
    from huggingface_hub import ModelCard

    card = ModelCard.load(Path(gptq["artifact"], "README.md"))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert card.data.base_model_relation == "quantized" and card.data.quantization["group_size"] == 64
    assert f"| perplexity | {gptq['perplexity']:.3f} ± {gptq['perplexity_se']:.2g}" in card.text
    assert "wiki.test.raw" in card.text and ref["model_card"] is None  # the reference saved nothing


def test_gguf_files_are_made_and_evaluated_inside_llama_cpp(cli_env, model_root, shared_data, tmp_path, store, ray_head):
    """llama.cpp quantizes the bundled GGUF to F16 / Q8_0 / Q4_K_M and evaluates each file itself, on the same
    WikiText-2 windows and against the same float reference as the bnb row beside them."""
    env = dict(cli_env, QFARM_OUTPUT_ROOT=str(model_root))
    spec = tmp_path / "gguf.yaml"
    spec.write_text(f"""\
name: e2e-gguf
model: bundled:smollm2-135m
eval:
  perplexity: {{dataset: {shared_data / 'wikitext2' / 'wiki.test.raw'}, seq_len: 256, max_windows: 4}}
  speed: {{prompt_tokens: 32, new_tokens: 8, runs: 1}}
  prompts: ["What is the capital of France?"]
  max_new_tokens: 8
jobs:
  - {{kind: quantize, method: none}}
  - {{kind: quantize, method: bnb-nf4}}
  - kind: quantize
    matrix: {{method: [gguf], gguf_type: [F16, Q8_0, Q4_K_M]}}
""")
    out = qfarm(env, "submit", str(spec), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {r["label"]: r for r in json.loads(qfarm(env, "results", submitted_id(out.stdout), "--format", "json").stdout)}
    assert sorted(rows) == ["bnb-nf4", "gguf F16", "gguf Q4_K_M", "gguf Q8_0", "none"]
    ref, f16, q8, q4 = rows["none"], rows["gguf F16"], rows["gguf Q8_0"], rows["gguf Q4_K_M"]
    for r in (f16, q8, q4):
        assert r["status"] == "succeeded" and r["size_source"] == "disk" and r["artifact"]
        files = list(Path(r["artifact"]).glob("*.gguf"))
        assert len(files) == 1 and files[0].stat().st_size == pytest.approx(r["size_mb"] * 2**20, rel=0.01)
        assert r["ppl_windows"] == 4 and r["ref_perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
        assert r["decode_tokens_per_s"] > 0 and r["llama_cpp_threads"] == 1 and r["answers"][0]["answer"]
        assert r["device"].startswith("cpu (llama.cpp") or r["device"].startswith("cuda (")  # where it really ran
    assert f16["device"] == "cpu (llama.cpp)" or __import__("torch").cuda.is_available()
    # the windows line up: llama.cpp's F16 file scores like the torch float reference on the same tokens
    assert abs(f16["ppl_delta_pct"]) < 1 and f16["kl_div"] < 0.01 and f16["top1_agree"] > 0.97
    assert abs(q8["perplexity"] - f16["perplexity"]) / f16["perplexity"] < 0.01
    assert q4["perplexity"] > q8["perplexity"] and (q4["perplexity"] - f16["perplexity"]) / f16["perplexity"] < 0.2
    assert f16["size_mb"] > q8["size_mb"] > q4["size_mb"] and (f16["bits"], q8["bits"], q4["bits"]) == (16, 8, 4)
    assert "Q4_K" in q4["gguf_tensor_types"] and 4 < q4["bits_per_weight"] < 8  # fallbacks for 576-wide rows
    # the reference proves its inputs (workers/evaluate/checks.py): the bundled GGUF's tokenizer as transformers rebuilds it
    # agrees with llama.cpp's, it adds no BOS, and its float copy reproduces the GGUF running in llama.cpp on the
    # same windows
    assert ref["tokenizer_check"].startswith("agrees with llama.cpp on a ") and ref["ppl_bos"] is False
    assert ref["source_kl"] < 0.02 and ref["source_top1_agree"] > 0.9
    assert abs(ref["source_perplexity"] - ref["perplexity"]) / ref["perplexity"] < 0.05
    assert math.isclose(ref["bits_per_byte"], ref["ref_bits_per_byte"]) and 0.5 < ref["bits_per_byte"] < 3
    nf4 = rows["bnb-nf4"]
    assert nf4["ref_perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
    # WikiText-2 windows of 256 tokens: 255 scored each; bitsandbytes NF4 on the same windows is worse
    assert ref["ppl_windows"] == 4 and ref["ppl_tokens"] == 4 * 255
    assert 5 < ref["perplexity"] < 200 and nf4["perplexity"] > ref["perplexity"]
    csv_out = qfarm(env, "results", "e2e-gguf", "--format", "csv").stdout.splitlines()
    assert csv_out[0].startswith("job_id,status,method,bits,size_mb") and len(csv_out) == 1 + 5
    # every speed names its runtime, and every quality figure has its standard error
    assert {r["runtime"] for r in (f16, q8, q4)} == {"llama.cpp"} and rows["bnb-nf4"]["runtime"] == "transformers-bnb"
    assert ref["runtime"] == "transformers-dense" and ref["perplexity_se"] > 0 and ref["ppl_delta_pct_se"] == 0
    assert q4["kl_div_se"] > 0 and q4["ppl_delta_pct_se"] > 0

    # The Q4_K_M file as a published quant: `kind: evaluate` of that file, in a sweep of its own, reads its type from
    # the file and lands on the figures of the row that made it
    published = tmp_path / "published-q4_k_m.gguf"
    shutil.copy(next(Path(q4["artifact"]).glob("*.gguf")), published)
    evaluate = tmp_path / "evaluate.yaml"
    evaluate.write_text(spec.read_text().replace("e2e-gguf", "e2e-gguf-evaluate").split("jobs:")[0]
                        + f"jobs:\n  - {{kind: quantize, method: none}}\n  - {{kind: evaluate, checkpoint: {published}}}\n")
    out = qfarm(env, "submit", str(evaluate), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    pub = {r["label"]: r for r in json.loads(qfarm(env, "results", "e2e-gguf-evaluate", "--format", "json").stdout)}
    pub = pub["evaluate published-q4_k_m.gguf"]
    assert pub["status"] == "succeeded" and pub["checkpoint_format"] == "gguf Q4_K_M" and pub["bits"] == 4
    assert pub["runtime"] == "llama.cpp" and pub["perplexity"] == pytest.approx(q4["perplexity"], rel=1e-4)
    assert pub["kl_div"] == pytest.approx(q4["kl_div"], rel=1e-3) and pub["size_mb"] == pytest.approx(q4["size_mb"])

    # A hub model, as users have them: pinned to a commit at submit (offline here: the cache's refs/main), downloaded
    # into the shared cache (here laid out already, as huggingface_hub writes it), its snapshot folder converted
    # by llama.cpp's convert_hf_to_gguf.py; it lands on the same numbers as the GGUF it came from. The token
    # reaches the workers and nothing else: no Redis key, no log line.
    hf_dir = next(p.parent for p in (model_root / "_models").glob("*/config.json"))
    sha = lay_out_hub_cache(hf_dir, model_root / "_hub", "HuggingFaceTB/SmolLM2-135M-Instruct")
    secret = "hf_qfarmTestToken0123456789abcdefXYZ"
    hub_env = dict(env, HF_HUB_OFFLINE="1", HF_TOKEN=secret)
    spec.write_text(spec.read_text().replace("bundled:smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct\nrevision: main")
                    .replace("e2e-gguf", "e2e-hub-gguf").replace("gguf_type: [F16, Q8_0, Q4_K_M]", "gguf_type: [Q8_0]"))
    out = qfarm(hub_env, "submit", str(spec), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    hub_rows = {r["label"]: r for r in json.loads(qfarm(env, "results", "e2e-hub-gguf", "--format", "json").stdout)}
    conv, hub_ref = hub_rows["gguf Q8_0"], hub_rows["none"]
    assert all(r["model_revision"] == sha and r["model_revision_asked"] == "main" and r["hub_token"] is True
               for r in hub_rows.values()), hub_rows
    assert conv["gguf_source"] == "converted" and q8["gguf_source"] == "gguf"
    assert conv["perplexity"] == pytest.approx(q8["perplexity"], rel=0.005)
    assert hub_ref["ref_size_source"] == "checkpoint files" and hub_ref["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-4)
    assert secret not in out.stdout + out.stderr and secret not in redis_dump(store)
    assert not files_containing(secret, Path(ray_head.temp_dir)), "the hub token is in a Ray log"
