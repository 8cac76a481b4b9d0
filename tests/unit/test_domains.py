"""Several evaluation domains (a list-form ``eval.perplexity``): their names, refusals, what a job carries, the
columns and frontier objectives they add, and how their figures reach MLflow."""

from __future__ import annotations

from qfarm.sweep.expand import load_sweep
from tests.unit.test_spec import problems, write

HEAD = """\
    name: s
    model: bundled:smollm2-135m
    eval:
      perplexity:
"""
JOBS = """\
    jobs:
      - {kind: quantize, method: bnb-int8}
"""


def test_domains_are_named_resolved_and_carried_by_every_job(tmp_path):
    (tmp_path / "tickets.jsonl").write_text('{"text": "my printer is on fire"}\n')
    (tmp_path / "wikitext2.txt").write_text("text " * 100)
    path = write(tmp_path, HEAD + """\
        - {dataset: bundled:python-docs}
        - {dataset: wikitext2.txt, name: wiki, seq_len: 64}
        - {dataset: tickets.jsonl}
""" + JOBS)
    _, sweep = load_sweep(path)
    job = next(j for j in sweep.jobs if j.options.get("method") == "bnb-int8")
    ev = job.evaluation
    assert [d.name for d in ev.domains] == ["python-docs", "wiki", "tickets"]
    assert ev.perplexity.dataset == ev.domains[0].dataset and ev.domains[1].seq_len == 64
    assert ev.domains[2].dataset["location"] == str(tmp_path / "tickets.jsonl") and ev.texts == list(ev.domains)
    reference = next(j for j in sweep.jobs if j.options.get("method") == "none")
    assert [d.name for d in reference.evaluation.domains] == ["python-docs", "wiki", "tickets"]  # it makes all three


def test_the_one_text_form_keeps_its_job_ids_and_adds_no_domains(tmp_path):
    one = write(tmp_path, "name: s\nmodel: bundled:smollm2-135m\neval: {perplexity: {seq_len: 256}}\n" + JOBS.replace("    ", ""),
                name="one.yaml")
    listed = write(tmp_path, HEAD + "        - {seq_len: 256}\n" + JOBS, name="listed.yaml")
    (a,), (b,) = ([j for j in load_sweep(p)[1].jobs if j.options.get("method") == "bnb-int8"] for p in (one, listed))
    assert a.evaluation.domains == [] and a.evaluation.texts == [a.evaluation.perplexity]
    assert a.id != b.id and [d.name for d in b.evaluation.domains] == ["python-docs"]


def test_domain_refusals_name_the_entry(tmp_path):
    (tmp_path / "wikitext2.txt").write_text("text " * 100)
    path = write(tmp_path, HEAD + """\
        - {dataset: wikitext2.txt}
        - {dataset: ./wikitext2.txt, seq_len: 8}
        - {dataset: nowhere.txt, name: "a b"}
""" + JOBS)
    msgs = problems(path)
    assert f"{path}:6: eval.perplexity[1].seq_len: input should be greater than or equal to 16 (got 8)" in msgs
    assert any(m.startswith(f"{path}:7: eval.perplexity[2].name: 'a b' is not a valid name") for m in msgs), msgs
    fixed = write(tmp_path, HEAD + """\
        - {dataset: wikitext2.txt}
        - {dataset: ./wikitext2.txt, seq_len: 64}
        - {dataset: nowhere.txt}
""" + JOBS, name="fixed.yaml")
    msgs = problems(fixed)
    assert any(m.startswith(f"{fixed}:6: eval.perplexity[1].name: domain name 'wikitext2' is taken by "
                            "eval.perplexity[0]") for m in msgs), msgs
    assert any(m.startswith(f"{fixed}:7: eval.perplexity[2].dataset:") for m in msgs), msgs
    empty = write(tmp_path, HEAD.replace("perplexity:\n", "perplexity: []\n") + JOBS, name="empty.yaml")
    assert any("eval.perplexity: list should have at least 1 item" in m for m in problems(empty)), problems(empty)


def test_domain_columns_are_objectives_with_their_own_noise():
    from qfarm.results.columns import domain_columns, domains_of
    from qfarm.results.compare import noise_se, objectives_of, parse_frontier

    rows = [{"status": "succeeded", "ppl_domains": ["code", "wiki"], "ppl@wiki": 30.0, "ppl_delta_pct@wiki": 5.0,
             "ppl_delta_pct@wiki_se": 0.5, "ref_ppl@wiki": 28.0, "kl@wiki": 0.1, "kl@wiki_se": 0.01}]
    assert domains_of(rows + [{"ppl_domains": ["wiki", "tickets"]}]) == ["code", "wiki", "tickets"]
    shown = [c.name for c in domain_columns(rows) if c.header]
    assert shown == ["ppl_delta_pct@wiki"]  # the first domain is the plain columns
    lower, higher = objectives_of(rows)
    assert {"kl@wiki", "ppl@code", "ppl_delta_pct@wiki"} <= set(lower) and "top1@wiki" in higher
    assert parse_frontier("kl@wiki,size_mb", rows) == ("kl@wiki", "size_mb")
    assert noise_se(rows[0], "ppl@wiki") == 0.5 / 100 * 28.0 and noise_se(rows[0], "kl@wiki") == 0.01


def test_domain_figures_reach_mlflow_under_names_it_accepts():
    from qfarm.results.tracking import metrics_of
    from workers.evaluate.harness import domain_columns

    figures = {"perplexity": 12.0, "perplexity_se": 0.3, "kl_div": 0.05, "kl_div_se": 0.001, "top1_agree": 0.9,
               "top1_agree_se": 0.01, "ppl_delta_pct": 2.0, "ppl_delta_pct_se": 0.2, "ref_perplexity": 11.7}
    row = domain_columns("wiki", figures)
    assert row == {"ppl@wiki": 12.0, "ppl@wiki_se": 0.3, "ppl_delta_pct@wiki": 2.0, "ppl_delta_pct@wiki_se": 0.2,
                   "kl@wiki": 0.05, "kl@wiki_se": 0.001, "top1@wiki": 0.9, "top1@wiki_se": 0.01, "ref_ppl@wiki": 11.7}
    assert metrics_of(row)["kl/wiki"] == 0.05 and not any("@" in k for k in metrics_of(row))
