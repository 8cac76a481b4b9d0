"""A long job killed midway resumes from its last checkpoint when retried (issue 20): a LoRA run on a tiny random
Llama, its worker killed with -9 past its second checkpoint, finishes on the retry from that step, with the loss
curve of an uninterrupted run of the same job."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.cli import qfarm, results
from tests.tiny import corpus_of, guanaco_rows, make_tiny_model

pytestmark = pytest.mark.e2e


def test_a_killed_train_job_resumes_from_its_checkpoint_with_the_uninterrupted_loss_curve(cli_env, shared_data,
                                                                                           tmp_path, store):
    data = guanaco_rows(shared_data, tmp_path, 200)
    model = make_tiny_model(tmp_path / "tiny", corpus_of(data), seed=3)
    spec = tmp_path / "resume.yaml"
    spec.write_text(f"""\
name: resume
model: {model}
eval: {{perplexity: {{dataset: {data}, seq_len: 64, max_windows: 2}}, speed: null}}
max_attempts: 2
jobs:
  - {{kind: train, method: lora, dataset: {{path: {data}, eval_samples: 4}}, r: 4, max_steps: 40, save_steps: 5,
     batch_size: 4, seq_len: 64, learning_rate: 0.01}}
""")
    out = qfarm(cli_env, "submit", str(spec))
    assert out.returncode == 0, out.stdout + out.stderr
    sweep = store.find_sweep("resume").id
    deadline, victim = time.time() + 600, None
    while time.time() < deadline and victim is None:  # past step 12: two checkpoints (5, 10) are on disk
        job = store.sweep_jobs(sweep)[0]
        step = re.search(r"training step (\d+)/", job.progress or "")
        if job.status == "running" and job.pid and step and int(step.group(1)) >= 12:
            victim = job
        elif job.status != "queued" and job.status != "running":
            pytest.fail(f"the job ended before it could be killed: {job.status} {job.error}")
        time.sleep(0.05)
    assert victim is not None, "the job never reached step 12"
    os.kill(victim.pid, signal.SIGKILL)
    while time.time() < deadline and store.sweep_jobs(sweep)[0].status in ("queued", "running"):
        time.sleep(0.5)
    (row,) = results(cli_env, "resume")
    assert row["status"] == "succeeded" and row["attempts"] == 2, row.get("error")
    assert row["resumed_from"] in (10, 15, 20, 25, 30, 35)
    steps = [s for s, _ in row["loss_curve"]]
    assert steps == list(range(1, 41))  # the first attempt's logged steps, then the retry's, none twice

    # the same job run uninterrupted, in a namespace and output root of its own
    env = dict(cli_env, QFARM_NAMESPACE=cli_env["QFARM_NAMESPACE"] + "-whole",
               QFARM_OUTPUT_ROOT=str(tmp_path / "whole"))
    out = qfarm(env, "submit", str(spec), "--wait")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (whole,) = results(env, "resume")
    assert whole["resumed_from"] is None and whole["attempts"] == 1 and whole["job_id"] == row["job_id"]
    for (_, a), (_, b) in zip(row["loss_curve"], whole["loss_curve"]):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-4)
    assert row["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-3)
    assert row["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-3)
    store.r.delete(*store.r.keys(env["QFARM_NAMESPACE"] + ":*") or ["-"])
