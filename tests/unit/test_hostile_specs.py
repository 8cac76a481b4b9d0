"""Specs written to hurt: alias bombs, duplicate keys, huge values, format strings that reach attributes or build
huge strings, a .gguf that is not one. Each is refused at validate time, quickly, with where and why (exit 2)."""

from __future__ import annotations

import os
import struct
import time

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from qfarm.cli import cli


def validate(path) -> tuple[int, str]:
    out = CliRunner().invoke(cli, ["validate", "--offline", str(path)], obj={})
    return out.exit_code, out.output


@pytest.mark.timeout(60)
def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    lines = ["name: bomb", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]  # 10^9 values
    lines += ["eval: {prompts: *a8}", "jobs:", "  - {kind: sleep}"]
    spec = tmp_path / "bomb.yaml"
    spec.write_text("\n".join(lines) + "\n")
    started = time.process_time()
    code, out = validate(spec)
    assert code == 2 and f"{spec}:3: YAML aliases (*a0) are not allowed in a spec" in out
    assert time.process_time() - started < 30  # refused from the event stream, not after building it


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    spec = tmp_path / "dup.yaml"
    spec.write_text("name: d\njobs:\n  - {kind: sleep}\njobs:\n  - {kind: sleep, index: 3, index: 4}\n")
    code, out = validate(spec)
    assert code == 2
    assert f"{spec}:4: jobs: duplicate key 'jobs' (lines 2 and 4); give it once" in out
    assert "jobs[0].index: duplicate key 'index' (lines 5 and 5)" in out


def test_sizes_are_capped_and_the_cap_is_named(tmp_path):
    spec = tmp_path / "big.yaml"
    spec.write_text("name: b\ndescription: " + "x" * 100_001 + "\njobs:\n  - {kind: sleep}\n")
    code, out = validate(spec)
    assert code == 2 and "a value of 100001 characters; at most 100000" in out
    spec.write_text("name: b\neval: {prompts: [" + ", ".join(["p"] * 100_001) + "]}\njobs:\n  - {kind: sleep}\n")
    code, out = validate(spec)
    assert code == 2 and "more than 100000 values" in out


@pytest.mark.parametrize("fmt,why", [
    ("{text:{text.__class__}}", "a format spec may not name fields"),
    ("{text:{width}}", "a format spec may not name fields"),
    ("{text:>999999999}", "widths and precisions are at most 1000"),
    ("{text:.5000}", "widths and precisions are at most 1000"),
    ("{text.__class__}", "name a field of the row"),
])
def test_a_training_format_string_can_only_name_fields(fmt, why):
    from pydantic import ValidationError

    from qfarm.sweep.methods import TrainData

    with pytest.raises(ValidationError, match=why):
        TrainData(path="x.jsonl", format=fmt)
    assert TrainData(path="x.jsonl", format="### Q: {instruction:>20}\n### A: {instances[0][output]}")


def test_a_gguf_file_that_is_not_one_is_refused_at_validate(tmp_path):
    for name, data in [("garbage.gguf", b"GGUF" + os.urandom(4000)),
                       ("counts.gguf", b"GGUF" + struct.pack("<IQQ", 3, 5, 5) + os.urandom(4000)),
                       ("empty.gguf", b"")]:
        (tmp_path / name).write_bytes(data)
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(f"name: g\nmodel: {name}\njobs:\n  - {{kind: quantize, method: none}}\n")
        code, out = validate(spec)
        assert code == 2 and "model:" in out and ("not a GGUF" in out or "damaged" in out), out


yaml_values = st.recursive(
    st.sampled_from(["x", "1", "sleep", "*a", "&a x", "[]", "{}", "null"]),
    lambda inner: st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]")
    | st.lists(st.tuples(st.sampled_from(["kind", "name", "jobs", "index", "<<"]), inner), max_size=3)
    .map(lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"),
    max_leaves=12)


@settings(max_examples=200, deadline=2000)
@given(body=st.lists(st.tuples(st.sampled_from(["name", "jobs", "eval", "a", "b"]), yaml_values), max_size=6))
def test_yaml_structure_fuzz_exits_0_or_2_quickly(tmp_path_factory, body):
    spec = tmp_path_factory.mktemp("fuzz") / "s.yaml"
    spec.write_text("".join(f"{k}: {v}\n" for k, v in body))
    code, out = validate(spec)
    assert code in (0, 2), out
    assert "Traceback" not in out


class _Budget:
    """Counts the tokens PyYAML's scanner fetches while a spec is read (its work, not seconds): a refusal must come
    before the parser walks what it refuses. A context manager (hypothesis tests cannot take monkeypatch)."""

    def __enter__(self):
        import yaml.scanner

        self.fetched, self._real = 0, yaml.scanner.Scanner.fetch_more_tokens

        def counted(scanner):
            self.fetched += 1
            return self._real(scanner)

        yaml.scanner.Scanner.fetch_more_tokens = counted
        return self

    def __exit__(self, *exc):
        import yaml.scanner

        yaml.scanner.Scanner.fetch_more_tokens = self._real


