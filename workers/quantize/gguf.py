"""GGUF (``gguf``): llama.cpp's own quantizer, and the evaluation run inside llama.cpp itself.

What is measured is the GGUF file a user deploys to llama.cpp or Ollama, not a dequantized copy in torch.

- Source: a GGUF model (the bundled SmolLM2 is a Q4_1 GGUF) is quantized straight from its file with
  ``llama_model_quantize(allow_requantize=True)``: llama.cpp dequantizes each tensor and quantizes it again,
  which is what it would do with the float folder dequantized from the same file. A Hugging Face folder
  (a hub model, a merged fine-tune) is converted first, at its own dtype (BF16, F16 or F32), by llama.cpp's
  ``convert_hf_to_gguf.py`` (``make llama-cpp-tools`` unpacks it from the llama-cpp-python sdist of the
  installed version; ``QFARM_LLAMA_CPP_DIR`` names another llama.cpp checkout), once per output root. The
  converter asks transformers to trust a model's own code; qfarm runs it with that refused
  (``workers.shared.no_remote_code``): a model that needs its own code to load is not converted.
- Types: llama.cpp's file types (``F16``, ``Q8_0``, ``Q4_K_M``...). A K-quant whose tensors' rows do not
  divide into 256-wide super-blocks falls back to a legacy type for those tensors (SmolLM2's 576): the result
  records the tensor types the file really holds (``gguf_tensor_types``) and its bits per weight.
- Evaluation: the very token windows of the other rows (the HF tokenizer's ids, fed to llama.cpp as ids: a
  converted GGUF keeps the vocabulary), the same float reference log-probs, perplexity/KL/top-1 from
  llama.cpp's logits, prefill/decode speed of llama.cpp with ``n_threads`` recorded, greedy answers.

Sample yaml::

    jobs:
      - kind: quantize
        matrix: {method: [gguf], gguf_type: [F16, Q8_0, Q4_K_M]}
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from qfarm import settings
from qfarm.sweep.methods import GGML_TYPES, tensor_rule
from qfarm.sweep.modelinfo import gguf_metadata
from workers.evaluate.tasks import TASK_CONTEXT
from workers.shared.files import build_once, keyed
from workers.shared.models import checkpoint_dtype

# llama.cpp file type name -> llama_cpp constant. The names a spec may use are qfarm.sweep.methods.GGUF_TYPES.
_FTYPE_CONST = {"F32": "LLAMA_FTYPE_ALL_F32"}


def ftype(name: str) -> int:
    import llama_cpp

    const = _FTYPE_CONST.get(name, f"LLAMA_FTYPE_MOSTLY_{name}")
    value = getattr(llama_cpp, const, None)
    if value is None:
        raise ValueError(f"the installed llama.cpp has no file type {name} ({const})")
    return value


def converter() -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py: QFARM_LLAMA_CPP_DIR, else the copy `make llama-cpp-tools` unpacked."""
    for folder in (settings.get("QFARM_LLAMA_CPP_DIR"), Path(sys.prefix) / "share" / "qfarm" / "llama.cpp"):
        if folder and (Path(folder) / "convert_hf_to_gguf.py").is_file():
            return Path(folder) / "convert_hf_to_gguf.py"
    return None


SOURCE_OUTTYPE = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def source_gguf(ctx, base) -> str:
    """A GGUF file of the base model for llama.cpp to quantize: the model's own GGUF, or one converted once."""
    model = ctx.job.model
    if model["kind"] == "gguf":
        return str(Path(model["location"]) / model["gguf_file"])
    script = converter()
    if script is None:
        raise RuntimeError("converting a Hugging Face model to GGUF needs llama.cpp's convert_hf_to_gguf.py: "
                           "run `make llama-cpp-tools`, or set QFARM_LLAMA_CPP_DIR to a llama.cpp checkout")
    outtype = SOURCE_OUTTYPE.get(checkpoint_dtype(base.path), "f32")  # its own dtype: 70B in bf16 is 141 GB, not 282
    target = keyed(ctx.output_root, "_models", f"{model['key']}|{script}|{outtype}", f".{outtype}.gguf")

    def convert(tmp: Path) -> None:
        ctx.progress("converting the HF model to GGUF (llama.cpp convert_hf_to_gguf.py)")
        failed = run_converter(script, base.path, ["--outfile", str(tmp), "--outtype", outtype])
        if failed:
            raise RuntimeError(f"convert_hf_to_gguf.py failed: {failed}")

    build_once(target, convert)
    return str(target)


