"""The evaluation harness: the same measurements for every variant, against the same reference.

- perplexity over non-overlapping windows of the eval text (``eval.perplexity``): exp(mean NLL of every
  next-token prediction inside each window; the first token of a window is context only);
- KL(reference || variant) and top-1 agreement on the very same positions. The reference (the float base
  model) log-probabilities are kept as float16, and the variant's are rounded to float16 the same way
  before comparing, so the reference against itself gives exactly 0;
- speed (``eval.speed``): prefill of ``prompt_tokens`` tokens of the eval text, then ``new_tokens`` greedy
  decode steps with the KV cache, median over ``runs`` after one warm-up;
- answers to the fixed ``eval.prompts`` (greedy, chat template when the tokenizer has one);
- for a job that comes from a train job (and the train job itself): ``task_loss``, the mean next-token loss on
  the train job's held-out examples, beside ``ref_task_loss``, the same for the model it is compared with;
- peak memory: the worker process's peak RSS during the job on CPU, max allocated CUDA memory on GPU.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from workers.evaluate.checks import check_reference
from workers.evaluate.tasks import run_tasks
from workers.shared.data import held_out, load_text, windows_and_bytes
from workers.shared.files import build_once


@dataclass
class Reference:
    """The reference's figures on the evaluation windows. Its full log-probabilities ([seq_len - 1, vocab] a window,
    float16) are kept in memory when they fit the worker's budget (``QFARM_REF_CACHE_MB``, a total over everything
    kept). Past it they are written once under the output root (``disk``: a folder of one float16 file per window,
    shared by every worker that evaluates against the same reference) and read back a window at a time: the same
    numbers, host RAM for one window, and the base model no longer needed while a row is evaluated. Called
    without an output root (``reference_for`` alone, past its budget), each window's log-probs are computed again
    beside the row's own (``stream``). Exact every way, never more than one window's worth in memory past the
    budget."""

    logprobs: list | None  # per window: float16 [seq_len - 1, vocab]; None when not kept in memory
    nll: float
    tokens: int
    text_bytes: int = 0  # UTF-8 bytes of the text whose tokens are predicted (bits per byte)
    token_nll: list = field(default_factory=list)  # per window: float64 [seq_len - 1], for paired differences
    stream: object = None  # the reference model's runner, when its log-probs are recomputed
    full_bytes: int = 0  # what keeping every window's log-probs takes
    disk: Path | None = None  # the folder holding them, when written under the output root
    made_here: bool = True  # False: read from what another worker (or an earlier sweep) wrote

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.logprobs or [])

    def window_logprobs(self, i: int, window):
        """Window ``i``'s reference log-probs as float32 (rounded through float16 every way: the same numbers)."""
        import numpy as np
        import torch

        if self.logprobs is not None:
            return self.logprobs[i].float()
        if self.disk is not None:
            return torch.from_numpy(np.load(self.disk / f"w{i:05d}.npy", mmap_mode="r").astype(np.float32))
        return self.stream.logprobs(window).half().float().cpu()

    @property
    def how(self) -> str:
        mb = self.full_bytes / 2**20
        if self.logprobs is not None:
            return f"kept ({mb:.0f} MB)"
        if self.disk is not None:
            return (f"on disk ({mb:.0f} MB, over QFARM_REF_CACHE_MB: read a window at a time; "
                    f"{'written by this worker' if self.made_here else 'shared: written by another worker'})")
        return f"recomputed window by window (keeping them would take {mb:.0f} MB, over QFARM_REF_CACHE_MB)"


