"""Getting a base model into a form every method can start from: a float Hugging Face folder.

A GGUF source (the bundled SmolLM2 is a Q4_1 GGUF) is dequantized by transformers once and saved as float32
safetensors under ``<output_root>/_models/``; every later load, by any worker or method, reads that folder
(~1 s instead of ~30 s). A hub model is downloaded at its pinned commit into the shared hub cache once
(workers.shared.hub) and read from that snapshot folder like any local folder.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from qfarm import settings
from qfarm.sweep.sources import confirm
from workers.evaluate.checks import CHECKS_FILE, choose_tokenizer, gguf_conventions, llama_cpp_view
from workers.shared.files import build_once, inside, job_dir, keyed


def quiet() -> None:
    """Silence progress bars and known-harmless warnings in worker logs."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # bitsandbytes on an AVX-512 BF16 CPU tries a hub kernel at import and logs its absence (no hub here)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", message=".*inputs will be cast.*")


def preload() -> None:
    """Import the ML stack now (~5 s on 2 cores), so a worker pays it while starting, not in its first job."""
    import importlib.util

    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: F401

    quiet()
    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes  # noqa: F401


def start(ctx) -> None:
    """What every model job does first: quiet logs, this worker's thread count, its output folder checked."""
    import torch

    quiet()
    torch.set_num_threads(ctx.threads)
    ctx.output_dir = job_dir(ctx.output_root, ctx.output_dir, ctx.job.id)


def prepared_base(ctx, from_input: bool = False):
    """(the job's base model from the worker's cache, seconds spent preparing its folder, cache hit).

    The sweep's model; or, ``from_input``, the artifact of the job it comes from (a merged model to quantize)."""
    path, prepare_s = base_path(ctx, from_input)
    base, cached = ctx.cache.base(path, ctx)
    return base, prepare_s, cached


def base_path(ctx, from_input: bool = False) -> tuple[str, float]:
    """(the folder of the job's base model, seconds spent preparing it): the sweep's model, or, ``from_input``, the
    artifact of the job it comes from."""
    ctx.progress("preparing the base model")
    artifact = ctx.job.input.artifact if from_input else None
    if artifact:
        return inside(ctx.output_root, artifact), 0.0
    return base_dir(ctx.job.model, ctx.output_root, ctx.progress)


def package_version(name: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def versions() -> dict:
    found = {pkg: package_version(pkg) for pkg in ("torch", "transformers", "peft", "bitsandbytes", "llmcompressor",
                                                   "compressed-tensors", "llama_cpp_python", "gptqmodel", "optimum")}
    return {pkg: v for pkg, v in found.items() if v is not None}


def folder_columns(ctx, folder: str, peak_mb: float) -> dict:
    """The row's end for a job whose artifact is a folder of its own (a capture, a probe): its size on disk, peak
    memory, where it is, the library versions and what the job noted (``ctx.extra``)."""
    return {"size_mb": dir_bytes(folder) / 2**20, "size_source": "disk", "peak_mem_mb": peak_mb, "artifact": folder,
            "versions": versions(), **ctx.extra}


def base_dir(model: dict, output_root: str, progress=lambda line: None) -> tuple[str, float]:
    """A loadable float HF folder for ``model``, and seconds spent preparing it now (0 if ready): a local
    folder as it is, a hub model's snapshot at its pinned commit (downloaded once: workers.shared.hub), a GGUF's float
    copy (made once)."""
    confirm(model)  # a local model is still the content its key names (not a path taken from Redis on trust)
    if model["kind"] == "hf_dir":
        return model["location"], 0.0
    if model["kind"] == "hub":
        from workers.shared.hub import snapshot

        return snapshot(model, output_root, progress)
    target = keyed(output_root, "_models", f"{model['key']}|{FLOAT_COPY_VERSION}")
    start = time.time()
    built = build_once(target, lambda tmp: _materialize_gguf(model["location"], model["gguf_file"], tmp))
    if not (target / CHECKS_FILE).is_file():  # made by an older qfarm: check it now
        from transformers import AutoTokenizer

        _write_checks(target, f"{model['location']}/{model['gguf_file']}", AutoTokenizer.from_pretrained(target))
    return str(target), time.time() - start if built else 0.0


FLOAT_COPY_VERSION = 2  # 2: a GGUF without output.weight gives a float copy with tied embeddings (1 stored them twice)


def _write_checks(folder: Path, gguf_path: str, tokenizer=None, checks: dict | None = None) -> None:
    """The GGUF's own tokenizer conventions (``checks``, or ``tokenizer`` checked: workers.evaluate.checks), written
    beside its float copy."""
    import json

    checks = checks if checks is not None else gguf_conventions(gguf_path, tokenizer)
    tmp = folder / f"{CHECKS_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(checks))
    os.replace(tmp, folder / CHECKS_FILE)


def _materialize_gguf(folder: str, gguf_file: str, out: Path) -> None:
    """The GGUF's float copy: its weights dequantized, and the first tokenizer that cuts text as llama.cpp does with
    the file (workers.shared.gguf_tokenizer.candidates), saved beside them and checked again as saved: every row,
    calibration sample, training example and prompt of the sweep goes through it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.shared.gguf_tokenizer import candidates

    gguf_path = f"{folder}/{gguf_file}"
    theirs = llama_cpp_view(gguf_path)  # read once, for both checks
    tokenizer, checks = choose_tokenizer(gguf_path, candidates(folder, gguf_file), theirs)  # none agrees: refused now
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    _, saved = choose_tokenizer(gguf_path, [(AutoTokenizer.from_pretrained(out), None)], theirs)  # what jobs load
    _write_checks(out, gguf_path, checks={**saved, "tokenizer_check": checks["tokenizer_check"]})
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model keeps its gguf quantizer, which refuses to save; drop it (BACKENDS.md).
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if not _has_output_weight(gguf_path):  # llama.cpp's tied embeddings: one matrix, as the file has
        tie_embeddings(model)
    model.save_pretrained(out)
    (out / "QFARM_SOURCE.txt").write_text(f"dequantized to float32 from {gguf_path}\n")


def _has_output_weight(gguf_path: str) -> bool:
    from qfarm.sweep.modelinfo import gguf_metadata

    return "output.weight" in gguf_metadata(Path(gguf_path), wanted=set(), tensors=True).get("#tensors", {})


def tie_embeddings(model) -> None:
    """The model's output head made the input embedding itself (one tensor, saved once), and its config saying so:
    transformers' GGUF loader gives some families (Qwen2) an untied copy of a file's single embedding matrix."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is embed.weight:
        model.config.tie_word_embeddings = True
        return
    if head.weight.shape != embed.weight.shape:
        raise ValueError(f"cannot tie an output head of shape {tuple(head.weight.shape)} to embeddings of "
                         f"{tuple(embed.weight.shape)}")
    model.config.tie_word_embeddings = True
    text = getattr(model.config, "get_text_config", lambda: None)()
    if text is not None and text is not model.config:
        text.tie_word_embeddings = True
    head.weight = embed.weight


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_label() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu"


def checkpoint_dtype(path: str) -> str:
    """The dtype a model folder's config declares (``torch_dtype``/``dtype``); a GGUF's float copy says
    ``gguf`` (float32 on disk, a quantized file at heart)."""
    import json

    folder = Path(path)
    if (folder / "QFARM_SOURCE.txt").is_file():
        return "gguf"
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or text.get("torch_dtype") or text.get("dtype") or "float32")