def run_converter(script: Path, folder: str, args: list[str], timeout: float | None = None) -> str | None:
    """llama.cpp's converter on a model folder, with transformers unable to run the folder's own code
    (workers.shared.no_remote_code): None when it succeeds, else its last line of output (why it failed)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(script.parent / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "workers.shared.no_remote_code", str(script), folder, *args], env=env,
                         capture_output=True, text=True, timeout=timeout)
    if run.returncode == 0:
        return None
    return ((run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"])[0]


def file_tensors(path: str) -> tuple[dict[str, int], int, dict[str, tuple[str, int, int, int]]]:
    """One read of the file's tensors: how many of each type it holds, its number of weights, and its weight
    matrices (tensors of two or more dimensions): name -> (ggml type, row length, elements, bytes)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    counts: dict[str, int] = {}
    weights, matrices = 0, {}
    for name, (number, shape) in gguf_metadata(Path(path), wanted=set(), tensors=True)["#tensor_info"].items():
        kind = GGMLQuantizationType(number)
        elements = math.prod(shape)
        counts[kind.name] = counts.get(kind.name, 0) + 1
        weights += elements
        if len(shape) >= 2:
            block, size = GGML_QUANT_SIZES[kind]
            matrices[name] = (kind.name, shape[0], elements, elements * size // block)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])), weights, matrices


def layer_columns(layers: dict[str, tuple[str, int, int, int]]) -> dict:
    """``layer_formats`` (each weight matrix's type) and ``bits_per_weight``: every stored bit of the decoder blocks'
    weight matrices (``blk.N.*``: the quantized layers, their blocks' scales included) over their weights."""
    blocks = [v for k, v in layers.items() if k.startswith("blk.")]
    return {"layer_formats": {k: v[0] for k, v in layers.items()},
            "bits_per_weight": sum(v[3] for v in blocks) * 8 / sum(v[2] for v in blocks) if blocks else None}


def rule_columns(rules: list[tuple[str, str]], layers: dict[str, tuple[str, int, int, int]]) -> dict:
    """The file checked against the row's ``tensor_types`` (the first rule whose pattern a name holds decides, as in
    llama.cpp): a rule that names no tensor, or a tensor stored in another quantized type although its rows fit the
    asked type's blocks, fails the job (the option was not applied); a tensor whose rows do not fit (SmolLM2's 576)
    or that llama.cpp keeps in float is recorded in ``tensor_type_fallbacks``. {} without rules."""
    import re

    from qfarm.errors import Permanent

    if not rules:
        return {}
    matched = [0] * len(rules)
    fallbacks = {}
    for tensor, (stored, row, _, _) in layers.items():
        hit = next((i for i, (pattern, _) in enumerate(rules) if re.search(pattern, tensor)), None)
        if hit is None:
            continue
        matched[hit] += 1
        asked = rules[hit][1]
        if stored == asked:
            continue
        if row % GGML_TYPES[asked][1] == 0 and stored not in ("F32", "F16", "BF16"):
            raise Permanent(f"the artifact is not what its row says: tensor_types {rules[hit][0]}={asked} asks "
                            f"{tensor} in {asked}, the file stores it in {stored} (its rows of {row} fit {asked}'s "
                            "blocks): the override was not applied")
        fallbacks[tensor] = f"{asked}->{stored}"
    for (pattern, asked), n in zip(rules, matched):
        if n == 0:
            names = ", ".join(list(layers)[:3])
            raise Permanent(f"tensor_types {pattern}={asked} names no weight of the file (an earlier rule may take "
                            f"them all); its weights are named like {names}")
    return {"tensor_type_fallbacks": fallbacks or None}


# the embedding table and output head by the names llama.cpp gives them: what a mix allocates beside the blocks
# (workers.search.probe prices them under these names)
TABLES = ("token_embd.weight", "output.weight")


def mixed_rules(allocation: dict[str, str], source: str) -> list[str]:
    """A mixed candidate's allocation (Hugging Face module name -> ggml type; the tables by their GGUF names) as
    ``tensor_types`` rules over the names llama.cpp gives the tensors of ``source`` (gguf-py's name map for its
    architecture)."""
    from qfarm.sweep.search import gguf_rules

    layers = [name for name in allocation if name not in TABLES]
    return gguf_rules(allocation, {**tensor_names(layers, source), **{t: t for t in allocation if t in TABLES}})


def imatrix(importance: dict, names: dict[str, str]):
    """The probes' importance (Hugging Face module name -> a float per input column) as llama.cpp's
    ``llama_model_imatrix_data`` array over the GGUF tensor names (``names``), ended by a null name; the arrays it
    points into are kept on it (``_keep``) for as long as it lives."""
    import ctypes

    import llama_cpp
    import numpy as np

    items = [(names[layer], np.ascontiguousarray(v, dtype=np.float32)) for layer, v in importance.items()
             if layer in names and np.isfinite(v).all()]
    out = (llama_cpp.llama_model_imatrix_data * (len(items) + 1))()
    for i, (name, values) in enumerate(items):
        out[i].name = name.encode()
        out[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        out[i].size = values.size
    out._keep = items
    return out


IMATRIX = "imatrix.dat"
MAX_IMATRIX_ENTRIES, MAX_IMATRIX_NAME, MAX_IMATRIX_VALUES = 1 << 20, 1 << 10, 1 << 24


def write_imatrix(path: Path, values: dict, chunks: int, dataset: str) -> None:
    """``values`` (tensor name -> a float per input column: the inputs' mean squares) in llama.cpp's legacy
    ``imatrix.dat`` layout, which ``llama-quantize --imatrix`` reads too: entries (name, calls, values × calls), the
    chunk count, the dataset's name."""
    import struct

    import numpy as np

    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(values)))
        for name, v in values.items():
            raw = name.encode()
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", 1, len(v)))
            f.write(np.ascontiguousarray(v, dtype="<f4").tobytes())
        f.write(struct.pack("<i", chunks))
        raw = dataset.encode()[:MAX_IMATRIX_NAME]
        f.write(struct.pack("<i", len(raw)) + raw)


