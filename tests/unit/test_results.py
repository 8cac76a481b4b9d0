"""Rows and formats, built from job records (plain data: no services)."""

from __future__ import annotations

import csv
import io
import json

from qfarm.farm.store import JobRecord
from qfarm.results.rows import COLUMNS, render, rows


def record(job_id, status, method, result=None, error=None):
    spec = {"kind": "quantize", "label": method, "options": {"method": method, "bits": 4 if method != "none" else None}}
    return JobRecord(id=job_id, status=status, spec=spec, attempts=1, result=result, error=error,
                     started_at=100.0, finished_at=112.5)


def sample():
    return rows([
        record("j1", "succeeded", "none", {"size_mb": 500.0, "perplexity": 10.0, "kl_div": 0.0, "device": "cpu",
                                           "answers": [{"prompt": "Hi?", "answer": "Hello | there"}]}),
        record("j2", "failed", "bnb-nf4", error="RuntimeError: out of memory"),
    ])


def test_every_row_has_the_contract_columns():
    data = sample()
    for r in data:
        assert set(COLUMNS) <= set(r)
    assert data[0]["duration_s"] == 12.5
    assert data[1]["status"] == "failed" and data[1]["error"] == "RuntimeError: out of memory"
    assert data[1]["perplexity"] is None  # missing measurements are null, not absent


def test_json_and_csv_round_trip():
    data = sample()
    parsed = json.loads(render(data, "json"))
    assert [r["job_id"] for r in parsed] == ["j1", "j2"]
    assert parsed[0]["answers"][0]["answer"] == "Hello | there"
    table = list(csv.DictReader(io.StringIO(render(data, "csv"))))
    assert table[0]["perplexity"] == "10.0" and table[1]["error"] == "RuntimeError: out of memory"
    assert json.loads(table[0]["answers"])[0]["prompt"] == "Hi?"


def test_markdown_shows_failed_rows_with_reason():
    md = render(sample(), "md")
    lines = md.strip().splitlines()
    assert lines[0].startswith("| job | method | bits | status | size MB")
    assert "| j2 | bnb-nf4 | 4 | failed |" in lines[3] and lines[3].endswith("| RuntimeError: out of memory |")


def test_status_of_a_large_sweep_shows_unfinished_and_failed_first():
    from qfarm.results.progress import shown

    statuses = ["succeeded"] * 100 + ["failed", "running", "queued"]
    jobs = [JobRecord(id=f"j{i}", status=s, spec={}) for i, s in enumerate(statuses)]
    picked = shown(jobs, 10)
    assert [j.id for j in picked[-3:]] == ["j100", "j101", "j102"]  # kept, in sweep order
    assert [j.status for j in picked[:7]] == ["succeeded"] * 7
    assert shown(jobs, None) == jobs and shown(jobs[:5], 10) == jobs[:5]


def test_option_columns_are_named_as_in_the_spec_and_cannot_clash_with_measured_ones(tmp_path, monkeypatch):
    from qfarm.errors import SpecError
    from qfarm.results.columns import option_clashes
    from qfarm.sweep import methods
    from qfarm.sweep.expand import load_sweep

    rec = JobRecord(id="j1", status="succeeded", spec={"kind": "quantize", "options": {"method": "gguf", "gguf_type": "Q8_0"},
                                                       "bits": 8}, result={"size_mb": 1.0})
    (r,) = rows([rec])
    assert r["gguf_type"] == "Q8_0" and r["bits"] == 8 and "opt_gguf_type" not in r
    every_option = {f for k in methods.KINDS.values()
                    for m in ([k.options] if k.options else [m.options for m in k.methods.values()]) for f in m.model_fields}
    assert option_clashes(every_option) == []  # the registry as shipped
    assert option_clashes(["perplexity", "group_size", "r"]) == ["perplexity"]

    class Clashing(methods.RtnOptions):
        perplexity: float = 1.0

    monkeypatch.setitem(methods.METHODS, "rtn", methods.Method("rtn", Clashing, "x", "workers.quantize.llmc:LLMCompressor"))
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nmodel: bundled:smollm2-135m\neval: {speed: null, perplexity: null}\n"
                    "jobs:\n  - {kind: quantize, method: rtn, group_size: 32}\n")
    try:
        load_sweep(spec)
    except SpecError as e:
        assert "option 'perplexity' has the name of a measured result column (quality)" in str(e)
    else:
        raise AssertionError("a clashing option name was accepted")
