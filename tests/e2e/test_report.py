"""The report of a real finished sweep, checked in a real headless browser (Debian's chromium), and results
across sweeps. The sweep: the real bundled model, a reference, two quantized variants, and one job that fails,
evaluated on two domains (the bundled Python docs and WikiText-2): every row has both domains' figures in the JSON,
the table, the frontier, the report, the model card and the MLflow export."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from qfarm.results.report import DPI, PNG_WIDTH_IN, _bars_height
from tests.cli import qfarm, submitted_id

pytestmark = pytest.mark.e2e

SPEC = """\
name: {name}
model: bundled:smollm2-135m
eval:
  perplexity:
    - {{seq_len: 128, max_windows: 2}}
    - {{dataset: {wiki}, name: wiki, seq_len: 128, max_windows: 2}}
  speed: {{prompt_tokens: 16, new_tokens: 4, runs: 1}}
  prompts: ["What is the capital of France?", "Name a colour."]
  max_new_tokens: 8
jobs:
  - {{kind: quantize, method: none}}
  - {{kind: quantize, method: rtn}}
  - {{kind: quantize, method: gguf, gguf_type: Q4_0}}  # smaller than the Q4_1 reference file: on the frontier
  - {{kind: sleep, seconds: 0, fail: true, max_attempts: 1}}