def read_imatrix(path: Path) -> dict:
    """An ``imatrix.dat`` (llama.cpp's legacy layout) as {tensor name: mean squares per column}; ValueError saying
    what is wrong with a file that is not one (every count is checked against the file's size before it is used)."""
    import struct

    import numpy as np

    data = Path(path).read_bytes()
    at = 0

    def take(n: int) -> bytes:
        nonlocal at
        if n < 0 or at + n > len(data):
            raise ValueError(f"{path.name} ends early at byte {at}: not an imatrix.dat")
        at += n
        return data[at - n:at]

    (count,) = struct.unpack("<i", take(4))
    if not 0 < count <= MAX_IMATRIX_ENTRIES:
        raise ValueError(f"{path.name} says it holds {count} tensors: not an imatrix.dat")
    out = {}
    for _ in range(count):
        (size,) = struct.unpack("<i", take(4))
        if not 0 < size <= MAX_IMATRIX_NAME:
            raise ValueError(f"{path.name}: a tensor name of {size} bytes: not an imatrix.dat")
        name = take(size).decode("utf-8", "replace")
        calls, n = struct.unpack("<ii", take(8))
        if not 0 < n <= MAX_IMATRIX_VALUES:
            raise ValueError(f"{path.name}: tensor {name} has {n} values: not an imatrix.dat")
        values = np.frombuffer(take(4 * n), dtype="<f4").astype(np.float32)
        out[name] = values / calls if calls > 0 else values
    return out


def check_imatrix(values: dict, source: str, said: str) -> None:
    """Permanent where the imatrix names none of ``source``'s weights, or gives one a number of columns other than
    its rows' length (an imatrix of another model: llama.cpp would stop on it mid-file)."""
    from qfarm.errors import Permanent

    _, _, matrices = file_tensors(source)
    named = [name for name in values if name in matrices]
    if not named:
        raise Permanent(f"imatrix {said} names none of the model's weights (it has e.g. {next(iter(values), '-')!r}; "
                        f"the model's are named like {next(iter(matrices), '-')!r}): an imatrix of another model?")
    for name in named:
        if len(values[name]) != matrices[name][1]:
            raise Permanent(f"imatrix {said}: {name} has {len(values[name])} columns there, {matrices[name][1]} in the "
                            "model: an imatrix of another model")


