"""A model's shape, read without loading it: the input sizes of its Linear layers, for checks at validate time.

Group-wise quantization (GPTQ, AWQ, RTN) splits each Linear layer's input dimension into groups, so the group
size must divide it. Reading the shape needs no ML library: a GGUF file's header (a few KB of key/values, read
with ``struct``) or a Hugging Face folder's ``config.json``. A hub model is read from its config.json at the
pinned commit (the hub cache's copy, or fetched alone: qfarm.sweep.hub.config_folder); where that is impossible (no
network, nothing cached) the job itself reports a bad group size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# GGUF value types (gguf spec): id -> struct format; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_MAX_KV = 100_000


@dataclass(frozen=True)
class Shape:
    """Per weight layer (its name inside a block), its input features, and how many blocks there are."""

    layers: int
    inputs: dict[str, int]  # e.g. {"self_attn.q_proj": 576, ..., "mlp.down_proj": 1536}
    types: dict[str, str] = field(default_factory=dict)  # Linear, Conv1D (GPT-2), experts (fused MoE weights)
    counts: dict[str, int] = field(default_factory=dict)  # how many of each in the model (default: one a block)
    outputs: dict[str, int] = field(default_factory=dict)  # output features, where known (the module tree)
    source: str = "config"  # "module tree" (read from the model itself) or "config" (a Llama-shaped guess)

    def count(self, names) -> int:
        return sum(self.counts.get(n, self.layers) for n in names)

    def not_divisible(self, group_size: int) -> dict[str, int]:
        return {name: n for name, n in self.inputs.items() if n % group_size}

    def dividing_group_sizes(self, candidates=(16, 32, 64, 128, 256)) -> list[int]:
        return [g for g in candidates if not self.not_divisible(g)]


def _llama_like(hidden: int, intermediate: int, heads: int, head_dim: int, layers: int) -> Shape:
    return Shape(layers, {
        "self_attn.q_proj": hidden, "self_attn.k_proj": hidden, "self_attn.v_proj": hidden,
        "self_attn.o_proj": heads * head_dim, "mlp.gate_proj": hidden, "mlp.up_proj": hidden,
        "mlp.down_proj": intermediate,
    }, outputs={"self_attn.q_proj": heads * head_dim, "self_attn.k_proj": heads * head_dim,  # k, v: as if no GQA
                "self_attn.v_proj": heads * head_dim, "self_attn.o_proj": hidden, "mlp.gate_proj": intermediate,
                "mlp.up_proj": intermediate, "mlp.down_proj": hidden})


_MAX_STRING = 64 << 20  # bytes of one header string (tokenizer merges can be long; a damaged length is not)
MAX_TENSORS = 1_000_000
MAX_KV = 1_000_000


def check_gguf(path: Path) -> None:
    """A cheap check that ``path`` is a GGUF file: magic, a known version, sane tensor and key counts, and a first
    key that reads as a short UTF-8 name. ValueError says what is wrong."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic)" if head[:4] != b"GGUF"
                             else f"{path}: truncated GGUF header")
        version, tensors, kvs = struct.unpack("<IQQ", head[4:24])
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not one llama.cpp reads (2 or 3): damaged or not a GGUF")
        if not (0 < tensors <= MAX_TENSORS and 0 < kvs <= MAX_KV):
            raise ValueError(f"{path}: {tensors} tensors and {kvs} header keys: the file is damaged or not a GGUF")
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        name = f.read(n) if 0 < n <= 256 else b""
        try:
            ok = bool(name) and name.decode("utf-8").isprintable()
        except UnicodeDecodeError:
            ok = False
        if not ok:
            raise ValueError(f"{path}: its first header key is not a name: the file is damaged or not a GGUF")


GGUF_FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
GGML_FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}  # ggml's numbers of its float types (gguf.GGMLQuantizationType)
DEFAULT_STORAGE = "bfloat16"  # a source with no float weights of its own (a quantized GGUF): what HF checkpoints ship


