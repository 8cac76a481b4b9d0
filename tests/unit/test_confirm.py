"""A job's local model or dataset, re-resolved where it runs (qfarm.sweep.sources.confirm): still the content its key names."""

from __future__ import annotations

import os

import pytest

from qfarm.errors import Permanent
from qfarm.sweep.sources import confirm, resolve_dataset, resolve_model


def as_record(ref) -> dict:
    return {"kind": ref.kind, "location": ref.location, "gguf_file": getattr(ref, "gguf_file", None), "key": ref.key}


def test_an_unchanged_dataset_and_model_pass_and_an_edited_one_fails_with_the_reason(tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("one two three\n")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    data = dict(as_record(resolve_dataset(str(text), tmp_path)), text_field="text")
    model = as_record(resolve_model(str(folder), tmp_path))
    confirm(data, "dataset")
    confirm(model)
    st = text.stat()
    text.write_text("one two thrEE\n")  # same size, mtime put back: the content hash still tells
    os.utime(text, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(Permanent, match="changed since the sweep was submitted"):
        confirm(data, "dataset")
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(Permanent, match=f"the model at {folder} changed"):
        confirm(model)


def test_a_record_naming_a_relative_or_missing_path_is_refused(tmp_path):
    with pytest.raises(Permanent, match="by absolute path"):
        confirm({"kind": "text", "location": "../../etc/passwd", "key": "text:x"}, "dataset")
    with pytest.raises(Permanent, match="no longer usable"):
        confirm({"kind": "hf_dir", "location": str(tmp_path / "gone"), "key": "hf_dir:x"})
    confirm({"kind": "bundled", "location": "python-docs", "key": "bundled:python-docs"}, "dataset")  # checked where used
