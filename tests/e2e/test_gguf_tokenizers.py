"""A GGUF whose tokenizer transformers rebuilds wrongly (a tiny Gemma 3 with a SentencePiece BPE vocabulary of
Gemma's kind, made here by llama.cpp's own converter) runs a whole sweep with the file's own tokenization: every row's perplexity is
llama.cpp's own on the same text, within 2 %."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.cli import qfarm, submitted_id
from tests.tiny import corpus_of, make_spm_gguf

pytestmark = pytest.mark.e2e

SEQ_LEN, WINDOWS = 128, 4


def llama_cpp_perplexity(gguf: Path, text: str, seq_len: int, max_windows: int) -> float:
    """Perplexity as llama.cpp computes it with the file's own tokenizer and runtime: the text tokenized by
    llama.cpp, cut into windows as qfarm cuts them (BOS, then seq_len - 1 of the text's tokens), every token but
    each window's BOS predicted."""
    import llama_cpp
    import numpy as np

    from workers.shared.data import _squeezed

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=seq_len, logits_all=True, verbose=False, n_threads=1)
    try:
        ids = llm.tokenize(_squeezed(text).encode(), add_bos=False, special=False)
        width, nll, count = seq_len - 1, 0.0, 0
        for w in range(min(max_windows, len(ids) // width)):
            window = [llm.token_bos()] + ids[w * width:(w + 1) * width]
            llm.reset()
            llm.eval(window)
            logits = np.array(llm.scores[:len(window)], dtype=np.float64)
            top = logits.max(-1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
            nll -= sum(logp[i, t] for i, t in enumerate(window[1:]))
            count += len(window) - 1
    finally:
        llm.close()
    return math.exp(nll / count)


def test_a_gguf_transformers_misreads_runs_every_row_on_the_files_own_tokenizer(cli_env, shared_data, tmp_path, store,
                                                                                   ray_head):
    from transformers import AutoTokenizer

    from qfarm.errors import Permanent
    from workers.evaluate.checks import PROBE, gguf_conventions

    gguf = make_spm_gguf(tmp_path / "model", corpus_of(shared_data / "guanaco_llama2_1k" / "train.jsonl", 400) + [PROBE] * 3)
    with pytest.raises(Permanent, match=r"disagrees with the file's own \(llama\.cpp\): \d+ vs \d+ tokens"):
        gguf_conventions(str(gguf), AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))  # what qfarm refused
    text = tmp_path / "wiki.txt"
    text.write_text((shared_data / "wikitext2" / "wiki.test.raw").read_text()[:40_000])
    spec = tmp_path / "spm.yaml"
    spec.write_text(f"""\
name: e2e-spm-gguf
model: {gguf}
eval:
  perplexity: {{dataset: {text}, seq_len: {SEQ_LEN}, max_windows: {WINDOWS}}}
  speed: null
  prompts: ["The capital of France is"]
  max_new_tokens: 4
jobs:
  - {{kind: quantize, method: none}}
  - {{kind: quantize, method: bnb-int8}}
  - {{kind: quantize, method: rtn, bits: 8, group_size: 32}}
  - {{kind: quantize, method: gguf, gguf_type: Q8_0}}
""")
    checked = qfarm(cli_env, "validate", str(spec))
    assert checked.returncode == 0, checked.stdout + checked.stderr  # refused here before, by every job after
    out = qfarm(cli_env, "submit", str(spec), "--wait")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {r["label"]: r for r in json.loads(qfarm(cli_env, "results", submitted_id(out.stdout), "--format", "json").stdout)}
    assert len(rows) == 4, sorted(rows)
    own = llama_cpp_perplexity(gguf, text.read_text(), SEQ_LEN, WINDOWS)
    print(f"llama.cpp's own perplexity {own:.2f}; " + ", ".join(f"{k} {r.get('perplexity')}" for k, r in rows.items()))
    for label, row in rows.items():
        assert row["status"] == "succeeded", (label, row.get("error"))
        assert abs(row["perplexity"] / own - 1) < 0.02, (label, row["perplexity"], own)
    ref = rows["none"]
    assert "rebuilt by qfarm from the file's SentencePiece scores" in ref["tokenizer_check"]
    assert ref["ppl_bos"] is True and ref["source_kl"] < 1e-3  # the float copy computes what the file does
    assert isinstance(ref["answers"][0]["answer"], str)  # prompts are encoded and decoded by the same tokenizer