def gguf_float_dtype(path: str) -> str:
    """The float type of a GGUF's float weight matrices (its norms are float32 in every file and do not count):
    the most common of F32/F16/BF16 among its tensors of two or more dimensions, else bfloat16. What its float copy
    stores unquantized tensors (and a quantized artifact's scales) in."""
    counts: dict[str, int] = {}
    for kind, shape in gguf_metadata(Path(path), wanted=set(), tensors=True).get("#tensor_info", {}).values():
        name = GGUF_FLOATS.get(GGML_FLOAT_TYPES.get(kind, ""))
        if name and len([d for d in shape if d > 1]) >= 2:
            counts[name] = counts.get(name, 0) + 1
    return max(counts, key=counts.get) if counts else DEFAULT_STORAGE


def gguf_metadata(path: Path, wanted: set[str] | None = None, tensors: bool = False,
                  arrays: frozenset[str] = frozenset()) -> dict:
    """The scalar and string key/values of a GGUF file's header (arrays are skipped, but for the keys in ``arrays``,
    read whole as lists; ``<key>#count`` says how many items one held); with ``tensors``, ``#tensors``: each tensor's
    name and number of elements, ``#tensor_info``: its ggml type (a number) and dimensions (the row length first),
    and ``#header_bytes``: where the header ends. Plain reads, no numpy: a 150k-token
    vocabulary in a fraction of a second."""
    out: dict = {}
    with open(path, "rb") as f:
        def read(fmt: str):
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: truncated GGUF header")
            return struct.unpack("<" + fmt, data)[0]

        def string() -> str:
            n = read("Q")
            if n > _MAX_STRING:
                raise ValueError(f"{path}: a GGUF header string of {n} bytes: the file is damaged or not a GGUF")
            return f.read(n).decode("utf-8", errors="replace")

        def items(item: int, count: int, keep: bool) -> list | None:
            """An array's ``count`` items of GGUF type ``item``: read (``keep``) or skipped."""
            if item in _SCALARS:
                size = struct.calcsize("<" + _SCALARS[item]) * count
                if not keep:
                    f.seek(size, 1)
                    return None
                data = f.read(size)
                if len(data) != size:
                    raise ValueError(f"{path}: truncated GGUF header")
                return list(struct.unpack(f"<{count}{_SCALARS[item]}", data))
            if keep and item != 8:
                raise ValueError(f"{path}: an array of GGUF type {item}, not of strings or numbers")
            if keep:
                return [string() for _ in range(count)]
            for _ in range(count):
                skip(item)
            return None

        def skip(vtype: int) -> None:
            if vtype == 8:
                f.seek(read("Q"), 1)
            elif vtype == 9:
                items(read("I"), read("Q"), keep=False)
            elif vtype in _SCALARS:
                f.seek(struct.calcsize("<" + _SCALARS[vtype]), 1)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = read("I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old")
        n_tensors = read("Q")
        kv_count = read("Q")
        for _ in range(min(kv_count, _MAX_KV)):
            key, vtype = string(), read("I")
            if (wanted is None or key in wanted) and vtype in _SCALARS:
                out[key] = read(_SCALARS[vtype])
            elif (wanted is None or key in wanted) and vtype == 8:
                out[key] = string()
            elif vtype == 9:
                item, count = read("I"), read("Q")
                out[f"{key}#count"] = count
                found = items(item, count, keep=key in arrays)
                if found is not None:
                    out[key] = found
            else:
                skip(vtype)
        if tensors and kv_count <= _MAX_KV and n_tensors <= MAX_TENSORS:
            found, info = {}, {}
            for _ in range(n_tensors):
                name, dims = string(), read("I")
                if dims > 8:
                    raise ValueError(f"{path}: a tensor with {dims} dimensions: the file is damaged")
                shape = tuple(read("Q") for _ in range(dims))
                info[name] = (read("I"), shape)  # its ggml type, its dimensions as stored (the row length first)
                read("Q")  # offset
                found[name] = math.prod(shape)
            out["#tensors"] = found
            out["#tensor_info"] = info
            out["#header_bytes"] = f.tell()  # the key/values and tensor list: the vocabulary, what is not weights
    return out


TREE_TIMEOUT_S = 180


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "qfarm" / "architectures"


def _tree_key(model: dict) -> str | None:
    """A folder's module tree is its config's: keyed by config.json's bytes (the same config in another folder,
    or after its weights change, is the same tree); a GGUF's by the file's key. None: not kept on disk."""
    if model["kind"] == "hf_dir":
        try:
            return "cfg-" + hashlib.sha256((Path(model["location"]) / "config.json").read_bytes()).hexdigest()[:24]
        except OSError:
            return None
    return "gguf-" + hashlib.sha256(model["key"].encode()).hexdigest()[:24] if model.get("key") else None


