"""Which lm-evaluation-harness task names exist, read from task YAML files without importing lm-eval.

``eval.tasks`` names tasks, groups or tags of lm-eval's own catalogue (the ``lm_eval/tasks`` folder of the
installed harness) or of a spec's ``eval.task_paths`` folders (its ``include_path``). ``qfarm validate`` checks
each name here, in the CLI, where lm-eval (and the torch it brings) must not be imported: the YAML files are
scanned for their ``task:``, ``group:`` and ``tag:`` lines, as lm-eval's own index reads them. Without lm-eval
installed on the submitting machine only the local folders can be checked; the worker reports anything else.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

_NAME = r"""["']?([A-Za-z0-9][A-Za-z0-9_.:-]*)["']?"""
_SCALAR = re.compile(rf"^(?:task|group|tag):[ \t]*{_NAME}[ \t]*(?:#.*)?$", re.M)
_TAG_LIST = re.compile(r"^tag:[ \t]*\n((?:[ \t]+-[ \t]*\S+[ \t]*\n?)+)", re.M)
_TAG_FLOW = re.compile(r"^tag:[ \t]*\[([^\]\n]*)\]", re.M)
MAX_FILES = 50_000


def harness_tasks_dir() -> Path | None:
    """lm-eval's own task folder, found without importing the package (None when it is not installed)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "tasks"
    return folder if folder.is_dir() else None


def names_in(text: str) -> set[str]:
    """The task, group and tag names one task YAML defines."""
    names = set(_SCALAR.findall(text))
    for block in _TAG_LIST.findall(text):
        names.update(m.strip().strip("\"'") for m in re.findall(r"-[ \t]*(\S+)", block))
    for flow in _TAG_FLOW.findall(text):
        names.update(n.strip().strip("\"'") for n in flow.split(",") if n.strip())
    return names


@functools.lru_cache(maxsize=64)
def _names_under(folder: str, _version: float) -> frozenset[str]:
    names: set[str] = set()
    for i, path in enumerate(Path(folder).rglob("*.yaml")):
        if i >= MAX_FILES:
            break
        try:
            names |= names_in(path.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
    return frozenset(names)


def names_under(folder: Path) -> frozenset[str]:
    """Every task, group and tag name the YAML files under ``folder`` define (cached per folder version)."""
    return _names_under(str(folder), folder.stat().st_mtime)


def known(task_paths: list[Path]) -> tuple[frozenset[str], bool]:
    """(the names ``eval.tasks`` may use, whether lm-eval's own catalogue is among them)."""
    names: set[str] = set()
    for p in task_paths:
        names |= names_under(p)
    harness = harness_tasks_dir()
    if harness is not None:
        names |= names_under(harness)
    return frozenset(names), harness is not None
