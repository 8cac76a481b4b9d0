"""The registry is the one place a job kind lives: a kind added there (and nothing else) validates, expands and
runs on the real Redis and Ray cluster, because its jobs carry their worker entry point to the worker."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration


def test_a_new_kind_is_one_registry_entry(monkeypatch, tmp_path, store, ray_head, redis_url, namespace):
    from qfarm import cluster, methods, scheduler
    from qfarm.expand import load_plan

    nap = methods.Kind("nap", "workers.sleep:run", "a sleep by another name", needs_model=False,
                       parents=frozenset({"nap"}), options=methods.SleepOptions)
    monkeypatch.setitem(methods.KINDS, "nap", nap)
    spec = tmp_path / "naps.yaml"
    spec.write_text("name: new-kind\nresources: {gpus: 0}\njobs:\n"
                    "  - {name: first, kind: nap, seconds: 0.1, matrix: {index: [0, 1]}}\n"
                    "  - {name: then, kind: nap, from: first, seconds: 0.1}\n")
    _, plan = load_plan(spec)
    # index varies among the sweep's nap jobs, so every label shows it; the children's lineage tells them apart
    assert [j.label for j in plan.jobs] == ["nap index=0", "nap index=1", "nap index=0", "nap index=0"]
    assert [j.lineage for j in plan.jobs[2:]] == [("nap index=0",), ("nap index=1",)]
    assert {j.payload()["worker"] for j in plan.jobs} == {"workers.sleep:run"}

    cluster.connect(ray_head.address)
    store.submit(plan.sweep_id, plan.name, [j.payload() for j in plan.jobs], source=str(spec),
                 output_root=str(tmp_path / "out"))
    scheduler.start(plan.sweep_id, redis_url, namespace, str(tmp_path / "out"))
    deadline = time.time() + 120
    while time.time() < deadline and any(j.status in ("queued", "running") for j in store.sweep_jobs(plan.sweep_id)):
        time.sleep(0.3)
    jobs = store.sweep_jobs(plan.sweep_id)
    assert [j.status for j in jobs] == ["succeeded"] * 4, [j.error for j in jobs]
    assert all(j.result["slept_s"] >= 0.1 and j.spec["kind"] == "nap" for j in jobs)
    by_id = {j.id: j for j in jobs}
    for child in jobs[2:]:  # the DAG rule came from the registry entry too: each ran after its parent
        assert child.started_at >= by_id[child.spec["parent"]].finished_at


def test_a_payload_naming_a_module_outside_workers_is_refused():
    from qfarm.errors import Permanent
    from workers.actor import entry_point

    assert entry_point("workers.sleep:run", "worker").__name__ == "run"
    for bad in ("os:system", "workers.sleep:run;import os", "subprocess:run", "", None):
        with pytest.raises(Permanent):
            entry_point(bad, "worker")


def test_every_method_and_backend_of_the_registry_names_a_class_its_workers_can_import():
    """A typo in a registry string would surface only when a job of it ran: every one resolves here, and each
    quantizer has the Protocol's two calls."""
    from qfarm.methods import KINDS
    from workers.actor import entry_point

    names = set()
    for kind in KINDS.values():
        assert callable(entry_point(kind.worker, "worker")), kind.name
        for method in (kind.methods or {}).values():
            for impl in [method.worker, *(method.backends or {}).values()]:
                if impl is None:
                    continue
                cls = entry_point(impl, "method")
                assert callable(getattr(cls, "quantize", None)) and callable(getattr(cls, "load", None)), impl
                names.add(impl)
    assert "workers.gptqmodel:GPTQModelBackend" in names and "workers.llmc:LLMCompressor" in names
