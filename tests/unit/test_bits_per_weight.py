"""Bits per weight of a transformers-side artifact (workers.quantize.artifacts.bits_per_weight): every stored bit of
its quantized layers over their weights, read from the safetensors headers, whatever library wrote them."""

from __future__ import annotations

import pytest


def _save(folder, tensors: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.fixture
def skeleton():
    import torch

    with torch.device("meta"):
        model = torch.nn.ModuleDict({"q": torch.nn.Linear(256, 128), "o": torch.nn.Linear(128, 256),
                                     "head": torch.nn.Linear(256, 1000, bias=False)})
    return model


def test_each_librarys_layout_counts_its_packed_weights_scales_and_zero_points(tmp_path, skeleton):
    import torch

    from workers.quantize.artifacts import bits_per_weight

    u8, i32, bf16, f32 = torch.uint8, torch.int32, torch.bfloat16, torch.float32
    head = {"head.weight": torch.zeros(1000, 256, dtype=bf16)}  # left in float: not a quantized layer
    # compressed-tensors int4, group 64, symmetric: 4 bits + a bfloat16 scale per 64 (+ its weight_shape)
    ct = {f"{m}.{k}": v for m, (o, i) in (("q", (128, 256)), ("o", (256, 128))) for k, v in (
        ("weight_packed", torch.zeros(o, i // 8, dtype=i32)), ("weight_scale", torch.zeros(o, i // 64, dtype=bf16)),
        ("weight_shape", torch.zeros(2, dtype=torch.int64)), ("bias", torch.zeros(o, dtype=bf16)))}
    _save(tmp_path / "ct", {**ct, **head})
    assert bits_per_weight(str(tmp_path / "ct"), skeleton) == pytest.approx(4 + 16 / 64 + 2 * 16 * 8 / (2 * 128 * 256))
    # bitsandbytes NF4: packed bytes + a float32 absmax per 64 + its 16-value map
    nf4 = {f"{m}.{k}": v for m in ("q", "o") for k, v in (
        ("weight", torch.zeros(128 * 256 // 2, 1, dtype=u8)), ("weight.absmax", torch.zeros(128 * 256 // 64, dtype=f32)),
        ("weight.quant_map", torch.zeros(16, dtype=f32)))}
    _save(tmp_path / "nf4", {**nf4, **head})
    assert bits_per_weight(str(tmp_path / "nf4"), skeleton) == pytest.approx(4 + 32 / 64 + 2 * 16 * 32 / (2 * 128 * 256))
    # bitsandbytes LLM.int8: int8 weights + a float32 scale per output row
    int8 = {"q.weight": torch.zeros(128, 256, dtype=torch.int8), "q.SCB": torch.zeros(128, dtype=f32),
            "o.weight": torch.zeros(256, 128, dtype=torch.int8), "o.SCB": torch.zeros(256, dtype=f32)}
    _save(tmp_path / "int8", {**int8, **head})
    assert bits_per_weight(str(tmp_path / "int8"), skeleton) == pytest.approx(8 + (128 + 256) * 32 / (2 * 128 * 256))
    # GPTQModel / AutoGPTQ 4-bit, group 128: qweight, qzeros, float16 scales, g_idx
    gptq = {f"{m}.{k}": v for m, (o, i) in (("q", (128, 256)), ("o", (256, 128))) for k, v in (
        ("qweight", torch.zeros(i // 8, o, dtype=i32)), ("qzeros", torch.zeros(i // 128, o // 8, dtype=i32)),
        ("scales", torch.zeros(i // 128, o, dtype=torch.float16)), ("g_idx", torch.zeros(i, dtype=i32)))}
    _save(tmp_path / "gptq", {**gptq, **head})
    stored = sum(v.numel() * v.element_size() for v in gptq.values()) * 8
    assert bits_per_weight(str(tmp_path / "gptq"), skeleton) == pytest.approx(stored / (2 * 128 * 256))
    _save(tmp_path / "float", {"q.weight": torch.zeros(128, 256, dtype=bf16), **head})
    assert bits_per_weight(str(tmp_path / "float"), skeleton) is None  # nothing quantized: no figure
