"""Files made once per output root and shared by every worker that reaches it: the float copy of a GGUF base
model, an HF model converted to GGUF, tokenized calibration samples."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Callable


def keyed(output_root: str, folder: str, key: str, suffix: str = "") -> Path:
    """``<output_root>/<folder>/<hash of key><suffix>``: one path per identity."""
    return Path(output_root) / folder / (hashlib.sha256(key.encode()).hexdigest()[:16] + suffix)


def build_once(target: Path, build: Callable[[Path], None], waiting: Callable[[], None] = lambda: None) -> bool:
    """Make ``target`` (a file or a folder) once: ``build(tmp)`` writes a temporary path that is renamed into
    place, so a reader never sees half of it; a lock makes workers on one node build it once and the others
    wait for it (``waiting()`` is called first, to say so). True when this call built it, False when it was
    there already."""
    if target.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return False
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        build(tmp)
        os.replace(tmp, target)
        return True


JOB_ID = re.compile(r"^j[0-9a-f]{12}$")


def job_dir(root: str, path: str, job_id: str) -> str:
    """A job's own output folder, checked before anything is written or removed there: named by a well-formed
    job id and strictly below the output root (a record from Redis saying ``id: ..`` must not make the worker
    empty the whole root)."""
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise ValueError(f"refusing a job id that is not one qfarm makes: {job_id!r}")
    resolved = inside(root, path)
    if Path(resolved).name != job_id or Path(resolved) == Path(root).resolve() or \
            Path(root).resolve() not in Path(resolved).parent.parents:
        raise ValueError(f"refusing {resolved} as the folder of job {job_id}: it must be <root>/<sweep>/{job_id}")
    return resolved


def inside(root: str, path: str) -> str:
    """``path`` resolved, refusing anything outside the output root (paths come from specs and from Redis)."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"refusing to use a path outside the output root {base}: {resolved}")
    return str(resolved)


def empty_but(folder: Path, keep: Path | None) -> None:
    """``folder`` emptied (or removed), but for its child ``keep``: what a retried attempt keeps of an earlier one
    (llm-compressor's solved layers, a Trainer's last checkpoint)."""
    if keep is None or not folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        return
    for child in folder.iterdir():
        if child != keep:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
