"""Standard errors on quality figures, and rows within the noise treated as ties (frontier, sort, tables)."""

from __future__ import annotations

import math

import pytest
import torch

from qfarm.results.compare import mark_pareto, noise_pairs, sort_rows
from qfarm.results.rows import render


class Fixed:
    """A runner whose log-probs are given (pure logic: the harness's arithmetic, not a model)."""

    def __init__(self, logprobs: list):
        self.lps, self.i = logprobs, 0

    def logprobs(self, window):
        out = self.lps[self.i]
        self.i += 1
        return out


def logprobs(seed: int, windows: int = 3, length: int = 9, vocab: int = 11) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.log_softmax(torch.randn(length - 1, vocab, generator=g) * 2, -1) for _ in range(windows)]


def test_quality_figures_carry_their_standard_errors():
    from workers.evaluate.harness import quality, reference_for

    wins = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(0))
    ref_lp, var_lp = logprobs(1), logprobs(2)
    ref = reference_for(Fixed(ref_lp), wins, lambda line: None)
    same = quality(Fixed(ref_lp), wins, ref, lambda line: None)
    assert same["ppl_delta_pct"] == 0 and same["ppl_delta_pct_se"] == 0 and same["kl_div_se"] == 0
    assert same["top1_agree"] == 1 and same["top1_agree_se"] == 0

    q = quality(Fixed(var_lp), wins, ref, lambda line: None)
    n = 3 * 8
    nll = torch.cat([-lp.gather(-1, w[1:].unsqueeze(-1)).squeeze(-1) for lp, w in zip(var_lp, wins)]).double()
    ref_nll = torch.cat([-lp.gather(-1, w[1:].unsqueeze(-1)).squeeze(-1) for lp, w in zip(ref_lp, wins)]).double()
    assert q["perplexity"] == pytest.approx(math.exp(nll.mean().item()))
    assert q["perplexity_se"] == pytest.approx(q["perplexity"] * nll.std().item() / math.sqrt(n))
    d = nll - ref_nll  # paired: the same positions
    assert q["ppl_delta_pct"] == pytest.approx((math.exp(d.mean().item()) - 1) * 100)
    assert q["ppl_delta_pct_se"] == pytest.approx(100 * math.exp(d.mean().item()) * d.std().item() / math.sqrt(n))
    p = q["top1_agree"]
    assert q["top1_agree_se"] == pytest.approx(math.sqrt(p * (1 - p) / n)) and q["kl_div_se"] > 0


def row(job_id, size, ppl, se, **kw):
    return {"job_id": job_id, "label": job_id, "status": "succeeded", "size_mb": size, "perplexity": ppl,
            "perplexity_se": se, "decode_tokens_per_s": 10.0, **kw}


def test_a_difference_within_two_standard_errors_is_a_tie_on_the_frontier():
    close = [row("a", 100, 10.0, 0.3), row("b", 100, 10.4, 0.3)]  # 0.4 apart, 2 se of the difference = 0.85
    assert [r["pareto"] for r in mark_pareto(close)] == [True, True]
    far = [row("a", 100, 10.0, 0.1), row("b", 100, 10.4, 0.1)]  # 0.4 apart, 2 se = 0.28: a real difference
    assert [r["pareto"] for r in mark_pareto(far)] == [True, False]
    unknown = [row("a", 100, 10.0, None), row("b", 100, 10.4, None)]  # no standard errors: as before
    assert [r["pareto"] for r in mark_pareto(unknown)] == [True, False]


def test_sort_says_which_neighbours_are_within_the_noise_and_tables_show_plus_minus():
    rows = sort_rows([row("c", 90, 12.0, 0.2), row("a", 100, 10.0, 0.3), row("b", 100, 10.4, 0.3)], "perplexity")
    assert [(r["job_id"], r["ties"]) for r in rows] == [("a", "≈ b"), ("b", "≈ a"), ("c", None)]
    assert [(a["job_id"], b["job_id"]) for a, b in noise_pairs(rows, "perplexity")] == [("a", "b")]
    md = render(rows, "md")
    assert "| 10.000 ±0.3 |" in md and "| within noise |" in md.splitlines()[0] and "| ≈ b |" in md


def test_perplexity_is_ranked_by_its_paired_standard_error_against_the_reference():
    # on the same windows two variants' perplexities are far more comparable than their own spreads say
    ref = {"ref_perplexity": 15.0}
    a = row("a", 100, 19.0, 0.6, ppl_delta_pct=26.7, ppl_delta_pct_se=1.1, **ref)
    b = row("b", 100, 19.9, 0.6, ppl_delta_pct=32.7, ppl_delta_pct_se=1.1, **ref)
    assert [r["pareto"] for r in mark_pareto([a, b])] == [True, False]  # 0.9 apart > 2 * hypot(.165, .165)
    assert [r["pareto"] for r in mark_pareto([dict(a, ppl_delta_pct_se=None), dict(b, ppl_delta_pct_se=None)])] \
        == [True, True]  # own spreads only (0.6 each): within the noise
