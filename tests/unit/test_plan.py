"""The memory planner (qfarm.sweep.plan) on the real config.json of public models, against their published sizes."""

from __future__ import annotations

import pytest

from qfarm.sweep.plan import GB, job_plan, shape_of_config

# the fields of each model's config.json that size it (as published with the weights)
LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64}
MIXTRAL_8X7B = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8,
                "num_experts_per_tok": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
QWEN25_7B = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
             "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
GEMMA2_9B = {"model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000,
             "torch_dtype": "float32"}  # no tie_word_embeddings key: tied, as Gemma is

# published parameter counts (model cards / the safetensors index totals)
PUBLISHED = [(LLAMA3_8B, 8.03e9), (LLAMA3_70B, 70.55e9), (MIXTRAL_8X7B, 46.70e9), (QWEN25_7B, 7.62e9),
             (GEMMA2_9B, 9.24e9)]


@pytest.mark.parametrize("config,published", PUBLISHED, ids=["llama3-8b", "llama3-70b", "mixtral", "qwen2.5-7b",
                                                              "gemma2-9b"])
def test_parameter_counts_match_the_published_sizes(config, published):
    shape = shape_of_config(config)
    assert shape.total == pytest.approx(published, rel=0.003)
    assert shape.linear < shape.total and shape.params()["lm_head"] == (0 if shape.tied else shape.vocab * shape.hidden)


def job(method, kind="quantize", **options):
    return {"id": "j000000000000", "label": method, "kind": kind, "options": {"method": method, **options},
            "model": {"kind": "hub"}, "resources": {"gpus": 1},
            "eval": {"perplexity": {"seq_len": 2048, "max_windows": 16}}}


def test_a_plan_adds_up_what_a_job_holds_and_orders_the_methods_as_their_bits_do():
    shape = shape_of_config(LLAMA3_8B)
    plans = {m: job_plan(job(m), shape, "cuda") for m in ("none", "bnb-int8", "bnb-nf4", "gptq")}
    ref = plans["none"]
    # the reference phase: the float base at the checkpoint's own dtype (bfloat16: 2 bytes) and one window
    assert ref["parts"]["gpu"]["cached float base"] == pytest.approx(8.03e9 * 2 / GB, rel=0.003)  # 16.1 GB
    assert ref["gpu_gb"] == pytest.approx(sum(ref["parts"]["gpu"].values())) and ref["peak_phase"] == "reference"
    # a variant holds its own model only: the float base is the reference job's (whose log-probs it reads), so no
    # reference phase and nothing parked: int8 ~1 byte, nf4 ~0.56 byte a quantized weight (quantized while loading),
    # GPTQ the decompressed artifact + Hessians
    own = {m: p["phases_gb_per_device"].get("own model", 0) for m, p in plans.items()}
    assert own["none"] == 0 and own["bnb-nf4"] < own["bnb-int8"] < ref["gpu_gb"] < own["gptq"]
    for m, p in plans.items():
        assert p["gpu_gb"] == pytest.approx(max(p["phases_gb_per_device"].values()))
        assert "float base, parked in host RAM" not in p["parts"]["host"]
        assert ("reference" in p["phases_gb_per_device"]) == (m == "none") and "cached float base" not in (
            p["parts_by_phase"].get("own model") or {})
    # Llama-3-8B NF4 with 2,048-token windows: 6.0 GB of 4-bit model + a window's logits and KV cache, under half
    # the float reference's 18.4 GB
    assert plans["bnb-nf4"]["gpu_gb"] <= 0.5 * ref["gpu_gb"] and 6.0 < plans["bnb-nf4"]["gpu_gb"] < 9.2
    assert plans["gptq"]["parts"]["host"]["model being quantized (onloaded a layer at a time)"] == pytest.approx(16.06, rel=0.003)
    assert plans["gptq"]["gpu_gb"] < 16.1 + 16.1  # never the cached base and a second float copy on the GPU
    assert plans["bnb-nf4"]["parts"]["disk"]["artifact"] == pytest.approx(
        0.5625 * shape.linear / GB + 2 * (shape.total - shape.linear) / GB)
    # a 128k vocabulary: 16 x 2048 windows of reference log-probs would be 8.4 GB: over the 2 GiB budget, they are
    # on disk (once per output root), not in host RAM
    assert "reference log-probs kept" not in ref["parts"]["host"]
    assert ref["parts"]["disk"]["reference log-probs (once per output root)"] == pytest.approx(16 * 2048 * 128256 * 2 / GB)
    cpu = job_plan(job("none"), shape, "cpu")
    assert cpu["gpu_gb"] == 0 and cpu["host_gb"] > 32 and cpu["dtype_bytes"] == 4  # float32 on a CPU
    fp32 = shape_of_config(GEMMA2_9B)  # a float32 checkpoint computes in float32 on a GPU too
    assert job_plan(job("none"), fp32, "cuda")["parts"]["gpu"]["cached float base"] == pytest.approx(9.24e9 * 4 / GB, rel=0.003)


