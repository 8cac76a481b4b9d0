"""User-facing errors: what was wrong, where (YAML path and line), what is allowed. Collected, then raised
together. Also the YAML-position helpers every producer of a ``Problem`` uses."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence

import yaml


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: its YAML path (``jobs[0].matrix.bits[2]``), a message, and a line."""

    path: str
    message: str
    line: int | None = None

    def render(self, source: str | None = None) -> str:
        where = source or ""
        if self.line is not None:
            where = f"{where}:{self.line}" if where else f"line {self.line}"
        head = f"{where}: " if where else ""
        path = f"{self.path}: " if self.path else ""
        return f"{head}{path}{self.message}"


class QfarmError(Exception):
    """An error the user can fix; the CLI prints it without a traceback (exit 1)."""

    exit_code = 1


class UsageError(QfarmError):
    """Bad input (spec, arguments, resources no cluster can satisfy): exit 2."""

    exit_code = 2


class SpecError(UsageError):
    """Every problem found in one spec file."""

    def __init__(self, problems: Sequence[Problem], source: str | None = None, context: dict | None = None):
        self.problems = sorted(problems, key=lambda p: (p.line or 0, p.path))
        self.source = source
        # What a caller needs to add its own checks of the parts that did parse (see expand.load_sweep).
        context = context or {}
        self.raw, self.lines, self.base_dir = context.get("raw"), context.get("lines", {}), context.get("base_dir")
        self.groups_key = context.get("groups_key", "jobs")  # the file says jobs: or stages:
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        head = f"{self.source or 'spec'}: {n} error{'s' if n != 1 else ''}"
        lines = [f"  {p.render(self.source)}" for p in self.problems]
        return "\n".join([head, *lines])


class Retryable(Exception):
    """A job failure worth another attempt: the same job may well succeed elsewhere or later (out of memory, a
    lost node, a dropped connection). Retried while attempts remain (``max_attempts``)."""


class Permanent(Exception):
    """A job failure that another attempt would not change (a bad file, a setting the model cannot take)."""


# Exceptions, by class name, that are worth retrying although they do not derive from Retryable: the control
# plane names them without importing torch or Ray.
RETRYABLE_NAMES = frozenset({"OutOfMemoryError", "MemoryError", "ConnectionError", "TimeoutError",
                             "RayActorError", "ActorDiedError", "NodeDiedError", "ObjectLostError"})


def retryable(e: BaseException) -> bool:
    """Whether a job that raised ``e`` is worth another attempt. Anything not known to be transient is not: a
    deterministic error would only fail again, later."""
    if isinstance(e, Permanent):
        return False
    if isinstance(e, Retryable):
        return True
    return any(cls.__name__ in RETRYABLE_NAMES for cls in type(e).__mro__)


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` or an empty string."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def allowed(choices: Iterable[object]) -> str:
    return ", ".join(str(c) for c in choices)


# The optional libraries a job may need, by top-level module, and the extra that installs each (pyproject.toml).
# `make demo` installs only the `demo` extra: a job that needs another one says which, instead of a bare
# "No module named ...".
EXTRAS = {"llmcompressor": "ml", "compressed_tensors": "ml", "peft": "ml", "llama_cpp": "gguf",
          "gptqmodel": "gptqmodel", "optimum": "gptqmodel", "lm_eval": "eval", "mlflow": "mlflow",
          "wandb": "wandb", "matplotlib": "report", "pyarrow": "report", "vllm": "vllm (pip install vllm)"}


def missing_extra(e: BaseException, here: bool = False) -> str | None:
    """For a ModuleNotFoundError of an optional library: what to install, as a user would say it (``here``: for
    the command the user typed, else for the worker that ran a job)."""
    if not isinstance(e, ModuleNotFoundError) or not e.name:
        return None
    top = e.name.split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    where, there = ("here", "") if here else ("on this worker", " there")
    if " " in extra:
        return f"{top} is not installed {where}: {extra.split(' ', 1)[1].strip('()')}"
    return (f"{top} is not installed {where}: pip install 'qfarm[{extra}]'{there} (`make install` installs every "
            f"extra; `make demo` only the demo's)")


def one_line(e: BaseException, typed: bool = True) -> str:
    """An exception as the one-line reason a result row shows: its first non-empty line, at most 300 chars.
    A missing optional library says which extra installs it."""
    hint = missing_extra(e)
    if hint:
        return hint[:300]
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if typed:
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return (text or type(e).__name__)[:300]


# --- YAML paths and lines --------------------------------------------------------------------------


def line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map every YAML path (tuple of keys/indices) to its 1-based line."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value if isinstance(key, yaml.ScalarNode) else str(key.start_mark.line)
            out[path + (k,)] = key.start_mark.line + 1
            line_map(value, path + (k,), out)
            out[path + (k,)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            line_map(item, path + (i,), out)
    return out


def line_of(lines: dict[tuple, int], loc: tuple) -> int | None:
    """The line of ``loc``, or of its nearest ancestor that has one."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def format_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
