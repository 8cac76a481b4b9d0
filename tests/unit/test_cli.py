"""The CLI without services: help for every verb, validate's output and exit codes, light imports."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from qfarm.cli import cli

VERBS = sorted(cli.commands)  # every verb the CLI has, so a new one is smoke-tested without editing this file


def test_the_verbs_are_all_there():
    assert {"validate", "submit", "status", "results", "report", "retry", "resume", "cancel", "down"} <= set(VERBS)


@pytest.mark.parametrize("verb", VERBS)
def test_help(verb):
    out = CliRunner().invoke(cli, [verb, "--help"])
    assert out.exit_code == 0, out.output
    assert "Usage: cli " in out.output or "Usage: qfarm " in out.output
    assert cli.commands[verb].help or cli.commands[verb].short_help, f"qfarm {verb} has no help text"


def test_validate_ok_and_bad(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("name: naps\njobs:\n  - {kind: sleep, matrix: {index: [0, 1]}}\n")
    out = CliRunner().invoke(cli, ["validate", "--offline", str(good)])
    assert out.exit_code == 0 and "valid. Sweep naps-" in out.output and "2 jobs: 2 sleep" in out.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        name: naps
        jobs:
          - {kind: sleep, seconds: -1}
    """))
    out = CliRunner().invoke(cli, ["validate", "--offline", str(bad)])
    assert out.exit_code == 2
    assert out.output == (f"{bad}: 1 error\n  {bad}:3: jobs[0].seconds: kind sleep: seconds: "
                          "input should be greater than or equal to 0 (got -1)\n")
    assert "Traceback" not in out.output


def test_cli_imports_no_ml_or_ray():
    code = ("import sys; from qfarm.cli import cli; from qfarm.sweep import spec, expand; from qfarm.farm import store; from qfarm.results import rows, progress;"
            "heavy = [m for m in ('torch', 'transformers', 'ray', 'bitsandbytes') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cluster_yaml_is_a_launcher_config():
    import yaml

    from tests.conftest import REPO

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert config["head_node_type"] in config["available_node_types"]
    gpu_types = {k: v for k, v in config["available_node_types"].items() if v["resources"].get("GPU")}
    assert {"gpu_h100", "gpu_a10"} <= set(gpu_types)
    assert all(v["resources"][k] == v["resources"]["GPU"] for k, v in gpu_types.items())
    assert {k: float(v["labels"]["qfarm-gpu-mem-gb"]) for k, v in gpu_types.items()} == {"gpu_h100": 80, "gpu_a10": 24}
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))  # Ray's own schema for `ray up` accepts it
    # ... and its node types are what qfarm's placement reads as capacity the autoscaler may start
    from qfarm.farm.cluster import node_types_of

    types = {t.name: t for t in node_types_of(config)}
    assert set(types) == set(config["available_node_types"]) - {config["head_node_type"]}
    assert types["gpu_h100"].resources["GPU"] == 8 and types["gpu_h100"].labels == {"qfarm-gpu-mem-gb": "80"}
    assert types["gpu_a10"].max_workers == 4 and config["available_node_types"]["gpu_a10"]["min_workers"] == 0
    text = (REPO / "cluster.yaml").read_text()
    assert "redis://" not in text and ".bashrc" not in " ".join(c for c in config["setup_commands"] if "REDIS" in c)
    assert "~/.qfarm/redis-url" in config["file_mounts"]  # the Redis URL comes from a file outside the YAML
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)
    assert any("GGML_CUDA=on" in c for c in config["worker_setup_commands"])  # llama.cpp on the GPU nodes
    assert "llama-cpp-tools" in (REPO / "Makefile").read_text() and "[ml,gptqmodel,eval,report,mlflow,wandb,test]" in (REPO / "Makefile").read_text()


@pytest.mark.parametrize("url", ["notaurl", "http://127.0.0.1:6379/0", "redis//127.0.0.1"])
def test_a_redis_url_that_is_not_one_is_a_usage_error_not_an_internal_one(url):
    out = CliRunner().invoke(cli, ["--redis-url", url, "status"], obj={})
    assert out.exit_code == 2, out.output
    assert "not a Redis URL" in out.output and "internal error" not in out.output and "redis://HOST:6379/0" in out.output


def test_the_clis_job_limit_is_validates():
    """The CLI keeps its own copy of the default (importing qfarm.sweep.validate would load pydantic for `--help`)."""
    import qfarm.cli
    import qfarm.sweep.validate

    assert qfarm.cli.MAX_JOBS == qfarm.sweep.validate.MAX_JOBS