@functools.lru_cache(maxsize=64)
def module_tree(model_json: str) -> dict | None:
    """The model's weight layers read from its own module tree (``workers.shared.architecture``, run in a subprocess:
    the CLI imports no ML library), cached on disk (``_tree_key``). None where it cannot be read here (no
    torch/transformers, an architecture transformers does not know); the reason is kept in the cache entry."""
    model = json.loads(model_json)
    if model.get("kind") not in ("hf_dir", "gguf"):
        return None  # a hub id whose config could not be fetched (qfarm.sweep.hub.config_folder)
    key = _tree_key(model)  # what the tree depends on: a folder's config.json, a GGUF file's content
    tree = _cached_run("workers.shared.architecture", model, cache_dir() / f"{key}.json" if key else None, TREE_TIMEOUT_S)
    return None if not isinstance(tree, dict) or "error" in tree or not tree.get("linears") else tree


def _cached_run(module: str, model: dict, path: Path | None, timeout: float, keep=lambda found: True):
    """``python -m MODULE MODEL_JSON``'s last line of output, as JSON, kept at ``path`` (when ``keep`` says so)
    and read from there next time. None where it cannot be run or says nothing readable."""
    try:
        if path is None:
            raise OSError("not kept")
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    try:
        out = subprocess.run([sys.executable, "-m", module, json.dumps(model)], capture_output=True, text=True,
                             timeout=timeout)
        found = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    if path is not None and keep(found):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(found))
        os.replace(tmp, path)
    return found


MAX_TOKENIZER_BYTES = 64 * 2**20


def vocabulary(model: dict) -> tuple[int | None, dict | None]:
    """A model's vocabulary as its jobs read it, without loading it: the number of tokens its logits have (a GGUF's
    token list, llama.cpp's n_vocab; a folder's config.json vocab_size, or its text_config's) and, for a folder
    with a tokenizer.json, its model vocabulary (token -> id). (None, None) where neither can be read plainly.
    Read once per file in a validate (a sweep's reference is compared with every checkpoint of its matrix)."""
    return _vocabulary(model.get("kind"), model.get("location"), model.get("gguf_file"))


@functools.lru_cache(maxsize=16)
def _vocabulary(kind: str | None, location: str | None, gguf_file: str | None) -> tuple[int | None, dict | None]:
    try:
        if kind == "gguf":
            meta = gguf_metadata(Path(location) / gguf_file, {"tokenizer.ggml.tokens"})
            n = meta.get("tokenizer.ggml.tokens#count")
            return (n if isinstance(n, int) and n > 0 else None), None
        if kind != "hf_dir":
            return None, None
        folder = Path(location)
        config = json.loads((folder / "config.json").read_text())
        n = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        tokens = None
        if (folder / "tokenizer.json").is_file() and (folder / "tokenizer.json").stat().st_size < MAX_TOKENIZER_BYTES:
            tokens = json.loads((folder / "tokenizer.json").read_text()).get("model", {}).get("vocab")
        return (n if isinstance(n, int) and n > 0 else None), (tokens if isinstance(tokens, dict) and tokens else None)
    except (OSError, ValueError, AttributeError, TypeError):
        return None, None


def vocabulary_clash(checkpoint: dict, reference: dict) -> str | None:
    """Why an ``evaluate`` job would refuse ``checkpoint`` against ``reference`` (workers.evaluate.checkpoint.same_vocabulary),
    said where it can be read without loading either: other token counts, or other tokenizer vocabularies."""
    (n_ck, v_ck), (n_ref, v_ref) = vocabulary(checkpoint), vocabulary(reference)
    if n_ck and n_ref and n_ck != n_ref:
        return f"it has {n_ck} tokens, the sweep's model {n_ref}"
    if v_ck is not None and v_ref is not None and v_ck != v_ref:
        other = sum(1 for t, i in v_ck.items() if v_ref.get(t) != i)
        return f"its tokenizer's vocabulary differs from the sweep's model's ({other} of {len(v_ck)} tokens)"
    return None


PROBE_VERSION = 3  # bump when checks.choose_tokenizer changes what it refuses (3: a rebuild from SentencePiece scores)
PROBE_TIMEOUT_S = 120