"""


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("the report test needs Debian's chromium (apt-get install chromium); `make test` installs it",
                    pytrace=False)
    return exe


def test_report_renders_in_a_browser_with_table_plots_answers_and_failures(cli_env, model_root, shared_data, tmp_path):
    env = dict(cli_env, QFARM_OUTPUT_ROOT=str(model_root))
    wiki = tmp_path / "wikitext2.txt"
    wiki.write_text((shared_data / "wikitext2" / "wiki.test.raw").read_text()[:30_000])
    spec = tmp_path / "report.yaml"
    spec.write_text(SPEC.format(name="report-e2e", wiki=wiki))
    out = qfarm(env, "submit", str(spec), "--wait")
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]  # one job fails, on purpose
    sweep = submitted_id(out.stdout)
    domains_in_rows(env, sweep, model_root)

    page, pngs = tmp_path / "site" / "report.html", tmp_path / "png"
    rep = qfarm(env, "report", sweep, "-o", str(page), "--png", str(pngs))
    assert rep.returncode == 0, rep.stdout + rep.stderr
    text = page.read_text()
    # self-contained: nothing to fetch, nothing to run
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text) and "<script" not in text
    assert text.count("<svg") == 4 and 'id="fig-scatter"' in text and 'id="fig-memory"' in text
    assert 'id="fig-domains"' in text and png_size(pngs / "domains.png")[0] == PNG_WIDTH_IN * DPI  # method x domain
    body = text[text.index('<table id="results">'):text.index("</table>")]
    assert body.count("<tr") == 1 + 4 and body.count('class="failed"') == 1
    assert "was asked to fail (fail: true)" in body.split('class="failed"')[1]  # the reason, in the row
    assert "What is the capital of France?" in text and "Name a colour." in text  # answers side by side
    assert "max_windows: 2" in text and "transformers 5.17" in text  # the spec and the environment

    assert png_size(pngs / "scatter.png") == (PNG_WIDTH_IN * DPI, 5 * DPI)
    assert png_size(pngs / "memory.png") == (PNG_WIDTH_IN * DPI, round(_bars_height(3) * DPI))
    assert png_size(pngs / "speed.png") == (PNG_WIDTH_IN * DPI, round(_bars_height(3) * DPI))

    shot = tmp_path / "shot.png"
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--window-size=1400,2600", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and dom.stdout.count("<svg") == 4 and "report-e2e" in dom.stdout
    run = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--window-size=1400,2600", f"--screenshot={shot}", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 2600)
    pixels = list(image.getdata())

    def count(rgb, tol=12):
        return sum(1 for p in pixels if all(abs(a - b) <= tol for a, b in zip(p, rgb)))

    # what a person sees: the frontier line and ★ marks (red), the size bars (blue), the table's header shading
    assert count((214, 39, 40)) > 300, "no frontier line or ★ in the screenshot"
    assert count((76, 114, 176)) > 1000, "no size bars in the screenshot"  # ~1,900 px: bars scale with the sizes
    assert count((246, 248, 250), tol=2) > 5000, "no table header in the screenshot"
    top = image.crop((0, 0, 1400, 400)).convert("L")
    assert sum(1 for p in top.getdata() if p < 100) > 2000, "no text at the top of the page"


def domains_in_rows(env, sweep: str, model_root: Path) -> None:
    """Both domains' figures on every succeeded row, measured once for the first domain's plain columns too, the
    reference's log-probs made by the reference job; in the table, the frontier, the model card and MLflow."""
    rows = {r["method"]: r for r in json.loads(qfarm(env, "results", sweep, "--format", "json").stdout)
            if r["status"] == "succeeded"}
    assert sorted(rows) == ["gguf", "none", "rtn"]
    for method, r in rows.items():
        assert r["ppl_domains"] == ["python-docs", "wiki"], method
        for d in ("python-docs", "wiki"):
            for figure in ("ppl", "kl", "top1", "ppl_delta_pct"):
                assert isinstance(r[f"{figure}@{d}"], float) and isinstance(r[f"{figure}@{d}_se"], float), (method, figure, d)
        assert r["perplexity"] == r["ppl@python-docs"] and r["kl_div"] == r["kl@python-docs"]
        assert r["ref_ppl@wiki"] == rows["none"]["ppl@wiki"] != rows["none"]["ppl@python-docs"]
    ref, rtn, q4 = rows["none"], rows["rtn"], rows["gguf"]
    assert ref["kl@wiki"] == 0.0 and rtn["kl@wiki"] > 0 and q4["kl@wiki"] > 0  # llama.cpp's runtime too
    assert rtn["ref_cache"] != "computed" and q4["ref_cache"] != "computed"  # the reference job made both domains'
    # bits per weight of the quantized layers, one measure across libraries: 4 bits + a bfloat16 scale per 64
    assert rtn["bits_per_weight"] == pytest.approx(4 + 16 / 64, abs=1e-3) and ref.get("bits_per_weight") is None
    assert q4["bits_per_weight"] == pytest.approx(4.5) and set(q4["layer_formats"].values()) >= {"Q4_0"}  # 18 bytes/32
    card = Path(rtn["model_card"]).read_text()
    assert f"| Δ perplexity / KL on wiki | {rtn['ppl_delta_pct@wiki']:+.2f} ± " in card and "domain wiki: 2 windows" in card

    table = qfarm(env, "results", sweep, "--columns", "method,ppl@wiki,kl@wiki,top1@wiki", "--frontier", "kl@wiki,size_mb")
    assert table.returncode == 0, table.stderr
    assert "kl@wiki" in table.stdout and f"{rtn['ppl@wiki']:.3f}" in table.stdout
    wrong = qfarm(env, "results", sweep, "--frontier", "kl@wikk,size_mb")
    assert wrong.returncode == 2 and "Did you mean 'kl@wiki'?" in wrong.stderr

    sent = qfarm(env, "results", sweep, "--to", "mlflow")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{model_root}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments() if e.name == sweep])
    by_method = {run.data.params.get("method"): run.data.metrics for run in runs}
    assert by_method["rtn"]["kl/wiki"] == pytest.approx(rtn["kl@wiki"])
    assert by_method["gguf"]["ppl/python-docs_se"] == pytest.approx(q4["ppl@python-docs_se"])


def test_results_across_two_sweeps(cli_env, model_root, tmp_path):
    env = dict(cli_env, QFARM_OUTPUT_ROOT=str(model_root))
    ids = []
    for name, seconds in (("across-a", 0.1), ("across-b", 0.2)):
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(f"name: {name}\njobs:\n  - {{kind: sleep, seconds: {seconds}, matrix: {{index: [0, 1]}}}}\n")
        out = qfarm(env, "submit", str(spec), "--wait")
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        ids.append(submitted_id(out.stdout))
    rows = json.loads(qfarm(env, "results", *ids, "--format", "json").stdout)
    assert sorted(r["sweep_id"] for r in rows) == sorted(ids * 2)
    table = qfarm(env, "results", "across-a", "across-b", "--where", "index=1", "--sort", "-duration_s").stdout
    assert "sweep" in table and table.count("sleep[1]") == 2 and "sleep[0]" not in table
    bad = qfarm(env, "results", "across-a", "--sort", "durration_s")
    assert bad.returncode == 2 and "Did you mean 'duration_s'?" in bad.stderr + bad.stdout
