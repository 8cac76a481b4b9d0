"""A ``gguf`` job's ``tensor_types`` (llama.cpp's per-tensor overrides): what a rule may say, and the file checked
against the rules (workers.quantize.gguf.rule_columns), on made-up tensors: pure logic. The real quantizer runs them
in tests/integration/test_every_option.py and tests/integration/test_llama_cpp.py."""

from __future__ import annotations

import re

import pytest

from qfarm.errors import Permanent


def test_a_rule_is_a_pattern_and_a_ggml_type():
    from qfarm.sweep.methods import GgufOptions, tensor_rule

    assert tensor_rule(r"blk\.(0|29)\.=Q8_0") == (r"blk\.(0|29)\.", "Q8_0")

    for bad, said in (("ffn_down", "is not PATTERN=TYPE"), ("ffn=q6_k", "Did you mean 'Q6_K'?"),
                      ("(?<=x)y=Q8_0", "the pattern may hold"), ("a[=Q8_0", "not a regular expression"),
                      ("=Q8_0", "is not PATTERN=TYPE"), ("x=Q4_K_M", "is not a ggml tensor type")):
        with pytest.raises(ValueError, match=said.replace("(", r"\(").replace("?", r"\?")):
            tensor_rule(bad)
    with pytest.raises(ValueError, match="tensor_types applies to a quantized gguf_type"):
        GgufOptions(method="gguf", gguf_type="F16", tensor_types=["ffn=Q8_0"])
    assert GgufOptions(method="gguf").tensor_types is None  # unset: not in the job's identity (ids kept)


LAYERS = {  # name -> (stored type, row length, elements, bytes)
    "token_embd.weight": ("Q8_0", 576, 576 * 100, 576 * 100 * 17 // 16),
    "blk.0.attn_q.weight": ("Q5_0", 576, 576 * 576, 576 * 576 * 11 // 16),
    "blk.0.ffn_down.weight": ("Q8_0", 1536, 1536 * 576, 1536 * 576 * 17 // 16),
    "blk.1.ffn_down.weight": ("Q8_0", 1536, 1536 * 576, 1536 * 576 * 17 // 16),
}


def test_the_file_is_checked_against_the_rules_first_match_deciding():
    from workers.quantize.gguf import layer_columns, rule_columns

    assert rule_columns([], LAYERS) == {}
    # attn_q asked Q4_K: rows of 576 do not fit 256-blocks, llama.cpp stored Q5_0: a fallback, recorded
    found = rule_columns([("ffn_down", "Q8_0"), ("attn_q", "Q4_K"), ("token_embd", "Q6_K")], LAYERS)
    assert found == {"tensor_type_fallbacks": {"blk.0.attn_q.weight": "Q4_K->Q5_0", "token_embd.weight": "Q6_K->Q8_0"}}
    with pytest.raises(Permanent, match=r"asks blk\.0\.ffn_down\.weight in Q6_K, the file stores it in Q8_0 .* the "
                                        "override was not applied"):
        rule_columns([("ffn_down", "Q6_K")], LAYERS)  # 1536 fits Q6_K's blocks: not a fallback
    with pytest.raises(Permanent, match=re.escape("tensor_types blk\\.0\\.=Q8_0 names no weight of the file")):
        rule_columns([("ffn_down", "Q8_0"), ("blk\\.0\\.", "Q8_0")], {k: v for k, v in LAYERS.items() if "ffn" in k})
    cols = layer_columns(LAYERS)
    assert cols["layer_formats"]["blk.0.attn_q.weight"] == "Q5_0"
    blocks = [v for k, v in LAYERS.items() if k.startswith("blk.")]  # the embedding is not a quantized layer
    assert cols["bits_per_weight"] == sum(v[3] for v in blocks) * 8 / sum(v[2] for v in blocks)
