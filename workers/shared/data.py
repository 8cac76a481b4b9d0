"""Text for evaluation and calibration: bundled, local text, or local JSONL; tokenized into windows."""

from __future__ import annotations

import json
import re
from pathlib import Path

from qfarm.sweep.sources import confirm
from workers.shared.files import build_once, keyed


def python_docs_text() -> str:
    """The English text of Python's own reference manual (pydoc_data.topics, shipped with CPython)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(ref: dict) -> str:
    confirm(ref, "dataset")
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
    name, rows = hub_rows(location)
    out, size = [], 0
    for n, row in enumerate(rows):
        if field not in row:
            raise ValueError(f"hub dataset {name} row {n}: no field {field!r} (fields: {', '.join(row)}); set text_field")
        out.append(str(row[field]))
        size += len(out[-1])
        if size >= HUB_MAX_CHARS:
            break
    return "\n\n".join(out)


def hub_rows(location: str):
    """(dataset name, its rows streamed) for a hub location ``NAME[:CONFIG]@SPLIT``."""
    from datasets import load_dataset

    name_config, split = location.rsplit("@", 1)
    name, _, config = name_config.partition(":")
    return name, load_dataset(name, config or None, split=split, streaming=True)


def _token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(_squeezed(text), add_special_tokens=False)["input_ids"]


def _squeezed(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", text)


def windows(tokenizer, text: str, seq_len: int, max_windows: int, bos_id: int | None = None):
    """Non-overlapping windows of ``seq_len`` tokens from the start of the text (a LongTensor [n, seq_len]).

    The whole text is tokenized once, without special tokens, and cut into consecutive windows; the same
    windows (same tokenizer, same text) are used for the reference and for every variant. With ``bos_id`` (the
    model's convention: workers.evaluate.checks) each window is that token followed by ``seq_len - 1`` of the text's.
    """
    return windows_and_bytes(tokenizer, text, seq_len, max_windows, bos_id)[0]


def windows_and_bytes(tokenizer, text: str, seq_len: int, max_windows: int, bos_id: int | None = None):
    """(the windows, UTF-8 bytes of the text their predicted tokens cover): the unit of bits per byte, which
    does not depend on how a tokenizer cuts the text. Every token but a window's first is predicted."""
    import torch

    text = _squeezed(text)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer has no offsets
        ids, offsets = tokenizer(text, add_special_tokens=False)["input_ids"], None
    width = seq_len - (bos_id is not None)
    n = min(max_windows, len(ids) // width)
    if n == 0:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    out = torch.tensor(ids[: n * width], dtype=torch.long).view(n, width)
    first = 0 if bos_id is not None else 1  # the first predicted token of each window, among the text's
    if offsets is not None:
        spans = [(offsets[i * width + first][0], offsets[(i + 1) * width - 1][1]) for i in range(n)]
        nbytes = sum(len(text[a:b].encode("utf-8")) for a, b in spans)
    else:
        nbytes = sum(len(tokenizer.decode(out[i, first:].tolist()).encode("utf-8")) for i in range(n))
    if bos_id is not None:
        out = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), out], dim=1)
    return out, nbytes


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

    Returns (value, "disk" | "tokenized"). The file is safetensors (no pickle), made by workers.shared.files.build_once.
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


# --- examples for training ---------------------------------------------------------------------------

HUB_MAX_ROWS = 1_000_000


def examples(ref: dict, text_field: str = "text", fmt: str | None = None) -> list[str]:
    """The dataset as training examples, in file order: a JSONL row each (its ``text_field``, or ``fmt`` filled
    from its fields), a blank-line-separated paragraph of a text file, a topic of the bundled python-docs, or a
    row of a hub dataset. Empty examples are dropped."""
    confirm(ref, "dataset")
    kind = ref["kind"]
    if kind == "bundled":
        from pydoc_data.topics import topics

        texts = [topics[k] for k in sorted(topics)]
    elif kind == "text":
        texts = re.split(r"\n\s*\n", Path(ref["location"]).read_text(encoding="utf-8", errors="replace"))
    elif kind == "jsonl":
        texts = []
        path = Path(ref["location"])
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if line.strip():
                texts.append(_example(json.loads(line), text_field, fmt, f"{path}:{n}"))
    elif kind == "hub":
        name, rows = hub_rows(ref["location"])
        texts = []
        for n, row in enumerate(rows):
            texts.append(_example(row, text_field, fmt, f"hub dataset {name} row {n}"))
            if n + 1 >= HUB_MAX_ROWS:
                break
    else:
        raise ValueError(f"unknown dataset kind {kind!r}")
    return [t.strip() for t in texts if t and t.strip()]


def _example(row: dict, text_field: str, fmt: str | None, where: str) -> str:
    if fmt is None:
        if text_field not in row:
            raise ValueError(f"{where}: no field {text_field!r} (fields: {', '.join(row)}); set text_field or format")
        return str(row[text_field])
    try:
        return fmt.format_map(row)  # the spec checked it names fields only (no attribute access)
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{where}: format {fmt!r} does not fit the row ({type(e).__name__}: {e}; "
                         f"fields: {', '.join(row)})") from None


def split_examples(texts: list[str], eval_samples: int, max_samples: int | None = None) -> tuple[list[str], list[str]]:
    """(training examples, held-out examples): the last ``eval_samples`` are held out, never trained on."""
    if len(texts) <= eval_samples:
        raise ValueError(f"the dataset has {len(texts)} examples: too few to hold out eval_samples={eval_samples} "
                         "and train on the rest; lower dataset.eval_samples")
    train, held = texts[: len(texts) - eval_samples], texts[len(texts) - eval_samples:]
    return (train[:max_samples] if max_samples else train), held


def encode(tokenizer, text: str, seq_len: int) -> list[int]:
    """One example as token ids, ending with the end-of-sequence token, at most ``seq_len`` of them."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][: seq_len - 1]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids[:seq_len]


def held_out(task_eval: dict, tokenizer) -> list[list[int]]:
    """The held-out examples of a train job (``task_eval`` from the spec), tokenized as they were for training."""
    texts = examples(task_eval["dataset"], task_eval["dataset"].get("text_field") or "text", task_eval.get("format"))
    _, held = split_examples(texts, task_eval["eval_samples"])
    return [encode(tokenizer, t, task_eval["seq_len"]) for t in held]
