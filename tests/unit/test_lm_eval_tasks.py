"""eval.tasks without running a model: the spec's checks, the columns made from lm-eval's results dict, recovery
against the reference row, and the table/frontier that show them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from qfarm.cli import cli
from qfarm.errors import UsageError
from qfarm.results.compare import compare, parse_frontier
from qfarm.results.rows import visible
from qfarm.sweep.lmtasks import harness_tasks_dir, names_in
from workers.evaluate.tasks import task_columns

# the shape simple_evaluate returns (lm-eval 0.4.13), for a multiple-choice task and gsm8k's two filters
RESULTS = {
    "results": {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.62, "acc_stderr,none": 0.02, "acc_norm,none": 0.58,
                     "acc_norm_stderr,none": 0.021},
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.31, "exact_match_stderr,strict-match": 0.013,
                  "exact_match,flexible-extract": 0.35, "exact_match_stderr,flexible-extract": "N/A"},
    },
    "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True}, "gsm8k": {"exact_match": True}},
    "n-samples": {"arc_easy": {"original": 2376, "effective": 500}, "gsm8k": {"original": 1319, "effective": 100}},
    "n-shot": {"arc_easy": 0, "gsm8k": 5},
    "versions": {"arc_easy": 1.0, "gsm8k": 3.0},
}


def test_columns_are_named_after_task_metric_and_only_a_second_filter():
    arc = task_columns("arc_easy", RESULTS)
    assert arc["arc_easy_acc"] == 0.62 and arc["arc_easy_acc_se"] == 0.02
    assert arc["arc_easy_acc_norm"] == 0.58 and arc["arc_easy_acc_norm_se"] == 0.021
    assert arc["tasks"] == {"arc_easy": {"column": "arc_easy_acc", "metric": "acc", "higher_is_better": True,
                                         "samples": 500, "num_fewshot": 0, "version": 1.0}}
    gsm = task_columns("gsm8k", RESULTS)
    assert gsm["gsm8k_exact_match"] == 0.31 and gsm["gsm8k_exact_match_se"] == 0.013
    assert gsm["gsm8k_exact_match_flexible_extract"] == 0.35
    assert gsm["gsm8k_exact_match_flexible_extract_se"] is None  # lm-eval's "N/A" is not a number
    with pytest.raises(ValueError, match="no scores for 'hellaswag'"):
        task_columns("hellaswag", RESULTS)


def _row(method, acc, se, label=None, size=100.0, ppl=10.0, higher=True):
    cols = task_columns("arc_easy", {**RESULTS, "results": {"arc_easy": {"acc,none": acc, "acc_stderr,none": se}},
                                     "higher_is_better": {"arc_easy": {"acc": higher}}})
    return {"job_id": label or method, "label": label or method, "status": "succeeded", "method": method,
            "sweep_id": "s", "size_mb": size, "perplexity": ppl, **cols}


def test_recovery_is_variant_over_reference_with_its_noise():
    rows = compare([_row("none", 0.60, 0.02, size=500), _row("rtn", 0.54, 0.02, size=130)])
    ref, rtn = rows
    assert ref["arc_easy_recovery"] == pytest.approx(1.0)
    assert rtn["arc_easy_recovery"] == pytest.approx(0.9)
    assert rtn["arc_easy_recovery_se"] == pytest.approx(0.9 * ((0.02 / 0.54) ** 2 + (0.02 / 0.60) ** 2) ** 0.5)
    # a lower-is-better metric: reference over variant, so that below 1 is still worse
    low = compare([_row("none", 2.0, 0.1, higher=False), _row("rtn", 2.5, 0.1, higher=False)])
    assert low[1]["arc_easy_recovery"] == pytest.approx(0.8)
    # no reference row in the sweep: no recovery, not a made-up one
    assert compare([_row("rtn", 0.54, 0.02)])[0]["arc_easy_recovery"] is None


def test_task_columns_are_in_the_default_table_and_are_frontier_objectives():
    data = compare([_row("none", 0.60, 0.02, size=500), _row("rtn", 0.54, 0.02, size=130)])
    names = [c for c, _, _ in visible(data)]
    assert names.index("perplexity") < names.index("arc_easy_acc") < names.index("arc_easy_recovery")
    headers = dict((c, h) for c, h, _ in visible(data))
    assert headers["arc_easy_acc"] == "arc_easy acc"
    assert parse_frontier("size_mb,arc_easy_acc", data) == ("size_mb", "arc_easy_acc")
    with pytest.raises(UsageError, match="higher is better: .*arc_easy_recovery"):
        parse_frontier("size_mb,arc_easy_accc", data)
    # accuracy as the objective: the smaller row with the worse accuracy is not dominated, and a row that is
    # bigger and less accurate than another is
    rows = [_row("none", 0.60, 0.001, size=500), _row("rtn", 0.54, 0.001, size=130),
            _row("bad", 0.50, 0.001, "bad", size=600)]
    front = {r["label"]: r["pareto"] for r in compare(rows, frontier=("size_mb", "arc_easy_acc"))}
    assert front == {"none": True, "rtn": True, "bad": False}
    # within the noise (2 se of the difference) two accuracies tie: the bigger one no longer dominates
    rows = [_row("none", 0.60, 0.05, size=500), _row("big", 0.57, 0.05, "big", size=600)]
    front = {r["label"]: r["pareto"] for r in compare(rows, frontier=("size_mb", "arc_easy_acc"))}
    assert front == {"none": True, "big": False}  # bigger, and no better than the noise: dominated on size
    rows = [_row("none", 0.60, 0.05, size=600), _row("small", 0.45, 0.001, "small", size=500)]
    front = {r["label"]: r["pareto"] for r in compare(rows, frontier=("size_mb", "arc_easy_acc"))}
    assert front == {"none": True, "small": True}


def test_task_names_are_read_from_yaml_without_importing_lm_eval():
    text = 'tag:\n  - ai2_arc\n  - "reasoning"\ntask: arc_easy\ndataset_path: x\n'
    assert names_in(text) == {"ai2_arc", "reasoning", "arc_easy"}
    assert names_in("group: mmlu\ntag: [knowledge, multi]\ntask:\n  - mmlu_stem\n") == {"mmlu", "knowledge", "multi"}


def validate(spec) -> tuple[int, str]:
    out = CliRunner().invoke(cli, ["validate", "--offline", str(spec)], obj={})
    return out.exit_code, out.output


def test_a_task_name_lm_eval_does_not_know_is_refused_with_a_suggestion(tmp_path):
    if harness_tasks_dir() is None:
        pytest.skip("lm-eval is not installed here: only local task folders can be checked")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.yaml").write_text("task: my_local_task\ndataset_path: json\n")
    spec = tmp_path / "s.yaml"
    spec.write_text("name: t\nmodel: bundled:smollm2-135m\neval:\n  task_paths: [tasks]\n  tasks:\n"
                    "    - {name: arc_easyy}\n    - {name: my_local_task, limit: 10}\n    - {name: arc_easy}\n"
                    "jobs:\n  - {kind: quantize, method: none}\n")
    code, out = validate(spec)
    assert code == 2, out
    assert f"{spec}:6: eval.tasks[0].name: no task, group or tag 'arc_easyy' in lm-eval's task catalogue or " \
           "eval.task_paths. Did you mean 'arc_easy'?" in " ".join(out.split())
    assert "my_local_task" not in out and "tasks[2]" not in out


def test_task_paths_must_be_folders_and_tasks_are_listed_once(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: t\nmodel: bundled:smollm2-135m\neval:\n  task_paths: [nowhere]\n  tasks:\n"
                    "    - {name: arc_easy}\n    - {name: arc_easy, limit: 5}\n"
                    "jobs:\n  - {kind: quantize, method: none}\n")
    code, out = validate(spec)
    flat = " ".join(out.split())
    assert code == 2
    assert f"{spec}:4: eval.task_paths[0]: 'nowhere' is not a folder" in flat
    assert "eval.tasks[1].name: task 'arc_easy' is listed twice" in flat


VLLM_SPEC = """name: v
model: bundled:smollm2-135m
eval: {{engine: vllm, vllm: {{concurrency: [1, 4]}}}}
resources: {{gpus: {gpus}}}
jobs:
  - kind: quantize
    matrix: {{method: [none, rtn, bnb-nf4]}}
