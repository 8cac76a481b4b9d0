"""A memory plan per job from the model's config alone (no weights read): what it holds on its GPU(s), in host RAM
and on disk, before anything runs (``qfarm validate --plan``).

The plan estimates what qfarm's own code does, term by term (``parts``), so that it can be judged against what a
job measured (the row keeps ``plan_gpu_gb``/``plan_host_gb`` beside ``peak_mem_mb``):

- weights at the compute dtype: the checkpoint's own on a GPU (bfloat16/float16; a GGUF's float copy in bfloat16),
  float32 on a CPU (workers.shared.models.compute_dtype);
- on a GPU a job has two phases and peaks at the larger: the reference (the worker's cached float base evaluated
  on the windows), then the job's own model (int8 or 4-bit weights: bitsandbytes' 0.5 byte + a float32 absmax per
  64 weights, less with double quantization; llm-compressor's decompressed artifact, the copy it quantizes staying
  in host RAM and onloaded a decoder layer at a time; the GGUF file in llama.cpp; the trainable copy with its LoRA
  weights, gradients and Adam moments (16 bytes a trainable parameter) and activations (Korthikanti et al.'s
  s·b·h·(34 + 5·a·s/h) per layer at 16 bits, 2·s·b·h with gradient checkpointing); a merged model), the base
  parked in host RAM meanwhile (over several GPUs: dropped, and loaded again by the next job that needs it);
- with ``resources.gpus: N`` weights, KV cache and activations spread over the N GPUs (``gpu_gb_per_device``),
  a window's logits, GPTQ's Hessians (a block's in² × 4 bytes) and the training logits sit on one;
- evaluation: one window's logits and log-softmax (float32, [seq, vocab]) and the KV cache;
- host RAM: the worker process (~1.5 GB of libraries, ~3 GB with CUDA), the reference log-probs kept (windows ×
  seq × vocab × 2 bytes while that fits ``QFARM_REF_CACHE_MB``; past it they are on disk, written once per output
  root), and on a CPU every term above at once (a CPU worker has nothing to park).

GB are 1e9 bytes. Parameter counts follow the config (hidden, intermediate, heads, KV heads, head_dim, vocab,
experts, tied embeddings); tested against the published sizes of Llama-3-8B/70B, Mixtral-8x7B, Qwen2.5-7B and
Gemma-2-9B (``tests/unit/test_plan.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qfarm import settings
from qfarm.sweep.job import Job, as_job
from qfarm.sweep.methods import GGUF_BITS_PER_WEIGHT

GB = 1e9
NOT_GATED = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2", "mpt", "gpt_bigcode"}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
HOST_BASE = {"cpu": 1.5 * GB, "cuda": 3.0 * GB}  # a worker process with torch and transformers imported


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    dtype: str = "float32"  # the checkpoint's, as its config declares it
    experts: int = 1
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # a shared expert beside the routed ones (Qwen2-MoE)
    gated: bool = True
    positions: int = 0  # learned position embeddings (GPT-2)
    from_gguf: bool = False  # read from a GGUF header: workers compute with its float copy

    def params(self) -> dict[str, int]:
        """Parameters by tensor class."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        mats = 3 if self.gated else 2
        attention = h * q * 2 + h * kv * 2
        if self.experts > 1:
            mlp = self.experts * mats * h * (self.expert_intermediate or self.intermediate) + h * self.experts
            mlp += mats * h * self.shared_intermediate
        else:
            mlp = mats * h * self.intermediate
        return {"embedding": self.vocab * h + self.positions * h, "lm_head": 0 if self.tied else self.vocab * h,
                "attention": self.layers * attention, "mlp": self.layers * mlp,
                "norms": self.layers * 2 * h + h}

    @property
    def total(self) -> int:
        return sum(self.params().values())

    @property
    def linear(self) -> int:
        """The quantized layers: attention and MLP/expert weights (embeddings, head and norms stay float)."""
        p = self.params()
        return p["attention"] + p["mlp"]

    def block_linear_inputs(self) -> list[int]:
        """Input sizes of one block's Linear layers (GPTQ keeps a Hessian of in² for each)."""
        inter = self.expert_intermediate or self.intermediate
        ins = [self.hidden] * 3 + [self.heads * self.head_dim]
        per_expert = [self.hidden] * (2 if self.gated else 1) + [inter]
        return ins + per_expert * max(self.experts, 1)