class PeakMemory:
    """Peak memory of this job: CUDA max allocated, or on CPU the process's peak RSS as the kernel keeps it (VmHWM,
    reset through /proc/self/clear_refs: every page counted, however briefly held, at no cost while the job runs),
    or RSS sampled every 20 ms where the kernel does not offer that reset.

    May be nested (the quantization step inside the whole job): CUDA and the kernel have one peak counter each, so
    an inner measurement hands the peak it resets to every enclosing one first.
    """

    _active: ClassVar[list[PeakMemory]] = []

    def __init__(self):
        import psutil
        import torch

        self.cuda = torch.cuda.is_available()
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        carried = self._counter()
        if carried is not None and self._reset_counter():
            for outer in PeakMemory._active:
                outer.peak = max(outer.peak, carried)
            PeakMemory._active.append(self)
        else:  # no resettable peak counter here: sample
            self.peak = self.proc.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _counter(self) -> int | None:
        """The peak counter's value since its last reset: CUDA's max allocated, or the kernel's RSS high-water mark
        (never below the RSS of any moment since)."""
        import torch

        return torch.cuda.max_memory_allocated() if self.cuda else _rss_high_water()

    def _reset_counter(self) -> bool:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return True
        return _reset_rss_high_water()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            PeakMemory._active.remove(self)
            self.peak = max(self.peak, self._counter() or self.proc.memory_info().rss)
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return self.peak / 2**20


def _rss_high_water() -> int | None:
    """This process's peak resident set size since its last reset (VmHWM), in bytes; None where /proc has none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_rss_high_water() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+: ``5`` into /proc/self/clear_refs); False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class TorchRunner:
    """A transformers model answering the harness's three questions. A model that runs outside torch
    (``workers.quantize.gguf.LlamaCppModel``) answers the same three itself:

    - ``logprobs(window)``: log-softmax at every position but the last, [len(window) - 1, vocab];
    - ``continuation_logprobs(ids, n)``: the last ``n`` rows of that (lm-eval's requests; llama.cpp keeps the prefix
      it shares with the request before);
    - ``timed(prompt_ids, steps)``: seconds to prefill the prompt, and to decode ``steps`` greedy tokens after it;
    - ``greedy(ids, max_new_tokens, pad_id)``: the greedy continuation's token ids.
    """

    def __init__(self, model):
        self.model = model

    def logprobs(self, window):
        import torch

        with torch.inference_mode():
            logits = self.model(window.unsqueeze(0).to(self.model.device)).logits[0, :-1].float()
        return torch.log_softmax(logits, dim=-1)

    def continuation_logprobs(self, ids: list[int], n: int):
        import torch

        return self.logprobs(torch.tensor(ids, dtype=torch.long))[-n:]

    def timed(self, prompt_ids, steps: int) -> tuple[float, float]:
        import torch

        def sync():
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        ids = prompt_ids.unsqueeze(0).to(self.model.device)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t1 = time.perf_counter()
            past = out.past_key_values
            for _ in range(steps):
                out = self.model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            return t1 - t0, time.perf_counter() - t1

    def greedy(self, ids: list[int], max_new_tokens: int, pad_id: int | None, stop=None) -> list[int]:
        """The greedy continuation; with ``stop``, ended early once ``stop(new_ids)`` is true (or at EOS)."""
        import torch

        enc = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        if stop is not None:
            return self._greedy_until(enc, max_new_tokens, stop)
        with torch.inference_mode():
            gen = self.model.generate(input_ids=enc, attention_mask=torch.ones_like(enc),
                                      max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        return gen[0, len(ids):].tolist()

    def _greedy_until(self, enc, max_new_tokens: int, stop) -> list[int]:
        import torch

        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = set(eos if isinstance(eos, list) else [eos])
        out: list[int] = []
        with torch.inference_mode():
            res = self.model(input_ids=enc, use_cache=True)
            for _ in range(max_new_tokens):
                tok = int(res.logits[0, -1].argmax())
                if tok in eos:
                    break
                out.append(tok)
                if stop(out):
                    break
                res = self.model(input_ids=torch.tensor([[tok]], device=enc.device),
                                 past_key_values=res.past_key_values, use_cache=True)
        return out


def runner(model):
    """``model`` itself when it speaks the harness's protocol (llama.cpp), else a TorchRunner around it."""
    return model if hasattr(model, "logprobs") else TorchRunner(model)


