"""Shared GPTQ calibration through the CLI (issue 20), on a tiny random Llama: a grid of GPTQ jobs with
``calibration.share`` runs one ``calibrate`` job, each GPTQ job starts after it and solves from its capture; a GPTQ
job without ``share`` calibrates itself; a resubmit reuses every row, capture included."""

from __future__ import annotations

import pytest

from tests.cli import qfarm, results, submitted_id
from tests.tiny import corpus_of, guanaco_rows, make_tiny_model

pytestmark = pytest.mark.e2e


def test_a_gptq_grid_with_share_captures_once_and_every_job_solves_from_it(cli_env, shared_data, tmp_path, store):
    data = guanaco_rows(shared_data, tmp_path, 160)
    model = make_tiny_model(tmp_path / "tiny", corpus_of(data), seed=7)
    spec = tmp_path / "share.yaml"
    calibration = f"{{dataset: {data}, samples: 8, seq_len: 32, share: %s}}"
    spec.write_text(f"""\
name: share
model: {model}
eval: {{perplexity: {{dataset: {data}, seq_len: 64, max_windows: 2}}, speed: null}}
jobs:
  - {{kind: quantize, method: none}}
  - kind: quantize
    method: gptq
    calibration: {calibration % 'true'}
    matrix: {{bits: [4, 8], group_size: [32, -1]}}
  - {{kind: quantize, method: gptq, bits: 4, group_size: 32, calibration: {calibration % 'false'}}}
""")
    shown = qfarm(cli_env, "validate", str(spec))
    assert shown.returncode == 0 and "calibrate" in shown.stdout, shown.stdout + shown.stderr
    out = qfarm(cli_env, "submit", str(spec), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep = submitted_id(out.stdout)
    rows = results(cli_env, "share")
    assert all(r["status"] == "succeeded" for r in rows), [(r["label"], r["error"]) for r in rows]
    (capture,) = [r for r in rows if r["kind"] == "calibrate"]
    shared = [r for r in rows if r["method"] == "gptq" and r["calib_source"] == "shared capture"]
    (own,) = [r for r in rows if r["method"] == "gptq" and r["calib_source"] != "shared capture"]
    assert len(shared) == 4 and {r["calib_capture"] for r in shared} == {capture["job_id"]}
    assert capture["capture_layers"] == 2 and capture["calib_samples"] == 8 and capture["size_mb"] > 0
    assert own["calib_capture"] is None and own["calib_samples"] == 8
    jobs = {j.id: j for j in store.sweep_jobs(sweep)}
    done = jobs[capture["job_id"]].finished_at
    assert all(jobs[r["job_id"]].started_at >= done for r in shared)  # each started once the capture was made
    by = {(r["bits"], r["group_size"]): r for r in shared}
    assert by[(8, 32)]["kl_div"] < by[(4, 32)]["kl_div"]  # quality orders as bits do
    assert by[(4, 32)]["kl_div"] > 0 and by[(4, -1)]["kl_div"] > 0  # (8-bit KL is within float noise of 0 here)
    # the same 4-bit g32 point, shared or not: the two calibrations differ only past the first layer's inputs
    assert by[(4, 32)]["kl_div"] == pytest.approx(own["kl_div"], rel=0.5)

    # the capture's row sits in the table and the report like any other (no quality figures of its own)
    table = qfarm(cli_env, "results", "share")
    assert table.returncode == 0 and "calibrate" in table.stdout, table.stderr
    report = qfarm(cli_env, "report", "share", "--output", str(tmp_path / "share.html"))
    assert report.returncode == 0 and "calibrate" in (tmp_path / "share.html").read_text(), report.stderr

    again = qfarm(cli_env, "submit", str(spec), "--wait")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert len(store.sweep_jobs(sweep)) == len(rows) == 7  # reused: no job added, none run again
    assert {j.attempts for j in store.sweep_jobs(sweep)} == {1}
