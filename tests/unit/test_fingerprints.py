"""A local model's or dataset's identity includes its content: editing a file gives its jobs new ids (they run
again), leaving it alone keeps them (finished jobs are reused)."""

from __future__ import annotations

import json
import os

from qfarm.sweep.expand import load_sweep
from qfarm.sweep.sources import CHUNK, fingerprint


def folder(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                                   "intermediate_size": 128, "vocab_size": 512}))
    (model / "model.safetensors").write_bytes(b"\0" * (5 * CHUNK))
    (tmp_path / "eval.txt").write_text("some evaluation text " * 200)
    spec = tmp_path / "s.yaml"
    spec.write_text("name: fp\nmodel: model\neval: {perplexity: {dataset: eval.txt}, speed: null}\n"
                    "jobs:\n  - {kind: quantize, method: none}\n")
    return model, spec


def ids(spec) -> list[str]:
    return [j.id for j in load_sweep(spec)[1].jobs]


def test_editing_the_model_or_the_data_changes_the_job_ids(tmp_path):
    model, spec = folder(tmp_path)
    first = ids(spec)
    assert ids(spec) == first  # nothing changed: the same jobs

    weights = model / "model.safetensors"
    with open(weights, "r+b") as f:  # a weight changed in the last MiB, size and mtime kept
        st = weights.stat()
        f.seek(5 * CHUNK - 10)
        f.write(b"\1")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    edited = ids(spec)
    assert edited != first

    (model / "config.json").write_text((model / "config.json").read_text().replace("512", "513"))
    assert ids(spec) not in (first, edited)
    before = ids(spec)
    (tmp_path / "eval.txt").write_text("other evaluation text " * 200)
    assert ids(spec) != before


def test_qfarms_own_notes_beside_a_model_do_not_change_it(tmp_path):
    model, _ = folder(tmp_path)
    before = fingerprint(model)
    (model / "QFARM_CHECKS.json").write_text("{}")
    assert fingerprint(model) == before
    (model / "tokenizer.json").write_text("{}")
    assert fingerprint(model) != before
