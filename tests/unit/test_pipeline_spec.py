"""Pipelines in a spec: stages, from:, train/merge options, the DAG they expand to, and their errors."""

from __future__ import annotations

import json
import textwrap

import pytest

from qfarm.errors import SpecError
from qfarm.sweep.expand import load_sweep


@pytest.fixture
def folder(tmp_path):
    """A spec folder with a model (config.json only: validation reads no weights) and a training set."""
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 100}))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) + "\n" for i in range(50)))
    return tmp_path


def plan_of(folder, text):
    path = folder / "sweep.yaml"
    path.write_text(textwrap.dedent(text))
    return load_sweep(path)[1]


def errors_of(folder, text) -> list[str]:
    path = folder / "sweep.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(SpecError) as err:
        load_sweep(path)
    return [p.render(err.value.source) for p in err.value.problems]


PIPELINE = """\
    name: pipe
    model: tiny
    stages:
      - name: finetune
        kind: train
        dataset: {path: train.jsonl, format: "Q: {q}\\nA: {a}", eval_samples: 8}
        matrix: {method: [lora, qlora], r: [8, 16]}
      - name: merge
        kind: merge
        from: finetune
        onto: [base, dequantized]
      - name: deploy
        kind: quantize
        from: merge
        matrix: {method: [rtn, bnb-nf4]}
"""


def test_stages_expand_to_a_dag_with_lineage(folder):
    plan = plan_of(folder, PIPELINE)
    jobs = {j.id: j for j in plan.jobs}
    train = [j for j in plan.jobs if j.kind == "train"]
    merge = [j for j in plan.jobs if j.kind == "merge"]
    deploy = [j for j in plan.spec_jobs if j.kind == "quantize"]
    assert len(train) == 4
    # a LoRA adapter was trained on the float base: "dequantized" is that base, so it merges once, not twice
    assert sorted((jobs[m.parent].options["method"], m.options["onto"]) for m in merge) == [
        ("lora", "base"), ("lora", "base"), ("qlora", "base"), ("qlora", "base"),
        ("qlora", "dequantized"), ("qlora", "dequantized")]
    assert len(deploy) == 2 * len(merge)
    # each merged model is the reference its quantized rows are measured against: one reference job per merge job
    # (the stage has no method: none), made before the rows that need it, with the same parent
    refs = {j.parent: j for j in plan.jobs if j.id in plan.implicit}
    assert set(refs) == {m.id for m in merge} and all(r.options == {"method": "none", "bits": None} for r in refs.values())
    assert all(d.needs == (refs[d.parent].id,) and plan.jobs.index(refs[d.parent]) < plan.jobs.index(d) for d in deploy)
    for job in plan.jobs:  # parents come before children, and every child names a job of the stage it is from
        if job.parent:
            assert plan.jobs.index(jobs[job.parent]) < plan.jobs.index(job)
    d = deploy[-1]
    m = jobs[d.parent]
    t = jobs[m.parent]
    assert (t.stage, m.stage, d.stage) == ("finetune", "merge", "deploy")
    assert d.lineage == (t.label, m.label) and t.label.startswith("qlora r=")
    # every job descending from a train job measures its task loss on that job's held-out examples
    assert d.task_eval == m.task_eval == t.task_eval and t.task_eval["eval_samples"] == 8
    assert t.task_eval["format"] == "Q: {q}\nA: {a}" and t.data["kind"] == "jsonl"


def test_a_child_id_follows_its_parent(folder):
    before = plan_of(folder, PIPELINE)
    after = plan_of(folder, PIPELINE.replace("r: [8, 16]", "r: [8, 32]"))
    ids = lambda plan, kind: {j.id for j in plan.spec_jobs if j.kind == kind}  # noqa: E731
    # r=8 jobs and everything after them keep their ids (resubmitting reuses them); r=16's subtree is replaced
    assert len(ids(before, "train") & ids(after, "train")) == 2
    assert len(ids(before, "merge") & ids(after, "merge")) == 3
    assert len(ids(before, "quantize") & ids(after, "quantize")) == 6
    assert plan_of(folder, PIPELINE).sweep_id == before.sweep_id


