"""Property-based fuzzing of the spec loader and `qfarm validate`: whatever the file holds, the answer is
"valid" (exit 0) or a list of problems with YAML paths (exit 2), never a traceback. Pure logic: no services."""

from __future__ import annotations

import string
from pathlib import Path

import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qfarm.cli import cli
from qfarm.errors import SpecError
from qfarm.sweep.expand import load_sweep

KEYS = ["name", "model", "jobs", "kind", "matrix", "method", "bits", "group_size", "act_order", "calibration",
        "dataset", "samples", "seq_len", "eval", "perplexity", "speed", "prompts", "exclude", "resources", "gpus",
        "max_attempts", "timeout_s", "gguf_type", "seconds", "index", "fail", "custom", "text_field", "n_grid"]
WORDS = ["quantize", "sleep", "gptq", "awq", "rtn", "gguf", "none", "bnb-nf4", "Q4_K_M", "bundled:smollm2-135m",
         "bundled:python-docs", "hub:org/x", "hub:../../etc", "../../etc/passwd", "/etc/passwd", "~/x.txt",
         "s", "a" * 300, "\u202e\u0000\x7f", "-1", "1e309"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(WORDS),
    st.text(alphabet=string.printable, max_size=20),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=5),
), max_leaves=25)
specs = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(["ok", "../../etc", "a/b", ""]), scalars)},
    optional={"model": values, "eval": values, "resources": values, "max_attempts": values,
              "jobs": st.lists(st.dictionaries(st.sampled_from(KEYS), values, max_size=6), max_size=4) | values},
)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(spec=specs)
def test_any_mapping_is_either_a_plan_or_problems_with_paths(tmp_path, spec):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    try:
        _, plan = load_sweep(path)
    except SpecError as err:
        assert err.problems and all(p.message for p in err.problems)
        return
    assert plan.jobs  # a valid spec has jobs, and every job id is a hash
    assert all(j.id.startswith("j") and len(j.id) == 13 for j in plan.jobs)


@SETTINGS
@given(data=st.binary(max_size=400))
def test_any_bytes_through_the_cli_exit_0_or_2_without_a_traceback(tmp_path, data):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    result = CliRunner().invoke(cli, ["validate", "--offline", str(path)], obj={})
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@SETTINGS
@given(text=st.text(alphabet=string.printable + "éß\u2028", max_size=300))
def test_any_text_through_the_cli_exit_0_or_2_without_a_traceback(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text("name: t\njobs:\n" + text)
    result = CliRunner().invoke(cli, ["validate", "--offline", str(path)], obj={})
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output


@SETTINGS
@given(parts=st.lists(st.sampled_from(["..", ".", "a", "_models", "/", "~", "x.gguf", "%2e%2e", "\\.."]), max_size=8))
def test_worker_paths_never_leave_the_output_root(tmp_path, parts):
    from workers.shared.files import inside

    root = tmp_path / "root"
    candidate = str(root / "/".join(parts)) if parts and parts[0] != "/" else "/" + "/".join(parts)
    try:
        resolved = inside(str(root), candidate)
    except ValueError:
        return
    assert resolved == str(root.resolve()) or resolved.startswith(str(root.resolve()) + "/")


@SETTINGS
@given(job_id=st.sampled_from(["..", ".", "", "j0123456789ab", "jZZ", "j0123456789ab/..", "/", "j" + "0" * 12]),
       parts=st.lists(st.sampled_from(["..", ".", "sweep", "j0123456789ab", "j000000000000", "/"]), max_size=4))
def test_a_job_folder_from_redis_is_always_a_job_folder_strictly_inside_the_root(tmp_path, job_id, parts):
    """What a worker writes into and empties (rmtree) is <root>/<sweep>/<job id>, whatever Redis says."""
    from workers.shared.files import job_dir

    root = (tmp_path / "root").resolve()
    try:
        resolved = job_dir(str(root), str(root / "/".join(parts)) if parts else str(root), job_id)
    except ValueError:
        return
    path = Path(resolved)
    assert path.name == job_id
    assert root in path.parent.parents  # at least <root>/<sweep>/<job>: never the root, never a sweep folder
