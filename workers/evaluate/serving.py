"""``eval.engine: vllm``: serving figures from vLLM's own engine (offline ``LLM`` API), for rows whose checkpoint
vLLM loads (the float reference and compressed-tensors: rtn, gptq, awq; the registry's ``Method.vllm``).

Every row gets the same prompts: ``max(concurrency)`` consecutive spans of ``prompt_tokens`` token ids of the
evaluation text (the base tokenizer's ids, given to vLLM as ids). For each concurrency C, C requests are handed
to the engine at once, each writing exactly ``max_tokens`` greedy tokens (EOS ignored), after one warm-up
request: ``vllm_tokens_per_s_c<C>`` is output tokens over wall time. Time to first token, p50 and p99, comes
from vLLM's per-request metrics at the highest concurrency; ``vllm_gpu_mem_mb`` is the GPU memory in use
(nvidia's count, all processes) while the engine is up: what vLLM reserved for weights and KV cache.
"""

from __future__ import annotations

import gc
import time

from qfarm.errors import Permanent
from workers.evaluate.harness import percentile


def prompt_ids(tokenizer, text: str, count: int, length: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < length:
        raise Permanent(f"the evaluation text has {len(ids)} tokens: too few for vLLM prompts of {length}")
    return [ids[(i * length) % max(len(ids) - length, 1):][:length] for i in range(count)]


def first_token_s(output) -> float | None:
    """Seconds from arrival to the first token: vLLM V1 says it (``first_token_latency``), V0 gives both times."""
    m = getattr(output, "metrics", None)
    if m is None:
        return None
    if getattr(m, "first_token_latency", None) is not None:
        return float(m.first_token_latency)
    first, arrival = getattr(m, "first_token_time", None), getattr(m, "arrival_time", None)
    return float(first - arrival) if first is not None and arrival is not None else None


def vllm_metrics(ctx, path: str, tokenizer, text: str) -> dict:
    """Serving figures of the checkpoint at ``path`` (a folder or hub id) in vLLM."""
    import torch

    if not torch.cuda.is_available():
        raise Permanent("eval.engine: vllm needs CUDA on the worker, and this worker has none")
    try:
        import vllm
        from vllm import LLM, SamplingParams
    except ImportError:
        raise Permanent("eval.engine: vllm needs vLLM on the workers: pip install vllm") from None
    spec = ctx.job.evaluation.vllm
    levels = sorted(set(spec.concurrency))
    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids(tokenizer, text, max(levels), spec.prompt_tokens)]
    params = SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True)
    gc.collect()
    torch.cuda.empty_cache()
    ctx.progress("vLLM: starting the engine")
    llm = LLM(model=path, tokenizer=path if not path.endswith(".gguf") else None, seed=0,
              gpu_memory_utilization=spec.gpu_memory_utilization,
              max_model_len=spec.max_model_len or spec.prompt_tokens + spec.max_tokens + 8)
    try:
        free, total = torch.cuda.mem_get_info()
        out: dict = {"vllm_version": vllm.__version__, "vllm_gpu_mem_mb": (total - free) / 2**20,
                     "vllm_prompt_tokens": spec.prompt_tokens, "vllm_max_tokens": spec.max_tokens}
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up: graphs captured, caches filled
        for c in levels:
            ctx.progress(f"vLLM: concurrency {c}")
            t0 = time.perf_counter()
            outputs = llm.generate(prompts[:c], params, use_tqdm=False)
            wall = time.perf_counter() - t0
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            out[f"vllm_tokens_per_s_c{c}"] = tokens / wall
            if c == levels[-1]:
                ttft = [s * 1000 for s in map(first_token_s, outputs) if s is not None]
                out.update({"vllm_ttft_ms_p50": percentile(ttft, 50), "vllm_ttft_ms_p99": percentile(ttft, 99),
                            "vllm_ttft_concurrency": c})
        return out
    finally:
        del llm
        gc.collect()
        torch.cuda.empty_cache()
