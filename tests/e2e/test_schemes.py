"""llm-compressor's preset schemes through the CLI as a user runs them, on tiny random models of two families: GPTQ
W8A8 (SmoothQuant, then int8 weights per channel and dynamic per-token int8 activations), RTN FP8_DYNAMIC and GPTQ
W4A16_ASYM, each saved as a compressed-tensors checkpoint, loaded back from disk by the evaluating worker and
compared with the float reference. The rows say what the scheme set (bits, scales) and that their activations
were simulated in float (quality real, speed not); the checkpoints declare the activation quantization vLLM reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.cli import qfarm, results
from tests.tiny import corpus_of, guanaco_rows, make_tiny_model

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_w8a8_fp8_and_asymmetric_w4_rows_quantize_weights_and_activations_and_say_how_they_ran(
        cli_env, shared_data, tmp_path, family):
    data = guanaco_rows(shared_data, tmp_path, 120)
    model = make_tiny_model(tmp_path / family, corpus_of(data), seed=3, family=family)
    spec = tmp_path / "schemes.yaml"
    spec.write_text(f"""\
name: schemes-{family}
model: {model}
eval: {{perplexity: {{dataset: {data}, seq_len: 64, max_windows: 4}}, speed: null}}
jobs:
  - {{kind: quantize, method: none}}
  - kind: quantize
    method: gptq
    calibration: {{dataset: {data}, samples: 8, seq_len: 64}}
    matrix: {{scheme: [W8A8, W4A16_ASYM]}}
  - {{kind: quantize, method: rtn, scheme: FP8_DYNAMIC}}
""")
    out = qfarm(cli_env, "submit", str(spec), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {r["label"]: r for r in results(cli_env, f"schemes-{family}")}
    assert set(rows) == {"none", "gptq W8A8", "gptq W4A16_ASYM g=64", "rtn FP8_DYNAMIC"}, set(rows)
    assert all(r["status"] == "succeeded" for r in rows.values()), {k: r["error"] for k, r in rows.items()}
    ref = rows["none"]
    for label, acts in (("gptq W8A8", "int8"), ("rtn FP8_DYNAMIC", "float8"), ("gptq W4A16_ASYM g=64", None)):
        row = rows[label]
        assert row["bits"] == (4 if acts is None else 8) and row["scheme"] == label.split()[1]
        # W8A8's error on a random tiny model (KL ~5e-7) is below the harness's float16 log-probs: checked below
        assert (label == "gptq W8A8" or row["kl_div"] > 1e-7) and row["kl_div"] < 1.0, row
        assert math.isfinite(row["perplexity"])
        assert row["size_mb"] < ref["size_mb"]
        if acts is None:
            assert row["runtime"] == "transformers-dense (decompressed compressed-tensors)"
        else:
            assert row["runtime"] == f"transformers-dense (decompressed compressed-tensors; {acts} activations " \
                                     "simulated in float)", row["runtime"]
        config = json.loads((Path(row["artifact"]) / "config.json").read_text())["quantization_config"]
        (group,) = config["config_groups"].values()
        assert group["weights"]["num_bits"] == row["bits"]
        assert group["weights"]["symmetric"] is (label != "gptq W4A16_ASYM g=64")
        if acts is None:
            assert group["input_activations"] is None and group["weights"]["group_size"] == 64
        else:
            assert group["weights"]["strategy"] == "channel"
            assert group["input_activations"]["dynamic"] is True and group["input_activations"]["strategy"] == "token"
            assert group["input_activations"]["type"] == ("float" if acts == "float8" else "int")
    # 8-bit weights and activations lose less than 4-bit weights alone
    assert rows["gptq W8A8"]["kl_div"] < rows["gptq W4A16_ASYM g=64"]["kl_div"]
    # the W8A8 checkpoint as transformers loads it is quantized for real, weights and activations: its logits moved
    # from the float model's, and switching its activation quantization off moves them again
    import torch
    from compressed_tensors.quantization import disable_quantization
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 67).reshape(1, 64)
    with torch.no_grad():
        float_ = AutoModelForCausalLM.from_pretrained(model)(ids).logits
        w8a8 = AutoModelForCausalLM.from_pretrained(rows["gptq W8A8"]["artifact"])
        both = w8a8(ids).logits
        w8a8.apply(disable_quantization)
        weights_only = w8a8(ids).logits
    assert 1e-4 < (both - float_).abs().max() < 0.5 and (both - weights_only).abs().max() > 1e-4