def reference_for(model, wins, progress, text_bytes: int = 0, vocab_size: int = 0,
                  budget_bytes: float = float("inf")) -> Reference:
    """The reference's log-probs on the windows, checked to be sane (workers.evaluate.checks) before anything uses them;
    kept whole only when they fit ``budget_bytes`` (else recomputed window by window: ``Reference``)."""
    lps, token_nll, full_bytes = [], [], 0
    for i, window in enumerate(wins):
        progress(f"reference log-probs {i + 1}/{len(wins)}")
        lp = model.logprobs(window)
        targets = window[1:].to(lp.device)
        token_nll.append(-lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().cpu())
        full_bytes = len(wins) * lp.shape[0] * lp.shape[1] * 2  # float16
        if lps is not None and full_bytes <= budget_bytes:
            lps.append(lp.half().cpu())
        else:
            lps = None  # over the budget: nothing beyond this window is held
        vocab_size = vocab_size or lp.shape[-1]
    nll, tokens = sum(t.sum().item() for t in token_nll), sum(t.numel() for t in token_nll)
    ref = Reference(lps, nll, tokens, text_bytes, token_nll, None if lps is not None else model, full_bytes)
    if ref.text_bytes:
        check_reference(nll, tokens, ref.text_bytes, vocab_size)
    return ref


def spilled_reference(model, wins, progress, text_bytes: int, target: Path, in_memory: bool = False,
                      first: int | None = None) -> Reference:
    """The reference's log-probs on the windows written once to ``target`` (a folder under the output root: one
    float16 ``.npy`` a window, and the per-token NLL), by whichever worker gets there first while the others wait
    on its lock (workers.shared.files.build_once), then read back a window at a time (``Reference.disk``), or whole
    (``in_memory``: they fit the worker's budget). The same float16 numbers every way. ``first``: only the first
    windows of a folder already written for more (a halving screen's)."""
    import json

    import numpy as np
    import torch

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        nlls, shape = [], None
        for i, window in enumerate(wins):
            progress(f"reference log-probs {i + 1}/{len(wins)} (to disk, shared)")
            lp = model.logprobs(window)
            targets = window[1:].to(lp.device)
            nlls.append(-lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().cpu().numpy())
            np.save(tmp / f"w{i:05d}.npy", lp.half().cpu().numpy())
            shape = list(lp.shape)
            del lp
        np.save(tmp / "token_nll.npy", np.stack(nlls))
        (tmp / "meta.json").write_text(json.dumps({"windows": len(wins), "shape": shape}))

    made = first is None and build_once(target, write,
                                        lambda: progress("waiting for the reference log-probs another worker is making"))
    meta = json.loads((target / "meta.json").read_text())
    n = meta["windows"] if first is None else min(first, meta["windows"])
    token_nll = [torch.from_numpy(row.copy()) for row in np.load(target / "token_nll.npy")[:n]]
    nll, tokens = sum(t.sum().item() for t in token_nll), sum(t.numel() for t in token_nll)
    rows, vocab = meta["shape"]
    kept = [torch.from_numpy(np.load(target / f"w{i:05d}.npy")) for i in range(n)] if in_memory else None
    ref = Reference(kept, nll, tokens, text_bytes, token_nll, None, n * rows * vocab * 2,
                    None if in_memory else target, made)
    if text_bytes:
        check_reference(nll, tokens, text_bytes, vocab)
    return ref


KL_ROWS = 256  # positions compared at a time: 256 x a 128k vocabulary x 4 bytes is 131 MB a temporary


