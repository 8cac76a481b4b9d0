"""What a job spends besides its method's own work, before and after, side by side in one run, on the bundled
SmolLM2 (a Q4_1 GGUF, 49,152-token vocabulary):

- reading a GGUF header: gguf-py's GGUFReader (what the workers used, two to four times a job: source dtype, model
  card, tied head, a GGUF artifact's tensors) against qfarm's plain reader (qfarm.sweep.modelinfo.gguf_metadata);
- lm-eval's task index: over lm-eval's own ~14,000 task files and the spec's folder, against the folder alone
  (workers.evaluate.tasks.task_manager, when the folder defines every task asked for);
- a GGUF row's multiple-choice scoring in llama.cpp: each choice evaluated from scratch (LlamaCppModel.logprobs),
  against the prompt cache (continuation_logprobs: the question evaluated once), and whether the log-probs differ;
- peak memory on CPU: a single-threaded matmul loop alone, with PeakMemory's 20 ms RSS sampler beside it, and with
  the kernel's high-water mark (VmHWM) that replaced the sampler.

    python bench/overheads.py        # ~1 minute on 2 cores
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def row(what: str, before: float, after: float, unit: str = "s") -> None:
    print(f"{what:<58} {before:>9.3f} {unit} {after:>9.3f} {unit}   x{before / max(after, 1e-9):,.1f}")


def header(path: str) -> None:
    from gguf import GGUFReader

    from qfarm.sweep.modelinfo import gguf_metadata

    row("GGUF header + tensor list (GGUFReader vs plain reader)", best_of(3, lambda: GGUFReader(path).tensors),
        best_of(3, lambda: gguf_metadata(Path(path), tensors=True)))


def task_index() -> None:
    from lm_eval.tasks import TaskManager

    from workers.evaluate.tasks import task_manager

    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "mine.yaml").write_text("task: mine\ndataset_path: json\noutput_type: multiple_choice\n"
                                             "doc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n")
        full = best_of(1, lambda: TaskManager(include_path=[folder]))
        local = best_of(3, lambda: task_manager(TaskManager, [folder], ["mine"]))
    row("lm-eval task index (lm-eval's own + folder vs folder alone)", full, local)


def choices(path: str) -> None:
    import torch

    from workers.quantize.gguf import LlamaCppModel

    model = LlamaCppModel(path, 512, 1)
    tok = model.llm.tokenize
    text = open(Path(os.environ.get("QFARM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
                / "wikitext2" / "wiki.test.raw").read()[20000:60000].split(". ")
    questions = [(tok(". ".join(text[i:i + 4]).encode(), add_bos=False),
                  [tok((" " + text[i + 4 + k * 7]).encode(), add_bos=False)[:24] for k in range(4)])
                 for i in range(0, 200, 20)]
    worst = 0.0

    def fresh():
        return [model.logprobs(torch.tensor(q + c))[-len(c):] for q, cs in questions for c in cs]

    def cached():
        return [model.continuation_logprobs(q + c, len(c)) for q, cs in questions for c in cs]

    before, after = best_of(2, fresh), best_of(2, cached)
    for a, b in zip(fresh(), cached()):
        worst = max(worst, float((a - b).abs().max()))
    n = sum(len(cs) for _, cs in questions)
    row(f"llama.cpp: {len(questions)} questions x 4 choices (fresh vs prompt cache)", before, after)
    print(f"{'':<58} largest log-prob difference {worst:.2e} over {n} requests")
    model.llm.close()


def peak_memory() -> None:
    import torch

    import workers.evaluate.harness as harness

    torch.set_num_threads(1)
    a = torch.randn(384, 384)

    def work():
        for _ in range(3000):
            a @ a

    def sampled():
        with_reset = harness._reset_rss_high_water
        harness._reset_rss_high_water = lambda: False  # the 20 ms sampler, as before
        try:
            with harness.PeakMemory():
                work()
        finally:
            harness._reset_rss_high_water = with_reset

    def kernel():
        with harness.PeakMemory():
            work()

    alone = best_of(3, work)
    row("matmul loop: with the 20 ms sampler vs alone", best_of(3, sampled), alone)
    row("matmul loop: with the kernel's high-water mark vs alone", best_of(3, kernel), alone)


def main() -> None:
    from qfarm.sweep.sources import bundled_model_path

    path = str(bundled_model_path("smollm2-135m"))
    print(f"{'':<58} {'before':>11} {'after':>11}   ratio")
    header(path)
    task_index()
    choices(path)
    peak_memory()


if __name__ == "__main__":
    main()