def test_a_job_over_n_gpus_spreads_its_weights_not_its_logits():
    shape = shape_of_config(LLAMA3_70B)
    one, four = (job_plan(dict(job("none"), resources={"gpus": n}), shape, "cuda") for n in (1, 4))
    logits = one["parts"]["gpu"]["a window's logits and log-softmax (float32)"]
    assert one["gpu_gb_per_device"] == pytest.approx(one["gpu_gb"])
    assert four["gpu_gb"] == pytest.approx(one["gpu_gb"])
    assert four["gpu_gb_per_device"] == pytest.approx((one["gpu_gb"] - logits) / 4 + logits)
    assert 36 < four["gpu_gb_per_device"] < 40  # 70B in bfloat16 over 4 GPUs: 35.3 GB of weights each, + a window


@pytest.mark.parametrize("weights,reserve,gpus,host,expect", [
    (10, 1, [], 64, {"device_map": {"": "cpu"}, "max_memory": None, "gpus_used": 0, "offload_gb": 0.0}),
    (10, 1, [24], 64, {"device_map": {"": "cuda:0"}, "max_memory": None, "gpus_used": 1, "offload_gb": 0.0}),
    # 24 x 0.92 - 1 = 21.08 GB a GPU: 30 GB goes over two, transformers balancing it
    (30, 1, [24, 24], 64, {"device_map": "auto", "max_memory": {0: 21.08e9, 1: 21.08e9}, "gpus_used": 2,
                            "offload_gb": 0.0}),
    # one GPU that cannot hold it: the rest (30 - 21.08 GB) in host RAM, said in the row
    (30, 1, [24], 64, {"device_map": "auto", "max_memory": {0: 21.08e9, "cpu": 58.88e9}, "gpus_used": 1,
                       "offload_gb": 8.92}),
    # GPUs of different free memory each get their own room
    (40, 2, [80, 24], 64, {"device_map": "auto", "max_memory": {0: 71.6e9, 1: 20.08e9}, "gpus_used": 2,
                           "offload_gb": 0.0}),
])
def test_device_map_and_max_memory_from_the_plan(weights, reserve, gpus, host, expect):
    from qfarm.sweep.plan import layout

    got = layout(weights * GB, reserve * GB, [g * GB for g in gpus], host * GB)
    assert got["device_map"] == expect["device_map"] and got["gpus_used"] == expect["gpus_used"]
    assert got["offload_gb"] == pytest.approx(expect["offload_gb"], abs=1e-6)
    if expect["max_memory"] is None:
        assert got["max_memory"] is None
    else:
        assert got["max_memory"].keys() == expect["max_memory"].keys()
        for k, v in expect["max_memory"].items():
            assert got["max_memory"][k] == pytest.approx(v, rel=1e-6)
    assert ("offloaded" in got["where"]) == (expect["offload_gb"] > 0)


