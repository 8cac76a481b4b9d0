"""Reference log-probs within a total budget: kept whole when they fit; past it written once under the output root
and read back a window at a time (shared by the workers), or recomputed window by window beside each row's own: the
same numbers every way, and never the whole [windows, seq, vocab] tensor in memory."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_data):
    from tests.tiny import corpus_of, make_tiny_model

    corpus = corpus_of(shared_data / "guanaco_llama2_1k" / "train.jsonl", 80)
    folder = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(folder / "a", corpus, seed=0), make_tiny_model(folder / "b", corpus, seed=1), corpus


def _runners(tiny):
    """(the reference model, another model, 4 windows of 64 tokens): each model counts its forward passes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.evaluate.harness import TorchRunner

    class Counted(TorchRunner):
        def __init__(self, model):
            super().__init__(model)
            self.forwards = 0

        def logprobs(self, window):
            self.forwards += 1
            return super().logprobs(window)

    a, b, corpus = tiny
    ref_model, other = (Counted(AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval()) for m in (a, b))
    ids = AutoTokenizer.from_pretrained(a)(" ".join(corpus), return_tensors="pt").input_ids[0]
    return ref_model, other, torch.stack([ids[i * 64:(i + 1) * 64] for i in range(4)])


def quiet(line: str) -> None:
    pass


def test_recomputed_window_by_window_gives_the_numbers_kept_ones_give(tiny):
    from transformers import AutoTokenizer

    from workers.evaluate.harness import quality, reference_for

    ref_model, other, wins = _runners(tiny)
    a = tiny[0]
    kept = reference_for(ref_model, wins, quiet)
    streamed = reference_for(ref_model, wins, quiet, budget_bytes=kept.full_bytes - 1)
    assert kept.logprobs is not None and kept.nbytes == kept.full_bytes == 4 * 63 * len(AutoTokenizer.from_pretrained(a)) * 2
    assert streamed.logprobs is None and streamed.nbytes == 0 and streamed.nll == kept.nll
    q_kept, q_streamed = quality(other, wins, kept, quiet), quality(other, wins, streamed, quiet)
    for col in ("perplexity", "kl_div", "kl_div_se", "top1_agree", "ppl_delta_pct", "ppl_delta_pct_se"):
        assert q_kept[col] == q_streamed[col], col
    assert q_kept["kl_div"] > 1e-4  # two different models: a comparison that could have come out wrong
    assert q_kept["ref_logprobs"].startswith("kept") and "recomputed window by window" in q_streamed["ref_logprobs"]


def test_past_the_budget_they_are_written_once_and_every_worker_reads_the_same_numbers(tiny, tmp_path):
    from workers.evaluate.harness import quality, reference_for, spilled_reference

    ref_model, other, wins = _runners(tiny)
    kept = reference_for(ref_model, wins, quiet)
    ref_model.forwards = 0
    first = spilled_reference(ref_model, wins, quiet, 0, tmp_path / "_refs" / "r")
    assert ref_model.forwards == 4 and first.made_here and first.nbytes == 0  # nothing of it held in memory
    second = spilled_reference(ref_model, wins, quiet, 0, tmp_path / "_refs" / "r")  # another worker, later
    assert ref_model.forwards == 4 and not second.made_here  # read, not computed again
    whole = spilled_reference(ref_model, wins, quiet, 0, tmp_path / "_refs" / "r", in_memory=True)  # within budget
    assert ref_model.forwards == 4 and whole.nbytes == kept.nbytes and whole.disk is None
    assert second.nll == kept.nll and second.full_bytes == kept.full_bytes
    q_kept = quality(other, wins, kept, quiet)
    for ref in (first, second, whole):
        q = quality(other, wins, ref, quiet)
        for col in ("perplexity", "kl_div", "kl_div_se", "top1_agree", "ppl_delta_pct", "ppl_delta_pct_se"):
            assert q[col] == q_kept[col], col
    assert "on disk" in quality(other, wins, second, quiet)["ref_logprobs"] and "another worker" in second.how
    assert quality(ref_model, wins, second, quiet)["kl_div"] == 0  # the reference against itself, read back
    # a halving screen's first 2 windows, read from the folder written for 4: the numbers computing 2 gives
    own = reference_for(ref_model, wins[:2], quiet)
    ref_model.forwards = 0
    for in_memory in (False, True):
        screen = spilled_reference(ref_model, wins[:2], quiet, 0, tmp_path / "_refs" / "r", in_memory=in_memory, first=2)
        assert ref_model.forwards == 0 and not screen.made_here and screen.nll == own.nll and screen.tokens == own.tokens
        assert screen.full_bytes == own.full_bytes and len(screen.token_nll) == 2
        q, q_own = quality(other, wins[:2], screen, quiet), quality(other, wins[:2], own, quiet)
        for col in ("perplexity", "kl_div", "kl_div_se", "top1_agree", "ppl_delta_pct", "ppl_delta_pct_se"):
            assert q[col] == q_own[col], col


def test_the_budget_is_a_total_over_every_reference_kept():
    from workers.shared.cache import Cache

    cache = Cache()
    cache.ref_budget_bytes = 100
    big = lambda n: SimpleNamespace(nbytes=n)  # noqa: E731
    cache.reference(("a",), lambda: big(60))
    cache.reference(("b",), lambda: big(60))  # both would be 120 > 100: the older goes
    assert list(cache.refs.items) == [("b",)]
    cache.reference(("c",), lambda: big(30))
    assert list(cache.refs.items) == [("b",), ("c",)] and sum(v.nbytes for v in cache.refs.items.values()) <= 100
    cache.reference(("d",), lambda: big(0))  # one on disk or streamed keeps no log-probs: it costs nothing to keep
    assert ("d",) in cache.refs.items and sum(v.nbytes for v in cache.refs.items.values()) <= 100
