"""Text for evaluation (and later calibration): bundled, local text, or local JSONL; tokenized into windows."""

from __future__ import annotations

import json
import re
from pathlib import Path


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
    raise ValueError(f"unknown dataset kind {kind!r}")


def windows(tokenizer, text: str, seq_len: int, max_windows: int):
    """Non-overlapping windows of ``seq_len`` tokens from the start of the text (a LongTensor [n, seq_len]).

    The whole text is tokenized once, without special tokens, and cut into consecutive windows; the same
    windows (same tokenizer, same text) are used for the reference and for every variant.
    """
    import torch

    text = re.sub(r"\n{3,}", "\n\n", text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(max_windows, len(ids) // seq_len)
    if n == 0:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
