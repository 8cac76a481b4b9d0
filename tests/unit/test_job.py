"""The typed job record (qfarm.sweep.job): what Redis stores reads back into the same Job, its options typed by the
model the spec was validated with, every default from there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qfarm.errors import Permanent
from qfarm.sweep.job import Job, option_view

SNAPSHOT = Path(__file__).resolve().parents[1] / "integration" / "job_ids.json"


def payloads() -> list[dict]:
    return [job for plan in json.loads(SNAPSHOT.read_text()).values() for job in plan["jobs"]]


def test_every_shipped_job_reads_back_as_itself_with_typed_options():
    jobs = payloads()
    assert {j["kind"] for j in jobs} >= {"quantize", "train", "merge"} and len(jobs) > 40
    for payload in jobs:
        job = Job.from_payload({**payload, "output_dir": "/out/s/" + payload["id"], "input": {"artifact": "a"}})
        assert job.payload() == payload and job.output_dir.endswith(payload["id"]) and job.input.artifact == "a"
        typed = job.opts.model_dump()
        assert {k: typed[k] for k in payload["options"]} == payload["options"], payload["label"]
        if payload["options"].get("method") in ("gptq", "rtn", "awq"):
            assert job.opts.group_size == payload["options"]["group_size"]  # a field, not a dict key


def test_an_awq_job_on_gptqmodel_reads_back_though_its_stored_defaults_name_llm_compressor_options():
    awq = next(p for p in payloads() if p["options"].get("method") == "awq" and p["options"].get("backend") == "gptqmodel")
    assert awq["options"]["duo_scaling"] is True  # written out as a default: a user may not write it with gptqmodel
    assert Job.from_payload(awq).opts.backend == "gptqmodel"


def test_a_record_qfarm_did_not_write_is_refused_and_an_older_one_takes_defaults():
    with pytest.raises(Permanent, match="without id, options"):
        Job.from_payload({"id": {"x": 1}, "kind": "quantize"})
    with pytest.raises(Permanent, match="do not validate"):
        _ = Job.from_payload({"id": "j1", "kind": "quantize", "options": {"method": "rtn", "bits": 5}}).opts
    old = Job.from_payload({"id": "j1", "kind": "quantize", "options": {"method": "rtn", "bits": 8}})
    assert old.bits == 8 and old.input.artifact is None and old.label == "quantize" and old.opts.group_size == 64


def test_a_kind_this_registry_lacks_reads_its_stored_options_as_attributes():
    job = Job.from_payload({"id": "j1", "kind": "nap", "options": {"seconds": 0.5}})
    assert job.opts.seconds == 0.5 and job.opts.anything_else is None


def test_the_memory_plan_reads_defaults_from_the_options_model():
    view = option_view("train", {"method": "qlora", "r": 16})
    assert (view.r, view.seq_len, view.batch_size, view.quant_type) == (16, 256, 4, "nf4")
    assert option_view("quantize", {"method": "gguf"}).gguf_type == "Q4_K_M"