def compute_dtype(path: str):
    """What a model computes in here: the checkpoint's own dtype on a GPU (bfloat16 where the GPU has it, else
    float32: a bfloat16 model overflows in float16; a GGUF's float copy in bfloat16), float32 on a CPU (its
    bfloat16 kernels are native on AVX-512-BF16/AMX only, and rows of one sweep must not differ by machine)."""
    import torch

    if device() == "cpu":
        return torch.float32
    declared = checkpoint_dtype(path)
    if declared in ("bfloat16", "gguf"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.float16 if declared == "float16" else torch.float32


def placement(path: str, *, nbytes: float | None = None, reserve_bytes: float = 0.0) -> tuple[dict, dict]:
    """(``from_pretrained`` arguments placing a model's weights on this worker, the row's columns saying where).

    On one GPU that holds it, the whole model on ``cuda:0``; else over the job's GPUs (Ray gives the actor its
    ``resources.gpus``: ``CUDA_VISIBLE_DEVICES``) with ``max_memory`` from their free memory, offloading to host RAM
    only when they cannot hold it (qfarm.sweep.plan.layout). ``nbytes``, its weights, defaults to the config's parameters at the
    compute dtype; ``reserve_bytes`` is kept free on each GPU for the forward (the plan's working set)."""
    import psutil
    import torch

    from qfarm.sweep.plan import layout

    if device() == "cpu":
        return {"device_map": {"": "cpu"}}, {"device_map": "cpu"}
    if nbytes is None:
        nbytes = weight_bytes(path)
    free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    cap = settings.get("QFARM_GPU_MEM_GB")
    if cap:
        free = [min(f, float(cap) * 1e9) for f in free]
    plan = layout(nbytes, reserve_bytes, free, psutil.virtual_memory().available)
    kwargs = {"device_map": plan["device_map"]}
    if plan["max_memory"]:
        kwargs["max_memory"] = plan["max_memory"]
    return kwargs, {"device_map": plan["where"], "offload_gb": plan["offload_gb"], "gpus_used": plan["gpus_used"]}


def weight_bytes(path: str, linear_bytes: float | None = None, dtype=None) -> float:
    """A model's weight bytes from its config: every parameter at ``dtype`` (default the compute dtype), or its
    Linear layers at ``linear_bytes`` a weight (a bitsandbytes model) and the rest at ``dtype``; 0 unknown."""
    import torch

    from qfarm.sweep.plan import model_shape

    shape = model_shape({"kind": "hf_dir", "location": path})
    if shape is None:
        return 0.0
    size = torch.empty((), dtype=dtype or compute_dtype(path)).element_size()
    if linear_bytes is None:
        return float(shape.total * size)
    return shape.linear * linear_bytes + (shape.total - shape.linear) * size


def load_float(path: str, where: dict | None = None, host: bool = False):
    """The float model and tokenizer from an HF folder or hub id, on this worker's device(s), in the compute dtype
    (``compute_dtype``); ``host``: in host RAM whatever the device (llm-compressor onloads it a layer at a time).
    ``where``, when given, receives the placement's columns."""
    from transformers import AutoTokenizer

    return float_model(path, where, host), AutoTokenizer.from_pretrained(path)


def float_model(path: str, where: dict | None = None, host: bool = False):
    """The float model alone (``load_float``)."""
    from transformers import AutoModelForCausalLM

    kwargs, said = ({"device_map": {"": "cpu"}}, {"device_map": "cpu"}) if host else placement(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype(path), **kwargs)
    model.eval()
    if where is not None:
        where.update(said)
    return model


def skeleton(path: str):
    """The model's architecture on the meta device (no weights, no memory): its parameters' shapes and ties, as
    loading the folder would make them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def dtype_name(model) -> str:
    """The dtype a torch model's float weights compute in (``float32``, ``bfloat16``), for the ``dtype`` column."""
    import torch

    for p in model.parameters():
        if p.dtype.is_floating_point:
            return str(p.dtype).replace("torch.", "")
    return str(getattr(model, "dtype", torch.float32)).replace("torch.", "")


def tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights are shared)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total