def test_a_model_no_gpu_nor_the_host_can_hold_is_refused_with_its_figures():
    from qfarm.sweep.plan import NoRoom, layout

    with pytest.raises(NoRoom, match=r"141.0 GB of weights: the job's 1 GPU\(s\) hold 72.6 GB"):
        layout(141e9, 1e9, [80e9], 32e9)


def test_training_state_follows_rank_and_checkpointing():
    shape = shape_of_config(LLAMA3_8B)
    small, big = (job_plan(job("qlora", "train", r=r, seq_len=512, batch_size=1), shape, "cuda") for r in (8, 64))
    lora = lambda p: p["parts_by_phase"]["own model"]["LoRA weights, gradients, Adam moments"]  # noqa: E731
    assert lora(big) == pytest.approx(8 * lora(small))
    # r=8 all-linear on Llama-3-8B: 20,971,520 trainable parameters (peft reports the same), 16 bytes each
    assert lora(small) == pytest.approx(20_971_520 * 16 / GB)
    ckpt = job_plan(job("qlora", "train", r=8, seq_len=512, batch_size=1, gradient_checkpointing=True), shape, "cuda")
    act = lambda p: p["parts_by_phase"]["own model"]["activations"]  # noqa: E731
    assert act(ckpt) < act(small) / 10


