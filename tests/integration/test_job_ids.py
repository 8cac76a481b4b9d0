"""Every shipped sweep file makes the jobs it made before (issue 37's refactors are behaviour-unchanged): the same
sweep id, job ids, labels and payloads as `job_ids.json`, recorded before the typed-job work. A job id is a hash of
the job's identity, which names the model and data files by location and content, so the files are copied to one
fixed folder (the same on every machine) and the specs read from there.

    python tests/integration/test_job_ids.py --record   # only when a change is *meant* to give other ids
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: --record
from qfarm.sweep.sources import bundled_model_path  # noqa: E402 - the real one, before a test points it at ROOT

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = Path(__file__).with_name("job_ids.json")
ROOT = Path("/tmp/qfarm-job-ids-v1")  # fixed: locations are part of a local file's identity
DATA = "guanaco_llama2_1k/train.jsonl"
TEXTS = (DATA, "wikitext2/wiki.test.raw")  # the shared data the specs name
MTIME_NS = 1_790_000_000 * 10**9


def lay_out(shared_data: Path) -> Path:
    """The shipped specs under ROOT/repo/jobs, the data they name under ROOT/shared/data, the bundled GGUF under
    ROOT/model; returns the folder of the specs."""
    (ROOT / "repo").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ROOT / "repo" / "jobs", ignore_errors=True)  # another checkout's specs, left by its run, are not ours
    shutil.copytree(REPO / "jobs", ROOT / "repo" / "jobs")
    for text in TEXTS:
        (ROOT / "shared" / "data" / text).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / text, ROOT / "shared" / "data" / text)
    source = bundled_model_path("smollm2-135m")
    (ROOT / "model").mkdir(exist_ok=True)
    if not (ROOT / "model" / source.name).is_file():
        shutil.copyfile(source, ROOT / "model" / source.name)
    for path in [ROOT / "shared" / "data" / text for text in TEXTS] + [ROOT / "model" / source.name]:
        os.utime(path, ns=(MTIME_NS, MTIME_NS))  # a file's modification time is part of its fingerprint too
    return ROOT / "repo" / "jobs"


def plans(folder: Path) -> dict:
    """Each spec's sweep id and jobs (id, label, payload), the payload's one machine-specific path made relative."""
    from qfarm.sweep.expand import load_sweep

    out = {}
    for spec in sorted(folder.glob("*.yaml")):
        _, plan = load_sweep(spec)
        out[spec.name] = {"sweep": plan.sweep_id,
                          "jobs": [json.loads(json.dumps(j.payload(), default=str)) for j in plan.jobs]}
    return out


@pytest.fixture
def bundled_at_root(monkeypatch):
    from qfarm.sweep import sources

    monkeypatch.setattr(sources, "bundled_model_path", lambda name: ROOT / "model" / sources.BUNDLED_MODELS[name][1])


def test_every_shipped_sweep_makes_the_jobs_it_made_before(shared_data, bundled_at_root):
    now, before = plans(lay_out(shared_data)), json.loads(SNAPSHOT.read_text())
    assert sorted(now) == sorted(before)
    for name, plan in before.items():
        assert now[name]["sweep"] == plan["sweep"], name
        assert [j["id"] for j in now[name]["jobs"]] == [j["id"] for j in plan["jobs"]], name
        for new, old in zip(now[name]["jobs"], plan["jobs"]):
            assert new == old, f"{name} {old['id']} ({old['label']}): its payload changed"


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    from qfarm.sweep import sources
    from tests.conftest import SHARED_DATA

    sources.bundled_model_path = lambda name: ROOT / "model" / sources.BUNDLED_MODELS[name][1]
    folder = lay_out(SHARED_DATA)
    SNAPSHOT.write_text(json.dumps(plans(folder), indent=1) + "\n")
    print(f"recorded {SNAPSHOT}")
