"""Tables that fit a terminal, the ETA, and what goes to MLflow and into model cards (plain data, no services)."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from qfarm.farm.store import JobRecord
from qfarm.results.rows import rich_table, rows

LONG = "gptq-w4-g64-actorder-calib512"  # a label a person must read whole


def job(i, status, method, result=None, error=None, started=100.0, finished=112.5, worker=None, label=None):
    spec = {"kind": "quantize", "label": label or method, "options": {"method": method, "bits": 4}}
    return JobRecord(id=f"j{i:012x}", status=status, spec=spec, attempts=1, result=result, error=error,
                     started_at=started if status != "queued" else None,
                     finished_at=finished if status in ("succeeded", "failed") else None, worker=worker,
                     progress="quantizing layer 17/30" if status == "running" else None)


def full_row(i, label):
    return job(i, "succeeded", "gptq", label=label, result={
        "size_mb": 123.4, "size_vs_ref": 0.41, "peak_mem_mb": 2048, "load_s": 1.23, "perplexity": 14.632,
        "perplexity_se": 0.64, "ppl_delta_pct": 2.1, "ppl_delta_pct_se": 0.3, "kl_div": 0.0123, "kl_div_se": 0.001,
        "top1_agree": 0.912, "prefill_tokens_per_s": 812.3, "decode_tokens_per_s": 41.2, "device": "cpu",
        "runtime": "transformers dense (cpu)"})


def rendered(table, width: int) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [80, 120])
def test_results_table_fits_the_terminal_with_labels_whole(width):
    data = rows([full_row(1, LONG), full_row(2, "rtn-w8"),
                 job(3, "failed", "awq", label="awq-w4-g64", error="RuntimeError: CUDA out of memory while " * 3)])
    lines = rendered(rich_table(data, title="sweep s", width=width), width)
    assert max(len(x) for x in lines) <= width
    text = "\n".join(lines)
    assert LONG in text and "awq-w4-g64" in text  # never cut
    assert "ppl" in text and "14.632 ±0.64" in text  # the figures that matter most stay, whole
    assert "not shown at this width" in text and "--wide" in text
    wide = rendered(rich_table(data, title="sweep s", width=None), 400)
    assert "decode tok/s" in "\n".join(wide) and "not shown" not in "\n".join(wide)
    assert max(len(x) for x in wide) > width  # everything does not fit: something was left out at width


def test_narrower_terminals_keep_fewer_columns_by_priority():
    data = rows([full_row(1, LONG)])
    headers = {}
    for width in (80, 120, 200):
        text = "\n".join(rendered(rich_table(data, title="t", width=width), width)).split("not shown")[0]
        headers[width] = {h for h in ("ppl", "size MB", "KL", "decode tok/s", "peak MB", "load s", "time s") if h in text}
    assert headers[80] <= headers[120] <= headers[200]
    assert {"ppl", "size MB"} <= headers[80] and "load s" not in headers[80]


def test_user_chosen_columns_are_all_kept():
    data = rows([full_row(1, LONG)])
    text = "\n".join(rendered(rich_table(data, columns=["label", "load_s", "device"], width=80), 200))
    assert "load s" in text and "not shown" not in text


class FakeStore:
    namespace = "team-a"

    def __init__(self, sweeps):
        self.records = sweeps

    def sweep_ids(self):
        return list(self.records)

    def sweep(self, sid):
        from qfarm.farm.store import SweepRecord

        return SweepRecord(id=sid, name=sid.rsplit("-", 1)[0], created_at=1_700_000_000.0,
                           submitted_at=1_700_000_100.0)

    def statuses(self, sid):
        return self.records[sid]


@pytest.mark.parametrize("width", [80, 120])
def test_status_shows_whole_sweep_names_and_counts_in_80_columns(width):
    from qfarm.results.progress import sweeps_table

    names = ["seed-004-methods-3f2a9c1b", "held-out-qlora-ranks-77aa01ff", "smollm2-bnb-0c9d8e7f"]
    store = FakeStore({n: ["succeeded"] * 5 + ["failed"] + ["running"] * 2 + ["queued"] * 3 for n in names})
    text = "\n".join(rendered(sweeps_table(store, width), width))
    assert max(len(x) for x in text.splitlines()) <= width
    for n in names:
        assert n in text
    for header in ("jobs", "succeeded", "failed", "running", "queued"):
        assert header in text
    assert "cancelled" not in text  # zero everywhere: not worth a column at this width
    line = next(x for x in text.splitlines() if names[0] in x)
    assert re.findall(r"\b\d+\b", line.split(names[0])[1])[:5] == ["11", "5", "1", "2", "3"]


def test_jobs_table_keeps_label_and_status_and_says_the_eta():
    from qfarm.farm.store import SweepRecord
    from qfarm.results.progress import jobs_table

    sweep = SweepRecord(id="s-1", name="s", created_at=0)
    jobs = [job(1, "succeeded", "gptq", label=LONG, started=0, finished=100, worker="w1"),
            job(2, "running", "gptq", label="gptq-w3-g64-actorder-calib512", started=1000, worker="w2"),
            job(3, "queued", "gptq", label="gptq-w2-g64-actorder-calib512")]
    text = "\n".join(rendered(jobs_table(sweep, jobs, {}, width=80), 80))
    assert max(len(x) for x in text.splitlines()) <= 80
    for j in jobs:
        assert j.spec["label"] in text
    assert "ETA" in text and "running" in text


def test_eta_from_finished_jobs_of_the_same_shape_else_history_else_the_scaled_prior():
    from qfarm.farm.eta import eta_s, expected, prior_units, say, work_shape

    def rec(i, status, method, started=None, finished=None, worker=None):
        return JobRecord(id=f"j{i}", status=status, spec={"kind": "quantize", "options": {"method": method}},
                         started_at=started, finished_at=finished, worker=worker)

    jobs = [rec(1, "succeeded", "gptq", 0, 100, "w1"), rec(2, "succeeded", "rtn", 0, 10, "w2"),
            rec(3, "running", "gptq", 1000, None, "w1"), rec(4, "queued", "gptq"), rec(5, "queued", "rtn"),
            rec(6, "queued", "awq")]
    guess = expected(jobs)
    # awq: none finished, nothing remembered: its prior (the registry's cost 12 x 8192 tokens: the spec's default
    # 16 windows of 512) scaled by the median of what the finished jobs took against theirs (gptq 100 s for
    # 8 x 8192, rtn 10 s for 2 x 8192)
    awq = prior_units(jobs[5].job) * (100 / (8 * 8192) + 10 / (2 * 8192)) / 2
    assert guess == {"j3": 100, "j4": 100, "j5": 10, "j6": pytest.approx(awq)} and 100 < awq < 110
    # at t=1040: j3 has 60 s left; + 100 + 10 + awq queued, over 1 running slot
    assert eta_s(jobs, now=1040) == pytest.approx(60 + 100 + 10 + awq)
    jobs[4] = rec(5, "running", "rtn", 1030, None, "w2")  # two running: 60 + 100 + 0 + awq over 2 slots
    assert eta_s(jobs, now=1040) == pytest.approx((60 + 100 + awq) / 2)
    # an earlier sweep's awq of the same shape took 300 s: the history wins over the prior
    assert expected(jobs, {work_shape(jobs[5].job): 300.0})["j6"] == 300
    assert eta_s([rec(1, "queued", "gptq")]) is None and eta_s([rec(1, "succeeded", "gptq", 0, 1)]) == 0
    assert eta_s([rec(1, "queued", "gptq")], history={work_shape(rec(1, "queued", "gptq").job): 42.0}) == 42
    assert say(None).startswith("ETA unknown") and say(0) == "done" and say(125) == "ETA 2 min 05 s"


def test_a_spec_names_a_server_or_a_store_inside_the_output_root():
    from qfarm.results.tracking import resolve_uri, spec_uri_problem

    for fine in ("http://mlflow.internal:5000", "https://x/y", "databricks", "sqlite:///mlflow.db", "mlruns",
                 "runs/qfarm"):
        assert spec_uri_problem(fine) is None, fine
    for bad in ("/etc/mlruns", "../elsewhere", "sqlite:////abs/path.db", "file:///tmp/x", "~/mlruns",
                "runs/../../x", "ftp://host/x", "sqlite:///../x.db"):
        assert spec_uri_problem(bad), bad
    assert resolve_uri("sqlite:///m.db", "/out") == "sqlite:////out/m.db"
    assert resolve_uri("mlruns", "/out") == "file:///out/mlruns"
    assert resolve_uri(None, "/out", env={}) == "sqlite:////out/mlflow.db"
    assert resolve_uri(None, "/out", env={"MLFLOW_TRACKING_URI": "http://h:5000"}) == "http://h:5000"
    assert resolve_uri("http://h:5000", "/out") == "http://h:5000"


def test_mlflow_params_metrics_and_loss_history_of_a_row():
    from qfarm.results.tracking import loss_points, metrics_of, params_of

    row = {"job_id": "j1", "kind": "train", "method": "qlora", "perplexity": 14.6, "pareto": True,
           "started_at": 1.0, "answers": [{"prompt": "p", "answer": "a"}], "label": "qlora-r8", "kl_div": float("nan"),
           "size_mb": None, "train_steps": 40}
    m = metrics_of(row)
    assert m == {"perplexity": 14.6, "pareto": 1.0, "train_steps": 40.0}  # no timestamps, text, NaN or nulls
    p = params_of(row, {"r": 8, "calibration": {"samples": 64, "dataset": "bundled:c4"}, "lr": 2e-4})
    assert p["r"] == "8" and p["calibration.samples"] == "64" and p["calibration.dataset"] == "bundled:c4"
    assert p["kind"] == "train" and p["label"] == "qlora-r8"
    assert loss_points([[1, 2.5], [2, 2.25], ["x", 1], [3, float("inf")]]) == [(1, 2.5), (2, 2.25)]


def test_model_card_metadata_and_figures():
    from qfarm.sweep.job import Job
    from workers.shared.card import card_text

    job_ = {"id": "j1", "kind": "quantize", "label": "gptq-w4-g64", "options": {"method": "gptq", "bits": 4,
            "group_size": 64}, "eval": {"perplexity": {"seq_len": 512, "dataset": "bundled:python-docs"},
                                        "speed": {"prompt_tokens": 64, "new_tokens": 16, "runs": 2}}}
    result = {"size_mb": 80.5, "size_vs_ref": 0.3, "perplexity": 15.1, "perplexity_se": 0.7, "ref_perplexity": 14.6,
              "kl_div": 0.02, "decode_tokens_per_s": 30.0, "runtime": "transformers dense", "device": "cpu",
              "versions": {"torch": "2.13.0"}, "ppl_windows": 8, "ppl_tokens": 4088}
    meta, body = card_text(Job.from_payload(job_), result, {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                          "license": "apache-2.0"}, "s-1")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0" and meta["quantization"] == {"method": "gptq", "bits": 4, "group_size": 64}
    assert meta["qfarm"]["versions"] == {"torch": "2.13.0"} and "gptq" in meta["tags"] and "4-bit" in meta["tags"]
    assert "| perplexity | 15.100 ± 0.7 (reference 14.600) |" in body
    assert "8 windows of 512 tokens" in body and "bundled:python-docs" in body
    local = {"kind": "gguf", "location": "/home/alice/models", "gguf_file": "m.Q4_1.gguf",
             "key": "gguf:/home/alice/models#m.Q4_1.gguf@fc8ebd769d2a"}
    meta3, body3 = card_text(Job.from_payload(dict(job_, model=local)), result, {}, "s-1")
    assert meta3["qfarm"]["source"] == "gguf:m.Q4_1.gguf@fc8ebd769d2a"  # a card never names this machine's paths
    assert "/home/alice" not in body3 + str(meta3) and "dequantized to float" in body3
    meta2, _ = card_text(Job.from_payload(dict(job_, kind="train", options={"method": "lora", "r": 8})), {}, {}, "s-1")
    assert "base_model" not in meta2 and meta2["library_name"] == "peft" and meta2["training"] == {"r": 8}


def test_a_tracking_server_login_never_reaches_a_message():
    from qfarm.results.tracking import shown

    assert shown("https://alice:pw-123@mlflow.example:5000/") == "https://***@mlflow.example:5000/"
    assert "tok-9" not in shown("http://h:5000/?token=tok-9")
    assert shown("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"  # a local store's path is kept as it is