def shape_of_config(cfg: dict) -> ModelShape:
    """A HF config.json (its text part, for multimodal configs) as a ModelShape (vocab 0 where it names none)."""
    cfg = cfg.get("text_config", cfg)
    g = lambda *keys, default=None: next((cfg[k] for k in keys if cfg.get(k) is not None), default)  # noqa: E731
    hidden = int(g("hidden_size", "n_embd", "d_model"))
    heads = int(g("num_attention_heads", "n_head"))
    experts = int(g("num_local_experts", "num_experts", "n_routed_experts", default=1) or 1)
    model_type = str(cfg.get("model_type", ""))
    return ModelShape(
        vocab=int(g("vocab_size", default=0)), hidden=hidden, layers=int(g("num_hidden_layers", "n_layer")), heads=heads,
        kv_heads=int(g("num_key_value_heads", default=heads)), head_dim=int(g("head_dim", default=hidden // heads)),
        intermediate=int(g("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden) or 4 * hidden),
        tied=bool(cfg.get("tie_word_embeddings", True)), dtype=str(g("torch_dtype", "dtype", default="float32")),
        experts=experts, expert_intermediate=int(g("moe_intermediate_size", default=0) or 0) if experts > 1 else 0,
        shared_intermediate=int(g("shared_expert_intermediate_size", default=0) or 0),
        gated=model_type not in NOT_GATED, positions=int(g("n_positions", default=0)) if model_type == "gpt2" else 0)


def shape_of_gguf(meta: dict) -> ModelShape:
    """A GGUF header's hyperparameters and tensor list (qfarm.sweep.modelinfo.gguf_metadata(tensors=True)) as a
    ModelShape; whether the output head is tied is read from the tensors (no ``output.weight``)."""
    arch = meta.get("general.architecture", "llama")
    g = lambda k, default=None: meta.get(f"{arch}.{k}", default)  # noqa: E731
    hidden, heads = int(g("embedding_length")), int(g("attention.head_count"))
    vocab = int(g("vocab_size") or meta.get("tokenizer.ggml.tokens#count") or 0)
    return ModelShape(vocab=vocab, hidden=hidden, layers=int(g("block_count")), heads=heads,
                      kv_heads=int(g("attention.head_count_kv", heads)),
                      head_dim=int(g("attention.key_length", hidden // heads)),
                      intermediate=int(g("feed_forward_length")), tied="output.weight" not in meta.get("#tensors", {}),
                      dtype="float32", experts=int(g("expert_count", 1) or 1), from_gguf=True,
                      expert_intermediate=int(g("expert_feed_forward_length", 0) or 0))


def model_shape(model: dict) -> ModelShape | None:
    """The ModelShape of a resolved model reference (a folder's or a hub snapshot's config.json, a GGUF header), or
    None where there is none to read here."""
    from qfarm.sweep.modelinfo import gguf_metadata

    try:
        if model.get("kind") == "gguf":
            return shape_of_gguf(gguf_metadata(Path(model["location"]) / model["gguf_file"], tensors=True))
        folder = model.get("config_dir") or (model["location"] if model.get("kind") == "hf_dir" else None)
        if folder:
            return shape_of_config(json.loads((Path(folder) / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


UNSPREAD = ("a window's logits and log-softmax (float32)", "GPTQ Hessians (one block)", "logits and their gradient")


def compute_bytes(shape: ModelShape, device: str) -> int:
    """Bytes a weight takes as qfarm computes with it: the checkpoint's own dtype on a GPU (bfloat16/float16; a
    GGUF source's float copy is float32 and computes in bfloat16 there), float32 on a CPU."""
    if device != "cuda":
        return 4
    return DTYPE_BYTES.get(shape.dtype, 4) if shape.dtype != "float32" or not shape.from_gguf else 2


def job_plan(job: Job | dict, shape: ModelShape, device: str, reads_reference: bool | None = None) -> dict:
    """The plan of one job (a Job, or its payload) on ``device`` (cuda | cpu): GB per GPU and in all, host, disk, by term.

    A job measured against the reference (``Job.compares``: a quantized variant, an evaluated checkpoint) holds only
    its own model: the float base is its reference job's, whose log-probs it reads (kept in host RAM when they fit
    the budget, else a window at a time from disk). bitsandbytes quantizes while loading (the 4-bit model, never the
    float one, on the GPU); llm-compressor methods quantize a host-RAM copy and are evaluated decompressed (their
    dense size on the GPU); a GGUF job holds llama.cpp's file. The reference job, and a job that trains or merges,
    has two phases on a GPU and its peak is the larger: the reference (the cached float base on the GPU, evaluated
    on the windows; its log-probs kept in host RAM or written to disk), then the job's own model, with the base
    parked in host RAM meanwhile. ``reads_reference=False`` plans a comparing job that makes the reference itself
    (its reference's figures not on disk: every job, before the reference was a job of its own; bench/plan_memory.py).
    llm-compressor methods quantize a copy in host RAM that their sequential pipeline
    onloads a decoder layer at a time. Weights, KV cache and activations spread over the job's GPUs; a window's
    logits and GPTQ's Hessians sit on one. On a CPU everything is host RAM, held at once (nothing to park)."""
    job = as_job(job)
    reads = job.compares if reads_reference is None else reads_reference and job.compares
    kind, opts = job.kind, job.view  # every default from the options model, none here
    method = job.method or kind
    on_gpu, P = device == "cuda", shape.total
    cb = compute_bytes(shape, device)
    # a comparing job reads the reference's figures its reference job wrote: the float base is that job's, not its own
    ref: dict[str, float] = {} if reads else {"cached float base": P * cb}
    own: dict[str, float] = {}
    host: dict[str, float] = {"worker process": HOST_BASE[device]}
    disk: dict[str, float] = {}
    four_bit = 0.5 + (1 / 64 + 4 / (64 * 256) if opts.double_quant else 4 / 64)
    gguf_source = (job.model or {}).get("kind") == "gguf"
    terms = Terms(ref, own, host, disk, opts, shape, cb, on_gpu, gguf_source, four_bit)
    PLAN_TERMS[plan_key(kind, method)](terms)
    if reads:
        _evaluation(own, host, job, shape, cb)
    else:
        _evaluation(ref, host, job, shape, cb, disk)
        if own:
            _evaluation(own, {}, job, shape, cb)
    if gguf_source:
        disk.setdefault("float copy of the GGUF (once per output root)", P * 4)
    gpus = max(int(job.resources.get("gpus") or 0), 1) if on_gpu else 0
    if not on_gpu:  # a CPU worker holds everything in host RAM, at once
        host.update({**ref, **own})
        dev, phase, phases = {}, "host", {}
    else:
        if ref and own and gpus == 1:  # over several GPUs it is dropped instead (and loaded again by the next job)
            host["float base, parked in host RAM"] = P * cb
        per_device = lambda terms: sum(v if k in UNSPREAD else v / gpus for k, v in terms.items())  # noqa: E731
        dev, phase = (own, "own model") if own and per_device(own) >= per_device(ref) else (ref, "reference")
        phases = {**({"reference": per_device(ref) / GB} if ref else {}),
                  **({"own model": per_device(own) / GB} if own else {})}
    gpu_per_device = sum(v if k in UNSPREAD else v / max(gpus, 1) for k, v in dev.items())
    return {"device": device, "gpus": gpus, "gpu_gb": sum(dev.values()) / GB, "gpu_gb_per_device": gpu_per_device / GB,
            "host_gb": sum(host.values()) / GB, "disk_gb": sum(disk.values()) / GB, "params": P, "peak_phase": phase,
            "phases_gb_per_device": phases, "dtype_bytes": cb,
            "parts_by_phase": {} if not on_gpu else {**({"reference": {k: v / GB for k, v in ref.items()}} if ref else {}),
                                                     **({"own model": {k: v / GB for k, v in own.items()}} if own else {})},
            "parts": {"gpu": {k: v / GB for k, v in dev.items()}, "host": {k: v / GB for k, v in host.items()},
                      "disk": {k: v / GB for k, v in disk.items()}}}


@dataclass
class Terms:
    """What a job holds, by phase and place (``job_plan``), and what its plan terms are computed from."""

    ref: dict
    own: dict
    host: dict
    disk: dict
    opts: object  # the job's options, every default filled in (``Job.view``)
    shape: ModelShape
    cb: int  # bytes of a weight at the compute dtype
    on_gpu: bool
    gguf_source: bool  # the sweep's model is a GGUF file
    four_bit: float  # bytes of a bitsandbytes 4-bit weight, its scales included

    @property
    def rest(self) -> int:
        return self.shape.total - self.shape.linear


def plan_key(kind: str | None, method: str | None) -> str:
    """The memory plan's terms a job gets: its method's (the registry's ``Method.plan``), else its kind's
    (``Kind.plan``). KeyError for a kind the registry does not have."""
    from qfarm.sweep.methods import KINDS

    entry = KINDS[kind]
    found = entry.method(method)
    return found.plan if found is not None else entry.plan


def _reference(t: Terms) -> None:
    """The float model as loaded: the reference phase alone (no model of its own)."""


def _bnb_int8(t: Terms) -> None:
    t.own["int8 model"] = t.shape.linear * 1 + t.rest * t.cb
    t.disk["artifact"] = t.shape.linear + t.rest * 2


def _bnb_4bit(t: Terms) -> None:
    t.own["4-bit model"] = t.shape.linear * t.four_bit + t.rest * t.cb
    t.disk["artifact"] = t.shape.linear * t.four_bit + t.rest * 2


def _llm_compressor(t: Terms, hessians: bool = False) -> None:
    P, bits, group = t.shape.total, t.opts.bits, t.opts.group_size
    if t.on_gpu:
        t.host["model being quantized (onloaded a layer at a time)"] = P * t.cb
        t.own["decompressed artifact"] = P * t.cb
    else:
        t.own["model being quantized, then its decompressed artifact"] = P * t.cb
    if hessians:
        t.own["GPTQ Hessians (one block)"] = sum(n * n * 4 for n in t.shape.block_linear_inputs())
    per_group = 2 * (2 if not t.opts.symmetric else 1) / (group if group and group > 0 else t.shape.hidden)
    t.disk["artifact"] = t.shape.linear * (bits / 8 + per_group) + t.rest * 2


def _gguf(t: Terms) -> None:
    P = t.shape.total
    file_bytes = P * GGUF_BITS_PER_WEIGHT.get(t.opts.gguf_type, 8) / 8
    (t.own if t.on_gpu else t.host)["GGUF file in llama.cpp"] = file_bytes
    t.disk["artifact"] = file_bytes
    if not t.gguf_source:
        t.disk["GGUF at the source dtype, converted once per output root"] = P * (2 if t.shape.dtype != "float32" else 4)


def _calibrate(t: Terms) -> None:
    """A float copy runs the calibration data; no reference, no evaluation."""
    t.ref.clear()
    (t.host if t.on_gpu else t.own)["float copy being calibrated (onloaded a layer at a time)"] = t.shape.total * t.cb
    block = sum(n * n * 4 for n in t.shape.block_linear_inputs())
    t.own["GPTQ Hessians (one block)"] = block
    t.disk["GPTQ Hessians of every layer (the capture)"] = block * t.shape.layers


def _evaluate(t: Terms) -> None:
    """Its format is read where it runs: at most a dense copy, the folder or file on disk."""
    t.own["the checkpoint as loaded (at most a dense copy)"] = t.shape.total * t.cb


def _merge(t: Terms) -> None:
    t.own["merged model"] = t.shape.total * t.cb
    t.disk["artifact"] = t.shape.total * DTYPE_BYTES.get(t.opts.dtype, 4)


def _training(t: Terms, four_bit_base: bool = False) -> None:
    dev, disk, opts, shape, four_bit, rest, cb = t.own, t.disk, t.opts, t.shape, t.four_bit, t.rest, t.cb
    method = "qlora" if four_bit_base else "lora"
    r = int(opts.r)
    per_block = sum(r * (n_in + n_out) for n_in, n_out in (
        (shape.hidden, shape.heads * shape.head_dim), (shape.hidden, shape.kv_heads * shape.head_dim),
        (shape.hidden, shape.kv_heads * shape.head_dim), (shape.heads * shape.head_dim, shape.hidden),
        (shape.hidden, shape.intermediate), (shape.hidden, shape.intermediate), (shape.intermediate, shape.hidden)))
    lora = per_block * shape.layers  # all-linear on a Llama-shaped block (qfarm's default targets)
    dev["trainable copy" + (" (4-bit)" if method == "qlora" else "")] = (
        shape.linear * four_bit + rest * cb if method == "qlora" else shape.total * cb)
    dev["LoRA weights, gradients, Adam moments"] = lora * 16
    s, b, h, a = int(opts.seq_len), int(opts.batch_size), shape.hidden, shape.heads
    # at 16 bits; LoRA computes in the base's dtype, QLoRA in its compute_dtype (float32 unless the spec says)
    act = cb / 2 if method == "lora" else DTYPE_BYTES.get(opts.compute_dtype, 4) / 2
    per_layer = s * b * h * 2 if opts.gradient_checkpointing else s * b * h * (34 + 5 * a * s / h)
    dev["activations"] = per_layer * act * shape.layers
    dev["logits and their gradient"] = b * s * shape.vocab * 4 * 2
    disk["adapter"] = lora * 4


# the memory plan's terms by the registry's ``Method.plan`` / ``Kind.plan``: a method names one of these (or adds
# its own here); tests/unit/test_plan.py holds every registry entry to a key of this table
PLAN_TERMS = {
    "reference": _reference, "bnb-int8": _bnb_int8, "bnb-4bit": _bnb_4bit, "llm-compressor": _llm_compressor,
    "llm-compressor+hessians": lambda t: _llm_compressor(t, hessians=True), "gguf": _gguf, "lora": _training,
    "qlora": lambda t: _training(t, four_bit_base=True), "calibrate": _calibrate, "evaluate": _evaluate,
    "merge": _merge, "none": _reference,
}


def window_bytes(shape: ModelShape, seq: int, cb: int) -> dict[str, float]:
    """What one forward over ``seq`` tokens holds besides the weights: its logits and log-softmax (float32,
    [seq, vocab]) and the KV cache at ``cb`` bytes an element."""
    return {"a window's logits and log-softmax (float32)": seq * shape.vocab * 4 * 2,
            "KV cache": 2 * shape.layers * seq * shape.kv_heads * shape.head_dim * cb}


def _evaluation(dev: dict, host: dict, job: Job, shape: ModelShape, cb: int, disk: dict | None = None) -> None:
    texts = job.evaluation.texts if job.evaluation is not None else []
    if texts:  # each domain's windows in turn: the longest window at once, every domain's log-probs kept
        seq, windows = max(t.seq_len for t in texts), sum(t.max_windows for t in texts)
        dev.update(window_bytes(shape, seq, cb))
        budget = settings.number("QFARM_REF_CACHE_MB") * 2**20
        kept = windows * seq * shape.vocab * 2
        if kept <= budget:
            host["reference log-probs kept"] = kept
        elif disk is not None:  # past the budget: written once under the output root, read a window at a time
            disk["reference log-probs (once per output root)"] = kept


def plan_jobs(jobs: list[Job | dict], shape: ModelShape, device: str) -> list[dict]:
    """Every model job's plan (``job_plan``) with its id, label and method."""
    out = []
    for job in map(as_job, jobs):
        if job.model:
            out.append({"job_id": job.id, "label": job.label, "method": job.method or job.kind,
                        **job_plan(job, shape, device)})
    return out



PLAN_FIXES = ("more resources.gpus (the model spreads over them; for the reference, a `method: none` job of the sweep "
              "with its own resources: it is the only job that holds the float model)",
              "a 4-bit method held as 4-bit (bnb-nf4, a GGUF Q4_K_M; gptq/awq rows are evaluated decompressed)",
              "a shorter eval.perplexity.seq_len or fewer max_windows",
              "a train job's smaller seq_len/batch_size or gradient_checkpointing: true",
              "a node type with bigger GPUs (resources.min_gpu_mem_gb names one)")


def place(jobs: list[dict], shape: ModelShape | None, gpu_sizes: list[float]) -> list[str]:
    """The memory plan as each GPU job's placement requirement: a job that names no ``min_gpu_mem_gb`` gets the
    smallest GPU size among ``gpu_sizes`` (the cluster's, GB) that holds its plan's figure per device (a job's
    model spreads over its ``gpus:``), so it is placed only where it fits (and jobs group onto few worker shapes).
    Returns why the jobs no size holds cannot run (empty: all fit). Nothing happens without GPU sizes (a machine of
    logical GPU slots, a cluster whose GPUs say no memory) or without a shape (a config that cannot be read here).
    """
    sizes = sorted({float(s) for s in gpu_sizes if s})
    if shape is None or not sizes:
        return []
    refused = []
    for payload in jobs:
        job = as_job(payload)
        res = job.resources
        if not job.model or not res.get("gpus") or res.get("min_gpu_mem_gb"):
            continue
        p = job_plan(job, shape, "cuda")
        fits = [s for s in sizes if s >= p["gpu_gb_per_device"]]
        if fits:  # the payload is what is submitted: its own resources (jobs of one group may share one dict)
            payload["resources"] = {**res, "min_gpu_mem_gb": fits[0], "min_gpu_mem_gb_source": "plan"}
            continue
        parts = ", ".join(f"{k} {v:.1f}" for k, v in p["parts"]["gpu"].items())
        on = "one GPU" if p["gpus"] == 1 else f"each of its {p['gpus']} GPUs"
        refused.append(f"  {job.label} ({job.id}): {p['gpu_gb_per_device']:.1f} GB on {on} ({parts})")
    if not refused:
        return []
    return (["by their memory plan these jobs fit no GPU of this cluster (the largest has "
             f"{sizes[-1]:g} GB):"] + refused
            + [f"give them room: {'; '.join(PLAN_FIXES)}. `qfarm validate SPEC --plan` shows every job's plan"])


HEADROOM = 0.92  # of a device's free memory given to weights: CUDA's context, allocator slack, fragmentation


class NoRoom(ValueError):
    """A model that neither the job's GPUs nor the host can hold."""


def layout(weight_bytes: float, reserve_bytes: float, gpu_free: list[float], host_free: float) -> dict:
    """Where a model's weights go on a worker, from its weight bytes, the working set each GPU keeps free for the
    forward (``reserve_bytes``: a window's logits, KV cache, activations: the plan's terms that are not weights),
    each of the job's GPUs' free bytes and the host's: the ``from_pretrained`` arguments and what the row says.

    - no GPU: everything on the CPU;
    - one GPU that holds it: ``device_map={"": "cuda:0"}`` (no dispatch hooks: the fastest forward);
    - else spread over the job's GPUs: ``device_map="auto"`` with ``max_memory`` per GPU (free × HEADROOM less the
      reserve), transformers balancing the layers over them;
    - past the GPUs' room, the rest offloaded to host RAM (``max_memory["cpu"]``), said in ``offload_gb``;
    - past that too: :class:`NoRoom`, with the figures.
    """
    if not gpu_free:
        return {"device_map": {"": "cpu"}, "max_memory": None, "gpus_used": 0, "offload_gb": 0.0, "where": "cpu"}
    room = [max(free * HEADROOM - reserve_bytes, 0.0) for free in gpu_free]
    if len(room) == 1 and weight_bytes <= room[0]:
        return {"device_map": {"": "cuda:0"}, "max_memory": None, "gpus_used": 1, "offload_gb": 0.0, "where": "cuda:0"}
    max_memory: dict = {i: int(r) for i, r in enumerate(room)}
    over = weight_bytes - sum(room)
    n = len(room)
    if over <= 0:
        return {"device_map": "auto", "max_memory": max_memory, "gpus_used": n, "offload_gb": 0.0,
                "where": f"spread over {n} GPUs" if n > 1 else "cuda:0"}
    host_room = host_free * HEADROOM
    if over > host_room:
        raise NoRoom(f"{weight_bytes / GB:.1f} GB of weights: the job's {n} GPU(s) hold {sum(room) / GB:.1f} GB after "
                     f"{reserve_bytes / GB:.1f} GB each for the forward, and host RAM {host_room / GB:.1f} GB more; "
                     f"give the job more `resources.gpus`, bigger GPUs, or a 4-bit method")
    max_memory["cpu"] = int(host_room)
    return {"device_map": "auto", "max_memory": max_memory, "gpus_used": n, "offload_gb": over / GB,
            "where": f"{n} GPU(s) + {over / GB:.1f} GB offloaded to host RAM"}
