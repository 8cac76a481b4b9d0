"""Text sources read in a worker: a datasets-style dataset streamed the way a hub dataset is (no network here:
a local dataset folder goes through the very same ``load_dataset(..., streaming=True)`` call)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_streamed_dataset_text_and_a_missing_field(tmp_path, monkeypatch):
    from workers.shared import data

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"body": f"row {i} " * 10}) + "\n" for i in range(50)))
    text = data.load_text({"kind": "hub", "location": f"{folder}@train", "text_field": "body"})
    assert text.startswith("row 0 row 0") and text.count("\n\n") == 49
    monkeypatch.setattr(data, "HUB_MAX_CHARS", 200)  # a huge split is read only as far as needed
    assert data.load_text({"kind": "hub", "location": f"{folder}@train", "text_field": "body"}).count("\n\n") == 3  # 4 rows of 60
    with pytest.raises(ValueError, match=r"row 0: no field 'text' \(fields: body\); set text_field"):
        data.load_text({"kind": "hub", "location": f"{folder}@train", "text_field": "text"})


def test_calibration_windows_come_from_the_end_and_are_shared_through_a_file(tmp_path):
    import torch

    from workers.shared import data

    class Tok:  # one token per character: enough to check where the windows are cut
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    ids, total = data.calibration_windows(Tok(), "abcdefghij", seq_len=3, samples=2)
    assert total == 10 and ids.tolist() == [[ord(c) for c in "efg"], [ord(c) for c in "hij"]]
    with pytest.raises(ValueError, match="fewer than one sample"):
        data.calibration_windows(Tok(), "ab", seq_len=3, samples=2)

    calls = []

    def make():
        calls.append(1)
        return torch.arange(6).view(2, 3), 10

    first, how = data.shared_tokens(str(tmp_path), ("k", 3), make)
    again, how2 = data.shared_tokens(str(tmp_path), ("k", 3), make)
    assert (how, how2) == ("tokenized", "disk") and len(calls) == 1
    assert again[0].tolist() == first[0].tolist() and again[1] == 10
    assert [p.suffix for p in (tmp_path / "_data").iterdir() if p.suffix != ".lock"] == [".safetensors"]
