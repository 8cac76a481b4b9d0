"""The scheduler's decisions as pure functions of what it read from Redis, on a fake clock: when a job is ready,
waits or is skipped; when a running job is orphaned or past its timeout; when a failure is retried."""

from __future__ import annotations

import pytest

from qfarm.errors import Permanent, Retryable, retryable
from qfarm.farm.scheduler import GONE_WORKER_S, HEARTBEAT_TTL_S, orphaned, readiness, seen_after, superseded, timed_out
from qfarm.farm.store import JobRecord, JobStatus, retry_decision

NOW = 1_000_000.0


def job(status="running", **kw) -> JobRecord:
    return JobRecord(id=kw.pop("id", "jp"), status=status, spec=kw.pop("spec", {"label": "train r=8", "kind": "train",
                                                                               "options": {"r": 8}}), **kw)


def test_a_job_without_a_parent_is_ready_with_no_inputs():
    assert readiness(None, None) == ("ready", {})


@pytest.mark.parametrize("status", ["queued", "running"])
def test_a_child_waits_while_its_parent_may_still_succeed(status):
    assert readiness("jp", job(status)) == ("wait", None)


def test_a_child_of_a_succeeded_parent_gets_its_artifact_and_options():
    decision, inputs = readiness("jp", job("succeeded", result={"artifact": "/out/s/jp/adapter"}))
    assert decision == "ready"
    assert inputs == {"id": "jp", "kind": "train", "label": "train r=8", "options": {"r": 8},
                      "artifact": "/out/s/jp/adapter"}


@pytest.mark.parametrize("status,error,reason", [
    ("failed", "RuntimeError: boom", "skipped: train r=8 (jp) failed: RuntimeError: boom"),
    ("cancelled", None, "skipped: train r=8 (jp) cancelled"),
    ("skipped", "skipped: x", "skipped: train r=8 (jp) skipped: skipped: x"),
])
def test_a_child_of_a_parent_that_will_never_succeed_is_skipped_with_why(status, error, reason):
    assert readiness("jp", job(status, error=error)) == ("skip", reason)


def test_a_child_whose_parent_is_missing_is_skipped():
    assert readiness("jgone", None) == ("skip", "skipped: the job it comes from (jgone) is not in Redis")


def test_a_final_runs_again_when_a_job_it_waited_for_succeeds_in_an_attempt_it_was_not_handed():
    def cand(i, status, attempt):
        return job(status, id=f"c{i}", attempt_id=attempt, spec={"label": f"rtn[{i}]", "kind": "quantize", "options": {}})

    final = {"label": "final[1]", "kind": "final", "options": {}, "after": ["c0", "c1", "c2"]}
    jobs = {"c0": cand(0, "succeeded", "a0"), "c1": cand(1, "cancelled", "a1"), "c2": cand(2, "failed", "a2")}
    handed = job("queued", id="f", spec=final)
    assert seen_after(handed, jobs) == {"c0": "a0"}  # what it ranks: the candidates that succeeded
    ran = job("succeeded", id="f", spec=final, attempt_id="f1", after_seen={"c0": "a0"})
    assert superseded(ran, jobs) is None
    jobs["c2"] = cand(2, "failed", "a3")  # ran again and failed again: nothing new to rank
    jobs["c1"] = cand(1, "queued", None)  # requeued by `qfarm retry`: nothing new yet
    assert superseded(ran, jobs) is None
    jobs["c1"] = cand(1, "succeeded", "a4")
    assert superseded(ran, jobs) == "ran again: rtn[1] (c1) succeeded after it ranked the jobs it waited for"
    # one it had ranked, succeeded again in another attempt (a resubmit after its record was lost) is new too
    assert "rtn[0] (c0)" in superseded(job("succeeded", id="f", spec=final, after_seen={"c0": "old", "c1": "a4"}), jobs)
    # not while it runs or failed (it ranks what it is handed then), nor a record that says nothing of what it saw
    for other in (job("running", id="f", spec=final, after_seen={}), job("failed", id="f", spec=final, after_seen={}),
                  job("succeeded", id="f", spec=final)):
        assert superseded(other, jobs) is None


def test_orphaned_after_the_heartbeat_lapses_or_sooner_when_its_worker_is_gone():
    alive, gone = (lambda name: False), (lambda name: True)
    fresh = job(heartbeat_at=NOW - 1, worker="w1")
    assert orphaned(fresh, NOW, gone) is None  # a beat a second ago: not orphaned, whatever Ray says
    quiet = job(heartbeat_at=NOW - GONE_WORKER_S - 1, worker="w1")
    assert orphaned(quiet, NOW, alive) is None  # two missed beats, but its worker lives: a slow job
    assert orphaned(quiet, NOW, gone) == f"its worker w1 is gone (no heartbeat for {GONE_WORKER_S + 1:.0f} s)"
    lapsed = job(heartbeat_at=NOW - HEARTBEAT_TTL_S, worker="w1")
    assert orphaned(lapsed, NOW, alive) == f"heartbeat lapsed ({HEARTBEAT_TTL_S:.0f} s without one)"
    never_beat = job(started_at=NOW - HEARTBEAT_TTL_S - 5, worker=None)
    assert orphaned(never_beat, NOW, gone).startswith("heartbeat lapsed")  # the start counts as its last sign


