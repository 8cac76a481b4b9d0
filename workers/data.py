"""Text for evaluation and calibration: bundled, local text, or local JSONL; tokenized into windows."""

from __future__ import annotations

import json
import re
from pathlib import Path

from workers.files import build_once, keyed


def python_docs_text() -> str:
    """The English text of Python's own reference manual (pydoc_data.topics, shipped with CPython)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(ref: dict) -> str:
    kind = ref["kind"]
    if kind == "bundled" and ref["location"] == "python-docs":
        return python_docs_text()
    path = Path(ref["location"])
    if kind == "text":
        return path.read_text(encoding="utf-8", errors="replace")
    if kind == "jsonl":
        field = ref.get("text_field") or "text"
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if field not in row:
                raise ValueError(f"{path}:{n}: no field {field!r} (fields: {', '.join(row)}); set text_field")
            out.append(str(row[field]))
        return "\n\n".join(out)
    if kind == "hub":
        return hub_text(ref["location"], ref.get("text_field") or "text")
    raise ValueError(f"unknown dataset kind {kind!r}")


HUB_MAX_CHARS = 20_000_000


def hub_text(location: str, field: str) -> str:
    """The text field of a hub dataset's split, streamed (a split may be huge), up to ``HUB_MAX_CHARS``."""
    from datasets import load_dataset

    name_config, split = location.rsplit("@", 1)
    name, _, config = name_config.partition(":")
    rows = load_dataset(name, config or None, split=split, streaming=True)
    out, size = [], 0
    for n, row in enumerate(rows):
        if field not in row:
            raise ValueError(f"hub dataset {name} row {n}: no field {field!r} (fields: {', '.join(row)}); set text_field")
        out.append(str(row[field]))
        size += len(out[-1])
        if size >= HUB_MAX_CHARS:
            break
    return "\n\n".join(out)


def _token_ids(tokenizer, text: str) -> list[int]:
    text = re.sub(r"\n{3,}", "\n\n", text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def windows(tokenizer, text: str, seq_len: int, max_windows: int):
    """Non-overlapping windows of ``seq_len`` tokens from the start of the text (a LongTensor [n, seq_len]).

    The whole text is tokenized once, without special tokens, and cut into consecutive windows; the same
    windows (same tokenizer, same text) are used for the reference and for every variant.
    """
    import torch

    ids = _token_ids(tokenizer, text)
    n = min(max_windows, len(ids) // seq_len)
    if n == 0:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def calibration_windows(tokenizer, text: str, seq_len: int, samples: int):
    """``samples`` windows of ``seq_len`` tokens from the *end* of the text, and the text's length in tokens.

    Evaluation windows come from the start of a text, so calibrating on the evaluation text itself leaves
    them untouched unless the text is too short (the caller records any overlap). Fewer windows when the text
    is short; never fewer than one.
    """
    import torch

    ids = _token_ids(tokenizer, text)
    n = min(samples, len(ids) // seq_len)
    if n == 0:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one sample of seq_len={seq_len}")
    tail = ids[len(ids) - n * seq_len:]
    return torch.tensor(tail, dtype=torch.long).view(n, seq_len), len(ids)


def shared_tokens(output_root: str, key: tuple, make):
    """``make()`` -> (LongTensor, total tokens), computed once per output root and shared through a file.

    Returns (value, "disk" | "tokenized"). The file is safetensors (no pickle), made by workers.files.build_once.
    """
    import torch
    from safetensors.torch import load_file, save_file

    path = keyed(output_root, "_data", json.dumps(list(key)), ".safetensors")
    made = []

    def build(tmp: Path) -> None:
        ids, total = make()
        made.append((ids, total))
        save_file({"ids": ids.contiguous(), "total": torch.tensor([total])}, str(tmp))

    if build_once(path, build):
        return made[0], "tokenized"
    t = load_file(str(path))
    return (t["ids"], int(t["total"].item())), "disk"
