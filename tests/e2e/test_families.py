"""A small sweep on tiny random models of six families, through the CLI as a user runs it: the float reference,
the quantization methods that quantize every kind of layer the family has, and LoRA (peft's all-linear
default) trained and merged. Every row succeeds with sane numbers; the pairs that would leave layers in float
(llm-compressor on GPT-2's Conv1D, bitsandbytes on Mixtral's fused experts) are refused at validate time
(tests/integration/test_architectures.py). GGUF is left out: llama.cpp's converter does not know these tiny
models' word-level tokenizer."""

from __future__ import annotations

import math

import pytest

from tests.cli import qfarm, results
from tests.tiny import FAMILIES, corpus_of, guanaco_rows, make_tiny_model

pytestmark = pytest.mark.e2e

QUANTIZERS = {"gpt2": ["bnb-nf4"], "mixtral": ["rtn"]}  # the others take both
# peft wraps Mixtral's fused experts as parameters, which train only without dropout (refused otherwise)
DROPOUT = {"mixtral": 0.0}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_small_sweep_on_a_tiny_model_of_each_family(cli_env, shared_data, tmp_path, family):
    data = guanaco_rows(shared_data, tmp_path, 120)
    model = make_tiny_model(tmp_path / family, corpus_of(data), seed=1, family=family)
    methods = QUANTIZERS.get(family, ["bnb-nf4", "rtn"])
    stages = "".join(f"  - {{name: {m}, kind: quantize, method: {m}{', group_size: 32' if m == 'rtn' else ''}}}\n"
                     for m in ["none"] + methods)
    spec = tmp_path / f"{family}.yaml"
    spec.write_text(f"""\
name: fam-{family}
model: {model}
eval: {{perplexity: {{dataset: {data}, seq_len: 64, max_windows: 2}}, speed: null}}
stages:
{stages}  - {{name: ft, kind: train, method: lora, dataset: {{path: {data}, eval_samples: 4}}, r: 4, max_steps: 2,
      seq_len: 64, learning_rate: 0.01, lora_dropout: {DROPOUT.get(family, 0.05)}}}
  - {{name: merge, kind: merge, from: ft, onto: [base]}}
""")
    out = qfarm(cli_env, "submit", str(spec), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {r["label"]: r for r in results(cli_env, f"fam-{family}")}
    assert all(r["status"] == "succeeded" for r in rows.values()), {k: r["error"] for k, r in rows.items()}
    ref = rows["none"]
    assert ref["kl_div"] == 0.0 and math.isfinite(ref["perplexity"]) and 0 < ref["bits_per_byte"] < 8
    # every row compares with the same reference, computed once for the sweep whatever worker ran the job
    sources = [r["ref_cache"] for r in rows.values()]
    assert sources.count("computed") == 1 and set(sources) <= {"computed", "shared", "memory"}, sources
    for m in methods:  # quantized for real: the logits moved, and the artifact on disk is smaller
        label = next(k for k in rows if k.startswith(m))
        assert rows[label]["kl_div"] > 1e-6 and rows[label]["size_mb"] < ref["size_mb"], rows[label]
    train, merged = rows["lora"], next(r for r in rows.values() if r["kind"] == "merge")
    assert train["trainable_params"] > 0 and math.isfinite(train["train_loss"])
    assert merged["merge_max_abs_diff"] < 1e-3  # the merged model is the adapter model