def test_timeouts():
    assert timed_out(NOW - 10, 5, NOW) and not timed_out(NOW - 4, 5, NOW)
    assert not timed_out(None, 5, NOW) and not timed_out(NOW - 10, None, NOW)


def test_the_retry_policy():
    assert retry_decision(1, 3, retryable=True) == JobStatus.QUEUED
    assert retry_decision(3, 3, retryable=True) == JobStatus.FAILED  # attempts used up
    assert retry_decision(1, 3, retryable=False) == JobStatus.FAILED  # another attempt would not change it


def test_which_failures_are_worth_retrying():
    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError, named without importing torch
        pass

    class ActorDiedError(Exception):
        pass

    assert retryable(OutOfMemoryError("CUDA out of memory")) and retryable(MemoryError())
    assert retryable(ActorDiedError()) and retryable(ConnectionResetError()) and retryable(Retryable("node lost"))
    assert not retryable(ValueError("bad group size")) and not retryable(FileNotFoundError("x.jsonl"))
    assert not retryable(RuntimeError("sleep job 9 was asked to fail"))
    assert not retryable(type("E", (Permanent, ConnectionError), {})())  # said permanent: permanent


def test_a_worker_is_hung_when_its_heartbeat_stops_but_not_while_redis_was_away():
    from qfarm.farm.scheduler import hung

    beating = job(heartbeat_at=NOW - 5, started_at=NOW - 500)
    assert hung(beating, NOW, 60) is None
    frozen = job(heartbeat_at=NOW - 95, started_at=NOW - 500)
    assert hung(frozen, NOW, 60) == "worker hung: no heartbeat for 95 s (more than 60 s); its worker was killed"
    assert hung(frozen, NOW, 120) is None  # the sweep's own hung_after_s
    assert hung(frozen, NOW, 60, watching_since=NOW - 30) is None  # Redis came back 30 s ago: no verdict yet
    assert hung(job(started_at=NOW - 70), NOW, 60).startswith("worker hung: no heartbeat for 70 s")  # never beat


def _job(i, kind, parent=None, **options):
    from qfarm.farm.store import JobRecord

    spec = {"kind": kind, "options": options, "parent": parent,
            "eval": {"perplexity": {"seq_len": 512, "max_windows": 8}}}
    return JobRecord(id=f"j{i}", status="queued", spec=spec)


def test_dispatch_is_longest_first_and_by_critical_path_on_a_pipeline():
    from qfarm.farm.eta import dispatch_order, ranks, work_shape

    cal = {"samples": 16, "seq_len": 256}
    jobs = [_job(0, "quantize", method="none"), _job(1, "quantize", method="bnb-nf4"),
            _job(2, "train", method="lora", max_steps=20, batch_size=4, seq_len=128),
            _job(3, "merge", parent="j2"), _job(4, "quantize", parent="j3", method="gptq", calibration=cal),
            _job(5, "quantize", method="awq", calibration=cal), _job(6, "quantize", method="gguf")]
    order = [j.id for j in dispatch_order(jobs, jobs)]
    # the train job leads a chain (train -> merge -> gptq) longer than the single longest job (awq): first
    assert order == ["j2", "j5", "j3", "j4", "j6", "j1", "j0"]
    r = ranks(jobs)
    assert r["j2"] == pytest.approx(r["j3"] + 1.0 * (4096 + 20 * 4 * 128 * 3))  # its own time + the chain below
    assert [j.id for j in dispatch_order(jobs, jobs, how="file")] == [f"j{i}" for i in range(7)]
    # what a shape took in earlier sweeps replaces its prior (and scales the others' priors by the same measure):
    # here awq took 100 s and gptq 2,000 s on this cluster, against the prior's 3:2: awq goes last
    seen = {work_shape(jobs[5].job): 100.0, work_shape(jobs[4].job): 2000.0}
    assert [j.id for j in dispatch_order(jobs, jobs, seen)] == ["j2", "j3", "j4", "j6", "j1", "j0", "j5"]
    assert ranks(jobs, seen)["j5"] == 100.0 and ranks(jobs, seen)["j4"] == 2000.0
    # equal jobs keep the spec's order
    same = [_job(i, "quantize", method="rtn", bits=b) for i, b in enumerate((4, 8, 3))]
    assert [j.id for j in dispatch_order(same, same)] == ["j0", "j1", "j2"]


def test_gptq_jobs_that_differ_only_in_quality_options_share_their_timing_history():
    """eta keyed history on an option list that named "damp" while the option is dampening_frac: each dampening
    value had a history of its own. Quality-only options are marked on their fields now (qfarm.sweep.methods)."""
    from qfarm.farm.eta import work_shape
    from qfarm.sweep.job import Job

    def gptq(**opts):
        return Job.from_record("j1", {"kind": "quantize", "options": {"method": "gptq", "bits": 4, "group_size": 64, **opts},
                                      "model": {"key": "m"}, "eval": {"perplexity": {"seq_len": 512}}})

    assert work_shape(gptq(dampening_frac=0.01)) == work_shape(gptq(dampening_frac=0.1)) \
        == work_shape(gptq(bits=8, act_order=False, dampening_frac=0.05))
    assert work_shape(gptq(calibration={"samples": 64})) != work_shape(gptq(calibration={"samples": 128}))
