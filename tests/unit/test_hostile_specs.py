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

    from qfarm.methods import TrainData

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
