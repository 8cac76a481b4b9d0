"""The artifact check's logic (workers.quantize.artifacts) on hand-written metadata: what each format's config says is read
into one description, and a row whose option the description contradicts is refused naming both values."""

from __future__ import annotations

import json

import pytest

from qfarm.errors import Permanent
from qfarm.sweep.methods import METHODS
from workers.quantize.artifacts import check, claims, describe

GPTQ = {"method": "gptq", "bits": 4, "group_size": 64, "symmetric": True, "act_order": False, "dampening_frac": 0.01,
        "scheme": None}


def typed(options: dict):
    """Options as a job reads them (its method's options model)."""
    return METHODS[options["method"]].options.model_validate(options)


def _compressed(tmp_path, **weights):
    args = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64, "symmetric": True, "actorder": None,
            **weights}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors", "config_groups": {"group_0": {"weights": args, "targets": ["Linear"]}},
        "ignore": ["lm_head"]}}))
    return describe(str(tmp_path))


def test_compressed_tensors_metadata_is_read_and_agrees_with_its_row(tmp_path):
    described = _compressed(tmp_path)
    assert described["format"] == "compressed-tensors" and described["actorder"] is None
    assert described["bits"] == 4 and described["group_size"] == 64 and described["input_activations"] is None
    check(typed(GPTQ), "workers.quantize.llmc:LLMCompressor", described)  # no error


def test_an_option_the_checkpoint_contradicts_is_named_with_both_values(tmp_path):
    described = _compressed(tmp_path, actorder="static")
    with pytest.raises(Permanent) as e:
        check(typed(GPTQ), "workers.quantize.llmc:LLMCompressor", described)
    assert "the row says act_order false, the checkpoint says actorder static (expected null)" in str(e.value)
    with pytest.raises(Permanent, match="the row says group_size 64, the checkpoint says group_size 128"):
        check(typed(GPTQ), "workers.quantize.llmc:LLMCompressor", _compressed(tmp_path, group_size=128))


def test_a_channel_scheme_and_activations_are_claimed(tmp_path):
    w8a8 = typed({**GPTQ, "bits": 8, "group_size": -1, "scheme": "W8A8", "act_order": True})
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors", "ignore": ["lm_head"], "config_groups": {"group_0": {
            "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "actorder": "weight"},
            "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}}}}))
    check(w8a8, None, describe(str(tmp_path)))
    with pytest.raises(Permanent, match="the row says scheme W8A8, the checkpoint says input_activations null"):
        check(w8a8, None, _compressed(tmp_path, num_bits=8, strategy="channel", actorder="weight"))


def test_gptqmodel_and_bitsandbytes_metadata(tmp_path):
    (tmp_path / "quantize_config.json").write_text(json.dumps(
        {"bits": 4, "group_size": 64, "desc_act": True, "sym": True, "damp_percent": 0.01, "quant_method": "gptq"}))
    gm = describe(str(tmp_path))
    check(typed({**GPTQ, "act_order": True}), "workers.quantize.gptqmodel:GPTQModelBackend", gm)
    with pytest.raises(Permanent, match="the row says act_order false, the checkpoint says desc_act true"):
        check(typed(GPTQ), "workers.quantize.gptqmodel:GPTQModelBackend", gm)
    bnb = tmp_path / "bnb"
    bnb.mkdir()
    (bnb / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "float32"}}))
    nf4 = {"method": "bnb-nf4", "double_quant": True, "compute_dtype": "float32"}
    nf4_typed = typed(nf4)
    with pytest.raises(Permanent, match="the row says double_quant true, the checkpoint says bnb_4bit_use_double_quant false"):
        check(nf4_typed, None, describe(str(bnb)))
    with pytest.raises(Permanent, match="the row says method bnb-fp4, the checkpoint says bnb_4bit_quant_type nf4"):
        check(typed({**nf4, "method": "bnb-fp4", "double_quant": False}), None, describe(str(bnb)))


def test_every_artifact_method_claims_something():
    """A method with an artifact and no claim would pass any checkpoint: every one names its facts."""
    for name, method in METHODS.items():
        if method.writes_artifact:
            for impl in {method.worker, *(method.backends or {}).values()}:
                assert claims(method.options(method=name), impl), (name, impl)
