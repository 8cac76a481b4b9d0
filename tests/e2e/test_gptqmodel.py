"""GPTQModel as a backend, through the CLI as a user runs it, on tiny random models of two families: llm-compressor
and GPTQModel GPTQ side by side on the same calibration data (the backend axis), GPTQModel AWQ, a LoRA trained on
the GPTQModel model, and the GPTQ checkpoint evaluated again by ``kind: evaluate`` in a second sweep.

The checkpoint is checked by a reader that shares no code with GPTQModel: the AutoGPTQ layout (int32-packed 4-bit
``qweight`` along the input dimension, ``qzeros`` packed along the output one, stored minus one, ``scales`` per
group) unpacked by hand into float weights, whose model must give the logits the int4 kernel gave — so the
``gptq`` in ``quant_method`` is the format every other runtime reads, and the kernel's figures are that model's."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.cli import qfarm, results
from tests.tiny import corpus_of, guanaco_rows, make_tiny_model

pytestmark = pytest.mark.e2e


def unpack_autogptq(folder: Path, float_model: Path):
    """The float model whose Linears are the GPTQ checkpoint's weights, dequantized by hand (sym or asym, 4 bits,
    no act_order: g_idx is the identity)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["bits"] == 4 and not config["desc_act"]
    group = config["group_size"]
    tensors = load_file(str(folder / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(float_model, dtype=torch.float32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    layers = 0
    for name, module in model.named_modules():
        if f"{name}.qweight" not in tensors:
            continue
        qweight, qzeros, scales = (tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales"))
        # qweight [in/8, out]: 8 nibbles per int32, low first, along the input dimension
        w = ((qweight.unsqueeze(1) >> shifts[None, :, None]) & 15).reshape(-1, qweight.shape[1])
        # qzeros [groups, out/8], packed along the output dimension, stored as zero - 1 (AutoGPTQ's v1 layout)
        z = ((qzeros.unsqueeze(2) >> shifts[None, None, :]) & 15).reshape(qzeros.shape[0], -1) + 1
        g = torch.arange(w.shape[0]) // group
        dense = (w.float() - z[g].float()) * scales[g].float()  # [in, out]
        module.weight.data = dense.t().contiguous().to(module.weight.dtype)
        layers += 1
    assert layers > 0
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_backends_side_by_side_lora_on_the_gptq_model_and_the_checkpoint_read_by_hand(
        cli_env, shared_data, tmp_path, family):
    import torch

    data = guanaco_rows(shared_data, tmp_path, 160)
    model = make_tiny_model(tmp_path / family, corpus_of(data), seed=5, family=family)
    spec = tmp_path / "backends.yaml"
    spec.write_text(f"""\
name: backends-{family}
model: {model}
eval: {{perplexity: {{dataset: {data}, seq_len: 64, max_windows: 4}}, speed: {{prompt_tokens: 16, new_tokens: 4, runs: 1}}}}
stages:
  - {{kind: quantize, method: none}}
  - name: quant
    kind: quantize
    method: gptq
    act_order: false  # the hand-written unpacker reads groups in stored order (no g_idx permutation)
    calibration: {{dataset: {data}, samples: 16, seq_len: 64}}
    matrix: {{backend: [llm-compressor, gptqmodel]}}
  - {{kind: quantize, method: awq, backend: gptqmodel, calibration: {{dataset: {data}, samples: 16, seq_len: 64}}}}
  - {{kind: quantize, method: gptq, act_order: false, backend: gptqmodel, bits: 3, calibration: {{dataset: {data}, samples: 16, seq_len: 64}}}}
  - name: finetune
    kind: train
    from: quant
    method: lora
    dataset: {{path: {data}, eval_samples: 16}}
    max_steps: 8
    batch_size: 4
    seq_len: 64
    learning_rate: 3.0e-3
  - {{name: merge, kind: merge, from: finetune, onto: [base, dequantized]}}
""")
    out = qfarm(cli_env, "validate", str(spec))
    # LoRA trains on GPTQModel's model only: the llm-compressor parent is refused at its from: line
    assert out.returncode == 2 and "backends.yaml:16: stages[4].from" in out.stdout + out.stderr, out.stdout
    assert "backend: gptqmodel, not gptq (backend llm-compressor)" in out.stdout + out.stderr
    spec.write_text(spec.read_text().replace("""  - name: finetune
    kind: train
    from: quant""", """  - {name: gq, kind: quantize, method: gptq, act_order: false, backend: gptqmodel, calibration: {dataset: DATA, samples: 16, seq_len: 64}}
  - name: finetune
    kind: train
    from: gq""".replace("DATA", str(data))))
    out = qfarm(cli_env, "submit", str(spec), "--wait")
    assert not (Path.cwd() / "logs").exists()  # GPTQModel's pass logs went to the job's scratch folder, not here
    rows = {r["label"]: r for r in results(cli_env, f"backends-{family}")}
    if family == "qwen2":  # its k/v projections are 32 wide: GPTQModel's AWQ cannot clip them, and says so
        awq_row = rows.pop("awq gptqmodel")
        assert out.returncode == 1 and awq_row["status"] == "failed" and awq_row["attempts"] == 1, awq_row
        assert "output size to be a multiple of 64; model.layers.0.self_attn.k_proj has 32" in awq_row["error"]
    else:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # the gq stage's job is the quant stage's gptqmodel job (same options): one row, which still feeds finetune
    merges = {rows.pop(k)["onto"]: r for k, r in list(rows.items()) if r["kind"] == "merge"}
    three = rows.pop("gptq gptqmodel 3b")
    # no GPTQModel kernel computes 3-bit in float32: it runs on the torch kernel in bfloat16, and the row says so
    assert three["status"] == "succeeded" and three["runtime"] == "gptqmodel-torch (bfloat16)", three
    assert three["bits"] == 3 and 0 < three["kl_div"] < 1.0
    assert set(rows) == {"none", "gptq llm-compressor 4b", "gptq gptqmodel 4b", "lora"} | (
        {"awq gptqmodel"} if family == "llama" else set()), set(rows)
    assert all(r["status"] == "succeeded" for r in rows.values()), {k: r["error"] for k, r in rows.items()}
    by = {(r["method"], r["backend"], r["kind"]): r for r in rows.values()}
    llmc, gm = by[("gptq", "llm-compressor", "quantize")], by[("gptq", "gptqmodel", "quantize")]
    awq, lora, ref = by.get(("awq", "gptqmodel", "quantize")), by[("lora", None, "train")], by[("none", None, "quantize")]
    # the same calibration, two libraries, both real quantizations of the same model
    assert llmc["calib_tokens"] == gm["calib_tokens"] == 16 * 64
    made = [(gm, "gptq")] + ([(awq, "awq")] if awq else [])
    for row, _ in made + [(llmc, "gptq")]:
        assert row["bits"] == 4 and 1e-6 < row["kl_div"] < 1.0 and math.isfinite(row["perplexity"]), row
        assert row["size_mb"] < ref["size_mb"]
    assert gm["backend_version"] and llmc["backend_version"]
    # evaluated on GPTQModel's int4 kernels, and the row says which; llm-compressor's rows run dense
    assert all(row["runtime"].startswith("gptqmodel-torch-fused") for row, _ in made), [r["runtime"] for r, _ in made]
    assert llmc["runtime"] == "transformers-dense (decompressed compressed-tensors)"
    for row, method in made:
        folder = Path(row["artifact"])
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == method and config["bits"] == 4 and config["group_size"] == 64
        assert (folder / "quantize_config.json").is_file()
        assert not (folder / "offload").exists()
    # the checkpoint read by hand gives the kernel's logits: the format is AutoGPTQ's, the figures are its model's
    from transformers import AutoModelForCausalLM

    from workers.quantize.gptqmodel import dequantized, load_quantized

    ids = torch.arange(4, 68).reshape(1, 64)
    with torch.no_grad():
        by_hand = unpack_autogptq(Path(gm["artifact"]), model)(ids).logits
        kernel = load_quantized(gm["artifact"])(ids).logits.float()
        float_ = AutoModelForCausalLM.from_pretrained(model)(ids).logits
    # the int4 kernel's own rounding (~2e-3 here) is far below what quantizing moved the logits (~6e-2)
    off, moved = (by_hand - kernel).abs().max().item(), (float_ - kernel).abs().max().item()
    assert off < 0.1 * moved, (off, moved)
    # what a merge onto: dequantized merges into is that same model, exactly
    with torch.no_grad():
        merge_base = dequantized(gm["artifact"])(ids).logits
    assert (merge_base - by_hand).abs().max().item() < 1e-5
    # LoRA on the GPTQ model: trained through GPTQModel's torch kernel, the loss fell, the adapter reloads on the
    # default kernel (what was evaluated) and moved the model away from its quantized base
    assert lora["train_kernel"] == "gptqmodel-torch (bfloat16)" and lora["runtime"].startswith("gptqmodel-"), lora
    assert lora["bits"] == 4 and lora["lineage"] == "gptq gptqmodel 4b" and lora["train_dtype"] in ("bfloat16", "float16")
    assert lora["train_loss"] < lora["train_loss_first"], lora["loss_curve"]
    assert lora["trainable_params"] > 0 and (Path(lora["artifact"]) / "adapter_config.json").is_file()
    assert lora["task_loss"] is not None and math.isfinite(lora["task_loss"])
    # where it started: the GPTQ model without the adapter, on the same held-out examples; training moved it
    assert math.isfinite(lora["base_task_loss"]) and lora["base_task_loss"] != lora["task_loss"]
    # merged into the dequantized GPTQ weights, the model is the adapter model as trained (but for the int4 kernel's
    # own rounding); merged into the float model it was never trained on, it is not. Both saved as float models
    assert set(merges) == {"base", "dequantized"}
    assert merges["dequantized"]["merge_max_abs_diff"] < 0.25 * merges["base"]["merge_max_abs_diff"], merges
    assert merges["dequantized"]["merge_top1_agree"] >= merges["base"]["merge_top1_agree"]
    for merged in merges.values():
        config = json.loads((Path(merged["artifact"]) / "config.json").read_text())
        assert "quantization_config" not in config and merged["status"] == "succeeded"
        # the GPTQ checkpoint, copied elsewhere as a published quant is, evaluated by a second sweep: the same figures
    published = tmp_path / "published-gptq"
    shutil.copytree(gm["artifact"], published)
    second = tmp_path / "evaluate.yaml"
    second.write_text(f"""\
name: evaluate-gptq-{family}
model: {model}
eval: {{perplexity: {{dataset: {data}, seq_len: 64, max_windows: 4}}, speed: null}}
jobs:
  - {{kind: quantize, method: none}}
  - {{kind: evaluate, checkpoint: {published}}}
""")
    out = qfarm(cli_env, "submit", str(second), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (evaluated,) = [r for r in results(cli_env, f"evaluate-gptq-{family}") if r["kind"] == "evaluate"]
    assert evaluated["status"] == "succeeded" and evaluated["checkpoint_format"] == "gptq" and evaluated["bits"] == 4
    assert evaluated["runtime"] == gm["runtime"]
    assert abs(evaluated["perplexity"] - gm["perplexity"]) < 1e-4 * gm["perplexity"]
    assert abs(evaluated["kl_div"] - gm["kl_div"]) < 1e-3
