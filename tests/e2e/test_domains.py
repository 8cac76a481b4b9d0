"""A sweep evaluated on two domains (the bundled Python docs and WikiText-2), on the real bundled model: every row
has both domains' perplexity, KL and top-1 with their standard errors, in the JSON, the table, the frontier, the
report and the MLflow export; the reference's log-probs are made once per domain, by the reference job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli import qfarm, submitted_id

pytestmark = pytest.mark.e2e


def test_every_row_is_measured_on_every_domain(cli_env, model_root, shared_data, tmp_path):
    env = dict(cli_env, QFARM_OUTPUT_ROOT=str(model_root))
    wiki = tmp_path / "wikitext2.txt"
    wiki.write_text((shared_data / "wikitext2" / "wiki.test.raw").read_text()[:30_000])
    spec = tmp_path / "domains.yaml"
    spec.write_text(f"""\
name: e2e-domains
model: bundled:smollm2-135m
eval:
  perplexity:
    - {{dataset: bundled:python-docs, seq_len: 128, max_windows: 2}}
    - {{dataset: {wiki}, name: wiki, seq_len: 128, max_windows: 2}}
  speed: null
jobs:
  - {{kind: quantize, method: rtn}}
  - {{kind: quantize, method: gguf, gguf_type: Q4_0}}
""")
    out = qfarm(env, "submit", str(spec), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep = submitted_id(out.stdout)
    rows = {r["method"]: r for r in json.loads(qfarm(env, "results", sweep, "--format", "json").stdout)}
    assert sorted(rows) == ["gguf", "none", "rtn"]  # the reference added by expansion
    for method, r in rows.items():
        assert r["status"] == "succeeded" and r["ppl_domains"] == ["python-docs", "wiki"], (method, r.get("error"))
        for d in ("python-docs", "wiki"):
            for figure in ("ppl", "kl", "top1", "ppl_delta_pct"):
                assert isinstance(r[f"{figure}@{d}"], float) and isinstance(r[f"{figure}@{d}_se"], float), (method, figure, d)
        # the plain columns are the first domain's, measured once
        assert r["perplexity"] == r["ppl@python-docs"] and r["kl_div"] == r["kl@python-docs"]
        assert r["ref_ppl@wiki"] == rows["none"]["ppl@wiki"] != rows["none"]["ppl@python-docs"]
    ref, rtn, q4 = rows["none"], rows["rtn"], rows["gguf"]
    # bits per weight of the quantized layers, one measure across libraries: 4 bits + a bfloat16 scale per 64
    assert rtn["bits_per_weight"] == pytest.approx(4 + 16 / 64, abs=1e-3) and ref.get("bits_per_weight") is None
    assert q4["bits_per_weight"] == pytest.approx(4.5) and set(q4["layer_formats"].values()) >= {"Q4_0"}  # 18 bytes/32
    assert ref["kl@wiki"] == 0.0 and rtn["kl@wiki"] > 0 and q4["kl@wiki"] > 0  # llama.cpp's runtime too
    assert rtn["ref_cache"] != "computed" and q4["ref_cache"] != "computed"  # the reference job made both domains'
    card = Path(rtn["model_card"]).read_text()
    assert f"| Δ perplexity / KL on wiki | {rtn['ppl_delta_pct@wiki']:+.2f} ± " in card and "domain wiki: 2 windows" in card

    table = qfarm(env, "results", sweep, "--columns", "method,ppl@wiki,kl@wiki,top1@wiki", "--frontier", "kl@wiki,size_mb")
    assert table.returncode == 0, table.stderr
    assert "kl@wiki" in table.stdout and f"{rtn['ppl@wiki']:.3f}" in table.stdout
    wrong = qfarm(env, "results", sweep, "--frontier", "kl@wikk,size_mb")
    assert wrong.returncode == 2 and "Did you mean 'kl@wiki'?" in wrong.stderr

    page = tmp_path / "report.html"
    rep = qfarm(env, "report", sweep, "-o", str(page), "--png", str(tmp_path / "png"))
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert 'id="fig-domains"' in page.read_text() and (tmp_path / "png" / "domains.png").is_file()

    sent = qfarm(env, "results", sweep, "--to", "mlflow")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{model_root}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments() if e.name == sweep])
    by_method = {run.data.params.get("method"): run.data.metrics for run in runs}
    assert by_method["rtn"]["kl/wiki"] == pytest.approx(rtn["kl@wiki"])
    assert by_method["gguf"]["ppl/python-docs_se"] == pytest.approx(q4["ppl@python-docs_se"])
