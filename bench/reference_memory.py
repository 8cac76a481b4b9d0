"""Memory of the reference's log-probs at a big model's evaluation size: seq_len 2048 x 16 windows with a 128k
vocabulary (Llama-3's 128,256), kept whole (the old way, and today's when they fit QFARM_REF_CACHE_MB) against
written once to disk and read back a window at a time (past the budget, where workers have an output root), and
recomputed window by window (workers.evaluate.harness.Reference). The model is a stand-in that returns
log-softmaxed random logits of that shape: the memory is the harness's, whatever the model.

    python bench/reference_memory.py [--windows 16] [--seq-len 2048] [--vocab 128256]

Prints each path's peak RSS above the start, and the ratio; the numbers of the comparison (KL on the same
windows) must agree exactly.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Stand:
    """A 'model' with the harness's logprobs(window): [len - 1, vocab], deterministic per window; ``noise`` > 0 is
    a variant of the same 'model' (its logits moved a little), as a quantized row is."""

    def __init__(self, vocab: int, noise: float = 0.0):
        self.vocab, self.noise = vocab, noise

    def logprobs(self, window):
        import torch

        g = torch.Generator().manual_seed(int(window[0]))
        logits = torch.randn(len(window) - 1, self.vocab, generator=g) * 3
        if self.noise:
            logits += self.noise * torch.randn(len(window) - 1, self.vocab, generator=g)
        return torch.log_softmax(logits, dim=-1)


def peak_rss_mb(fn) -> tuple[float, object]:
    import psutil

    proc, peak, stop = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        stop.set()
        t.join()
    return (peak[0] - base) / 2**20, out


def one(a) -> None:
    """One path in this (fresh) process: its peak and its numbers, as one JSON line."""
    import json
    import tempfile

    import torch

    from workers.evaluate.harness import quality, reference_for, spilled_reference

    torch.set_num_threads(2)
    wins = torch.arange(a.windows).unsqueeze(1) * 7 + torch.zeros(a.windows, a.seq_len, dtype=torch.long)
    ref, variant, quiet = Stand(a.vocab), Stand(a.vocab, 0.3), (lambda line: None)
    budget = float("inf") if a.path == "kept" else 0.0
    tmp = Path(tempfile.mkdtemp(prefix="qfarm-refs-"))
    made = (lambda: spilled_reference(ref, wins, quiet, 0, tmp / "r")) if a.path == "on disk" else \
        (lambda: reference_for(ref, wins, quiet, budget_bytes=budget))
    t0 = time.time()
    mb, q = peak_rss_mb(lambda: quality(variant, wins, made(), quiet))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"mb": mb, "s": time.time() - t0, "kl": q["kl_div"], "top1": q["top1_agree"],
                      "ppl": q["perplexity"]}))


def main() -> None:
    import json
    import subprocess

    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--path", choices=["kept", "recomputed", "on disk"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.path:
        return one(a)
    full_mb = a.windows * (a.seq_len - 1) * a.vocab * 2 / 2**20
    print(f"{a.windows} windows x {a.seq_len} tokens, vocab {a.vocab}: the log-probs kept whole are {full_mb:,.0f} MB")
    got = {}
    for path in ("recomputed", "on disk", "kept"):  # each in a fresh process: an allocator warmed by the other would hide it
        out = subprocess.run([sys.executable, __file__, "--path", path, "--windows", str(a.windows), "--seq-len",
                              str(a.seq_len), "--vocab", str(a.vocab)], capture_output=True, text=True, check=True)
        got[path] = json.loads(out.stdout.strip().splitlines()[-1])
        r = got[path]
        print(f"  {path:<11} peak +{r['mb']:>9,.0f} MB  {r['s']:6.1f} s  KL {r['kl']:.6f}  top-1 {r['top1']:.4f}")
    same = all(got["kept"][k] == got[p][k] for k in ("kl", "top1", "ppl") for p in ("recomputed", "on disk"))
    print(f"  kept / recomputed: {got['kept']['mb'] / max(got['recomputed']['mb'], 1):.1f}x the memory, "
          f"{got['recomputed']['s'] / got['kept']['s']:.2f}x the time; kept / on disk: "
          f"{got['kept']['mb'] / max(got['on disk']['mb'], 1):.1f}x the memory, "
          f"{got['on disk']['s'] / got['kept']['s']:.2f}x the time; the same numbers: {same}")


if __name__ == "__main__":
    main()