@pytest.mark.parametrize("opening,closing", [("[", "]"), ("{a: ", "}")])
def test_deep_flow_nesting_is_refused_before_the_parser_walks_it(tmp_path, opening, closing):
    """20,000 nested brackets cost PyYAML's scanner a minute (a possible key per open bracket, all walked at every
    token): refused from a linear pass over the text, the scanner never started."""
    spec = tmp_path / "deep.yaml"
    spec.write_text("name: d\nmodel: bundled:smollm2-135m\neval: {prompts: " + opening * 20_000 + "x"
                    + closing * 20_000 + "}\njobs: [{kind: sleep}]\n")
    with _Budget() as budget:
        code, out = validate(spec)
    assert code == 2 and f"{spec}:3: invalid YAML: nested too deeply (more than 64 lists or mappings" in out, out
    assert budget.fetched == 0


def test_deep_block_nesting_is_refused_while_parsing(tmp_path):
    spec = tmp_path / "block.yaml"
    spec.write_text("name: b\njobs:\n" + "".join("  " * i + "-\n" for i in range(1, 500)))
    with _Budget() as budget:
        code, out = validate(spec)
    assert code == 2 and "nested too deeply" in out and f"{spec}:66:" in out, out
    assert budget.fetched < 200  # stopped at the 65th level, not after the 500th


def test_a_million_job_matrix_is_refused_from_its_lengths_before_expansion(tmp_path, monkeypatch):
    import qfarm.sweep.validate

    def never(*args, **kwargs):
        raise AssertionError("a combination was made: the bound must be checked first")

    monkeypatch.setattr(qfarm.sweep.validate, "combinations", never)
    spec = tmp_path / "million.yaml"
    spec.write_text("name: m\njobs:\n  - kind: sleep\n    matrix:\n"
                    f"      index: [{', '.join(map(str, range(1000)))}]\n"
                    f"      seconds: [{', '.join(str(i / 1000) for i in range(1000))}]\n")
    code, out = validate(spec)
    assert code == 2 and f"{spec}:4: jobs[0].matrix: the sweep would make up to 1,000,000 jobs (this stage: index " \
                         "1000 × seconds 1000); at most 10,000 per sweep" in out, out
    assert "--max-jobs" in out


def test_stages_multiply_the_bound_and_max_jobs_raises_it(tmp_path):
    spec = tmp_path / "stages.yaml"
    spec.write_text("name: s\njobs:\n  - {name: a, kind: sleep, matrix: {index: [0, 1, 2]}}\n"
                    "  - {name: b, kind: sleep, from: a, matrix: {seconds: [0, 0.5, 1, 2]}}\n")
    out = CliRunner().invoke(cli, ["validate", "--offline", "--max-jobs", "14", str(spec)], obj={})
    assert out.exit_code == 2 and "up to 15 jobs (this stage: seconds 4 × 3 jobs of stage 'a'); at most 14" in out.output
    out = CliRunner().invoke(cli, ["validate", "--offline", "--max-jobs", "15", str(spec)], obj={})
    assert out.exit_code == 0 and "15 jobs" in out.output, out.output


@settings(max_examples=60, deadline=None)
@given(depth=st.integers(1, 5_000), brackets=st.text(alphabet="[{", min_size=1, max_size=3),
       alias=st.booleans(), rows=st.sampled_from([1, 5, 3_000]), cols=st.sampled_from([1, 7, 4_000]))
def test_nested_aliased_and_huge_specs_fuzz_exit_2_within_a_token_budget(tmp_path_factory, depth, brackets, alias,
                                                                        rows, cols):
    """Generated hostile specs (nesting of any depth in flow style, an alias, a matrix of rows × cols jobs): each
    exits 0 or 2 with no traceback, and the scanner's work stays within a budget that does not grow with the
    nesting (a fixed multiple of the limits), so none can cost what 20,000 brackets once did."""
    opens = "".join(brackets[i % len(brackets)] for i in range(depth))
    nest = "".join("[" if c == "[" else "{k: " for c in opens) + "v" + "".join("]" if c == "[" else "}" for c in reversed(opens))
    spec = tmp_path_factory.mktemp("hostile") / "s.yaml"
    spec.write_text("name: h\n" + ("anchor: &a [1]\n" if alias else "") + f"eval: {{prompts: {nest}}}\n"
                    + ("copy: *a\n" if alias else "") + "jobs:\n  - kind: sleep\n    matrix:\n"
                    f"      index: [{', '.join(map(str, range(rows)))}]\n"
                    f"      seconds: [{', '.join(map(str, range(cols)))}]\n")
    with _Budget() as budget:
        code, out = validate(spec)
    assert code in (0, 2) and "Traceback" not in out, out
    assert code == 2 or (depth == 1 and brackets[0] == "[" and not alias and rows * cols <= 10_000), out
    assert budget.fetched <= 8 * (rows + cols) + 16 * 64 + 200, budget.fetched  # ~6 tokens a list value; nesting capped
