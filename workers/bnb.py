"""bitsandbytes: LLM.int8() (``bnb-int8``), 4-bit NF4 (``bnb-nf4``) and FP4 (``bnb-fp4``).

Quantized at load time by transformers, saved with ``save_pretrained`` (bnb serializes 8- and 4-bit weights),
and reloaded from that folder for evaluation, so what is measured is what a user would deploy. Runs on CPU
with bitsandbytes >= 0.49 (its CPU backend), on CUDA with its kernels.

Sample yaml::

    jobs:
      - kind: quantize
        matrix:
          method: [bnb-int8, bnb-nf4, bnb-fp4]
      - {kind: quantize, method: bnb-nf4, double_quant: true, compute_dtype: bfloat16}
"""

from __future__ import annotations

import gc
import shutil


def config(options: dict):
    import torch
    from transformers import BitsAndBytesConfig

    method = options["method"]
    if method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=options.get("threshold", 6.0))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4" if method == "bnb-nf4" else "fp4",
        bnb_4bit_use_double_quant=bool(options.get("double_quant")),
        bnb_4bit_compute_dtype=getattr(torch, options.get("compute_dtype", "float32")),
    )


class BitsAndBytes:
    def quantize(self, ctx, base) -> str:
        import torch
        from transformers import AutoModelForCausalLM

        from workers.models import device

        out = ctx.output_dir
        shutil.rmtree(out, ignore_errors=True)  # a retried attempt starts clean
        model = AutoModelForCausalLM.from_pretrained(base.path, quantization_config=config(ctx.options),
                                                     dtype=torch.float32, device_map={"": device()})
        model.save_pretrained(out)
        base.tokenizer.save_pretrained(out)
        del model
        gc.collect()
        return out

    def load(self, ctx, artifact, base):
        from transformers import AutoModelForCausalLM

        from workers.models import device

        model = AutoModelForCausalLM.from_pretrained(artifact, device_map={"": device()})
        model.eval()
        return model
