"""The Redis store against the real server (own namespace, removed after each test)."""

from __future__ import annotations

import json

import pytest

from qfarm.farm.store import JobStatus

pytestmark = pytest.mark.integration


def jobs(n=2):
    return [{"id": f"j{i}", "kind": "sleep", "label": f"sleep[{i}]", "options": {"index": i}, "max_attempts": 3}
            for i in range(n)]


def test_submit_is_idempotent_and_requeues_only_failed(store):
    assert store.submit("s1", "s", jobs(), source="x.yaml", output_root="/tmp/o") == {"created": 2}
    assert store.claim("j0", "a1", sweep_id="s1")
    assert store.finish("j0", "a1", JobStatus.SUCCEEDED, result={"x": 1})
    assert store.claim("j1", "b1", sweep_id="s1")
    assert store.finish("j1", "b1", JobStatus.FAILED, error="boom")
    counts = store.submit("s1", "s", jobs(), source="x.yaml", output_root="/tmp/o")
    assert counts == {"succeeded": 1, "requeued": 1}
    j0, j1 = store.sweep_jobs("s1")
    assert (j0.status, j0.result, j0.attempts) == ("succeeded", {"x": 1}, 1)
    assert (j1.status, j1.error, j1.attempts) == ("queued", None, 0)


def test_claim_is_exclusive_and_finish_is_exactly_once(store):
    store.submit("s1", "s", jobs(1), source="x", output_root="/o")
    assert store.claim("j0", "first", sweep_id="s1")
    assert not store.claim("j0", "second", sweep_id="s1")  # already running
    # the first attempt is given up and retried; its zombie finishing later must not write
    assert store.requeue("j0", "first", error="worker died")
    assert store.claim("j0", "retry", sweep_id="s1")
    assert not store.finish("j0", "first", JobStatus.SUCCEEDED, result={"zombie": True})
    assert store.finish("j0", "retry", JobStatus.SUCCEEDED, result={"ok": True})
    assert not store.finish("j0", "retry", JobStatus.FAILED, error="twice")
    job = store.job("j0")
    assert job.status == "succeeded" and job.result == {"ok": True} and job.attempts == 2
    history = store.attempts("j0")
    assert [(a["attempt_id"], a["status"]) for a in history] == [("first", "retried"), ("retry", "succeeded")]


def test_heartbeat_only_from_the_current_attempt(store):
    store.submit("s1", "s", jobs(1), source="x", output_root="/o")
    store.claim("j0", "a", sweep_id="s1")
    assert store.beat("j0", "a", "perplexity 1/8")
    assert not store.beat("j0", "stale", "nope")
    job = store.job("j0")
    assert job.progress == "perplexity 1/8" and job.heartbeat_at is not None


def test_cancel_marks_queued_jobs_and_sets_the_flag(store):
    store.submit("s1", "s", jobs(3), source="x", output_root="/o")
    store.claim("j0", "a", sweep_id="s1")
    assert store.request_cancel("s1") == 2
    assert store.sweep("s1").cancel_requested
    assert [j.status for j in store.sweep_jobs("s1")] == ["running", "cancelled", "cancelled"]


def test_events_and_json_only(store):
    store.submit("s1", "s", jobs(1), source="x", output_root="/o")
    store.claim("j0", "a", sweep_id="s1")
    store.finish("j0", "a", JobStatus.SUCCEEDED, result={"ppl": 1.5})
    events = store.r.xrange(store.keys.events())
    assert [(e[1]["from"], e[1]["to"]) for e in events] == [("queued", "running"), ("running", "succeeded")]
    raw = store.r.hgetall(store.keys.job("j0"))
    assert json.loads(raw["result"]) == {"ppl": 1.5} and json.loads(raw["spec"])["id"] == "j0"


def test_find_sweep_by_id_prefix_and_name(store):
    store.submit("demo-aaaa1111", "demo", jobs(1), source="x", output_root="/o")
    assert store.find_sweep("demo-aaaa1111").id == "demo-aaaa1111"
    assert store.find_sweep("demo-aa").id == "demo-aaaa1111"
    assert store.find_sweep("demo").id == "demo-aaaa1111"
    assert store.find_sweep("other") is None


def test_the_start_of_two_sweep_ids_is_a_usage_error_naming_both(store):
    from qfarm.errors import UsageError

    store.submit("demo-aaaa1111", "demo", jobs(1), source="x", output_root="/o")
    store.submit("demo-aabb2222", "demo", jobs(1), source="y", output_root="/o")
    with pytest.raises(UsageError, match=r"'demo-aa' is the start of 2 sweep ids \(demo-aaaa1111, demo-aabb2222\)"):
        store.find_sweep("demo-aa")
    assert store.find_sweep("demo-aab").id == "demo-aabb2222" and store.find_sweep("demo").id == "demo-aabb2222"


def test_a_name_means_the_most_recently_submitted_sweep_of_that_name(store):
    store.submit("demo-aaaa", "demo", jobs(1), source="x", output_root="/o")
    store.submit("demo-bbbb", "demo", jobs(1), source="y", output_root="/o")
    assert store.find_sweep("demo").id == "demo-bbbb"
    store.submit("demo-aaaa", "demo", jobs(1), source="x", output_root="/o")  # resubmitting the first file
    assert store.find_sweep("demo").id == "demo-aaaa"
    assert store.sweep("demo-aaaa").created_at < store.sweep("demo-bbbb").created_at  # created_at is kept


def test_one_retry_policy_for_every_failed_attempt(store):
    """fail_attempt: a retryable failure is requeued until max_attempts, then fails saying so; a permanent one
    fails at once; an attempt that is no longer current writes nothing."""
    store.submit("s1", "s", jobs(2), source="x", output_root="/o")
    for n in (1, 2):
        assert store.claim("j0", f"a{n}", sweep_id="s1")
        assert store.fail_attempt("j0", f"a{n}", error="worker process died", retryable=True) == "queued"
    assert store.claim("j0", "a3", sweep_id="s1")
    assert store.fail_attempt("j0", "a2", error="zombie", retryable=True) is None  # a stale attempt
    assert store.fail_attempt("j0", "a3", error="worker process died", retryable=True) == "failed"
    j0 = store.job("j0")
    assert (j0.status, j0.attempts, j0.error) == ("failed", 3, "worker process died (after 3 attempts)")
    assert [a["status"] for a in store.attempts("j0")] == ["retried", "retried", "failed"]
    assert all(a["started_at"] for a in store.attempts("j0"))  # each attempt's record says when it started
    assert store.claim("j1", "b1", sweep_id="s1")
    assert store.fail_attempt("j1", "b1", error="ValueError: bad file", retryable=False, error_detail="tb") == "failed"
    j1 = store.job("j1")
    assert (j1.status, j1.attempts, j1.error, j1.error_detail) == ("failed", 1, "ValueError: bad file", "tb")
