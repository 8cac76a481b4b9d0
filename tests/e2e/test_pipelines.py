"""Pipelines through the CLI: train (LoRA/QLoRA) -> merge -> quantize, on a tiny model for the DAG and the merge
arithmetic, and on the real SmolLM2 with real data for a short QLoRA run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.cli import qfarm, results, wandb_runs
from tests.tiny import corpus_of, guanaco_rows, make_tiny_model

pytestmark = pytest.mark.e2e


def by_stage(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["stage"], []).append(r)
    return out


def test_tiny_pipeline_train_merge_quantize_with_a_failing_branch(cli_env, shared_data, tmp_path):
    data = guanaco_rows(shared_data, tmp_path, 200)
    tiny = make_tiny_model(tmp_path / "tiny", corpus_of(data))
    (Path(tiny) / "README.md").write_text("---\nlicense: mit\n---\n# a tiny model\n")  # its license: carried over
    spec = tmp_path / "tiny-pipe.yaml"
    spec.write_text(f"""\
name: tiny-pipe
model: {tiny}
eval:
  perplexity: {{dataset: {data}, seq_len: 64, max_windows: 2}}
  speed: null
resources: {{gpus: 1}}
stages:
  - name: ft
    kind: train
    method: qlora
    dataset: {{path: {data}, eval_samples: 8}}
    matrix: {{r: [4]}}
    max_steps: 8
    seq_len: 64
    learning_rate: 0.01
  - {{name: broken, kind: train, method: lora, dataset: {{path: {data}, format: "{{no_such_field}}"}}, max_steps: 2}}
  - {{name: merge, kind: merge, from: ft, onto: [base, dequantized]}}
  - {{name: merge-broken, kind: merge, from: broken}}
  - {{name: deploy, kind: quantize, from: merge, method: rtn, bits: 8, group_size: 32}}
