"""Comparing rows across sweeps: filters, sort, columns, deltas and the Pareto frontier. Pure logic."""

from __future__ import annotations

import pytest

from qfarm.errors import UsageError
from qfarm.results.compare import (
    compare,
    filter_rows,
    mark_pareto,
    parse_frontier,
    pick_columns,
    sort_rows,
    with_deltas,
)
from qfarm.results.rows import render, to_parquet


def r(job, method, size, ppl, decode, sweep="s1", status="succeeded", bits=4, **extra):
    return {"job_id": job, "sweep_id": sweep, "method": method, "bits": bits, "status": status, "size_mb": size,
            "perplexity": ppl, "decode_tokens_per_s": decode, "prefill_tokens_per_s": decode and decode * 10,
            "peak_mem_mb": size and size * 4, "label": method, "error": None, **extra}


ROWS = [
    r("a", "none", 500.0, 10.0, 14.0, bits=None),
    r("b", "gptq", 170.0, 11.0, 10.0),
    r("c", "rtn", 170.0, 13.0, 10.0),  # dominated by b: same size and speed, worse perplexity
    r("d", "bnb-nf4", 170.0, 12.0, 6.0),  # dominated by b
    r("e", "bnb-int8", 214.0, 10.2, 5.0),  # on the frontier: better perplexity than every smaller model
    dict(r("f", "awq", None, None, None, status="failed"), error="RuntimeError: boom"),
    r("g", "none", 400.0, 20.0, 7.0, sweep="s2", bits=None),
    r("h", "gptq", 150.0, 30.0, 14.0, sweep="s2"),
]


def test_pareto_marks_exactly_the_undominated_rows():
    marked = {x["job_id"]: x["pareto"] for x in mark_pareto(ROWS)}
    assert marked == {"a": True, "b": True, "c": False, "d": False, "e": True, "f": None, "g": False, "h": True}
    # g is beaten by b (smaller, better, faster) once both sweeps are compared; within its own sweep it is not
    assert {x["job_id"]: x["pareto"] for x in mark_pareto([x for x in ROWS if x["sweep_id"] == "s2"])}["g"] is True
    # other objectives: size and KL only
    two = mark_pareto([r("x", "m", 1.0, 1.0, 1.0, kl_div=0.5), r("y", "m", 2.0, 1.0, 1.0, kl_div=0.1),
                       r("z", "m", 2.0, 1.0, 1.0, kl_div=0.2)], ("size_mb", "kl_div"))
    assert [x["pareto"] for x in two] == [True, True, False]


def test_equal_rows_do_not_dominate_each_other():
    twins = mark_pareto([r("x", "m", 1.0, 2.0, 3.0), r("y", "m", 1.0, 2.0, 3.0)])
    assert [x["pareto"] for x in twins] == [True, True]


def test_deltas_are_against_each_sweeps_own_reference():
    rows = {x["job_id"]: x for x in with_deltas(ROWS)}
    assert rows["b"]["decode_speedup"] == pytest.approx(10 / 14) and rows["h"]["decode_speedup"] == pytest.approx(2.0)
    assert rows["h"]["mem_vs_ref"] == pytest.approx(150 / 400) and rows["f"]["decode_speedup"] is None
    alone = with_deltas([r("q", "gptq", 1.0, 1.0, 1.0)])  # no reference row in the sweep
    assert alone[0]["decode_speedup"] is None


@pytest.mark.parametrize("conditions,expected", [
    (["method=gptq"], ["b", "h"]),
    (["method=gptq|awq"], ["b", "f", "h"]),
    (["method!=none", "sweep_id=s1"], ["b", "c", "d", "e", "f"]),
    (["perplexity<11"], ["a", "e"]),
    (["size_mb>=214"], ["a", "e", "g"]),
    (["bits=null"], ["a", "g"]),
    (["status!=succeeded"], ["f"]),
])
def test_where(conditions, expected):
    assert [x["job_id"] for x in filter_rows(ROWS, conditions)] == expected


