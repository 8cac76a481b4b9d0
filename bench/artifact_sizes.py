"""Artifact sizes by format, not by machine (issue 35): the same 4-bit job saved computing in float32 (a CPU) and in
bfloat16 (a GPU's compute dtype), on the bundled SmolLM2 (a Llama, tied, from a Q4_1 GGUF) and on a tied bfloat16
Qwen2 of Qwen2.5-0.5B's vocabulary and width (151,936 × 896; 2 random blocks: the embedding is what the issue was
about). Each job runs in this process through the quantize worker (quantize, store as deployed, check, load,
evaluate on one 64-token window). Prints size, ratio, the stored dtype and how many embedding matrices each
artifact holds.

    . .venv/bin/activate && python bench/artifact_sizes.py      # ~4 minutes on 2 cores
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2"


def qwen2_tied(folder: Path) -> Path:
    """A random Qwen2 with Qwen2.5-0.5B's vocabulary and hidden size, 2 blocks, tied, saved in bfloat16, with a
    word-level tokenizer over its vocabulary (tests.tiny's)."""
    import torch
    import transformers as t

    from tests.tiny import make_tiny_model

    text = (WIKI / "wiki.test.raw").read_text()[:200_000]
    make_tiny_model(folder, [line for line in text.splitlines() if line.strip()], family="qwen2")
    config = t.Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                           num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                           max_position_embeddings=512)
    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


def run(model: str, method: str, dtype, root: Path) -> dict:
    import workers.shared.models
    from qfarm.sweep.expand import load_sweep
    from qfarm.sweep.job import Job
    from workers.actor import JobContext, entry_point
    from workers.shared.cache import Cache

    text = (WIKI / "wiki.test.raw")
    root.mkdir(parents=True, exist_ok=True)
    spec = root / f"spec-{str(dtype).replace('torch.', '')}.yaml"
    spec.write_text(f"name: sizes\nmodel: {model}\neval: {{perplexity: {{dataset: {text}, seq_len: 64, max_windows: 1}}, "
                    f"speed: {{prompt_tokens: 4, new_tokens: 1, runs: 1}}}}\njobs:\n  - {{kind: quantize, method: {method}}}\n")
    (job,) = [j for j in load_sweep(spec)[1].jobs if j.kind == "quantize"]
    real = workers.shared.models.compute_dtype
    workers.shared.models.compute_dtype = lambda path: dtype
    try:
        sweep = f"sizes-{str(dtype).replace('torch.', '')}"  # one folder per compute dtype: both artifacts kept
        ctx = JobContext(Job.from_payload(job.payload()), "a1", sweep, str(root / sweep / job.id), str(root),
                         Cache(), 2, lambda line: None)
        return entry_point(job.worker, "worker")(ctx)
    finally:
        workers.shared.models.compute_dtype = real


def embeddings_stored(folder: str) -> int:
    from safetensors import safe_open

    names = [k for f in Path(folder).glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]
    return sum(n.endswith(("embed_tokens.weight", "lm_head.weight")) for n in names)


def main() -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"bundled SmolLM2-135M (GGUF Q4_1, tied)": "bundled:smollm2-135m",
                  "Qwen2 151936x896, 2 blocks (bf16, tied)": str(qwen2_tied(tmp / "qwen2"))}
        print(f"{'model':42} {'method':8} {'size MB f32':>11} {'size MB bf16':>12} {'ratio':>6} "
              f"{'stored':>9} {'embeddings':>10}")
        for name, model in models.items():
            for method in ("rtn", "bnb-nf4"):
                rows = {d: run(model, method, d, tmp / f"{abs(hash(model))}")  # one float copy a model
                        for d in (torch.float32, torch.bfloat16)}
                cpu, gpu = rows[torch.float32], rows[torch.bfloat16]
                print(f"{name:42} {method:8} {cpu['size_mb']:11.1f} {gpu['size_mb']:12.1f} "
                      f"{cpu['size_mb'] / gpu['size_mb']:6.3f} {cpu['stored_dtype']:>9} "
                      f"{embeddings_stored(cpu['artifact']):>5} / {embeddings_stored(gpu['artifact'])}",
                      flush=True)
                print("   artifact_config:", json.dumps(cpu["artifact_config"]))


if __name__ == "__main__":
    main()