""")
    out = qfarm(cli_env, "submit", str(spec), "--wait")
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]  # the broken branch failed
    rows = results(cli_env, "tiny-pipe")
    stages = by_stage(rows)
    by_id = {r["job_id"]: r for r in rows}

    (ft,) = stages["ft"]
    assert ft["status"] == "succeeded", ft["error"]
    # r=4 on q/k/v/o (64->64) and gate/up (64->128), down (128->64), in 2 blocks: 2 * (4*4*128 + 3*4*192)
    assert ft["trainable_params"] == 2 * (4 * 4 * 128 + 3 * 4 * 192)
    assert ft["train_steps"] == 8 and len(ft["loss_curve"]) == 8 and ft["step_s"] > 0
    assert ft["train_loss"] < ft["train_loss_first"]
    assert ft["task_loss"] < ft["ref_task_loss"]  # it learned something that holds on held-out examples
    # where it started: the NF4 model without the adapter, not the float base
    assert ft["task_loss"] < ft["base_task_loss"] != ft["ref_task_loss"]
    adapter = Path(ft["artifact"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4

    merges = {r["onto"]: r for r in stages["merge"]}
    assert sorted(merges) == ["base", "dequantized"] and all(r["status"] == "succeeded" for r in merges.values())
    # onto the dequantized 4-bit base the merge reproduces the trained model; onto the float base it does not
    assert merges["dequantized"]["merge_max_abs_diff"] < 1e-3
    assert merges["base"]["merge_max_abs_diff"] > 10 * merges["dequantized"]["merge_max_abs_diff"]
    assert merges["dequantized"]["task_loss"] == pytest.approx(ft["task_loss"], abs=1e-3)
    assert all(Path(r["artifact"], "config.json").is_file() for r in merges.values())

    # each merged model is the reference of the rows quantized from it: its reference job (made: the stage has no
    # none) ran from that merge, and the row was measured against it
    refs = {r["parent"]: r for r in stages["deploy"] if r["method"] == "none"}
    deploy = [r for r in stages["deploy"] if r["method"] != "none"]
    assert len(deploy) == 2 and all(r["status"] == "succeeded" for r in stages["deploy"])
    for r in deploy:
        parent = by_id[r["parent"]]
        assert r["ref_perplexity"] == pytest.approx(refs[r["parent"]]["perplexity"]) and refs[r["parent"]]["kl_div"] == 0
        assert parent["stage"] == "merge" and r["lineage"] == f"{ft['label']} → {parent['label']}"
        assert r["ref_task_loss"] == pytest.approx(parent["task_loss"], rel=1e-4)  # compared with what it quantized
        assert math.isfinite(r["task_loss"]) and r["started_at"] >= parent["finished_at"]

    (broken,), (skipped,) = stages["broken"], stages["merge-broken"]
    assert broken["status"] == "failed" and "no_such_field" in broken["error"]
    assert skipped["status"] == "skipped" and "failed" in skipped["error"]

    table = qfarm(cli_env, "results", "tiny-pipe", "--format", "md").stdout
    header = table.splitlines()[0]
    assert all(h in header for h in ("| stage |", "| from |", "| train loss |", "| task loss |", "| merge Δmax |"))
    assert "| skipped |" in table
    report = qfarm(cli_env, "report", "tiny-pipe", "-o", str(tmp_path / "report.html"))
    assert report.returncode == 0, report.stderr
    assert "Training loss" in (tmp_path / "report.html").read_text()  # the train job's loss curve is plotted

    # every artifact folder carries a model card the hub's own parser reads: license from the source's card,
    # what was done, the row's figures
    from huggingface_hub import ModelCard

    made = [r for r in rows if r["status"] == "succeeded" and r["artifact"]]  # the references save nothing
    assert len(made) == 5 and all(r["model_card"] == str(Path(r["artifact"], "README.md")) for r in made)
    cards = {r["job_id"]: ModelCard.load(r["model_card"]) for r in made}
    for r in made:
        meta = cards[r["job_id"]].data.to_dict()
        assert meta["license"] == "mit" and meta["qfarm"]["job_id"] == r["job_id"] and "qfarm" in meta["tags"]
        assert meta["qfarm"]["versions"]["torch"] == r["versions"]["torch"]
        assert f"{r['perplexity']:.3f}" in cards[r["job_id"]].text
    assert cards[ft["job_id"]].data.library_name == "peft" and cards[ft["job_id"]].data.training["r"] == 4
    for r in deploy:
        meta = cards[r["job_id"]].data.to_dict()
        assert meta["quantization"] == {"method": "rtn", "bits": 8, "group_size": 32}
        assert f"from {r['lineage']}" in cards[r["job_id"]].text

    # into MLflow: the loss curve as a metric history, the pipeline as parent and child runs
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sent = qfarm(cli_env, "results", "tiny-pipe", "--to", "mlflow", "--tracking-uri", uri)
    assert sent.returncode == 0 and "9 run(s) created" in sent.stdout, sent.stdout + sent.stderr
    c = MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in c.search_experiments() if e.name.startswith("tiny-pipe-")]
    runs = {r.data.tags["qfarm.job_id"]: r for r in c.search_runs([experiment.experiment_id])}
    history = c.get_metric_history(runs[ft["job_id"]].info.run_id, "train_loss_curve")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(step, pytest.approx(loss)) for step, loss in ft["loss_curve"]]
    for r in rows:
        parent = r["parent"]
        assert runs[r["job_id"]].data.tags.get("mlflow.parentRunId") == (runs[parent].info.run_id if parent else None)
    assert runs[ft["job_id"]].data.params["r"] == "4" and runs[ft["job_id"]].data.params["method"] == "qlora"
    assert runs[deploy[0]["job_id"]].data.metrics["perplexity"] == pytest.approx(deploy[0]["perplexity"])
    assert runs[skipped["job_id"]].info.status == "KILLED" and runs[broken["job_id"]].info.status == "FAILED"
    assert runs[ft["job_id"]].data.tags["qfarm.artifact"] == ft["artifact"]  # the path, not a copy
    assert not c.list_artifacts(runs[ft["job_id"]].info.run_id)

    # and W&B, offline: the runs' own files, read back
    wb = qfarm(cli_env, "results", "tiny-pipe", "--to", "wandb", "--experiment", "tiny")
    assert wb.returncode == 0 and "wrote 9 W&B run(s) (offline)" in wb.stdout, wb.stdout + wb.stderr
    wruns = wandb_runs(Path(cli_env["QFARM_OUTPUT_ROOT"]) / "wandb")
    assert set(wruns) == set(by_id)
    w = wruns[ft["job_id"]]
    assert w["name"] == ft["label"] and w["job_type"] == "train" and w["project"] == "tiny" and w["exit_code"] == 0
    assert w["group"] == ft["sweep_id"] and w["config"]["r"] == "4"
    assert [(h["_step"], h["train_loss_curve"]) for h in w["history"]] == [(s_, pytest.approx(l_)) for s_, l_ in
                                                                          ft["loss_curve"]]
    assert w["summary"]["task_loss"] == pytest.approx(ft["task_loss"])
    assert wruns[deploy[0]["job_id"]]["config"]["parent_job"] == deploy[0]["parent"]
    assert wruns[broken["job_id"]]["exit_code"] == 1 and "no_such_field" in wruns[broken["job_id"]]["notes"]


def test_smollm2_qlora_on_guanaco_then_merge(cli_env, model_root, shared_data, tmp_path):
    env = dict(cli_env, QFARM_OUTPUT_ROOT=str(model_root))
    spec = tmp_path / "qlora.yaml"
    spec.write_text(f"""\