def quality(model, wins, ref: Reference, progress) -> dict:
    """Perplexity, its change from the reference, KL and top-1 agreement on the same positions, each with its
    standard error over tokens (``<column>_se``): the paired per-token difference against the reference for
    the change in perplexity, as llama.cpp's perplexity tool reports ``Mean KLD ± x``."""
    import torch

    nll, diff, kl, agree = [], [], [], []
    for i, window in enumerate(wins):
        progress(f"perplexity/KL {i + 1}/{len(wins)}")
        lp = model.logprobs(window)
        targets = window[1:].to(lp.device)
        token_nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().cpu()
        r = ref.window_logprobs(i, window)
        nll.append(token_nll)
        if ref.token_nll:
            diff.append(token_nll - ref.token_nll[i])
        for rows in range(0, r.shape[0], KL_ROWS):  # a few [rows, vocab] temporaries, not a window's worth
            q = lp[rows:rows + KL_ROWS].half().float().cpu()
            r_part = r[rows:rows + KL_ROWS]
            kl.append((r_part.exp() * (r_part - q)).sum(-1).double())
            agree.append((r_part.argmax(-1) == q.argmax(-1)).double())
    nll_t, kl_t, agree_t = torch.cat(nll), torch.cat(kl), torch.cat(agree)
    tokens = nll_t.numel()
    mean_nll = nll_t.mean().item()
    ppl = math.exp(mean_nll)
    top1 = agree_t.mean().item()
    out = {
        "perplexity": ppl,
        "perplexity_se": ppl * _se(nll_t),
        "ref_perplexity": ref.perplexity,
        "ppl_delta_pct": (ppl - ref.perplexity) / ref.perplexity * 100,
        "kl_div": max(kl_t.mean().item(), 0.0),
        "kl_div_se": _se(kl_t),
        "top1_agree": top1,
        "top1_agree_se": math.sqrt(top1 * (1 - top1) / tokens),
        "ppl_windows": len(wins),
        "ppl_tokens": tokens,
        "ref_logprobs": ref.how,
    }
    if diff:
        d = torch.cat(diff)
        out["ppl_delta_pct_se"] = 100 * math.exp(d.mean().item()) * _se(d)
    if ref.text_bytes:
        out.update({"bits_per_byte": nll_t.sum().item() / math.log(2) / ref.text_bytes,
                    "ref_bits_per_byte": ref.nll / math.log(2) / ref.text_bytes,
                    "tokens_per_byte": tokens / ref.text_bytes})
    return out


DOMAIN_KEYS = {"perplexity": "ppl", "ppl_delta_pct": "ppl_delta_pct", "kl_div": "kl", "top1_agree": "top1",
               "ref_perplexity": "ref_ppl", "bits_per_byte": "bits_per_byte", "ppl_tokens": "ppl_tokens"}


def domain_columns(name: str, figures: dict) -> dict:
    """One evaluation domain's figures (``quality``'s) under its own names: ``ppl@NAME``, ``kl@NAME``,
    ``top1@NAME``, ``ppl_delta_pct@NAME``, each with its ``_se`` where it has one (qfarm.results.columns.domain_columns)."""
    out = {}
    for key, short in DOMAIN_KEYS.items():
        if key in figures:
            out[f"{short}@{name}"] = figures[key]
        if f"{key}_se" in figures:
            out[f"{short}@{name}_se"] = figures[f"{key}_se"]
    return out


def _se(values) -> float:
    """Standard error of the mean of per-token values (tokens taken as independent: a lower bound)."""
    n = values.numel()
    return values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else 0.0