def test_pipeline_errors_name_the_stage_path_and_line(folder):
    msgs = errors_of(folder, """\
        name: bad
        model: tiny
        stages:
          - name: finetune
            kind: train
            method: qlorra
            dataset: {path: train.jsonl}
          - name: ft2
            kind: train
            method: lora
            dataset: {path: nope.jsonl}
            target_modules: [q_proj, qq_proj]
          - name: merge
            kind: merge
            from: finetun
            onto: [base, dequant]
          - name: m2
            kind: merge
          - name: deploy
            kind: quantize
            from: later
            method: rtn
          - name: d2
            kind: quantize
            from: ft2
            method: none
          - name: later
            kind: sleep
        """)
    text = "\n".join(msgs)
    assert "sweep.yaml:6: stages[0].method: unknown training method 'qlorra'. Did you mean 'qlora'?" in text
    assert "sweep.yaml:11: stages[1].dataset.path: dataset 'nope.jsonl': no such file" in text
    assert "sweep.yaml:12: stages[1].target_modules[1]: the model has no Linear layer 'qq_proj'. Did you mean 'q_proj'?" in text
    assert "sweep.yaml:15: stages[2].from: no stage is named 'finetun'. Did you mean 'finetune'? Earlier stages: finetune, ft2" in text
    assert "sweep.yaml:16: stages[2].onto[1]: kind merge: onto: 'dequant' is not allowed. Did you mean 'dequantized'?" in text
    assert "sweep.yaml:17: stages[3]: a merge stage needs from:" in text
    assert "sweep.yaml:21: stages[4].from: stages run in file order: from names an earlier stage." in text
    assert "sweep.yaml:25: stages[5].from: a quantize stage cannot start from stage 'ft2' (kind train); it can start from a merge stage" in text


def test_missing_dataset_and_both_lists(folder):
    msgs = errors_of(folder, """\
        name: bad
        model: tiny
        jobs:
          - {kind: sleep}
        stages:
          - {kind: train, method: lora, dataset: {path: missing.jsonl}}
          - {kind: train, method: lora, dataset: {path: train.jsonl, format: "{q.__class__}"}}
        """)
    assert any("stages: give jobs or stages, not both" in m for m in msgs)
    msgs = errors_of(folder, """\
        name: bad
        model: tiny
        stages:
          - {kind: train, method: lora}
          - {kind: train, method: lora, dataset: {path: train.jsonl}, r: 0}
          - {kind: train, method: lora, dataset: {path: missing.jsonl}}
          - {kind: train, method: lora, dataset: {path: train.jsonl, format: "{q.__class__}"}}
        """)
    assert any("stages[0]: method lora: dataset: required, but missing" in m for m in msgs), msgs
    assert any("stages[2].dataset.path: dataset 'missing.jsonl': no such file" in m for m in msgs), msgs
    assert any("stages[3].dataset.format: method lora: dataset.format: {q.__class__}: name a field" in m
               for m in msgs), msgs
    assert any("stages[1].r: method lora: r: input should be greater than or equal to 1" in m for m in msgs), msgs


def test_sleep_stages_chain_without_a_model(folder):
    plan = plan_of(folder, """\
        name: chain
        stages:
          - {name: a, kind: sleep, matrix: {index: [0, 1]}, seconds: 0}
          - {name: b, kind: sleep, from: a, seconds: 0, index: 5}
        """)
    a = [j for j in plan.jobs if j.stage == "a"]
    b = [j for j in plan.jobs if j.stage == "b"]
    assert len(a) == 2 and sorted(j.parent for j in b) == sorted(j.id for j in a)


def test_a_stage_whose_jobs_an_earlier_stage_has_too_still_feeds_its_children(folder):
    # "again" is "finetune" spelled twice: one job, not two; merge comes from it either way (it used to get none)
    plan = plan_of(folder, """\
        name: pipe
        model: tiny
        stages:
          - {name: finetune, kind: train, method: lora, dataset: {path: train.jsonl, format: "{q}", eval_samples: 8}}
          - {name: again, kind: train, method: lora, dataset: {path: train.jsonl, format: "{q}", eval_samples: 8}}
          - {name: merge, kind: merge, from: again}
        """)
    kinds = [j.kind for j in plan.jobs]
    assert kinds == ["train", "merge"], kinds
    (train,) = [j for j in plan.jobs if j.kind == "train"]
    (merge,) = [j for j in plan.jobs if j.kind == "merge"]
    assert merge.parent == train.id


def test_a_gptq_checkpoint_as_the_sweeps_model_is_refused_with_where_it_goes_instead(folder):
    config = json.loads((folder / "tiny" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 64}
    (folder / "tiny" / "config.json").write_text(json.dumps(config))
    msgs = errors_of(folder, """\
        name: q
        model: tiny
        stages:
          - {name: finetune, kind: train, method: lora, dataset: {path: train.jsonl, format: "{q}", eval_samples: 8}}
        """)
    assert len(msgs) == 1 and "model" in msgs[0] and "is a GPTQ checkpoint" in msgs[0], msgs
    assert "kind: evaluate" in msgs[0] and "backend: gptqmodel" in msgs[0]
