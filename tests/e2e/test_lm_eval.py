"""Downstream tasks through lm-evaluation-harness, through the CLI as a user runs them, on the bundled SmolLM2:
a local multiple-choice task and a local generate-until task (lm-eval YAMLs over ../shared/data), on the
reference and a GGUF row (llama.cpp, through qfarm's lm-eval adapter; transformers rows other than the reference
go through the same HFLM wrapper as it). The reference's
figures must be the very ones `lm_eval` itself prints for the same model folder and tasks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import qfarm, results
from tests.lmtasks import write_tasks

pytestmark = pytest.mark.e2e

TASKS = ("qfarm_wikinext", "qfarm_nextword")


def lm_eval_cli(folder: Path, tasks: Path, out: Path) -> dict:
    """lm-eval's own CLI on a model folder: {task: its results entry}."""
    run = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                          f"pretrained={folder},dtype=float32", "--device", "cpu", "--batch_size", "1",
                          "--tasks", ",".join(TASKS), "--include_path", str(tasks), "--limit", "40",
                          "--output_path", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(out.rglob("results_*.json"))
    assert files, f"lm_eval wrote no results under {out}: {run.stdout[-2000:]}"
    return json.loads(files[-1].read_text())["results"]


def test_lm_eval_tasks_on_every_row_match_lm_eval_itself(cli_env, model_root, shared_data, tmp_path):
    env = dict(cli_env, QFARM_OUTPUT_ROOT=str(model_root))
    tasks = write_tasks(tmp_path / "tasks", mc_docs=60, gen_docs=40)
    spec = tmp_path / "tasks.yaml"
    spec.write_text(f"""\
name: e2e-lm-eval
model: bundled:smollm2-135m
eval:
  perplexity: {{dataset: {shared_data / 'wikitext2' / 'wiki.test.raw'}, seq_len: 128, max_windows: 2}}
  speed: null
  task_paths: [tasks]
  tasks:
    - {{name: qfarm_wikinext, limit: 40}}
    - {{name: qfarm_nextword}}
jobs:
  - {{kind: quantize, method: none}}
  - {{kind: quantize, method: gguf, gguf_type: Q8_0}}
""")
    run = qfarm(env, "submit", str(spec), "--wait")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "qfarm_wikinext acc" in run.stdout and "qfarm_wikinext rec." in run.stdout  # in the table printed
    rows = {r["method"]: r for r in results(env, "e2e-lm-eval")}
    assert all(r["status"] == "succeeded" for r in rows.values()), {m: r["error"] for m, r in rows.items()}
    ref, gguf = rows["none"], rows["gguf"]
    for r in rows.values():
        assert r["tasks"]["qfarm_wikinext"]["column"] == "qfarm_wikinext_acc"
        assert r["tasks"]["qfarm_wikinext"]["samples"] == 40 and r["tasks"]["qfarm_nextword"]["samples"] == 40
        assert 0 <= r["qfarm_wikinext_acc"] <= 1 and 0 < r["qfarm_wikinext_acc_se"] < 0.1
        assert r["qfarm_wikinext_acc_norm"] is not None and r["qfarm_nextword_exact_match"] is not None
    assert gguf["runtime"] == "llama.cpp" and ref["runtime"] == "transformers-dense"
    assert ref["decode_tokens_per_s"] is None and gguf["decode_tokens_per_s"] is None  # speed: null turns it off
    assert ref["qfarm_wikinext_recovery"] == pytest.approx(1.0)
    # a 135M model picks the next sentence of a WikiText article above chance (0.25, by 2 se) and often
    # writes the next word of a sentence ...
    assert ref["qfarm_wikinext_acc"] > 0.25 + 2 * ref["qfarm_wikinext_acc_se"]
    assert ref["qfarm_nextword_exact_match"] > 0.1
    # ... and its 8-bit GGUF in llama.cpp about as well: within 3 standard errors of the reference
    assert abs(gguf["qfarm_wikinext_acc"] - ref["qfarm_wikinext_acc"]) <= 3 * ref["qfarm_wikinext_acc_se"], gguf
    assert gguf["qfarm_wikinext_recovery"] == pytest.approx(gguf["qfarm_wikinext_acc"] / ref["qfarm_wikinext_acc"])

    # the reference row's figures are lm-eval's own, run by lm-eval on the same float folder
    folder = next(p.parent for p in model_root.glob("_models/*/QFARM_SOURCE.txt"))
    own = lm_eval_cli(folder, tasks, tmp_path / "lm_eval_out")
    assert ref["qfarm_wikinext_acc"] == pytest.approx(own["qfarm_wikinext"]["acc,none"], abs=1e-9)
    assert ref["qfarm_wikinext_acc_norm"] == pytest.approx(own["qfarm_wikinext"]["acc_norm,none"], abs=1e-9)
    assert ref["qfarm_wikinext_acc_se"] == pytest.approx(own["qfarm_wikinext"]["acc_stderr,none"], rel=1e-6)
    assert ref["qfarm_nextword_exact_match"] == pytest.approx(own["qfarm_nextword"]["exact_match,first-word"], abs=1e-9)