name: smollm2-qlora
model: bundled:smollm2-135m
eval:
  perplexity: {{dataset: bundled:python-docs, seq_len: 128, max_windows: 2}}
  speed: null
resources: {{gpus: 1}}
stages:
  - name: finetune
    kind: train
    method: qlora
    dataset: {{path: {shared_data / 'guanaco_llama2_1k' / 'train.jsonl'}, text_field: text, eval_samples: 8}}
    r: 8
    lora_alpha: 16
    max_steps: 6
    batch_size: 2
    seq_len: 64
    learning_rate: 1.0e-3
  - {{name: merge, kind: merge, from: finetune, onto: dequantized, check_samples: 2}}
""")
    out = qfarm(env, "submit", str(spec), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = by_stage(results(env, "smollm2-qlora"))
    (ft,), (merged,) = rows["finetune"], rows["merge"]
    # r * (inputs + outputs) for q, o (576->576), k, v (576->192), gate, up (576->1536), down (1536->576), 30 blocks
    per_block = 8 * (2 * (576 + 576) + 2 * (576 + 192) + 2 * (576 + 1536) + (1536 + 576))
    assert ft["trainable_params"] == 30 * per_block
    assert ft["task_loss"] < ft["ref_task_loss"]  # held-out guanaco loss goes down after 6 steps
    assert ft["task_loss"] < ft["base_task_loss"] and ft["base_task_loss"] > ft["ref_task_loss"]  # NF4 lost some
    assert ft["train_loss_best"] < ft["train_loss_first"]
    assert ft["kl_div"] > 0 and math.isfinite(ft["perplexity"])
    # like with like (both float32 arithmetic): exact on every CPU
    assert merged["merge_max_abs_diff"] < 1e-3 and merged["merge_top1_agree"] > 0.99
    # bitsandbytes' default CPU kernel against that: exactly the float32 path on AVX2, a bf16 kernel on AVX-512 BF16
    # (~1 logit over 30 layers, but the same model: nearly every top-1 agrees)
    if "fused" in merged["kernel_default"]:
        assert merged["merge_max_abs_diff"] < merged["kernel_max_abs_diff"] < 5 and merged["kernel_top1_agree"] > 0.9
    else:
        assert merged["kernel_max_abs_diff"] == 0
    assert ft["kernel"] == "bnb cpu: dequantize + float32 matmul"  # the trained model was evaluated as asked
    assert merged["task_loss"] == pytest.approx(ft["task_loss"], rel=0.01)
    assert math.isfinite(merged["perplexity"]) and merged["size_source"] == "disk"
