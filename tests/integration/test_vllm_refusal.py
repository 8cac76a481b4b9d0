"""eval.engine: vllm against a real (local) Ray cluster whose GPU slots are logical: validate and submit refuse
it before anything runs, with what the cluster has; where CUDA is real the same spec passes this check."""

from __future__ import annotations

import pytest

from qfarm.farm.cluster import cuda_gpu_count
from tests.cli import qfarm

pytestmark = pytest.mark.integration


@pytest.mark.skipif(cuda_gpu_count() > 0, reason="this machine has CUDA GPUs: nothing to refuse")
def test_a_vllm_sweep_is_refused_on_a_cluster_without_cuda(cli_env, tmp_path):
    spec = tmp_path / "v.yaml"
    spec.write_text("name: v\nmodel: bundled:smollm2-135m\neval: {engine: vllm}\n"
                    "jobs:\n  - {kind: quantize, matrix: {method: [none, gptq, bnb-nf4]}}\n")
    for command in ("validate", "submit"):
        out = qfarm(cli_env, command, str(spec))
        text = " ".join((out.stdout + out.stderr).split())
        assert out.returncode == 2, text
        assert "eval.engine: vllm runs on CUDA GPUs only, and no node of this cluster has one" in text
        assert "2 job(s) (gptq, none)" in text and "Traceback" not in text
    assert "v-" not in qfarm(cli_env, "status").stdout  # nothing was submitted: the namespace has no sweep
