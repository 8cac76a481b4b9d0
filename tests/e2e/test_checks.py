"""A reference proves its inputs before anything is compared with it, through the CLI as a user runs it: a model
whose tokenizer cuts text into single characters fails every job with the reason, and a model whose tokenizer adds
BOS is evaluated with it. (That the bundled GGUF agrees with llama.cpp, tokenizer and float copy, is asserted on the
reference row of tests/e2e/test_sweeps.py's GGUF sweep.)"""

from __future__ import annotations

import pytest

from tests.cli import qfarm, results
from tests.tiny import make_tiny_model

pytestmark = pytest.mark.e2e


def sweep(tmp_path, name: str, model: str, data, jobs: str) -> str:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(f"name: {name}\nmodel: {model}\n"
                    f"eval: {{perplexity: {{dataset: {data}, seq_len: 64, max_windows: 2}}, speed: null}}\n"
                    f"resources: {{gpus: 1}}\njobs:\n{jobs}")
    return str(spec)


def test_a_tokenizer_that_cuts_text_into_characters_fails_the_sweep_with_the_reason(cli_env, shared_data, tmp_path):
    """The reference refuses it, once: the row measured against it is skipped with the reference's reason."""
    wiki = shared_data / "wikitext2" / "wiki.test.raw"
    tiny = make_tiny_model(tmp_path / "chars", wiki.read_text()[:20000].splitlines(), characters=True)
    jobs = "  - {kind: quantize, method: none}\n  - {kind: quantize, method: rtn, bits: 8, group_size: 32}\n"
    out = qfarm(cli_env, "submit", sweep(tmp_path, "chars", str(tiny), wiki, jobs), "--wait")
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    rows = results(cli_env, "chars")
    assert [r["status"] for r in rows] == ["failed", "skipped"]  # the reference refused; its row never started
    for r in rows:  # refused to publish numbers, and says why, not retried (it would fail again)
        assert "cut the evaluation text into single characters" in r["error"] and r["perplexity"] is None
    assert [r["attempts"] for r in rows] == [1, 0] and rows[1]["error"].startswith(f"skipped: none ({rows[0]['job_id']})")
    assert "single characters" in qfarm(cli_env, "results", "chars", "--format", "md").stdout


def test_bos_follows_the_model(cli_env, shared_data, tmp_path):
    wiki = shared_data / "wikitext2" / "wiki.test.raw"
    tiny = make_tiny_model(tmp_path / "bos", wiki.read_text()[:20000].splitlines(), bos=True)
    out = qfarm(cli_env, "submit", sweep(tmp_path, "bos", str(tiny), wiki, "  - {kind: quantize, method: none}\n"),
                "--wait")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (row,) = results(cli_env, "bos")
    assert row["ppl_bos"] is True and row["tokenizer_check"] is None and row["source_kl"] is None
    assert 0 < row["bits_per_byte"] < 8 and row["ppl_tokens"] == 2 * 63