def test_bad_where_sort_columns_and_frontier_are_usage_errors_with_hints():
    with pytest.raises(UsageError, match=r"no column 'metod'. Did you mean 'method'\?"):
        filter_rows(ROWS, ["metod=gptq"])
    with pytest.raises(UsageError, match="write COLUMN=VALUE"):
        filter_rows(ROWS, ["gptq"])
    with pytest.raises(UsageError, match=r"--sort '-perplexty': no column 'perplexty'. Did you mean 'perplexity'\?"):
        sort_rows(ROWS, "-perplexty")
    with pytest.raises(UsageError, match="--columns: no column 'sise_mb'"):
        pick_columns(ROWS, "label,sise_mb")
    with pytest.raises(UsageError, match="'speed' is not an objective"):
        parse_frontier("size_mb,speed")
    with pytest.raises(UsageError, match="at least two"):
        parse_frontier("size_mb")


def test_sort_both_ways_with_missing_values_last():
    assert [x["job_id"] for x in sort_rows(ROWS, "perplexity")] == ["a", "e", "b", "d", "c", "g", "h", "f"]
    assert [x["job_id"] for x in sort_rows(ROWS, "-perplexity")] == ["h", "g", "c", "d", "b", "e", "a", "f"]


def test_compare_filters_before_the_frontier_and_every_format_shows_the_failed_reason(tmp_path):
    data = compare(ROWS, ["sweep_id=s1"], "-decode_tokens_per_s")
    assert [x["job_id"] for x in data] == ["a", "b", "c", "d", "e", "f"]
    assert data[0]["pareto"] is True  # within s1 alone
    md = render(data, "md")
    assert "| ★ |" in md and "RuntimeError: boom" in md
    assert "RuntimeError: boom" in render(data, "csv") and '"error": "RuntimeError: boom"' in render(data, "json")
    cut = render(data, "csv", ["job_id", "pareto", "perplexity"]).splitlines()
    assert cut[0] == "job_id,pareto,perplexity" and cut[1] == "a,True,10.0"

    import pyarrow.parquet as pq

    to_parquet(data + [dict(data[0], answers=[{"prompt": "p", "answer": "x"}], job_id="z")], str(tmp_path / "r.parquet"))
    table = pq.read_table(tmp_path / "r.parquet")
    assert table.num_rows == 7 and table.column("perplexity").to_pylist()[:2] == [10.0, 11.0]
    assert table.column("answers").to_pylist()[-1] == '[{"prompt": "p", "answer": "x"}]'


def test_sizes_within_a_tenth_of_a_percent_tie_so_the_better_perplexity_wins():
    # two 4-bit artifacts differ by a few KB of metadata (recipe.yaml): that must not put the worse one on the front
    rows = mark_pareto([r("gptq", "gptq", 155.90, 54.0, 8.0), r("rtn", "rtn", 155.88, 100.0, 8.0)])
    assert [x["pareto"] for x in rows] == [True, False]
    rows = mark_pareto([r("gptq", "gptq", 155.90, 54.0, 8.0), r("rtn", "rtn", 150.0, 100.0, 8.0)])
    assert [x["pareto"] for x in rows] == [True, True]  # 4% smaller is a real trade-off


def test_the_default_frontier_leaves_speed_out_where_no_row_measured_one_or_runtimes_differ():
    from qfarm.results.compare import DEFAULT_FRONTIER, frontier_for

    unmeasured = [{"status": "succeeded", "runtime": "llama.cpp"}, {"status": "succeeded", "runtime": "transformers-bnb"}]
    assert frontier_for(unmeasured, DEFAULT_FRONTIER, chosen=False) == (("size_mb", "perplexity"), None)  # no note
    one = [{"status": "succeeded", "runtime": "llama.cpp", "decode_tokens_per_s": 9.0}, *unmeasured]
    assert frontier_for(one, DEFAULT_FRONTIER, chosen=False) == (DEFAULT_FRONTIER, None)
    two = one + [{"status": "succeeded", "runtime": "transformers-bnb", "decode_tokens_per_s": 3.0}]
    kept, note = frontier_for(two, DEFAULT_FRONTIER, chosen=False)
    assert kept == ("size_mb", "perplexity") and "different runtimes (llama.cpp, transformers-bnb)" in note
    assert frontier_for(two, DEFAULT_FRONTIER, chosen=True) == (DEFAULT_FRONTIER, None)
