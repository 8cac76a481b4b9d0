"""Method ``none``: the unquantized base model, as loaded. The reference every other row is compared with.

When the sweep's model is a GGUF file, the float model transformers made from it is first compared with the
file itself running in llama.cpp, on the same evaluation windows: ``source_kl`` (KL of the float copy from
llama.cpp's), ``source_top1_agree`` and ``source_perplexity`` in the reference row. A float copy that does not
reproduce its GGUF (KL above ``MAX_SOURCE_KL``) fails the job: nothing would be comparable with it.

Sample yaml::

    jobs:
      - {kind: quantize, method: none}
"""

from __future__ import annotations

import importlib.util

from qfarm.errors import Permanent

MAX_SOURCE_KL = 0.1  # nats per token; a faithful float copy of a GGUF is ~1e-3 from llama.cpp running it


class Reference:
    def quantize(self, ctx, base) -> None:
        return None  # nothing to write: the base folder is the artifact

    def load(self, ctx, artifact, base):
        ctx.extra.update(source_check(ctx, base))
        return base.model


def source_check(ctx, base) -> dict:
    """The float copy of a GGUF source against llama.cpp running that file ({} for other sources)."""
    from workers.evaluate.harness import eval_windows, quality

    model = ctx.job.model or {}
    if not model.get("gguf_file") or ctx.job.input.artifact:
        return {}  # not made from a GGUF (or a pipeline's merged model)
    if importlib.util.find_spec("llama_cpp") is None:
        return {"source_check": "skipped: llama-cpp-python is not installed"}
    wins, ref = eval_windows(ctx, base)
    if wins is None:
        return {}
    from workers.quantize.gguf import LlamaCppModel

    ctx.progress("comparing the float copy with the GGUF in llama.cpp")
    source = LlamaCppModel(f"{model['location']}/{model['gguf_file']}", int(wins.shape[1]) + 8, ctx.threads)
    try:
        q = quality(source, wins, ref, ctx.progress)
    finally:
        source.llm.close()
    if q["kl_div"] > MAX_SOURCE_KL:
        raise Permanent(f"the float model made from {model['gguf_file']} does not reproduce the file in llama.cpp "
                        f"(KL {q['kl_div']:.3g} nats/token, top-1 agreement {q['top1_agree']:.3f} on the evaluation "
                        "windows): its dequantization is wrong for this architecture; no numbers were published")
    return {"source_kl": q["kl_div"], "source_top1_agree": q["top1_agree"], "source_perplexity": q["perplexity"],
            "source_check": f"llama.cpp {model['gguf_file']}"}