"""


def test_engine_vllm_is_refused_where_no_gpu_can_run_it(tmp_path):
    from qfarm.farm.cluster import Node, cuda_refusal
    from qfarm.sweep.expand import load_sweep

    spec = tmp_path / "v.yaml"
    spec.write_text(VLLM_SPEC.format(gpus=0))
    code, out = validate(spec)
    assert code == 2 and "jobs[0] asks for resources.gpus: 0. Give it gpus: 1" in " ".join(out.split())
    spec.write_text(VLLM_SPEC.format(gpus=1))
    jobs = [j.payload() for j in load_sweep(spec)[1].jobs]
    logical = Node("a" * 16, {"CPU": 4.0, "GPU": 2.0, "node:10.0.0.1": 1.0}, {})  # a CPU box's GPU slots
    real = Node("b" * 16, {"CPU": 16.0, "GPU": 1.0, "accelerator_type:H200": 1.0}, {})
    why = cuda_refusal(jobs, [logical])
    assert why and "no node of this cluster has one" in why and "2 job(s) (none, rtn)" in why
    assert cuda_refusal(jobs, [logical, real]) is None
    native = [j for j in jobs if j["eval"]["engine"] == "native"]
    assert native and cuda_refusal(native, [logical]) is None  # rows not served by vLLM need no CUDA


def test_engine_vllm_serves_the_rows_vllm_loads_and_says_why_not_for_the_others(tmp_path):
    from qfarm.sweep.expand import load_sweep

    spec = tmp_path / "v.yaml"
    spec.write_text(VLLM_SPEC.format(gpus=1))
    jobs = {j.options["method"]: j for j in load_sweep(spec)[1].jobs}
    for m in ("none", "rtn"):
        assert jobs[m].eval["engine"] == "vllm" and jobs[m].eval["vllm"]["concurrency"] == [1, 4]
    assert jobs["bnb-nf4"].eval["engine"] == "native" and jobs["bnb-nf4"].eval["vllm"] is None
    assert jobs["bnb-nf4"].eval["vllm_skipped"] == "bnb-nf4 checkpoints are not served by vLLM in qfarm"
    # the engine is part of a job's identity; a native sweep keeps the ids it had before engines existed
    spec.write_text(VLLM_SPEC.format(gpus=1).replace("engine: vllm, vllm: {concurrency: [1, 4]}", "engine: native"))
    native = {j.options["method"]: j for j in load_sweep(spec)[1].jobs}
    spec.write_text(VLLM_SPEC.format(gpus=1).replace("eval: {engine: vllm, vllm: {concurrency: [1, 4]}}\n", ""))
    plain = {j.options["method"]: j for j in load_sweep(spec)[1].jobs}
    assert native["rtn"].id == plain["rtn"].id != jobs["rtn"].id


def test_vllm_prompts_are_the_same_spans_for_every_row():
    from workers.evaluate.harness import percentile
    from workers.evaluate.serving import prompt_ids

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    spans = prompt_ids(Tok(), "abcdefghijklmnopqrstuvwxyz" * 4, 5, 8)
    assert len(spans) == 5 and all(len(s) == 8 for s in spans) and len({tuple(s) for s in spans}) == 5
    assert spans == prompt_ids(Tok(), "abcdefghijklmnopqrstuvwxyz" * 4, 5, 8)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([], 99) is None


def test_a_job_indexes_lm_eval_s_own_tasks_only_when_the_spec_s_folders_do_not_define_every_task_it_asks_for(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is the eval extra (make install puts it in)")
    from lm_eval.tasks import TaskManager

    from workers.evaluate.tasks import task_manager

    task = "task: {name}\ndataset_path: json\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\n" \
           "doc_to_target: 0\n"
    (tmp_path / "mine.yaml").write_text(task.format(name="mine"))
    (tmp_path / "theirs.yaml").write_text(task.format(name="other"))
    (tmp_path / "group.yaml").write_text("group: mixed\ntask: [mine, arc_easy]\n")  # names one of lm-eval's own

    class Recorded(TaskManager):  # what was asked for; lm-eval's own ~14,000 files are not indexed here
        asked: list[bool] = []

        def __init__(self, include_path=None, include_defaults=True):
            Recorded.asked.append(include_defaults)
            super().__init__(include_path=include_path, include_defaults=False)

    local = task_manager(Recorded, [str(tmp_path)], ["mine", "other"])
    assert Recorded.asked == [False] and sorted(local.all_subtasks) == ["mine", "other"]
    for names in (["mine", "hellaswag"], ["mixed"]):  # one of lm-eval's own; a group that may name them
        Recorded.asked.clear()
        task_manager(Recorded, [str(tmp_path)], names)
        assert Recorded.asked == [False, True], names
    Recorded.asked.clear()
    task_manager(Recorded, [], ["hellaswag"])  # no folders: lm-eval's own only
    assert Recorded.asked == [True]
