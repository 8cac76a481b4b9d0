"""Validation reads a model's layers from its own module tree (built from its config on the meta device, no
weights), not from Llama's names: target_modules and group sizes are checked against GPT-2's Conv1D
``c_attn``, Phi-3's fused ``qkv_proj``, GPT-NeoX's ``query_key_value``, Mixtral's fused expert weights, as
well as Llama, Qwen2 and Gemma-2. Config-only folders: ``qfarm validate`` needs no weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.cli import REPO

pytestmark = pytest.mark.integration

SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)


def config(family: str):
    import transformers as t

    return {
        "llama": lambda: t.LlamaConfig(num_key_value_heads=2, **SMALL),
        "qwen2": lambda: t.Qwen2Config(num_key_value_heads=2, **SMALL),
        "gemma2": lambda: t.Gemma2Config(num_key_value_heads=2, head_dim=16, **SMALL),
        "gpt2": lambda: t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128),
        "phi3": lambda: t.Phi3Config(pad_token_id=0, **SMALL),
        "gpt_neox": lambda: t.GPTNeoXConfig(**SMALL),
        "mixtral": lambda: t.MixtralConfig(num_key_value_heads=2, num_local_experts=4, **SMALL),
    }[family]()


# family -> (a target module it has, one it has not (Llama's), the layers a group size of 64 does not fit)
CASES = {
    "llama": ("q_proj", "c_attn", "down_proj (160 inputs)"),
    "qwen2": ("v_proj", "qkv_proj", "down_proj (160 inputs)"),
    "gemma2": ("o_proj", "query_key_value", "down_proj (160 inputs)"),
    "gpt2": ("c_attn", "q_proj", None),  # its MLP is 4 x 64 = 256 wide: 64 divides every layer
    "phi3": ("qkv_proj", "q_proj", "down_proj (160 inputs)"),
    "gpt_neox": ("query_key_value", "q_proj", "dense_4h_to_h (160 inputs)"),
    "mixtral": ("q_proj", "gate_proj", "down_proj (160 inputs)"),
}


def validate(spec) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-m", "qfarm.cli", "validate", "--offline", str(spec)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    return out.returncode, " ".join((out.stdout + out.stderr).split())


@pytest.mark.parametrize("family", list(CASES))
def test_layers_are_read_from_the_models_own_module_tree(tmp_path, family):
    has, lacks, unfit = CASES[family]
    folder = tmp_path / family
    config(family).save_pretrained(folder)
    spec = tmp_path / "s.yaml"
    spec.write_text(f"""name: arch
model: {folder}
jobs:
  - {{kind: quantize, method: rtn, group_size: 64}}
  - {{kind: quantize, method: rtn, group_size: 32}}
  - {{kind: train, method: lora, dataset: {{path: data.jsonl}}, target_modules: [{has}, {lacks}]}}
""")
    (tmp_path / "data.jsonl").write_text('{"text": "a b c"}\n')
    code, out = validate(spec)
    assert code == 2, out
    assert f"jobs[2].target_modules[1]: the model has no Linear layer '{lacks}'" in out
    assert "target_modules[0]" not in out  # the family's own name is accepted
    if unfit:
        assert "jobs[0].group_size: method rtn: group_size 64 does not divide the input size of 2 of " in out
        assert unfit in out and "jobs[1].group_size" not in out
    else:
        assert "group_size" not in out


def test_fused_moe_experts_are_named_as_such_not_as_missing_layers(tmp_path):
    folder = tmp_path / "mixtral"
    config("mixtral").save_pretrained(folder)
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: moe\nmodel: {folder}\njobs:\n"
                    "  - {kind: train, method: lora, dataset: {path: d.jsonl}, target_modules: [q_proj, gate_up_proj]}\n")
    (tmp_path / "d.jsonl").write_text('{"text": "a b c"}\n')
    code, out = validate(spec)
    assert code == 2
    assert "'gate_up_proj' is a fused expert weight of this MoE model (a 3-D parameter of its experts block" in out
    spec.write_text(f"name: moe\nmodel: {folder}\njobs:\n  - {{kind: train, method: lora, dataset: {{path: d.jsonl}}}}\n")
    code, out = validate(spec)  # all-linear (the default) includes the experts: peft trains them without dropout
    assert code == 2 and "jobs[0]: on this MoE model target_modules all-linear includes its fused expert" in out
    spec.write_text(f"name: moe\nmodel: {folder}\njobs:\n"
                    "  - {kind: train, method: lora, dataset: {path: d.jsonl}, lora_dropout: 0}\n")
    assert validate(spec)[0] == 0
    tree = json.loads(subprocess.run([sys.executable, "-m", "workers.shared.architecture",
                                      json.dumps({"kind": "hf_dir", "location": str(folder)})], cwd=REPO,
                                     capture_output=True, text=True, timeout=600).stdout)
    assert tree["linears"]["mlp.experts.gate_up_proj"] == {"type": "experts", "in": 64, "out": 320, "count": 2,
                                                          "experts": 4}
    assert "mlp.gate" not in tree["linears"]  # the router is not a weight layer to quantize


@pytest.mark.parametrize("family,refused,kept", [("gpt2", "rtn", "bnb-nf4"), ("mixtral", "bnb-nf4", "rtn")])
def test_a_method_that_would_leave_most_layers_in_float_is_refused(tmp_path, family, refused, kept):
    """Measured with transformers 5.17 / llm-compressor 0.14 / bitsandbytes 0.50: llm-compressor quantizes no
    Conv1D (GPT-2's every layer), bitsandbytes leaves fused MoE experts in float32 (most of Mixtral's weights);
    either row would look nearly lossless and be mostly float."""
    folder = tmp_path / family
    config(family).save_pretrained(folder)
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: kinds\nmodel: {folder}\njobs:\n  - kind: quantize\n"
                    f"    matrix: {{method: [{refused}, {kept}]}}\n")
    code, out = validate(spec)
    assert code == 2, out
    assert f"jobs[0].matrix.method[0]: method {refused} leaves" in out
    assert "matrix.method[1]" not in out  # the other method quantizes every kind of layer this model has
    assert kept in out.split("Methods that quantize every kind of layer it has:")[1]


def test_a_hub_models_layers_are_read_from_its_config_at_the_pinned_commit(tmp_path):
    """A hub id is read like a folder: its config.json at the commit the revision pins (here from the hub cache,
    offline, as huggingface_hub lays it out under the output root)."""
    import os

    sha = "c0ffee" + "0" * 34
    repo = tmp_path / "out" / "_hub" / "models--acme--tiny-neox"
    config("gpt_neox").save_pretrained(repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    spec = tmp_path / "s.yaml"
    spec.write_text("name: arch\nmodel: acme/tiny-neox\njobs:\n"
                    "  - {kind: train, method: lora, dataset: {path: d.jsonl}, target_modules: [query_key_value, q_proj]}\n")
    (tmp_path / "d.jsonl").write_text('{"text": "a b c"}\n')
    env = dict(os.environ, HF_HUB_OFFLINE="1", QFARM_OUTPUT_ROOT=str(tmp_path / "out"))
    out = subprocess.run([sys.executable, "-m", "qfarm.cli", "validate", "--offline", str(spec)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2 and "target_modules[1]: the model has no Linear layer 'q_proj'" in text, text
    assert "target_modules[0]" not in text