def gguf_tokenizer(model: dict) -> dict | None:
    """A GGUF model's tokenizer check (``workers.evaluate.checks.probe``, in a subprocess: the CLI imports no ML library),
    kept on disk by the file's content key: ``{"refused": why}`` where every job would refuse the file, its
    conventions where it agrees, None where it cannot run here (no transformers). A check that was skipped
    (no llama-cpp-python here) or failed to run is not kept: the next validate tries again."""
    if model.get("kind") != "gguf" or not model.get("key"):
        return None
    key = hashlib.sha256(f"{model['key']}|{PROBE_VERSION}".encode()).hexdigest()[:24]
    found = _cached_run("workers.evaluate.checks", model, cache_dir().parent / "checks" / f"tok-{key}.json", PROBE_TIMEOUT_S,
                        keep=lambda f: "refused" in f or str(f.get("tokenizer_check", "")).startswith("agrees"))
    return found if isinstance(found, dict) and "error" not in found else None


CONVERT_CHECK_VERSION = 1  # bump when workers.quantize.convertible changes what it asks of the converter


# the files a Hugging Face tokenizer is read from (one of them is enough for the converter to know it)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


def gguf_conversion(model: dict) -> str | None:
    """Why llama.cpp's converter refuses a Hugging Face model folder (an architecture it has no class for, a BPE
    pre-tokenizer whose hash it does not know), so that every gguf job of it would fail converting it; None where it
    converts, or where the check cannot run here. Asked of the converter itself (workers.quantize.convertible, its
    vocabulary pass in a subprocess: the CLI imports no ML library), kept on disk by the folder's content key and
    the installed llama-cpp-python's version (whose converter it is). A hub model is asked about where its snapshot
    is in the download cache (``config_dir``, qfarm.sweep.hub.config_folder), not where validate fetched its
    config.json alone."""
    import importlib.metadata

    if model.get("kind") == "hub" and model.get("config_dir"):  # read where validate found its config
        folder = Path(model["config_dir"])
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            return None  # its config.json alone, fetched at validate: the converter would miss the tokenizer
        model = {"kind": "hf_dir", "location": str(folder), "key": model.get("key")}
    if model.get("kind") != "hf_dir" or not model.get("key"):
        return None
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None  # no llama.cpp here: the check cannot run
    key = hashlib.sha256(f"{model['key']}|{version}|{CONVERT_CHECK_VERSION}".encode()).hexdigest()[:24]
    found = _cached_run("workers.quantize.convertible", model, cache_dir().parent / "checks" / f"convert-{key}.json",
                        330, keep=lambda f: "refused" in f or "converts" in f)
    return str(found["refused"]) if isinstance(found, dict) and found.get("refused") else None


def shape_from_tree(tree: dict) -> Shape:
    """The quantizable layers of a module tree: every weight layer but the output head."""
    layers = {k: v for k, v in tree["linears"].items() if k != tree.get("lm_head")}
    return Shape(max(tree.get("blocks") or 1, 1), {k: v["in"] for k, v in layers.items()},
                 {k: v["type"] for k, v in layers.items()}, {k: v["count"] for k, v in layers.items()},
                 source="module tree", outputs={k: v["out"] for k, v in layers.items() if "out" in v})


def shape_of(model: dict) -> Shape | None:
    """The shape of a resolved model ref (``qfarm.sweep.sources.ModelSource`` as a dict), or None if it can't be read here:
    from the model's module tree where this machine can build it on the meta device, else (no ML stack here)
    from its config's numbers, Llama-shaped."""
    if model.get("kind") == "hub" and model.get("config_dir"):  # its config, fetched at validate (qfarm.sweep.hub)
        model = {"kind": "hf_dir", "location": model["config_dir"], "key": model.get("key")}
    tree = module_tree(json.dumps({k: model.get(k) for k in ("kind", "location", "gguf_file", "key")},
                                  sort_keys=True))
    if tree is not None:
        return shape_from_tree(tree)
    from qfarm.sweep.plan import model_shape  # the one reader of a config's (or GGUF header's) numbers

    numbers = model_shape(model)
    if numbers is None or not (numbers.hidden and numbers.heads and numbers.intermediate and numbers.layers):
        return None
    return _llama_like(numbers.hidden, numbers.intermediate, numbers.heads, numbers.head_dim, numbers.layers)
