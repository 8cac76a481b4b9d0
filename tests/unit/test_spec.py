"""Spec parsing, validation messages, expansion and ids. Pure logic: no services."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from qfarm.errors import SpecError
from qfarm.sweep.expand import load_sweep

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_sweep(path)
    return [p.render(str(path)) for p in info.value.problems]


GOOD = """\
    name: s
    model: bundled:smollm2-135m
    jobs:
      - kind: quantize
        matrix:
          method: [none, bnb-int8, bnb-nf4, bnb-fp4]
"""


def test_demo_spec_expands_to_four_jobs():
    loaded, plan = load_sweep(REPO / "jobs" / "demo.yaml")
    assert [j.options["method"] for j in plan.jobs] == ["none", "bnb-int8", "bnb-nf4", "bnb-fp4"]
    assert len({j.id for j in plan.jobs}) == 4
    assert all(j.resources["gpus"] == 1 for j in plan.jobs)
    assert plan.sweep_id.startswith("smollm2-bnb-")


@pytest.mark.parametrize("spec", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_validates(spec):
    _, plan = load_sweep(spec)
    assert plan.jobs


def test_ids_are_stable_and_depend_on_what_changes_results(tmp_path):
    _, a = load_sweep(write(tmp_path, GOOD, "a.yaml"))
    _, b = load_sweep(write(tmp_path, GOOD, "b.yaml"))
    assert [j.id for j in a.jobs] == [j.id for j in b.jobs]
    assert a.sweep_id == b.sweep_id
    changed = GOOD + "    eval: {perplexity: {max_windows: 3}}\n"
    _, c = load_sweep(write(tmp_path, changed, "c.yaml"))
    assert {j.id for j in c.jobs}.isdisjoint({j.id for j in a.jobs})
    renamed = GOOD.replace("name: s", "name: t")
    _, d = load_sweep(write(tmp_path, renamed, "d.yaml"))
    assert [j.id for j in d.jobs] == [j.id for j in a.jobs]  # the job is the same work; the sweep is new
    assert d.sweep_id != a.sweep_id


def test_defaults_are_filled_so_explicit_defaults_share_the_id(tmp_path):
    _, a = load_sweep(write(tmp_path, GOOD, "a.yaml"))
    explicit = GOOD.replace("method: [none, bnb-int8, bnb-nf4, bnb-fp4]", "method: [bnb-nf4]\n          double_quant: [false]")
    _, b = load_sweep(write(tmp_path, explicit, "b.yaml"))
    nf4 = next(j for j in a.jobs if j.options["method"] == "bnb-nf4")
    assert b.spec_jobs[0].id == nf4.id


def test_matrix_product_fixed_options_and_exclude(tmp_path):
    path = write(tmp_path, """\
        name: s
        model: bundled:smollm2-135m
        jobs:
          - kind: quantize
            compute_dtype: bfloat16
            matrix:
              method: [bnb-nf4, bnb-fp4]
              double_quant: [false, true]
            exclude:
              - {method: bnb-fp4, double_quant: true}
    """)
    _, plan = load_sweep(path)
    combos = [(j.options["method"], j.options["double_quant"]) for j in plan.spec_jobs]
    assert combos == [("bnb-nf4", False), ("bnb-nf4", True), ("bnb-fp4", False)]
    assert all(j.options["compute_dtype"] == "bfloat16" for j in plan.spec_jobs)


def test_every_error_at_once_with_path_line_and_did_you_mean(tmp_path):
    path = write(tmp_path, """\
        name: s
        model: bundled:smollm2-135n
        eval:
          speeed: {runs: 2}
        jobs:
          - kind: quantize
            matrix:
              method: [none, bnb-nf5]
          - kind: quantise
    """)
    got = problems(path)
    assert got == [
        f"{path}:2: model: unknown bundled model 'smollm2-135n'. Did you mean 'smollm2-135m'? Allowed: bundled:smollm2-135m",
        f"{path}:4: eval.speeed: unknown key 'speeed'. Did you mean 'speed'? Allowed: perplexity, speed, prompts, max_new_tokens, tasks, task_paths, engine, vllm",
        f"{path}:8: jobs[0].matrix.method[1]: unknown method 'bnb-nf5'. Did you mean 'bnb-nf4'? Allowed: none, bnb-int8, bnb-nf4, bnb-fp4, rtn, gptq, awq, gguf",
        f"{path}:9: jobs[1].kind: unknown job kind 'quantise'. Did you mean 'quantize'? Allowed: quantize, train, merge, evaluate, sleep",
    ]


def test_unsupported_bits_refused_with_fix(tmp_path):
    path = write(tmp_path, """\
        name: s
        model: bundled:smollm2-135m
        jobs:
          - kind: quantize
            matrix: {method: [bnb-nf4], bits: [4, 3]}
    """)
    (only,) = problems(path)
    assert only.startswith(f"{path}:5: jobs[0].matrix.bits[1]: method bnb-nf4: bits: 3 is not allowed. Allowed: 4.")
    assert 'add to exclude: {"method": "bnb-nf4", "bits": 3}' in only


def test_option_of_another_method_is_named(tmp_path):
    path = write(tmp_path, """\
        name: s
        model: bundled:smollm2-135m
        jobs:
          - {kind: quantize, method: bnb-int8, double_quantt: true}
    """)
    assert problems(path) == [
        f"{path}:4: jobs[0].double_quantt: option 'double_quantt' does not apply to method bnb-int8. Its options: bits, threshold"
    ]


def test_ranges_types_and_names(tmp_path):
    path = write(tmp_path, """\
        name: ../../etc
        model: bundled:smollm2-135m
        eval: {perplexity: {seq_len: 4, max_windows: many}}
        resources: {gpus: -1}
        jobs:
          - kind: quantize
            matrix: {method: [none], bits: [[16]]}
    """)
    got = problems(path)
    assert got[0] == (f"{path}:1: name: '../../etc' is not a valid name: use letters, digits, '.', '_' and '-', "
                      "at most 64, starting with a letter or digit")
    assert f"{path}:3: eval.perplexity.seq_len: input should be greater than or equal to 16 (got 4)" in got
    assert any(g.startswith(f"{path}:3: eval.perplexity.max_windows: input should be a valid integer") for g in got)
    assert f"{path}:4: resources.gpus: input should be greater than or equal to 0 (got -1)" in got
    assert any("jobs[0].matrix.bits[0]: must be a number, string, boolean or null, not list" in g for g in got)


def test_exclude_rows_are_checked(tmp_path):
    path = write(tmp_path, """\
        name: s
        model: bundled:smollm2-135m
        jobs:
          - kind: quantize
            matrix: {method: [bnb-nf4, bnb-fp4]}
            exclude: [{methd: bnb-nf4}, {method: bnb-int8}]
    """)
    assert problems(path) == [
        f"{path}:6: jobs[0].exclude[0].methd: not a matrix key. Did you mean 'method'? Matrix keys: method",
        f"{path}:6: jobs[0].exclude[1]: this exclude row matches no combination of the matrix",
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "a spec must be a mapping with keys name, model, jobs; this file is empty"),
        (b"- 1\n- 2\n", "a spec must be a mapping with keys name, model, jobs; this file is a list"),
        (b"name: [unclosed\n", "invalid YAML"),
        (b"name: \xff\xfe\n", "the file is not UTF-8 text (byte 6 is invalid)"),
        (b"name: !!python/object:os.system x\n", "invalid YAML"),
    ],
)
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    (only,) = problems(path)
    assert message in only


def test_missing_file_and_missing_keys(tmp_path):
    (only,) = problems(tmp_path / "nope.yaml")
    assert "cannot read the file" in only
    path = write(tmp_path, "name: s\n")
    assert problems(path) == [f"{path}:1: jobs: required, but missing"]


def test_local_paths_resolve_against_the_spec_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "eval.txt").write_text("hello " * 100)
    path = write(tmp_path, GOOD + "    eval: {perplexity: {dataset: data/eval.txt}}\n")
    _, plan = load_sweep(path)
    assert plan.jobs[0].eval["perplexity"]["dataset"]["location"] == str(tmp_path / "data" / "eval.txt")
    missing = write(tmp_path, GOOD + "    eval: {perplexity: {dataset: data/none.txt}}\n", "m.yaml")
    (only,) = problems(missing)
    assert f"no such file ({tmp_path / 'data' / 'none.txt'})" in only


def test_model_references(tmp_path):
    for model, expected in [
        ("./missing-dir", "is not a bundled model"),
        ("weights.gguf", "is not a bundled model"),
    ]:
        path = write(tmp_path, GOOD.replace("bundled:smollm2-135m", model))
        (only,) = problems(path)
        assert expected in only and ":2: model:" in only
    (tmp_path / "hf").mkdir()
    path = write(tmp_path, GOOD.replace("bundled:smollm2-135m", "hf"))
    assert "has no config.json" in problems(path)[0]
    sha = "0123456789abcdef0123456789abcdef01234567"  # a commit pins a hub model without asking the hub
    _, plan = load_sweep(write(tmp_path, GOOD.replace("bundled:smollm2-135m", f"HuggingFaceTB/SmolLM2-135M\n    revision: {sha}")))
    assert plan.jobs[0].model["kind"] == "hub" and plan.jobs[0].model["revision"] == sha


def test_sleep_jobs_need_no_model(tmp_path):
    path = write(tmp_path, """\
        name: naps
        jobs:
          - kind: sleep
            seconds: 0.5
            matrix: {index: [0, 1, 2]}
    """)
    _, plan = load_sweep(path)
    assert [j.label for j in plan.jobs] == ["sleep[0]", "sleep[1]", "sleep[2]"]
    assert all(j.model is None and j.eval is None for j in plan.jobs)


def test_every_compared_row_needs_one_reference_job_the_spec_s_own_or_one_made_for_it(tmp_path):
    from qfarm.farm.eta import ranks
    from qfarm.farm.store import JobRecord

    _, own = load_sweep(REPO / "jobs" / "demo.yaml")  # the spec has its none: that one is the reference
    none = own.jobs[0]
    assert none.options["method"] == "none" and not own.implicit and not none.needs
    assert all(j.needs == (none.id,) for j in own.jobs[1:])
    # without one, expansion makes it: the very job (same id) the spec's own would be, placed first
    path = write(tmp_path, GOOD.replace("method: [none, bnb-int8, bnb-nf4, bnb-fp4]", "method: [bnb-nf4, rtn]"))
    _, made = load_sweep(path)
    assert [j.label for j in made.jobs] == ["none", "bnb-nf4", "rtn"] and made.implicit == {made.jobs[0].id}
    assert made.spec_jobs == made.jobs[1:] and all(j.needs == (made.jobs[0].id,) for j in made.jobs[1:])
    assert made.jobs[0].id == next(j.id for j in load_sweep(write(tmp_path, GOOD, "g.yaml"))[1].jobs
                                   if j.options["method"] == "none")
    # an evaluated checkpoint is measured against the same reference; a spec's none with more GPUs stays its own
    # (a stage of its own, its resources: the only job that holds the float model), and is the one needed
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, '
                                      '"num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 49152}')
    path = write(tmp_path, f"""\
        name: s
        model: bundled:smollm2-135m
        jobs:
          - {{kind: quantize, method: bnb-nf4}}
          - {{kind: evaluate, checkpoint: {ckpt}}}
          - {{kind: quantize, method: none, resources: {{gpus: 4}}}}
    """, "wide.yaml")
    _, wide = load_sweep(path)
    ref = next(j for j in wide.jobs if j.options.get("method") == "none")
    assert not wide.implicit and ref.resources["gpus"] == 4 and len(wide.jobs) == 3
    assert all(j.needs == (ref.id,) for j in wide.jobs if j is not ref)
    # dispatched first: the critical path of every row runs through it
    records = [JobRecord(id=j.id, status="queued", spec=j.payload()) for j in made.jobs]
    r = ranks(records)
    assert max(r, key=r.get) == made.jobs[0].id