def test_validate_plan_json_from_a_folder_with_only_a_config(tmp_path):
    """`qfarm validate --plan --json --offline` on a model folder holding nothing but config.json."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    folder = tmp_path / "llama3-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA3_8B, "architectures": ["LlamaForCausalLM"]}))
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: big\nmodel: {folder}\nresources: {{gpus: 2}}\n"
                    "eval: {perplexity: {seq_len: 2048, max_windows: 16}}\n"
                    "jobs:\n  - kind: quantize\n    matrix: {method: [none, bnb-nf4]}\n")
    out = subprocess.run([sys.executable, "-m", "qfarm.cli", "validate", str(spec), "--offline", "--plan", "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {r["method"]: r for r in json.loads(out.stdout)}
    for r in rows.values():
        assert {"job_id", "label", "method", "gpus", "gpu_gb", "gpu_gb_per_device", "host_gb", "disk_gb"} <= set(r)
        logits = r["parts"]["gpu"]["a window's logits and log-softmax (float32)"]
        assert r["gpus"] == 2 and r["gpu_gb_per_device"] == pytest.approx((r["gpu_gb"] - logits) / 2 + logits)
    assert 16 < rows["none"]["gpu_gb"] < 19 and rows["bnb-nf4"]["phases_gb_per_device"]["own model"] < 6
    assert "valid" in out.stderr  # the human line goes to stderr: stdout is the JSON alone


def test_the_plan_places_gpu_jobs_and_refuses_what_fits_no_gpu():
    from qfarm.sweep.plan import place

    shape = shape_of_config(LLAMA3_8B)
    shared = {"gpus": 1}  # one group's jobs share one resources dict
    jobs = [dict(job(m, "quantize"), id=f"j{i}", label=m, resources=shared) for i, m in
            enumerate(("none", "bnb-nf4", "gptq"))]
    assert place([dict(j) for j in jobs], shape, []) == []  # logical GPU slots say no memory: nothing to hold
    assert place([dict(j) for j in jobs], None, [24]) == []  # no config to plan from
    placed = [dict(j) for j in jobs]
    assert place(placed, shape, [80.0, 16.0, 24.0]) == []
    sizes = [j["resources"]["min_gpu_mem_gb"] for j in placed]
    assert sizes == [24.0, 16.0, 24.0]  # the smallest GPU that holds each plan: 18.4, 8.4, 19.7 GB
    assert shared == {"gpus": 1} and placed[0]["resources"]["min_gpu_mem_gb_source"] == "plan"
    said = place([dict(j) for j in jobs], shape, [16.0])
    assert said[0].endswith("(the largest has 16 GB):") and len(said) == 4  # NF4 fits: two refused, then the fixes
    assert "gptq (j2): 19.7 GB on one GPU (decompressed artifact 16.1" in said[2] and "4-bit method" in said[3]
    assert "more resources.gpus" in said[3] and "method: none" in said[3]
    two = [dict(jobs[0], resources={"gpus": 2})]  # over two GPUs: 8.0 GB of weights each + a window's logits
    assert place(two, shape, [16.0]) == [] and two[0]["resources"]["min_gpu_mem_gb"] == 16.0
    mine = [dict(jobs[2], resources={"gpus": 1, "min_gpu_mem_gb": 80})]  # the spec's own choice stands
    assert place(mine, shape, [16.0]) == [] and mine[0]["resources"]["min_gpu_mem_gb"] == 80


def test_validate_refuses_a_job_whose_plan_fits_no_gpu_of_the_cluster_config(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    folder = tmp_path / "llama3-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA3_8B, "architectures": ["LlamaForCausalLM"]}))
    config = tmp_path / "cluster.yaml"
    config.write_text("head_node_type: head\navailable_node_types:\n  head: {resources: {CPU: 4}}\n"
                      "  t4: {resources: {CPU: 8, GPU: 2}, labels: {qfarm-gpu-mem-gb: '16'}, max_workers: 2}\n")
    spec = tmp_path / "s.yaml"
    for gpus, code in ((2, 0), (1, 2)):  # 18.4 GB on one 16 GB GPU; 10.3 GB on each of two
        spec.write_text(f"name: big\nmodel: {folder}\neval: {{perplexity: {{seq_len: 2048, max_windows: 16}}}}\n"
                        f"resources: {{gpus: {gpus}}}\njobs:\n  - kind: quantize\n    matrix: {{method: [none, gptq]}}\n")
        out = subprocess.run([sys.executable, "-m", "qfarm.cli", "validate", str(spec), "--offline", "--cluster-config",
                              str(config)], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert out.returncode == code, out.stderr
    assert "fit no GPU of this cluster (the largest has 16 GB)" in out.stderr and "gptq (j" in out.stderr
    assert "4-bit method" in out.stderr and "Traceback" not in out.stderr


def test_70b_nf4_fits_one_48gb_gpu_and_only_the_reference_needs_several():
    """The float model is paid for once, by the reference job (over 4 GPUs here); every 4-bit row holds only its own
    model: Llama-3-70B in NF4 on one 48 GB GPU, which bitsandbytes alone does."""
    from qfarm.sweep.plan import place

    shape = shape_of_config(LLAMA3_70B)
    eval_512 = {"perplexity": {"seq_len": 512, "max_windows": 16}}
    nf4, gguf = (dict(job(m), id=f"j{i}", eval=eval_512) for i, m in enumerate(("bnb-nf4", "gguf")))
    one_gpu = job_plan(nf4, shape, "cuda")
    assert one_gpu["gpus"] == 1 and one_gpu["peak_phase"] == "own model" and 40 < one_gpu["gpu_gb"] < 46
    assert "cached float base" not in str(one_gpu["parts"]) and "reference" not in one_gpu["phases_gb_per_device"]
    ref = dict(job("none"), id="jr", eval=eval_512, resources={"gpus": 4})
    assert job_plan(dict(ref, resources={"gpus": 1}), shape, "cuda")["gpu_gb"] > 140  # the float model: 141 GB
    jobs = [ref, nf4, gguf]
    assert place(jobs, shape, [48.0]) == []
    assert [j["resources"]["min_gpu_mem_gb"] for j in jobs] == [48.0, 48.0, 48.0]  # 35.3 GB each of 4; 43; 43
    said = place([dict(ref, resources={"gpus": 1})], shape, [48.0])  # the reference on one GPU: refused, with why
    assert "none (jr): 141.8 GB on one GPU (cached float base 141.1" in said[1] and "method: none" in said[2]
