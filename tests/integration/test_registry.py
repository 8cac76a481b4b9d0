"""The registry is the one place a job kind lives: a kind added there (and nothing else) validates, expands and
runs on the real Redis and Ray cluster, because its jobs carry their worker entry point to the worker."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration


def test_a_new_kind_is_one_registry_entry(monkeypatch, tmp_path, store, ray_head, redis_url, namespace):
    from qfarm.farm import cluster, scheduler
    from qfarm.sweep import methods
    from qfarm.sweep.expand import load_sweep

    nap = methods.Kind("nap", "workers.sleep:run", "a sleep by another name", needs_model=False,
                       parents=frozenset({"nap"}), options=methods.SleepOptions)
    monkeypatch.setitem(methods.KINDS, "nap", nap)
    spec = tmp_path / "naps.yaml"
    spec.write_text("name: new-kind\nresources: {gpus: 0}\njobs:\n"
                    "  - {name: first, kind: nap, seconds: 0.1, matrix: {index: [0, 1]}}\n"
                    "  - {name: then, kind: nap, from: first, seconds: 0.1}\n")
    _, plan = load_sweep(spec)
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
    from qfarm.sweep.methods import KINDS
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
    assert "workers.quantize.gptqmodel:GPTQModelBackend" in names and "workers.quantize.llmc:LLMCompressor" in names


def test_a_new_quantization_method_is_one_registry_entry(monkeypatch, tmp_path):
    """A method added to the registry (and nothing else: its worker here is an existing one) validates and
    expands, gets the memory plan it names, is ordered and timed by its own cost, shares timing history across the
    options it marks quality-only, and is a row of the table with its bits."""
    from typing import Literal

    from pydantic import Field

    from qfarm.farm import eta
    from qfarm.farm.store import JobRecord
    from qfarm.results.rows import row
    from qfarm.sweep import methods
    from qfarm.sweep.expand import load_sweep
    from qfarm.sweep.job import Job
    from qfarm.sweep.modelinfo import shape_of
    from qfarm.sweep.plan import model_shape, plan_jobs

    class ToyOptions(methods.Options):
        method: Literal["toy"]
        bits: int = Field(4, ge=2, le=8, json_schema_extra=methods.QUALITY_ONLY)
        group_size: int = 64
        sharpness: float = Field(0.5, json_schema_extra=methods.QUALITY_ONLY)

    toy = methods.Method("toy", ToyOptions, "a toy method", "workers.quantize.llmc:LLMCompressor", cost=30.0,
                         plan="llm-compressor", library="toylib")
    monkeypatch.setitem(methods.METHODS, "toy", toy)
    spec = tmp_path / "toy.yaml"
    spec.write_text("name: toy\nmodel: bundled:smollm2-135m\neval: {perplexity: {seq_len: 128, max_windows: 2}}\n"
                    "jobs:\n  - {kind: quantize, method: none}\n"
                    "  - {kind: quantize, method: toy, matrix: {bits: [4, 8]}}\n")
    _, plan = load_sweep(spec)
    payloads = [j.payload() for j in plan.jobs]
    assert [p["label"] for p in payloads] == ["none", "toy 4b", "toy 8b"]
    assert [p["impl"] for p in payloads[1:]] == ["workers.quantize.llmc:LLMCompressor"] * 2

    shape = model_shape(payloads[0]["model"])
    plans = {p["label"]: p for p in plan_jobs(payloads, shape, "cuda")}
    assert "decompressed artifact" in plans["toy 4b"]["parts"]["gpu"]  # llm-compressor's terms, as named
    assert plans["toy 8b"]["disk_gb"] > plans["toy 4b"]["disk_gb"] > 0

    records = [JobRecord(p["id"], "queued", p, sweep_id=plan.sweep_id) for p in payloads]
    sharper = {**payloads[1], "options": {**payloads[1]["options"], "sharpness": 0.9}}
    assert eta.work_shape(Job.from_payload(sharper)) == eta.work_shape(plan.jobs[1])  # quality-only, as marked
    bigger = {**payloads[1], "options": {**payloads[1]["options"], "group_size": 128}}
    assert eta.work_shape(Job.from_payload(bigger)) != eta.work_shape(plan.jobs[1])
    assert eta.prior_units(plan.jobs[1]) == 30.0 * eta.prior_units(plan.jobs[0])  # its cost against the reference's 1
    # the reference first: both rows need it (the critical path of each runs through it)
    assert [j.spec["label"] for j in eta.dispatch_order(records, records)][0] == "none"

    done = JobRecord(payloads[2]["id"], "succeeded", payloads[2], result={"ppl": 12.5}, sweep_id=plan.sweep_id)
    assert {k: row(done)[k] for k in ("method", "bits", "group_size", "ppl")} == {
        "method": "toy", "bits": 8, "group_size": 64, "ppl": 12.5}
    from workers.shared.card import library

    assert library("quantize", "toy") == "toylib" and shape_of(payloads[0]["model"]) is not None


def test_every_registry_entry_names_a_memory_plan_there_is():
    from qfarm.sweep.methods import KINDS
    from qfarm.sweep.plan import PLAN_TERMS

    for kind in KINDS.values():
        assert kind.plan in PLAN_TERMS, kind.name
        for method in (kind.methods or {}).values():
            assert method.plan in PLAN_TERMS, method.name
    assert KINDS["quantize"].method("gptq").plan != KINDS["quantize"].method("none").plan


def test_a_job_queued_before_workers_were_grouped_into_packages_still_finds_its_code():
    """Payloads in Redis name their worker code (``workers.bnb:BitsAndBytes``); since workers/ is grouped by what a job
    does (workers/quantize/bnb.py), a sweep queued before still resumes."""
    from workers.actor import MOVED, entry_point
    from workers.quantize.bnb import BitsAndBytes
    from workers.train.merge import run

    assert entry_point("workers.bnb:BitsAndBytes", "method") is BitsAndBytes
    assert entry_point("workers.merge:run", "worker") is run
    for old, new in MOVED.items():
        assert entry_point(f"{new}:__name__", "worker") == new, old
