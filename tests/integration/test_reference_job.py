"""The reference is its own job: a sweep without `method: none` gets one, it runs once, first, and every quantized
row reads its figures from disk without ever loading the float model. A real Redis, a real local Ray cluster (2
logical GPUs: two workers), the real CLI, a tiny model built here."""

from __future__ import annotations

import pytest

from tests.cli import qfarm, results
from tests.tiny import corpus_of, guanaco_rows, make_tiny_model

pytestmark = pytest.mark.integration


def test_a_sweep_without_none_runs_its_reference_once_first_and_no_variant_loads_the_float_model(
        cli_env, shared_data, tmp_path, store):
    data = guanaco_rows(shared_data, tmp_path, 120)
    model = make_tiny_model(tmp_path / "tiny", corpus_of(data), seed=3)
    spec = tmp_path / "ref.yaml"
    spec.write_text(f"""\
name: refjob
model: {model}
eval: {{perplexity: {{dataset: {data}, seq_len: 64, max_windows: 2}}, speed: null}}
jobs:
  - {{kind: quantize, matrix: {{method: [bnb-nf4, rtn, bnb-int8]}}, group_size: 32}}
""")
    shown = qfarm(cli_env, "validate", str(spec))
    assert shown.returncode == 0 and "4 jobs" in shown.stdout, shown.stdout + shown.stderr  # 3 rows + the reference
    out = qfarm(cli_env, "submit", str(spec), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {r["label"]: r for r in results(cli_env, "refjob")}
    assert set(rows) == {"none", "bnb-nf4", "rtn", "bnb-int8"}, set(rows)
    assert all(r["status"] == "succeeded" for r in rows.values()), {k: r["error"] for k, r in rows.items()}
    ref = rows.pop("none")
    # the reference ran once and first: every variant started after it finished (they need it)
    assert all(ref["finished_at"] <= r["started_at"] for r in rows.values())
    assert ref["ref_cache"] == "computed" and ref["kl_div"] == 0.0
    sweep = store.find_sweep("refjob")
    specs = {j.job.label: j.job for j in store.sweep_jobs(sweep.id)}
    assert all(specs[label].needs == (ref["job_id"],) for label in rows)
    for label, r in rows.items():  # read from disk (or this worker's memory): never computed again
        assert r["ref_cache"] in ("shared", "memory") and r["kl_div"] > 0, (label, r)
        assert r["ref_perplexity"] == pytest.approx(ref["perplexity"])
        # the float model never loaded for a row: on the other worker not at all; on the reference's own worker its
        # copy is still in the cache (kept on a CPU, parked on a GPU)
        assert r["base_during_job"] == ("kept" if r["worker"] == ref["worker"] else "not loaded"), (label, r)
    # the float model was loaded by the reference job alone, whatever worker ran the rest
    assert store.stats(sweep.id)["model_loads"] == 1 and len({r["worker"] for r in rows.values()}) == 2