def dir_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def checkpoint_bytes(ctx, base) -> tuple[int, str]:
    """(the reference checkpoint's size on disk in its own dtype, what was measured): a GGUF source's file, the
    weight files of a model folder (safetensors, else PyTorch .bin), else (a hub id) its parameters in the dtype
    its config declares. Not the float copy a worker computes with: that is ``model_mem_mb``."""
    model = ctx.job.model or {}
    if not ctx.job.input.artifact and model.get("kind") == "gguf":
        return (Path(model["location"]) / model["gguf_file"]).stat().st_size, f"file {model['gguf_file']}"
    folder = Path(base.path)
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if files:
            return sum(f.stat().st_size for f in files), "checkpoint files"
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base.path)  # as the checkpoint declares it, not as it was loaded
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    params = sum(p.numel() for p in base.skeleton.parameters())
    return params * torch.empty((), dtype=dtype).element_size(), f"parameters in {str(dtype).replace('torch.', '')}"


def shared_columns(ctx, base, *, size_bytes: int | None, size_source: str, model, peak_mb: float,
                   prepare_s: float, cached: bool, artifact: str | None, model_bytes: int | None = None) -> dict:
    """The columns every model job's row has (qfarm.results.columns): size against the reference checkpoint on disk,
    memory, device, artifact and library versions. ``size_source`` says what ``size_bytes`` measured: ``disk``
    or ``memory``; ``size_bytes`` None is the reference itself (its checkpoint)."""
    ref_bytes, ref_source = checkpoint_bytes(ctx, base)
    if size_bytes is None:
        size_bytes, size_source = ref_bytes, f"disk ({ref_source})"
    return {
        **hub_columns(ctx.job.model or {}),
        **plan_columns(ctx, base),
        "size_mb": size_bytes / 2**20,
        "size_source": size_source,
        "ref_size_mb": ref_bytes / 2**20,
        "ref_size_source": ref_source,
        "size_vs_ref": size_bytes / ref_bytes,
        "model_mem_mb": (model_bytes if model_bytes is not None else tensor_bytes(model)) / 2**20,
        "peak_mem_mb": peak_mb,
        "prepare_s": prepare_s,
        "base_cache_hit": cached,
        "device": device_label(),
        "run_dtype": dtype_name(model) if hasattr(model, "parameters") else None,
        **({"device_map": base.where.get("device_map")} if model is base.held and base.where else {}),
        "artifact": artifact,
        "versions": versions(),
    }


def hub_columns(model: dict) -> dict:
    """A hub model's pin (the commit every job of the sweep used) and whether a token reached this worker."""
    if model.get("kind") != "hub":
        return {}
    from workers.shared.hub import token_set

    return {"model_revision": model.get("revision"), "model_revision_asked": model.get("revision_asked"),
            "hub_token": token_set()}


def plan_columns(ctx, base) -> dict:
    """The job's memory plan (qfarm.sweep.plan) for this worker's device, beside what it measured, so the estimate can be
    judged: on a GPU ``peak_mem_mb`` is CUDA's peak (compare ``plan_gpu_gb``), on a CPU the process RSS
    (``plan_host_gb``). Empty when the config cannot be read: a plan informs, it never fails a job."""
    from qfarm.sweep.plan import job_plan, model_shape

    model = ctx.job.model or {}
    ref = model if model.get("kind") == "gguf" and not ctx.job.input.artifact else \
        {"kind": "hf_dir", "location": base.path}
    try:
        shape = model_shape(ref)
        plan = job_plan(ctx.job.payload(), shape, device()) if shape else None
    except Exception:  # noqa: BLE001 - see the docstring
        plan = None
    return {"plan_gpu_gb": plan["gpu_gb"], "plan_host_gb": plan["host_gb"]} if plan else {}
