"""bitsandbytes' 4-bit CPU kernels inside the workers, on a tiny random Llama: the compute dtype a job asks for is
the arithmetic it gets on every CPU (AVX2-only and AVX-512 BF16 alike), and the merge check compares like with like.

On an AVX-512 BF16 CPU bitsandbytes 0.50 runs a fused bf16 kernel for inference by default; these tests hold on
both kinds of CPU, and assert that kernel's behaviour only where this CPU has it.
"""

from __future__ import annotations

import pytest

from qfarm.sweep.methods import QloraOptions
from tests.tiny import make_tiny_model

pytestmark = pytest.mark.integration

# a QLoRA job's typed options, as far as loading its base goes (no dataset: nothing here trains from one)
QLORA = QloraOptions.model_construct(method="qlora", quant_type="nf4", double_quant=True, compute_dtype="float32")
WORDS = ["the cat sat on the mat and the dog ran after it", "a merge of an adapter is a sum of two matrices"]
VOCAB = len(set(" ".join(WORDS).split())) + 3  # the tiny word-level tokenizer: every word plus 3 specials


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("bnb") / "tiny", WORDS * 20)


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    """A LoRA adapter with random (non-zero) B matrices, so merging it changes every target layer."""
    import torch
    from peft import LoraConfig, get_peft_model

    from workers.train import load_trainable_base

    torch.manual_seed(1)
    model = get_peft_model(load_trainable_base(str(tiny), QLORA),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    out = tmp_path_factory.mktemp("bnb") / "adapter"
    model.save_pretrained(out)
    return str(out)


def examples(n: int = 3, length: int = 40) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (length,), generator=g).tolist() for _ in range(n)]


def test_float32_compute_is_float32_on_every_cpu(tiny):
    """A 4-bit model with compute_dtype float32 gives the logits of the float model holding its dequantized
    weights: on an AVX-512 BF16 CPU too, where bitsandbytes' default would compute in bf16."""
    from workers.quantize.bnb import kernel_of, unpacked
    from workers.train import load_trainable_base
    from workers.train.merge import logits_diff, logits_of

    four_bit = load_trainable_base(str(tiny), QLORA).eval()
    assert kernel_of(four_bit) == "bnb cpu: dequantize + float32 matmul"
    dequantized = load_trainable_base(str(tiny), QLORA).dequantize().eval()
    diff = logits_diff(logits_of(dequantized, examples()), logits_of(four_bit, examples()))
    assert diff["merge_max_abs_diff"] < 1e-4 and diff["merge_top1_agree"] == 1.0
    unpacked(four_bit)  # the forward above left the weights in bitsandbytes' storage layout


def test_the_fused_kernel_where_this_cpu_has_it(tiny):
    """bfloat16 compute (or forcing bitsandbytes' default) runs the fused kernel on an AVX-512 BF16 CPU and the
    row says so; afterwards the weights are repacked and dequantizing them is refused, not done wrongly."""
    from workers.quantize.bnb import _fused_cpu, kernel_of, unpacked
    from workers.train import load_trainable_base
    from workers.train.merge import logits_diff, logits_of

    exact = logits_of(load_trainable_base(str(tiny), QLORA).eval(), examples())
    bf16 = load_trainable_base(str(tiny), QLORA.model_copy(update={"compute_dtype": "bfloat16"}))
    forced = load_trainable_base(str(tiny), QLORA, fused_cpu_kernel=True).eval()
    diff = logits_diff(exact, logits_of(forced, examples()), "kernel")
    if _fused_cpu():
        assert kernel_of(bf16) == kernel_of(forced) == "bnb cpu: fused avx512-bf16 kernel, bfloat16 compute"
        assert 0 < diff["kernel_max_abs_diff"] < 0.5  # bf16-level error, not a broken kernel
        with pytest.raises(RuntimeError, match="repacked CPU layout"):
            unpacked(forced).dequantize()
    else:
        assert kernel_of(bf16) == "bnb cpu: dequantize + bfloat16 matmul"
        assert kernel_of(forced) == "bnb cpu: dequantize + float32 matmul" and diff["kernel_max_abs_diff"] == 0
        unpacked(forced)


def test_merge_check_separates_the_merge_from_the_kernel(tiny, adapter):
    """Onto the dequantized base the merge is exact in like-for-like arithmetic on every CPU; onto the float base
    it is not; the default kernel's own error is reported beside it, 0 where there is no fused kernel."""
    from workers.quantize.bnb import _fused_cpu
    from workers.train.merge import check, merged_model

    exact = check(str(tiny), adapter, QLORA, merged_model(str(tiny), adapter, QLORA, "dequantized").eval(), examples())
    onto_base = check(str(tiny), adapter, QLORA, merged_model(str(tiny), adapter, QLORA, "base").eval(), examples())
    assert exact["merge_max_abs_diff"] < 1e-4 and exact["merge_top1_agree"] == 1.0
    assert onto_base["merge_max_abs_diff"] > 100 * exact["merge_max_abs_diff"]
    assert exact["kernel_check_tokens"] == exact["merge_check_tokens"] == 3 * 40
    if _fused_cpu():
        assert exact["kernel_max_abs_diff"] > 10 * exact["merge_max_abs_diff"]
        assert exact["kernel_default"] == "bnb cpu: fused avx512-bf16 kernel, bfloat16 compute"
    else:
        assert exact["kernel_max_abs_diff"] == 0 and exact["kernel_top1_agree"] == 1.0