def speed(model, prompt_ids, new_tokens: int, runs: int) -> dict:
    """Prefill and greedy decode timed like a benchmark: one warm-up of the very sizes measured (allocations,
    kernel selection, caches), the device synchronised around each timing (TorchRunner.timed), the median of
    ``runs`` and its spread (10th and 90th percentile of the runs' speeds)."""
    model.timed(prompt_ids, new_tokens)  # warm-up at the measured sizes
    timings = [model.timed(prompt_ids, new_tokens) for _ in range(runs)]
    prefill = statistics.median(t[0] for t in timings)
    decode = statistics.median(t[1] for t in timings)
    n = int(prompt_ids.shape[0])
    prefill_speeds = [n / t[0] for t in timings]
    decode_speeds = [new_tokens / t[1] for t in timings]
    return {
        "prefill_tokens_per_s": n / prefill,
        "decode_tokens_per_s": new_tokens / decode,
        "prefill_tokens_per_s_p10": percentile(prefill_speeds, 10),
        "prefill_tokens_per_s_p90": percentile(prefill_speeds, 90),
        "decode_tokens_per_s_p10": percentile(decode_speeds, 10),
        "decode_tokens_per_s_p90": percentile(decode_speeds, 90),
        "ttft_ms": prefill * 1000,
        "ms_per_token": decode / new_tokens * 1000,
        "speed_prompt_tokens": n,
        "speed_new_tokens": new_tokens,
        "speed_runs": runs,
    }


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default) of a few values; None for none."""
    if not values:
        return None
    xs = sorted(values)
    at = (len(xs) - 1) * q / 100
    lo = int(at)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (at - lo)


def answers(model, tokenizer, prompts: list[str], max_new_tokens: int, progress) -> list[dict]:
    out = []
    for i, prompt in enumerate(prompts):
        progress(f"prompts {i + 1}/{len(prompts)}")
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        else:
            text = prompt
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        new = model.greedy(ids, max_new_tokens, tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append({"prompt": prompt, "answer": tokenizer.decode(new, skip_special_tokens=True).strip()})
    return out


def task_loss(model, examples: list[list[int]], progress, what: str = "task loss") -> float:
    """Mean next-token loss over the held-out examples (each its own sequence, like in training)."""
    import torch

    nll, tokens = 0.0, 0
    for i, ids in enumerate(examples):
        progress(f"{what} {i + 1}/{len(examples)}")
        if len(ids) < 2:
            continue
        window = torch.tensor(ids, dtype=torch.long)
        lp = model.logprobs(window)
        targets = window[1:].to(lp.device)
        nll += -lp.gather(-1, targets.unsqueeze(-1)).sum().item()
        tokens += targets.numel()
    return nll / max(tokens, 1)


def reference_first(ctx, base) -> str:
    """Before a job builds its own model: the reference's figures at hand (log-probs on the windows, task loss):
    read from what the sweep's reference job wrote, so the float base is never loaded (``not loaded``); else made
    now, then the base given back so that the job's model has the room, never the two at once: on a GPU parked in
    host RAM (workers.shared.cache.Cache.park); on a CPU worker whose host-RAM budget (``QFARM_HOST_MEM_GB``) the job's
    plan exceeds, dropped (loaded again by the next job that needs it). Not when the reference log-probs are
    recomputed window by window (the base is needed beside the row's model) or the cache keeps nothing. Returns
    what was done with the base (the row's ``base_during_job``)."""
    from qfarm import settings
    from workers.shared.models import device, plan_columns

    ev = ctx.job.evaluation
    refs = [eval_windows(ctx, base, text)[1] for text in (ev.texts if ev is not None else [])]  # each domain's: read
    _reference_task_loss(ctx, base)  # from disk when the sweep's reference job wrote them
    if not base.loaded:
        return "not loaded"  # the reference's figures came from its own job: the float model never loaded here
    on_gpu = device() != "cpu"
    budget = settings.get("QFARM_HOST_MEM_GB")
    over = bool(budget) and (plan_columns(ctx, base).get("plan_host_gb") or 0) > float(budget)
    if not on_gpu and not over:
        return "kept"
    if any(ref.stream is not None for ref in refs) or ctx.cache.models.max_items == 0:
        return "kept"
    return ctx.cache.park(base, on_gpu=True) if on_gpu else ctx.cache.drop(base)


def _reference_task_loss(ctx, base) -> tuple[list, float] | None:
    """(the held-out examples of the job's train ancestor, the reference's task loss on them), both cached; None
    without a train ancestor."""
    te = ctx.job.task_eval
    if not te:
        return None
    key = (te["dataset"]["key"], te.get("format"), te["eval_samples"], te["seq_len"], base.path)
    examples = ctx.cache.tokens(key, lambda: held_out(te, base.tokenizer), ctx, "task_data")
    ref, _ = ctx.cache.reference_number(("task_loss",) + key,
                                        lambda: task_loss(runner(base.model), examples, ctx.progress, "reference task loss"))
    return examples, ref


def task_metrics(ctx, model, base) -> dict:
    """task_loss of ``model`` and of ``base`` on the held-out examples of the job's train ancestor."""
    found = _reference_task_loss(ctx, base)
    if found is None:
        return {}
    examples, ref = found
    loss = task_loss(runner(model), examples, ctx.progress)
    return {"task_loss": loss, "ref_task_loss": ref, "task_loss_delta": loss - ref, "task_examples": len(examples)}


def runtime_of(model) -> str:
    """What computes a torch model's forward: ``gptqmodel-<kernel>`` (GPTQModel's quantized layers, e.g.
    ``gptqmodel-torch-fused``), ``transformers-bnb`` (bitsandbytes layers), ``transformers-dense``,
    or ``transformers-dense (decompressed compressed-tensors)`` for a compressed checkpoint loaded back as dense
    weights, saying so when its activations are quantized too (simulated: quality real, speed not)."""
    from workers.quantize.bnb import four_bit_layers
    from workers.quantize.gptqmodel import kernels

    gptq_kernels = kernels(model)
    if gptq_kernels:  # GPTQModel's int4 kernels (TorchFused / Marlin / ...), or its dequantizing torch fallback
        return "/".join(gptq_kernels)
    if four_bit_layers(model) or any(type(m).__name__ == "Linear8bitLt" for m in model.modules()):
        return "transformers-bnb"
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum: its value, compressed-tensors
    acts = {f"{getattr(a.type, 'value', a.type)}{a.num_bits}" for m in model.modules()
            for a in [getattr(getattr(m, "quantization_scheme", None), "input_activations", None)] if a is not None}
    if acts:  # W8A8 / FP8_DYNAMIC: compressed-tensors quantizes each Linear's input in float, no int8/fp8 kernel
        return f"transformers-dense (decompressed {method}; {'/'.join(sorted(acts))} activations simulated in float)"
    return f"transformers-dense (decompressed {method})" if method else "transformers-dense"


def eval_windows(ctx, base, text=None):
    """(the perplexity windows of ``text``, one of the job's evaluation texts (default: the first), the reference's
    checked log-probs on them), from the worker's cache when there. The windows follow the model's BOS convention;
    None, None without ``eval.perplexity``."""
    ppl = text or (ctx.job.evaluation.perplexity if ctx.job.evaluation is not None else None)
    if ppl is None:
        return None, None
    key, (wins, nbytes) = _windows(ctx, base, ppl, ppl.max_windows)
    ref, hit = ctx.cache.reference(key, lambda: _reference(ctx, base, wins, nbytes, key, _prefix_source(ctx, base, ppl, wins)))
    source = "memory" if hit else "computed" if ref.made_here else "shared"
    ctx.count({"memory": "reference_cache_hits", "computed": "reference_computations",
               "shared": "reference_shared"}[source])
    ctx.extra.setdefault("ref_cache", source)  # the first time this job asked: a job primes it before it evaluates
    return wins, ref


def _windows(ctx, base, ppl, count: int) -> tuple[tuple, tuple]:
    """(the cache key, (the first ``count`` perplexity windows of the text, the bytes they cover)), from the worker's
    cache when there."""
    key = (ppl.dataset["key"], base.path, ppl.seq_len, count)
    return key, ctx.cache.tokens(key, lambda: windows_and_bytes(base.tokenizer, load_text(ppl.dataset), ppl.seq_len,
                                                                 count, base.conventions.get("bos_id")), ctx)


def _reference_folder(ctx, base, wins, key: tuple) -> Path:
    """Where the reference's log-probs on ``wins`` lie under the output root: by the windows themselves and the device
    class and dtype the reference computes in (what every job of the sweep on such workers derives)."""
    import hashlib

    from workers.shared.files import keyed
    from workers.shared.models import compute_dtype, device

    tokens = hashlib.sha256(wins.numpy().tobytes()).hexdigest()  # the very windows, whatever made them
    return keyed(ctx.output_root, "_refs", repr((key, tokens, device(), str(compute_dtype(base.path)))))


def _prefix_source(ctx, base, ppl, wins) -> Path | None:
    """A halving screen's reference (``prefix_of``: its windows are the first of the full evaluation's): the folder
    the sweep's reference job wrote for the full windows, when it is there and starts with these very windows; None
    (the screen's own windows are computed) otherwise."""
    full = getattr(ppl, "prefix_of", None)
    if not full or full <= len(wins):
        return None
    key, (fwins, _) = _windows(ctx, base, ppl, full)
    folder = _reference_folder(ctx, base, fwins, key)
    if len(fwins) < len(wins) or not (fwins[: len(wins)] == wins).all() or not (folder / "meta.json").is_file():
        return None
    return folder


def _reference(ctx, base, wins, nbytes: int, key: tuple, prefix_of: Path | None = None) -> Reference:
    """Made once per output root and sweep (whichever worker gets there first; the others read it), kept in this
    worker's memory while the log-probs fit its budget, else read from disk a window at a time. ``prefix_of``: a
    folder of the reference on more windows that start with these: its first windows are read instead."""
    vocab = int(base.skeleton.get_output_embeddings().weight.shape[0])  # no weights read: the reference may be on disk
    fits = len(wins) * (wins.shape[1] - 1) * vocab * 2 <= ctx.cache.ref_budget_bytes
    if prefix_of is not None:
        return spilled_reference(_BaseRunner(base), wins, ctx.progress, nbytes, prefix_of, in_memory=fits,
                                 first=len(wins))
    return spilled_reference(_BaseRunner(base), wins, ctx.progress, nbytes, _reference_folder(ctx, base, wins, key),
                             in_memory=fits)


class _BaseRunner:
    """The base model's runner, its weights loaded only when a window's log-probs are computed here (not when the
    sweep's reference job wrote them)."""

    def __init__(self, base):
        self.base = base

    def logprobs(self, window):
        return runner(self.base.model).logprobs(window)


def evaluate(ctx, model, base) -> dict:
    """Every measurement the sweep's ``eval:`` asks for, of ``model`` against the float ``base``."""
    from workers.quantize.bnb import kernel_of

    ev = ctx.job.evaluation
    tokenizer = base.tokenizer
    metrics: dict = {"kernel": kernel_of(model), "runtime": runtime_of(model)} if hasattr(model, "modules") else {}
    loaded, model = model, runner(model)
    metrics.setdefault("runtime", getattr(model, "runtime", None))
    wins = None
    if ev.perplexity is not None:
        wins, ref = eval_windows(ctx, base)
        metrics.update(quality(model, wins, ref, ctx.progress))
        metrics.update({"ppl_bos": base.conventions.get("add_bos"),
                        "tokenizer_check": base.conventions.get("tokenizer_check")})
        for i, domain in enumerate(ev.domains):  # the first domain is the plain columns' too: measured once
            found = metrics if i == 0 else quality(model, *eval_windows(ctx, base, domain),
                                                   lambda line, name=domain.name: ctx.progress(f"{name}: {line}"))
            metrics.update(domain_columns(domain.name, found))
        if ev.domains:
            metrics["ppl_domains"] = [d.name for d in ev.domains]
    sp = ev.speed
    if sp is not None:
        ctx.progress("speed")
        prompt = wins[0] if wins is not None and wins.shape[1] >= sp.prompt_tokens else None
        if prompt is None:
            import torch

            ids = tokenizer(load_text({"kind": "bundled", "location": "python-docs"})[:20000],
                            add_special_tokens=False)["input_ids"]
            prompt = torch.tensor(ids, dtype=torch.long)
        metrics.update(speed(model, prompt[: sp.prompt_tokens], sp.new_tokens, sp.runs))
    if ev.prompts:
        metrics["answers"] = answers(model, tokenizer, ev.prompts, ev.max_new_tokens, ctx.progress)
    metrics.update(task_metrics(ctx, model, base))
    metrics.update(run_tasks(ctx, loaded, base))
    return metrics
