"""``kind: evaluate`` through the CLI as a user runs it, on a tiny random Llama: checkpoints an earlier sweep made
(compressed-tensors from RTN, bitsandbytes NF4) and a plain float copy, each evaluated in a second sweep against that
sweep's reference. An evaluated checkpoint's figures are the figures of the row that made it (the same model by
another path: the cross-check), its format and bits are read from the checkpoint itself, and a checkpoint with
another vocabulary is refused by `qfarm validate` at its line, before any job runs (the job's own check, the second
line, is tested in tests/integration/test_validate_checks.py)."""

from __future__ import annotations

import shutil

import pytest

from tests.cli import qfarm, results
from tests.tiny import corpus_of, guanaco_rows, make_tiny_model

pytestmark = pytest.mark.e2e

EVAL = "eval: {{perplexity: {{dataset: {data}, seq_len: 64, max_windows: 4}}, speed: null}}"


def test_checkpoints_made_elsewhere_score_as_the_rows_that_made_them_and_another_vocabulary_is_refused(
        cli_env, shared_data, tmp_path):
    data = guanaco_rows(shared_data, tmp_path, 120)
    model = make_tiny_model(tmp_path / "tiny", corpus_of(data), seed=4)
    first = tmp_path / "make.yaml"
    first.write_text(f"""\
name: make
model: {model}
{EVAL.format(data=data)}
jobs:
  - {{kind: quantize, method: none}}
  - {{kind: quantize, method: rtn, bits: 4, group_size: 32}}
  - {{kind: quantize, method: bnb-nf4}}
""")
    out = qfarm(cli_env, "submit", str(first), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    made = {r["method"]: r for r in results(cli_env, "make")}
    published = tmp_path / "published"
    published.mkdir()
    for method in ("rtn", "bnb-nf4"):  # as a user downloads a published quant: a folder of its own
        shutil.copytree(made[method]["artifact"], published / method)
    shutil.copytree(model, published / "float-copy")
    other = make_tiny_model(tmp_path / "other-vocab", corpus_of(data)[60:], seed=4)
    second = tmp_path / "evaluate.yaml"
    second.write_text(f"""\
name: evaluate
model: {model}
{EVAL.format(data=data)}
jobs:
  - {{kind: quantize, method: none}}
  - kind: evaluate
    matrix: {{checkpoint: [{published / 'rtn'}, {published / 'bnb-nf4'}, {published / 'float-copy'}, {other}]}}
""")
    shown = qfarm(cli_env, "validate", str(second))
    said = shown.stdout + shown.stderr
    assert shown.returncode == 2 and "evaluate.yaml:7: jobs[1].matrix.checkpoint[3]" in said, said
    assert f"checkpoint '{other}' is not in the sweep's model's vocabulary: its tokenizer's vocabulary differs" in said
    second.write_text(second.read_text().replace(f", {other}]", "]"))
    shown = qfarm(cli_env, "validate", str(second))
    assert shown.returncode == 0, shown.stdout + shown.stderr
    qfarm(cli_env, "submit", str(second), "--wait")
    rows = {r["label"]: r for r in results(cli_env, "evaluate")}
    assert set(rows) == {"none", "evaluate rtn", "evaluate bnb-nf4", "evaluate float-copy"}
    assert all(r["status"] == "succeeded" for r in rows.values()), {k: r["error"] for k, r in rows.items()}
    for method, fmt in (("rtn", "compressed-tensors"), ("bnb-nf4", "bitsandbytes")):
        row = rows[f"evaluate {method}"]
        assert row["checkpoint_format"] == fmt and row["bits"] == 4 and row["kind"] == "evaluate"
        assert row["method"] == "checkpoint"
        assert row["perplexity"] == pytest.approx(made[method]["perplexity"], rel=1e-4)
        assert row["kl_div"] == pytest.approx(made[method]["kl_div"], rel=1e-3, abs=1e-6) and row["kl_div"] > 1e-6
        assert row["top1_agree"] == pytest.approx(made[method]["top1_agree"], abs=1e-9)
        assert row["size_mb"] == pytest.approx(made[method]["size_mb"], rel=5e-2)  # + the model card
    same = rows["evaluate float-copy"]
    assert same["checkpoint_format"] == "float" and same["bits"] is None
    assert same["kl_div"] == pytest.approx(0.0, abs=1e-6) and same["top1_agree"] == 1.0
    assert same["perplexity"] == pytest.approx(rows["none"]["perplexity"], rel=1e-6)
