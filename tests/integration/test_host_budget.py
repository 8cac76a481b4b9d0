"""A worker whose host-RAM budget is smaller than two float copies (QFARM_HOST_MEM_GB): the quantized rows never load
the float model (the reference job wrote its log-probs), a train job that computes the reference's task loss itself
gives the cached base back before it builds its own model, and the sweep completes with the numbers of an
unbudgeted run. A real local Ray head of its own (the budget is the workers' environment), the real CLI."""

from __future__ import annotations

import os

import pytest

from tests.cli import qfarm, results
from tests.tiny import corpus_of, guanaco_rows, make_tiny_model

pytestmark = pytest.mark.integration


def test_a_sweep_on_one_worker_under_a_host_budget_drops_the_base_and_keeps_its_numbers(cli_env, shared_data,
                                                                                           tmp_path, store):
    from qfarm.farm.cluster import start_local_head, stop_local_head

    data = guanaco_rows(shared_data, tmp_path, 120)
    model = make_tiny_model(tmp_path / "tiny", corpus_of(data), seed=2)
    spec = tmp_path / "budget.yaml"
    spec.write_text(f"""\
name: budget
model: {model}
eval: {{perplexity: {{dataset: {data}, seq_len: 64, max_windows: 2}}, speed: null}}
resources: {{gpus: 2}}
stages:
  - {{name: q, kind: quantize, matrix: {{method: [none, bnb-nf4, rtn]}}, group_size: 32}}
  - {{name: ft, kind: train, method: lora, dataset: {{path: {data}, eval_samples: 4}}, r: 4, max_steps: 2, seq_len: 64}}
""")
    # the plan of a job on a CPU worker is ~1.5 GB (the process alone): any budget below it is exceeded
    old = os.environ.get("QFARM_HOST_MEM_GB")
    os.environ["QFARM_HOST_MEM_GB"] = "0.5"
    try:
        temp = f"/tmp/qfarm-test-budget-{os.getpid()}"
        head = start_local_head(temp_dir=temp, log_path=str(tmp_path / "head.log"), num_gpus=2, num_cpus=4)
    finally:
        os.environ.pop("QFARM_HOST_MEM_GB") if old is None else os.environ.__setitem__("QFARM_HOST_MEM_GB", old)
    try:
        out = qfarm(dict(cli_env, QFARM_RAY_ADDRESS=head.address), "submit", str(spec), "--wait")
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    finally:
        stop_local_head(head.pid)
    rows = {r["label"]: r for r in results(cli_env, "budget")}
    assert all(r["status"] == "succeeded" for r in rows.values()), {k: r["error"] for k, r in rows.items()}
    assert len({r["worker"] for r in rows.values()}) == 1  # one worker (a job of 2 GPUs on 2): one after another
    # the quantized rows read the reference job's log-probs: the float model is not loaded for them, and a copy an
    # earlier job left in the cache is dropped; the train job needs the float model for the reference's task loss,
    # then drops it (over the budget) before loading its own trainable copy
    during = {label: r["base_during_job"] for label, r in rows.items()}
    assert during.pop("none") is None and during.pop("lora") == "dropped", during
    assert set(during.values()) <= {"not loaded", "dropped"} and "not loaded" in during.values(), during
    sweep = store.find_sweep("budget")
    assert store.stats(sweep.id)["model_loads"] >= 2  # dropped, so loaded again by the next job that needs it

    # the same sweep without a budget (the session's head): the cached base kept, the same numbers
    env = dict(cli_env, QFARM_NAMESPACE=cli_env["QFARM_NAMESPACE"] + "-free", QFARM_OUTPUT_ROOT=str(tmp_path / "free"))
    out = qfarm(env, "submit", str(spec), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    free = {r["label"]: r for r in results(env, "budget")}
    for label, r in rows.items():
        assert free[label]["base_during_job"] in ((None,) if label == "none" else ("kept", "not loaded"))
        for col in ("perplexity", "kl_div", "top1_agree"):
            assert r[col] == pytest.approx(free[label][col], rel=1e-6, abs=1e-9), (label, col)
    store.r.delete(*store.r.keys(env["QFARM_NAMESPACE"] + ":*") or ["-"])