def tensor_names(layers: list[str], source: str) -> dict[str, str]:
    """Hugging Face module names -> the names llama.cpp gives their weights in ``source`` (``blk.3.ffn_down.weight``:
    gguf-py's name map for its architecture); Permanent for a layer outside the blocks."""
    import gguf

    from qfarm.errors import Permanent

    meta = gguf_metadata(Path(source))  # the header's scalars, read once
    arch = str(meta.get("general.architecture", ""))
    blocks = meta.get(f"{arch}.block_count")
    found = [k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch]
    if not found or blocks is None:
        raise Permanent(f"gguf-py has no tensor name map for architecture {arch!r}")
    names = gguf.get_tensor_name_map(found[0], int(blocks))
    mapped = {}
    for layer in layers:
        name = names.get_name(layer + ".weight", try_suffixes=(".weight",))
        if name is None or not name.startswith("blk."):
            raise Permanent(f"layer {layer} has no GGUF block tensor name for architecture {arch!r}")
        mapped[layer] = name
    return mapped


class Gguf:
    def quantize(self, ctx, base) -> str:
        import ctypes

        import llama_cpp

        name = ctx.opts.gguf_type
        out = Path(ctx.output_dir)
        shutil.rmtree(out, ignore_errors=True)  # a retried attempt starts clean
        out.mkdir(parents=True)
        source = source_gguf(ctx, base)
        target = out / f"model-{name}.gguf"
        ctx.progress(f"llama.cpp quantizing to {name}")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype(name)
        params.nthread = ctx.threads
        params.allow_requantize = True
        texts = ctx.opts.tensor_types or []
        values, said = {}, None  # the importance matrix llama.cpp weighs each column's error by
        if ctx.opts.mixed:  # a search candidate: each block tensor's type from the probes it needs
            from workers.search.mixed import allocation, importance

            layers = allocation(ctx)
            texts = mixed_rules(layers, source)
            ctx.extra["tensor_types"] = texts  # the plain job's option that makes this file again
            found, tokens = importance(ctx)  # measured by the probes on their windows
            names = tensor_names(list(found), source) if found else {}
            values = {names[layer]: v for layer, v in found.items()}
            if values:  # kept beside the file: the plain job's imatrix option, and llama-quantize's --imatrix
                write_imatrix(out / IMATRIX, values, tokens, "search probes")
                said = {"from": "search probes", "tokens": tokens,
                        "file": os.path.relpath(out / IMATRIX, Path(ctx.output_root).resolve())}
        elif ctx.opts.imatrix:
            from qfarm.errors import Permanent
            from workers.shared.files import inside

            try:
                path = Path(inside(ctx.output_root, str(Path(ctx.output_root) / ctx.opts.imatrix)))
                values = read_imatrix(path)
            except (OSError, ValueError) as e:
                raise Permanent(f"imatrix {ctx.opts.imatrix}: {e}") from None
            said = {"from": "file", "file": ctx.opts.imatrix}
            check_imatrix(values, source, ctx.opts.imatrix)
        weights = imatrix(values, {name: name for name in values}) if values else None
        if weights is not None:
            params.imatrix = ctypes.cast(weights, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
            said["tensors"] = len(weights._keep)
        ctx.extra["gguf_imatrix"] = said
        rules = [tensor_rule(text) for text in texts]
        overrides = (llama_cpp.llama_model_tensor_override * (len(rules) + 1))()  # ended by a null pattern
        for i, (pattern, type_name) in enumerate(rules):
            overrides[i].pattern, overrides[i].type = pattern.encode(), GGML_TYPES[type_name][0]
        if rules:
            params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        rc = llama_cpp.llama_model_quantize(source.encode(), str(target).encode(), ctypes.byref(params))
        if rc != 0 or not target.is_file():
            raise RuntimeError(f"llama_model_quantize to {name} failed (return code {rc})")
        counts, weights, layers = file_tensors(str(target))
        ctx.extra.update({"gguf_tensor_types": counts, "file_bits_per_weight": target.stat().st_size * 8 / weights,
                          **layer_columns(layers), **rule_columns(rules, layers),
                          "gguf_source": "gguf" if ctx.job.model["kind"] == "gguf" else "converted"})
        return str(out)

    def load(self, ctx, artifact, base):
        path = next(Path(artifact).glob("*.gguf"))
        return LlamaCppModel(str(path), context_for(ctx), ctx.threads)


def context_for(ctx) -> int:
    """The llama.cpp context a job's evaluation needs: its longest window, prompt + generation, or task."""
    ev = ctx.job.evaluation
    need = max(max((t.seq_len for t in ev.texts), default=0),
               ev.speed.prompt_tokens + ev.speed.new_tokens if ev.speed is not None else 0,
               (ctx.job.task_eval or {}).get("seq_len", 0),
               TASK_CONTEXT if ev.tasks else 0)
    return need + ev.max_new_tokens + 256


def where_llama_cpp_runs(on_gpu: bool, cuda_here: bool) -> str:
    """The row's ``device`` for llama.cpp: where its layers really ran, not whether torch sees a GPU."""
    if on_gpu:
        import torch

        return f"cuda ({torch.cuda.get_device_name(0)}; llama.cpp, every layer offloaded)"
    if cuda_here:
        return "cpu (llama.cpp built without GPU offload: make install LLAMA_CMAKE_EXTRA=-DGGML_CUDA=on)"
    return "cpu (llama.cpp)"


class LlamaCppModel:
    """A GGUF file in llama.cpp, answering the harness's three questions (workers.evaluate.harness.TorchRunner: logprobs,
    timed, greedy) with llama.cpp's own compute."""

    def __init__(self, path: str, n_ctx: int, threads: int):
        import llama_cpp
        import torch

        self.path, self.threads, self.n_ctx = path, threads, n_ctx
        self.nbytes = Path(path).stat().st_size
        on_gpu = torch.cuda.is_available() and llama_cpp.llama_supports_gpu_offload()
        gpus = torch.cuda.device_count() if on_gpu else 0
        # over the job's GPUs (Ray's CUDA_VISIBLE_DEVICES), split evenly by layers
        split = {"tensor_split": [1.0] * gpus} if gpus > 1 else {}
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads,
                                   n_threads_batch=threads, logits_all=True, verbose=False,
                                   n_gpu_layers=-1 if on_gpu else 0, **split)
        self.eos = self.llm.token_eos()
        self.runtime = "llama.cpp"
        self.extra = {"llama_cpp_threads": threads, "llama_cpp_version": llama_cpp.__version__,
                      "device": where_llama_cpp_runs(on_gpu, torch.cuda.is_available()),
                      "device_map": f"llama.cpp over {gpus} GPUs" if gpus > 1 else "cuda:0" if gpus else "cpu"}

    def _eval(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def logprobs(self, window):
        """log-softmax of the logits at every position but the last: [len(window) - 1, vocab]."""
        ids = window.tolist()
        self._eval(ids)
        return self._logprobs(0, len(ids) - 1)

    def continuation_logprobs(self, ids: list[int], n: int):
        """log-softmax at the ``n`` positions that predict the last ``n`` of ``ids``: [n, vocab]. The longest prefix
        ``ids`` shares with the tokens evaluated last keeps its KV cache and logits, as llama.cpp's own prompt cache
        does: lm-eval's choices of one question share its context, which is evaluated once instead of per choice."""
        llm, keep = self.llm, 0
        if not (llm._is_recurrent or llm._is_hybrid):  # their state cannot be cut back to a prefix
            for a, b in zip(llm.input_ids[: llm.n_tokens].tolist(), ids[:-1]):
                if a != b:
                    break
                keep += 1
        if keep == 0:  # (ids[:-1]: at least the last token is evaluated; logits before it are the prefix's own)
            llm.reset()
        llm.n_tokens = keep
        llm.eval(ids[keep:])
        return self._logprobs(len(ids) - 1 - n, len(ids) - 1)

    def _logprobs(self, start: int, stop: int):
        """log-softmax of the stored logits of positions ``start`` to ``stop`` (exclusive)."""
        import torch

        return torch.log_softmax(torch.from_numpy(self.llm.scores[start:stop].copy()).float(), dim=-1)

    def _next(self, position: int) -> int:
        return int(self.llm.scores[position].argmax())

    def greedy(self, ids: list[int], max_new_tokens: int, pad_id: int | None = None, stop=None) -> list[int]:
        self._eval(ids)
        out, pos = [], len(ids) - 1
        for _ in range(max_new_tokens):
            tok = self._next(pos)
            if tok == self.eos:
                break
            out.append(tok)
            if stop is not None and stop(out):
                break
            self.llm.eval([tok])
            pos += 1
        return out

    def timed(self, prompt_ids, steps: int) -> tuple[float, float]:
        prompt = prompt_ids.tolist()
        t0 = time.perf_counter()
        self._eval(prompt)
        tok = self._next(len(prompt) - 1)
        t1 = time.perf_counter()
        for i in range(steps):
            self.llm.eval([tok])
            tok = self._next(len(prompt) + i)
        return t1 - t0, time.perf_counter() - t1
