"""A sweep's GPU memory by its memory plan (qfarm.sweep.plan), before and after the reference became a job of its own.

Before: every job evaluated the reference first with the float base on its own GPU (then parked it), so each job's
GPU figure was at least the float model's. After: the reference job alone holds the float model; every other row
holds only its own model and reads the reference's log-probs from disk. Prints each job's GPU GB (per device, the
figure a GPU must hold) both ways and the sums: what a sweep asks of a cluster. Pure arithmetic on public configs
(no model, no GPU): `python bench/plan_memory.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qfarm.sweep.plan import job_plan, shape_of_config  # noqa: E402
from tests.unit.test_plan import LLAMA3_8B, LLAMA3_70B, QWEN25_7B  # noqa: E402 - the published configs

SWEEP = [("none", {}), ("bnb-int8", {}), ("bnb-nf4", {}), ("bnb-fp4", {}), ("rtn", {"bits": 4}),
         ("gptq", {"bits": 4}), ("awq", {"bits": 4}), ("gguf", {"gguf_type": "Q4_K_M"}), ("gguf", {"gguf_type": "Q8_0"})]


DENSE = ("none", "rtn", "gptq", "awq")


def payload(method: str, options: dict, gpus: int) -> dict:
    return {"id": f"j-{method}", "label": method, "kind": "quantize", "options": {"method": method, **options},
            "model": {"kind": "hub"}, "resources": {"gpus": gpus},
            "eval": {"perplexity": {"seq_len": 512, "max_windows": 16}}}


def main() -> None:
    print(f"{'model':<12} {'job':<14} {'before GB':>10} {'after GB':>10} {'ratio':>7}")
    for name, config, ref_gpus in (("Llama-3-8B", LLAMA3_8B, 1), ("Qwen2.5-7B", QWEN25_7B, 1),
                                   ("Llama-3-70B", LLAMA3_70B, 4)):
        shape = shape_of_config(config)
        total_before = total_after = 0.0
        for method, options in SWEEP:
            # the float model spreads over the GPUs it needs, and so do the rows evaluated dense (llm-compressor's,
            # decompressed); before, every job held the float model. A row held in 4 bits needs one GPU
            gpus = ref_gpus if method in DENSE else 1
            before = job_plan(payload(method, options, ref_gpus), shape, "cuda", reads_reference=False)
            after = job_plan(payload(method, options, gpus), shape, "cuda")
            b, a = before["gpu_gb_per_device"] * before["gpus"], after["gpu_gb_per_device"] * after["gpus"]
            total_before, total_after = total_before + b, total_after + a
            label = method + (f" {options.get('gguf_type') or options.get('bits') or ''}" if options else "")
            print(f"{name:<12} {label:<14} {b:>10.1f} {a:>10.1f} {a / b:>7.2f}"
                  + (f"   ({before['gpus']} GPUs x {before['gpu_gb_per_device']:.1f} -> {after['gpus']} x "
                     f"{after['gpu_gb_per_device']:.1f})" if before["gpus"] != after["gpus"] or after["gpus"] > 1 else ""))
        print(f"{name:<12} {'sweep (sum)':<14} {total_before:>10.1f} {total_after:>10.1f} {total_after / total_before:>7.2f}\n")


if __name__ == "__main__":
    main()
