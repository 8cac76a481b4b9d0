"""``search:`` — the best model for a budget: per-layer mixed precision, found on the farm.

Sample yaml::

    name: smollm2-fit
    model: bundled:smollm2-135m
    eval: {perplexity: {seq_len: 512, max_windows: 8}}
    search:
      target: {bits_per_weight: 4.25}    # or size_mb: 100 (the artifact on disk), gpu_mem_gb: 6 (serving it)
      objective: kl_div                  # minimised; or perplexity
      space:
        - {method: rtn, bits: [3, 4, 8], group_size: [32, 64, 128], mixed: true}
        - {method: gptq, bits: [3, 4, 8], group_size: [32, 64, 128], mixed: true}
        - {method: gguf, gguf_type: [Q3_K_M, Q4_K_M, Q5_K_M, Q6_K, Q8_0], mixed: true}
      budget: {jobs: 16}                 # full evaluations; probes are counted apart
      probe: {windows: 2, seq_len: 128}  # each probe: KL over these windows, one layer quantized at a time
      halving: {windows: 2, keep: 3}     # optional: every candidate on 2 windows, the best 3 in full; lists make
                                         # rungs: {windows: [2, 6], keep: [6, 2]}

A search is expanded into ordinary jobs (qfarm.sweep.expand), so it spreads over the farm, resumes and retries like
any sweep:
- **probes** (job kind ``probe``, one per layer format of the space): for every quantizable layer, the KL of the
  model's next-token distribution from the float model's when only that layer is quantized in that format. Written
  to the probe's folder (``sensitivity.json``); GPTQ candidates read the round-to-nearest probes of their formats.
- **uniform** candidates: every configuration of the space whose bits per weight (predicted from the model's layer
  shapes) fit the target: ordinary quantize jobs.
- **mixed** candidates (``mixed: true``): a quantize job with a ``mixed`` option; it needs the probes, and in its job
  picks each layer's format so that the quantized layers' stored bits come to at most the target while the summed
  predicted KL is least (``allocate``: greedy by KL saved per bit on each layer's lower convex hull, then a fill
  pass). ``points`` allocations per mixed entry, ``step`` bits apart under the target, trace the frontier.
- with ``halving: {windows, keep}``, every candidate is screened on its first ``windows`` windows, then ``keep``
  **final** jobs (kind ``final``, after every candidate) evaluate in full the best of those that met the target, on
  their own artifacts (workers.search.final); with lists, ``rung`` jobs (the same kind) between them evaluate the
  best of the rung before on more windows.
The pick (``search_pick``) is the candidate (or, with halving, the final) with the best measured objective whose
measured size meets the target (qfarm.results.compare.mark_search_pick).

``bits_per_weight`` counts every stored bit of the quantized layers' weights (packed weights, scales, zero points,
shapes) over their parameter count: the same measure the rows carry (workers.quantize.artifacts.bits_per_weight).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qfarm.sweep.methods import GGML_TYPES, GGUF_BITS_PER_WEIGHT, GGUF_TYPES, tensor_rule

MAX_SPACE = 8  # entries of a search's space
# a candidate meets the target when its bits per weight are at most the target × (1 + TARGET_SLACK): the 0.05 %
# a layer's shape record adds to int4 g64's 4.25 is not a reason to drop it from a 4.25 search
TARGET_SLACK = 0.002
# a size target's mixes aim this share under it: what lies outside the layers is an estimate from the model's shape
# (measured on SmolLM2 at 100 MB: a GGUF's 0.6 MB over it, a compressed-tensors artifact's 0.4 MB under)
SIZE_MARGIN = 0.01


def meets(bits_per_weight: float, target: float) -> bool:
    return bits_per_weight <= target * (1 + TARGET_SLACK)
MAX_POINTS = 8
MAX_FORMATS = 32  # distinct layer formats over a search's mixed entries (qfarm.sweep.methods.MixedOptions holds them)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpeedFloor(_Strict):
    min: float = Field(gt=0.0, le=1_000_000.0)


class SearchTarget(_Strict):
    """What the pick must meet, one of: ``bits_per_weight`` (the stored bits of the quantized layers over their
    weights), ``size_mb`` (the artifact on disk, in the rows' MB: 2^20 bytes), ``gpu_mem_gb`` (GB: 1e9 bytes, what a
    GPU holds to serve the artifact: its weights as stored, the KV cache and one forward's logits over ``context``
    tokens, by default the evaluation's longest window; predicted from the model's config, qfarm.sweep.plan) or
    ``decode_tokens_per_s: {min: N}`` (measured by eval.speed on the farm's own hardware: not predicted, so the
    candidates span the space's sizes and the pick is the best of those measured at least that fast)."""

    bits_per_weight: Optional[float] = Field(None, gt=1.0, le=16.0)
    size_mb: Optional[float] = Field(None, gt=0.0, le=10_000_000.0)
    gpu_mem_gb: Optional[float] = Field(None, gt=0.0, le=100_000.0)
    context: Optional[int] = Field(None, ge=1, le=10_000_000)  # tokens a gpu_mem_gb target's KV cache holds
    decode_tokens_per_s: Optional[SpeedFloor] = None

    @model_validator(mode="after")
    def _one(self):
        if sum(v is not None for v in (self.bits_per_weight, self.size_mb, self.gpu_mem_gb,
                                       self.decode_tokens_per_s)) != 1:
            raise ValueError("give one target: bits_per_weight (stored bits of the quantized layers over their "
                             "weights, e.g. 4.25), size_mb (the artifact on disk, e.g. 90), gpu_mem_gb (what serving "
                             "it holds on a GPU, e.g. 6) or decode_tokens_per_s (e.g. {min: 20}, measured by "
                             "eval.speed)")
        if self.context is not None and self.gpu_mem_gb is None:
            raise ValueError("context is the tokens a gpu_mem_gb target's KV cache holds: give it with gpu_mem_gb")
        return self

    @property
    def column(self) -> str:
        for name in ("decode_tokens_per_s", "gpu_mem_gb", "size_mb"):
            if getattr(self, name) is not None:
                return name
        return "bits_per_weight"

    @property
    def value(self) -> float:
        if self.decode_tokens_per_s is not None:
            return self.decode_tokens_per_s.min
        return getattr(self, self.column)

    def describe(self) -> str:
        return {"bits_per_weight": f"{self.value:g} bits per weight", "size_mb": f"{self.value:g} MB",
                "gpu_mem_gb": f"{self.value:g} GB of GPU memory",
                "decode_tokens_per_s": f"at least {self.value:g} decode tokens/s"}[self.column]


def gpu_mem_gb(target: dict, row: dict) -> Optional[float]:
    """A row's predicted GPU memory under a ``gpu_mem_gb`` target (as the rows record it: with ``overhead_gb``, the
    KV cache and logits at its context): its size on disk plus that."""
    size, overhead = row.get("size_mb"), target.get("overhead_gb")
    if not isinstance(size, (int, float)) or not isinstance(overhead, (int, float)):
        return None
    return size * 2**20 / 1e9 + overhead


def meets_target(target: dict, row: dict) -> bool:
    """Whether a row's figures meet a search's target (``target``: as the rows record it): its bits per weight
    within TARGET_SLACK, its size on disk at most the size asked, its predicted GPU memory at most the GB asked, its
    decode speed at least the floor."""
    if target.get("gpu_mem_gb") is not None:
        need = gpu_mem_gb(target, row)
        return need is not None and need <= float(target["gpu_mem_gb"])
    if target.get("size_mb") is not None:
        size = row.get("size_mb")
        return isinstance(size, (int, float)) and size <= float(target["size_mb"])
    if target.get("decode_tokens_per_s") is not None:
        speed = row.get("decode_tokens_per_s")
        return isinstance(speed, (int, float)) and speed >= float(target["decode_tokens_per_s"]["min"])
    bpw = row.get("bits_per_weight")
    return isinstance(bpw, (int, float)) and meets(bpw, float(target.get("bits_per_weight") or 0))


def rank_key(target: dict, column: Optional[str], direction: Optional[str], row: dict) -> Optional[tuple]:
    """How a search ranks a succeeded row (lower first): its objective (``column``; ``direction`` max: negated),
    then its size (on disk under a size or memory target, else bits per weight); None for a row that does not compete:
    no measured objective, or over the target (``meets_target``)."""
    value = row.get(column) if column else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not meets_target(target, row):
        return None
    sign = -1 if direction == "max" else 1
    by = "size_mb" if target.get("size_mb") is not None or target.get("gpu_mem_gb") is not None else "bits_per_weight"
    return sign * value, row.get(by) or 0.0


class SpaceEntry(BaseModel):
    """One method of the space: lists of its formats (``bits`` × ``group_size``, or ``gguf_type``); with ``mixed``
    each layer may take any of them. Other keys are fixed options of the method (e.g. gptq's ``calibration``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    method: Literal["rtn", "gptq", "gguf"]
    bits: list[Literal[2, 3, 4, 8]] = Field([], max_length=4)
    group_size: list[int] = Field([], max_length=8)
    gguf_type: list[str] = Field([], max_length=16)
    mixed: bool = False

    @model_validator(mode="after")
    def _formats(self):
        if self.method == "gguf":
            if self.bits or self.group_size:
                raise ValueError("a gguf entry lists gguf_type (Q4_K_M, Q6_K, ...), not bits or group_size")
            if not self.gguf_type:
                raise ValueError("a gguf entry lists its gguf_type values, e.g. [Q4_K_M, Q6_K, Q8_0]")
            bad = [t for t in self.gguf_type if t not in GGUF_TYPES or GGUF_TYPES[t] >= 16]
            if bad:
                raise ValueError(f"{bad[0]!r} is not a quantized llama.cpp file type. Allowed: "
                                 + ", ".join(t for t in GGUF_TYPES if GGUF_TYPES[t] < 16))
        else:
            if self.gguf_type:
                raise ValueError(f"a {self.method} entry lists bits and group_size, not gguf_type")
            if not self.bits or not self.group_size:
                raise ValueError(f"a {self.method} entry lists bits and group_size, e.g. bits: [3, 4, 8], "
                                 "group_size: [32, 64]")
            bad = [g for g in self.group_size if g not in (-1, 16, 32, 64, 128, 256, 512, 1024)]
            if bad:
                raise ValueError(f"group_size {bad[0]} is not one of -1, 16, 32, 64, 128, 256, 512, 1024")
            if self.mixed and (self.model_extra or {}).get("symmetric") is False:
                raise ValueError("mixed candidates are symmetric (their layers' sizes are predicted exactly); drop "
                                 "symmetric: false, or mixed")
        for key in ("scheme", "mixed_formats", "tensor_types"):
            if key in (self.model_extra or {}):
                raise ValueError(f"{key} is decided by the search; leave it out of the space")
        return self

    @property
    def fixed(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ProbeSpec(_Strict):
    """The sensitivity probes: ``jobs`` of them, each a share of the layers (one forward per layer over ``windows``
    windows of ``seq_len`` tokens)."""

    windows: int = Field(2, ge=1, le=64)
    seq_len: int = Field(128, ge=16, le=4_096)
    jobs: int = Field(4, ge=1, le=256)


class BudgetSpec(_Strict):
    jobs: int = Field(16, ge=1, le=1_000)  # full evaluations (uniform and mixed candidates); probes apart


MAX_RUNGS = 4
_Windows = Annotated[int, Field(ge=1, le=64)]


class HalvingSpec(_Strict):
    """Successive halving: every candidate (quantized once) is evaluated on its first ``windows`` windows of each
    evaluation text (no lm-eval tasks), then the ``keep`` best of those that meet the target are evaluated in full
    (``final`` jobs, on the candidates' own artifacts: nothing is quantized again). The pick is the best final.
    Lists make several rungs: ``windows: [2, 6], keep: [6, 2]`` screens every candidate on 2 windows, evaluates the
    best 6 again on 6 (``rung`` jobs), and the best 2 of those in full; each rung reads more windows than the one
    before and keeps fewer."""

    windows: Union[_Windows, list[_Windows]] = 2
    keep: Union[_Windows, list[_Windows]] = 3

    @model_validator(mode="after")
    def _rungs(self):
        windows, keep = _listed(self.windows), _listed(self.keep)
        if isinstance(self.windows, list) != isinstance(self.keep, list) or len(windows) != len(keep):
            raise ValueError("halving: windows and keep are both numbers (one screen), or lists of the same length "
                             "(one entry a rung), e.g. {windows: [2, 6], keep: [6, 2]}")
        if not 1 <= len(windows) <= MAX_RUNGS:
            raise ValueError(f"halving: 1 to {MAX_RUNGS} rungs, not {len(windows)}")
        if any(b <= a for a, b in zip(windows, windows[1:])):
            raise ValueError(f"halving: each rung reads more windows than the one before: {list(windows)}")
        if any(b >= a for a, b in zip(keep, keep[1:])):
            raise ValueError(f"halving: each rung keeps fewer candidates than the one before: {list(keep)}")
        return self

    def rungs(self) -> list[tuple[int, int]]:
        return halving_rungs(self.model_dump())


def _listed(value) -> list:
    return value if isinstance(value, list) else [value]


def halving_rungs(halving: dict) -> list[tuple[int, int]]:
    """(windows, keep) of each rung of a halving spec, as a job's search information holds it (its model_dump):
    rung 1 screens every candidate on its windows, and its ``keep`` best go on to the next rung (the last rung's to
    the full evaluation)."""
    windows, keep = _listed(halving["windows"]), _listed(halving["keep"])
    return list(zip(windows, keep)) if len(windows) == len(keep) else []


# what a final job reads of each screened candidate (the scheduler hands it these of their rows: Input.after), and
# carries over into its own row when that candidate is the one it evaluates: the artifact's own facts
SCREEN_KEYS = ("artifact", "method", "bits", "bits_per_weight", "size_mb", "layer_formats", "search_predicted_kl",
               "search_predicted_bits_per_weight", "search_target_bits_per_weight", "search_formats_used",
               "search_table_formats", "search_probe_windows", "tensor_types", "gguf_tensor_types", "gguf_imatrix",
               "file_bits_per_weight", "quant_s",
               "decode_tokens_per_s", "kl_div", "perplexity",
               # a rung's row (halving over several rungs): the candidate it stands for, and what the rungs before saw
               "search_final_of", "search_final_label", "search_fragment", "search_screen")


OBJECTIVES = {"kl_div": ("kl_div", "min"), "perplexity": ("perplexity", "min")}  # the rows' columns


class SearchSpec(_Strict):
    target: SearchTarget
    objective: str = "kl_div"
    space: list[SpaceEntry] = Field(min_length=1, max_length=MAX_SPACE)
    budget: BudgetSpec = BudgetSpec()
    probe: ProbeSpec = ProbeSpec()
    halving: Optional[HalvingSpec] = None  # off: every candidate is evaluated in full
    points: int = Field(2, ge=1, le=MAX_POINTS)  # allocations per mixed entry, along the frontier
    step: float = Field(0.25, gt=0.0, le=4.0)  # bits per weight between them

    @field_validator("objective")
    @classmethod
    def _objective(cls, value: str) -> str:
        if value not in OBJECTIVES and not re.match(r"^((kl|ppl)@[A-Za-z0-9_.-]{1,64}|task:\S{1,128})$", value):
            raise ValueError(f"objective {value!r} is not one qfarm can search for. Allowed: kl_div, perplexity, "
                             "kl@DOMAIN or ppl@DOMAIN (a list-form eval.perplexity's), or task:COLUMN (an eval.tasks "
                             "metric's column in the results, maximised)")
        return value

    @model_validator(mode="after")
    def _formats(self):
        if self.halving is not None and self.objective.startswith("task:"):
            raise ValueError("halving screens the candidates on a few perplexity windows; an eval.tasks objective is "
                             "not measured there: drop halving, or search for kl_div / perplexity")
        names = {f.name for e in self.space if e.mixed for f in formats_of(e)}
        if len(names) > MAX_FORMATS:
            raise ValueError(f"the mixed entries hold {len(names)} layer formats; at most {MAX_FORMATS} (each probe "
                             "prices every layer in each)")
        return self

    def measured(self) -> tuple[str, str]:
        """(the row column the objective reads, min or max)."""
        if self.objective in OBJECTIVES:
            return OBJECTIVES[self.objective]
        if self.objective.startswith("task:"):
            return self.objective.split(":", 1)[1], "max"
        return self.objective, "min"


# --- formats and their stored bits ------------------------------------------------------------------------------

# llama.cpp stores a K-quant tensor whose rows its 256-blocks do not divide in another type (llama-quant.cpp)
# llama.cpp's type for a tensor whose rows a K-quant's 256-blocks do not divide (llama-quant.cpp's
# tensor_type_fallback, as vendored by llama-cpp-python 0.3.36: Q2_K and Q3_K fall to Q4_0, no longer IQ4_NL)
K_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_EXTRA_GGML = {"IQ4_NL": (20, 32, 4.5)}  # types the rules do not name
SHAPE_BITS = 2 * 64  # compressed-tensors keeps each quantized layer's shape (two int64)


def ggml(name: str) -> tuple[int, int, float]:
    return GGML_TYPES.get(name) or _EXTRA_GGML[name]


def tensor_type_of(gguf_type: str) -> str:
    """The ggml tensor type a llama.cpp file type mostly stores (Q4_K_M: Q4_K)."""
    return re.sub(r"_[SML]$", "", gguf_type)


@dataclass(frozen=True)
class Format:
    """One layer format of a search: integer ``bits`` with ``group`` (rtn/gptq, symmetric) or a ggml tensor
    ``ggml_type`` (gguf). An integer format is stored as compressed-tensors (llm-compressor) or in the GPTQ layout
    (``layout: gptq``: GPTQModel's qweight, qzeros, float16 scales and g_idx)."""

    name: str  # "4b g64" or "Q4_K"
    layout: str = "compressed-tensors"

    @property
    def family(self) -> str:
        return "int" if "b g" in self.name else "gguf"

    @property
    def bits(self) -> int:
        return int(self.name.split("b")[0])

    @property
    def group(self) -> int:
        return int(self.name.split("g")[1])

    def stored_type(self, n_in: int) -> Optional[str]:
        """The ggml type llama.cpp stores a tensor with rows of ``n_in`` in (its fallback where the blocks do not
        divide them); None where no type fits."""
        kind = self.name
        if n_in % ggml(kind)[1]:
            kind = K_FALLBACK.get(kind, "")
            if not kind or n_in % ggml(kind)[1]:
                return None
        return kind

    def fits(self, n_in: int) -> bool:
        if self.family == "int":
            return self.group == -1 or n_in % self.group == 0
        return self.stored_type(n_in) is not None

    def layer_bits(self, n_in: int, n_out: int, scale_bits: int = 16) -> float:
        """Stored bits of a ``n_out`` × ``n_in`` layer in this format (its weights with their scales)."""
        if self.family == "gguf":
            _, block, bpw = ggml(self.stored_type(n_in))
            return n_out * (n_in // block) * block * bpw
        groups = 1 if self.group == -1 else n_in // self.group
        if self.layout == "gptq":  # int32 words packed along the inputs, a zero point a group and output (int32
            # words too), float16 scales, an int32 group index an input
            return (n_out * math.ceil(n_in * self.bits / 32) * 32 + groups * math.ceil(n_out * self.bits / 32) * 32
                    + groups * n_out * 16 + n_in * 32)
        # compressed-tensors packs each row's values bit after bit into int32 words (measured: 3-bit g64 stores 3.25
        # bits a weight with its scales); 8 bits: int8 weights
        packed = n_out * n_in * 8 if self.bits == 8 else n_out * math.ceil(n_in * self.bits / 32) * 32
        return packed + n_out * groups * scale_bits + SHAPE_BITS


def scale_bits(dtype: str) -> int:
    """Bits of one stored scale: a quantized artifact keeps its scales in the source checkpoint's dtype."""
    return 32 if dtype == "float32" else 16


def layout_of(options: dict) -> str:
    """How a job with these options stores an integer format: GPTQModel's GPTQ layout, else compressed-tensors."""
    return "gptq" if options.get("backend") == "gptqmodel" else "compressed-tensors"


def formats_of(entry: SpaceEntry) -> list[Format]:
    if entry.method == "gguf":
        return [Format(t) for t in dict.fromkeys(tensor_type_of(t) for t in entry.gguf_type) if t in GGML_TYPES]
    layout = layout_of(entry.fixed)
    return [Format(f"{b}b g{g}", layout)
            for b, g in itertools.product(sorted(set(entry.bits)), sorted(set(entry.group_size)))]


def uniform_options(entry: SpaceEntry) -> list[dict]:
    """Each configuration of the entry as a quantize job's options."""
    if entry.method == "gguf":
        return [{**entry.fixed, "method": "gguf", "gguf_type": t} for t in entry.gguf_type]
    return [{**entry.fixed, "method": entry.method, "bits": b, "group_size": g}
            for b, g in itertools.product(sorted(set(entry.bits)), sorted(set(entry.group_size)))]


@dataclass(frozen=True)
class Layer:
    """A quantizable weight layer: its name (as the probe and the candidate call it), inputs and outputs."""

    name: str
    n_in: int
    n_out: int

    @property
    def params(self) -> int:
        return self.n_in * self.n_out


# A layer's role in llama.cpp's rules (llama-quant.cpp's tensor_get_category), by its Hugging Face module name: the
# names of the families qfarm runs (Llama, Qwen2/3, Mistral, Gemma, Phi, GPT-2, GPT-NeoX, OPT, Falcon's fused ones)
_ROLES = (
    (r"(?:qkv_proj|c_attn|query_key_value|Wqkv|W_pack)$", "attn_qkv"),
    (r"(?:v_proj|\.value)$", "attn_v"), (r"(?:k_proj|\.key)$", "attn_k"), (r"(?:q_proj|\.query)$", "attn_q"),
    (r"(?:o_proj|out_proj|attn\.c_proj|attn(?:ention)?\.dense)$", "attn_output"),
    (r"(?:down_proj|fc2|mlp\.c_proj|dense_4h_to_h)$", "ffn_down"), (r"gate_proj$", "ffn_gate"),
    (r"(?:up_proj|gate_up_proj|fc1|c_fc|dense_h_to_4h)$", "ffn_up"),
)


def gguf_role(layer: str) -> tuple[Optional[int], str]:
    """(block, role) of a layer in llama.cpp's terms: ``3.self_attn.v_proj`` -> (3, "attn_v"); "other" for a role its
    rules do not single out."""
    block = re.search(r"(?:^|\.)(\d+)\.", layer)
    role = next((r for pattern, r in _ROLES if re.search(pattern, layer)), "other")
    return (int(block.group(1)) if block else None), role


def gguf_file_types(gguf_type: str, layers: list[Layer], imatrix: bool = False,
                    tensor_types: Optional[list[str]] = None) -> Optional[dict[str, str]]:
    """The ggml type llama.cpp stores each of ``layers`` in, in a file of ``gguf_type``: the user's ``tensor_types``
    rules first, then llama.cpp's own choice for the file type (llama-quant.cpp's llama_tensor_get_type_impl, as
    vendored by llama-cpp-python 0.3.36: Q4_K_M keeps attn_v and ffn_down in Q6_K on the first and last eighth of the
    blocks and every third between; Q3_K_M raises attn_v, attn_output, ffn_down), then its fallback where a type's
    blocks do not divide a row (F16 where none does). None where those rules are not followed here: a
    mixture-of-experts model, a file type qfarm does not list. Falcon's and Llama-70B's special cases are not
    followed (attn_v in Q5_K on a 70B: about 0.01 bits a weight)."""
    if gguf_type not in GGUF_BITS_PER_WEIGHT or any(re.search(r"(?:^|\.)experts?\.", la.name) for la in layers):
        return None
    base = tensor_type_of(gguf_type)
    if base not in GGML_TYPES:
        return None
    if GGML_TYPES[base][1] == 1:  # F16, BF16, F32: every tensor kept so
        return {la.name: base for la in layers}
    rules = [tensor_rule(text) for text in tensor_types or []]
    placed = sorted(((*gguf_role(la.name), la) for la in layers), key=lambda t: (t[0] is None, t[0] or 0))
    blocks = len({b for b, _, _ in placed if b is not None}) or 1
    by_role = {"attn_v": [], "attn_qkv": []}
    for b, role, la in placed:
        by_role.setdefault(role, []).append(la)
    n_wv = len(by_role["attn_v"]) + len(by_role["attn_qkv"])  # llama.cpp counts both as attn_v-like
    q_heads = [la.n_out for la in by_role.get("attn_q", [])]
    k_heads = [la.n_out for la in by_role.get("attn_k", [])]
    gqa = (q_heads[0] // k_heads[0]) if q_heads and k_heads and k_heads[0] else 1

    def more_bits(i: int, n: int) -> bool:  # llama.cpp's use_more_bits
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    counters = {"attn_v": 0, "ffn_down": 0}
    out = {}
    for b, role, la in placed:
        name = f"blk.{b}.{role}.weight" if b is not None and role != "other" else la.name
        kind = next((t for pattern, t in rules if re.search(pattern, name)), None)
        if kind is None:
            kind = base
            if role in ("attn_v", "attn_qkv"):
                i = counters["attn_v"]
                counters["attn_v"] += 1
                if gguf_type == "Q2_K":
                    kind = "Q4_K" if gqa >= 4 else "Q3_K"
                elif gguf_type == "Q3_K_M":
                    kind = "Q5_K" if i < 2 else "Q4_K"
                elif gguf_type == "Q3_K_L":
                    kind = "Q5_K"
                elif gguf_type in ("Q4_K_M", "Q5_K_M") and more_bits(i, n_wv):
                    kind = "Q6_K"
                elif gguf_type == "Q4_K_S" and i < 4:
                    kind = "Q5_K"
            elif role == "ffn_down":
                i = counters["ffn_down"]
                counters["ffn_down"] += 1
                if gguf_type == "Q2_K":
                    kind = "Q3_K"
                elif gguf_type == "Q3_K_M":
                    kind = "Q5_K" if i < blocks // 16 else "Q4_K"
                elif gguf_type == "Q3_K_L":
                    kind = "Q5_K"
                elif gguf_type in ("Q4_K_M", "Q5_K_M") and more_bits(i, blocks):
                    kind = "Q6_K"
                elif gguf_type == "Q4_K_S" and i < blocks // 8:
                    kind = "Q5_K"
                elif gguf_type in ("Q4_0", "Q5_0") and imatrix and i < blocks // 8:
                    kind = {"Q4_0": "Q4_1", "Q5_0": "Q5_1"}[gguf_type]
            elif role == "attn_output":
                kind = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(gguf_type, base)
        out[la.name] = Format(kind).stored_type(la.n_in) or "F16"
    return out


def uniform_bits_per_weight(options: dict, layers: list[Layer], scale_bits: int = 16) -> Optional[float]:
    """Predicted bits per weight of a uniform configuration over ``layers``; None where a layer cannot take it
    (a group size that does not divide its inputs). A GGUF file type is priced tensor by tensor with the types
    llama.cpp's rules give it (gguf_file_types), or its registry figure where they are not followed here."""
    if not layers:
        return None
    if options["method"] == "gguf":
        types = gguf_file_types(options["gguf_type"], layers, bool(options.get("imatrix")), options.get("tensor_types"))
        if types is None:
            return GGUF_BITS_PER_WEIGHT.get(options["gguf_type"])
        return sum(la.params * ggml(types[la.name])[2] for la in layers) / sum(la.params for la in layers)
    fmt = Format(f"{options['bits']}b g{options['group_size']}", layout_of(options))
    if not all(fmt.fits(la.n_in) for la in layers):
        return None
    return sum(fmt.layer_bits(la.n_in, la.n_out, scale_bits) for la in layers) / sum(la.params for la in layers)


# --- allocation ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Allocation:
    formats: dict[str, str]  # layer name -> format name
    bits_per_weight: float  # predicted
    predicted: float  # the summed sensitivity (predicted KL)


def allocate(layers: list[Layer], sensitivity: dict[str, dict[str, float]], formats: list[Format],
             target_bits_per_weight: float, scale_bits: int = 16) -> Optional[Allocation]:
    """Each layer's format, so that the layers' stored bits are at most ``target_bits_per_weight`` × their weights
    and the summed sensitivity (``sensitivity[layer][format]``: the KL with that layer alone in that format) is
    least: greedy by sensitivity saved per bit along each layer's lower convex hull, then single upgrades that
    still fit. None when even the smallest format of every layer is over the target."""
    budget = target_bits_per_weight * (1 + TARGET_SLACK) * sum(la.params for la in layers)
    options: dict[str, list[tuple[float, float, str]]] = {}
    for la in layers:
        mine = sorted((f.layer_bits(la.n_in, la.n_out, scale_bits), sensitivity.get(la.name, {}).get(f.name, math.inf),
                       f.name) for f in formats if f.fits(la.n_in) and f.name in sensitivity.get(la.name, {}))
        if not mine:
            raise ValueError(f"layer {la.name}: no format of the space fits it or was probed on it")
        options[la.name] = _hull(mine)
    choice = {name: 0 for name in options}
    used = sum(opts[0][0] for opts in options.values())
    if used > budget * (1 + 1e-12):
        return None
    while True:
        best = None
        for name, opts in options.items():
            i = choice[name]
            if i + 1 < len(opts):
                extra, saved = opts[i + 1][0] - opts[i][0], opts[i][1] - opts[i + 1][1]
                if used + extra <= budget and (best is None or saved / extra > best[0]):
                    best = (saved / extra, name, extra)
        if best is None:
            break
        choice[best[1]] += 1
        used += best[2]
    # fill: any single change to a better format (on or off the hull) that still fits, best gain first
    picked = {name: options[name][choice[name]] for name in options}
    full = {la.name: sorted((f.layer_bits(la.n_in, la.n_out, scale_bits), sensitivity[la.name][f.name], f.name)
                            for f in formats if f.fits(la.n_in) and f.name in sensitivity.get(la.name, {}))
            for la in layers}
    improved = True
    while improved:
        improved = False
        moves = sorted(((picked[n][1] - alt[1], n, alt) for n in full for alt in full[n]
                        if alt[1] < picked[n][1] and used - picked[n][0] + alt[0] <= budget), reverse=True)
        if moves:
            _, name, alt = moves[0]
            used += alt[0] - picked[name][0]
            picked[name] = alt
            improved = True
    params = sum(la.params for la in layers)
    return Allocation({n: p[2] for n, p in picked.items()}, used / params, sum(p[1] for p in picked.values()))


def _hull(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The lower convex hull of (bits, loss) points sorted by bits: each step buys less loss per bit than the last."""
    kept: list[tuple[float, float, str]] = []
    for p in points:
        if kept and p[1] >= kept[-1][1]:
            continue  # more bits, no less loss
        while len(kept) >= 2:
            (x1, y1, _), (x2, y2, _) = kept[-2], kept[-1]
            if (y1 - y2) * (p[0] - x2) <= (y2 - p[1]) * (x2 - x1):  # the middle point lies on or above the chord
                kept.pop()
            else:
                break
        kept.append(p)
    return kept


def gguf_rules(allocation: dict[str, str], tensor_names: dict[str, str]) -> list[str]:
    """An allocation over GGUF tensors (``tensor_names``: layer -> ``blk.N.ROLE.weight``) as llama.cpp's
    ``--tensor-type`` rules: one per role and type, naming its blocks (``blk\\.(0|7)\\.ffn_down\\.weight=Q6_K``)."""
    return block_rules({tensor_names[layer]: fmt for layer, fmt in allocation.items()})


def block_rules(formats: dict[str, str], anchored: bool = False) -> list[str]:
    """Per-name formats as ``PATTERN=FORMAT`` rules, one per role and format naming its blocks: a name's first number
    is its block (``model.layers.7.mlp.down_proj`` -> ``model\\.layers\\.(0|7)\\.mlp\\.down_proj$=4b g64``,
    ``anchored``: ending at the name's end); a name without one is a rule of its own."""
    by: dict[tuple[str, str, str], list[str]] = {}
    for name, fmt in formats.items():
        m = re.match(r"^(.*?\.)([0-9]+)(\..*)$", name)
        prefix, block, rest = m.groups() if m else ("", "", name)
        by.setdefault((prefix, rest, fmt), []).append(block)
    end = "$" if anchored else ""
    rules = []
    for (prefix, rest, fmt), blocks in sorted(by.items()):
        if blocks == [""]:
            rules.append(f"^{re.escape(rest)}{end}={fmt}")
            continue
        ordered = sorted(set(blocks), key=int)
        rules.append(f"{re.escape(prefix)}({'|'.join(ordered)}){re.escape(rest)}{end}={fmt}")
    return rules


def layers_by_rules(names: list[str], rules: list[str], default: str) -> dict[str, str]:
    """Each layer's format under ``layer_rules``: the first rule whose pattern its name holds, else ``default``.
    ValueError naming a rule that matches no layer (a typo would otherwise leave those layers at the default)."""
    from qfarm.sweep.methods import layer_rule

    parsed = [(text, *layer_rule(text)) for text in rules]
    used: set[str] = set()
    out = {}
    for name in names:
        hit = next(((text, fmt) for text, pattern, fmt in parsed if re.search(pattern, name)), None)
        if hit:
            used.add(hit[0])
        out[name] = hit[1] if hit else default
    unused = [text for text, _, _ in parsed if text not in used]
    if unused:
        example = names[len(names) // 2] if names else "(none)"
        raise ValueError(f"layer rule {unused[0]!r} decides no layer (none left by the rules before it matches it); "
                         f"the model's quantizable layers are named like {example!r}")
    return out


# --- the plan validate prints and expansion follows -----------------------------------------------------------

@dataclass(frozen=True)
class SearchPlan:
    """What a search will run: the probes' formats, the uniform candidates kept (options, predicted bits per
    weight), the mixed candidates (entry index, options) and what was left out, for ``qfarm validate``."""

    probes: tuple[str, ...]
    uniform: tuple[tuple[int, dict, float], ...]  # (entry, options, predicted bits per weight)
    mixed: tuple[tuple[int, dict], ...]  # (entry, options with ``mixed``)
    uniform_total: int  # configurations in the space
    uniform_fit: int  # of which fit the target
    left_out: tuple[str, ...]  # uniform configurations that fit but the budget left out
    space_log10: float  # log10 of the number of distinct models the space holds (uniform + mixed)
    layers: int
    smallest: dict[int, float]  # mixed entry -> the smallest mix's bits per weight
    targets: dict[int, float]  # a size target: mixed entry -> the bits per weight its mixes may store
    sizes: dict[str, float]  # a size target: uniform candidate's label -> its predicted size (MB)
    memory: str = ""  # a gpu_mem_gb target: what it leaves the weights (validate's search_stages)
    tabled: tuple[int, ...] = ()  # mixed entries whose allocations take the embedding table and head too

    @property
    def jobs(self) -> int:
        return len(self.uniform) + len(self.mixed)

    def summary(self, search: SearchSpec) -> list[str]:
        column, _ = search.measured()
        way = "maximised" if search.measured()[1] == "max" else "minimised"
        at = {"bits_per_weight": f"at ≤ {search.target.value:g} bits per weight over",
              "size_mb": f"at ≤ {search.target.value:g} MB on disk, with",
              "gpu_mem_gb": f"at ≤ {search.target.value:g} GB of GPU memory ({self.memory}), with",
              "decode_tokens_per_s": f"at ≥ {search.target.value:g} decode tokens/s (measured by eval.speed; the "
                                     "candidates span the space's sizes), with"}[search.target.column]
        lines = [f"search: {search.objective} ({column}, {way}) {at} "
                 f"{self.layers} quantizable layers; the space holds ~10^{self.space_log10:.0f} models "
                 f"({self.uniform_total} uniform)",
                 f"  uniform candidates that fit: {self.uniform_fit} of {self.uniform_total}"
                 + (": " + ", ".join(f"{_label(o)} ({b:.3f}" + (f", ~{self.sizes[_label(o)]:.0f} MB)" if self.sizes else ")")
                                     for _, o, b in self.uniform) if self.uniform else "")]
        if self.left_out:
            lines.append(f"  left out by the budget ({search.budget.jobs} jobs): {', '.join(self.left_out)}")
        for i, low in sorted(self.smallest.items()):
            points = sum(1 for e, _ in self.mixed if e == i)
            room = (f"; the size leaves its layers{' and the embeddings' if i in self.tabled else ''} "
                    f"{self.targets[i]:.3f}" if i in self.targets else "")
            limit = self.targets.get(i, search.target.value if search.target.column == "bits_per_weight" else math.inf)
            none = (", over the target: none of its mixes fits)" if not meets(low, limit) else
                    ", which takes the whole target: no mix but its smallest uniform configuration fits)")
            lines.append(f"  mixed {search.space[i].method}: {points} allocation(s) (smallest mix {low:.3f} bits per "
                         f"weight{room}" + (")" if points else none))
        probes = (f"{search.probe.jobs} probe job(s) (each a share of the layers, priced in {len(self.probes)} "
                  f"formats: {', '.join(self.probes)})" + (" and one of the embedding table and head (ggml types)"
                                                            if self.tabled else "") + ", then " if self.mixed else "")
        if search.halving is not None:
            rungs = search.halving.rungs()
            again = "".join(f", the best {min(rungs[n - 1][1], self.jobs)} of them again on {rungs[n][0]} window(s) "
                            f"(rung {n + 1} jobs)" for n in range(1, len(rungs)))
            lines.append(f"  planned: {probes}{self.jobs} candidate(s) screened on {rungs[0][0]} window(s) "
                         f"(budget {search.budget.jobs}){again}, then the best {min(rungs[-1][1], self.jobs)} of them "
                         "evaluated in full (final jobs)")
        else:
            lines.append(f"  planned: {probes}{self.jobs} full evaluation(s) (budget {search.budget.jobs})")
        return lines


def _label(options: dict) -> str:
    if options["method"] == "gguf":
        return f"gguf {options['gguf_type']}"
    return f"{options['method']} {options['bits']}b g{options['group_size']}"


def plan_search(search: SearchSpec, layers: list[Layer], scale_bits: int = 16,
                outside: Optional[Callable[..., float]] = None, tables: Sequence[Layer] = ()
                ) -> tuple[Optional[SearchPlan], list[tuple[tuple, str]]]:
    """The search's plan over the model's quantizable ``layers`` (None for no model shape: the plan is made at
    submit from the model itself), or the problems that stop it: (path under ``search``, message). A ``size_mb``
    target is each candidate's bits per weight target once ``outside(options)`` (the bits its artifact stores
    besides the quantized layers: embeddings, norms, tokenizer; qfarm.sweep.validate.outside_bits) is paid. Under a
    size target a mixed GGUF entry allocates the model's ``tables`` too (its embedding table and an untied output
    head, which a GGUF stores quantized: on SmolLM2 its tied table is a fifth of the weights): its mixes' bits per
    weight are then over the layers and the tables, once ``outside(options, tables=False)`` is paid."""
    problems: list[tuple[tuple, str]] = []
    if not layers:
        return None, [((), "the model has no Linear layer to quantize, and a search gives each its format")]
    params = max(sum(la.params for la in layers), 1)
    if search.target.column == "size_mb" and outside is None:
        return None, [(("target", "size_mb"), "the model's embeddings and vocabulary cannot be read here, and a size "
                                              "target is planned from them: give bits_per_weight")]

    speed = search.target.column == "decode_tokens_per_s"  # measured, not predicted: candidates span the sizes

    def target_of(options: dict, over: Sequence[Layer] = ()) -> float:
        """The bits per weight a candidate with these options may store in the quantized layers (and ``over``: the
        tables its allocation takes too)."""
        if speed:
            return math.inf
        if search.target.column == "bits_per_weight":
            return search.target.value
        if over:
            return (search.target.value * 2**23 - outside(options, tables=False)) / (
                params + sum(t.params for t in over))
        return (search.target.value * 2**23 - outside(options)) / params

    def allocated(entry: SpaceEntry, formats: list[Format]) -> list[Layer]:
        """The tables a mixed entry allocates beside the layers: a GGUF's, under a size target, those its formats fit."""
        if entry.method != "gguf" or search.target.column != "size_mb":
            return []
        return [t for t in tables if any(f.fits(t.n_in) for f in formats)]

    target = search.target.value if search.target.column == "bits_per_weight" else None  # one for every entry
    if speed:
        target = math.inf
    targets: dict[int, float] = {}  # entry -> its bits per weight target (its mixes')
    fits_all, mixed_entries, smallest, largest = [], [], {}, {}
    tabled: dict[int, int] = {}  # mixed entry -> the tables its allocations take beside the layers
    weights: dict[int, int] = {}  # mixed entry -> the weights its allocations cover
    total = 0
    logs = []  # log10 of each mixed entry's count of allocations
    for i, entry in enumerate(search.space):
        configs = uniform_options(entry)
        total += len(configs)
        for options in configs:
            bpw = uniform_bits_per_weight(options, layers, scale_bits)
            if bpw is not None and meets(bpw, target_of(options)):
                fits_all.append((i, options, bpw))
        if not entry.mixed:
            continue
        formats = formats_of(entry)
        covered = layers + allocated(entry, formats)  # the tables it takes are those its formats fit
        counts = [sum(1 for f in formats if f.fits(la.n_in)) for la in covered]
        unfit = sorted({la.name.rsplit(".", 1)[-1] + f" ({la.n_in} inputs)" for la, n in zip(covered, counts) if not n})
        if unfit:
            problems.append((("space", i), f"no format of this entry fits layers {', '.join(unfit[:4])}: add a group "
                                           "size that divides their inputs"))
            continue
        if len(covered) > len(layers):
            tabled[i] = len(covered) - len(layers)
        logs.append(sum(math.log10(n) for n in counts))
        weights[i] = sum(la.params for la in covered)
        low = sum(min(f.layer_bits(la.n_in, la.n_out, scale_bits) for f in formats if f.fits(la.n_in))
                  for la in covered) / weights[i]
        smallest[i] = low
        largest[i] = sum(max(f.layer_bits(la.n_in, la.n_out, scale_bits) for f in formats if f.fits(la.n_in))
                         for la in covered) / weights[i]
        targets[i] = target_of(mixed_base(entry, target_of), covered[len(layers):])
        if meets(low, targets[i]):  # else: no mix of this entry fits; said in the plan (an error if nothing fits)
            mixed_entries.append(i)
    budget = search.budget.jobs
    if len(mixed_entries) > budget:
        problems.append((("budget", "jobs"), f"{len(mixed_entries)} mixed entries need at least {len(mixed_entries)} "
                                             f"jobs; the budget is {budget}"))
    if problems:
        return None, problems
    points = min(search.points, budget // len(mixed_entries)) if mixed_entries else 0
    # every mixed entry's formats, whether or not its mixes fit this target: one set of probes for any target
    probes = sorted(dict.fromkeys(f.name for i in smallest for f in formats_of(search.space[i])),
                    key=lambda f: (Format(f).family, f))
    probe = {"formats": probes, "parts": search.probe.jobs, "windows": search.probe.windows,
             "seq_len": search.probe.seq_len}
    mixed = []
    for i in mixed_entries:
        entry = search.space[i]
        names = [f.name for f in formats_of(entry)]
        base = mixed_base(entry, target_of)
        room = targets[i]
        if search.target.column == "size_mb":  # a size is a hard limit: no allocation slack, a margin for the estimate
            room = (room * weights[i] - SIZE_MARGIN * search.target.value * 2**23) / weights[i] / (1 + TARGET_SLACK)
        mine = round(min(room, largest[i]), 4)  # more room than the best format on every layer takes: that
        step = search.step
        if speed and largest[i] - smallest[i] > 1e-6:  # points evenly between the entry's smallest and largest mix
            step = round((largest[i] - smallest[i]) / (points + 1), 4)
            mine = round(largest[i] - step, 4)
        for p in range(points):
            if mine - p * step < smallest[i] - 1e-9:
                break
            mixed.append((i, {**base, "mixed": {"target_bits_per_weight": mine, "formats": names, "point": p,
                                                "step": step, "probe": probe, "tables": i in tabled}}))
    room = budget - len(mixed)
    # the uniform candidates closest under the target first (a speed target: spread over their sizes, the smallest
    # first: the likeliest to be fast enough, then the largest), one entry after another; rtn's last where the space
    # holds gptq: GPTQ stores the same formats with the rounding error compensated, so a budget too small for both
    # runs the one likelier to be the best uniform (every format of bench/search.py measured so)
    by_entry: dict[int, list] = {}
    for item in sorted(fits_all, key=lambda x: x[2] if speed else -x[2]):
        by_entry.setdefault(item[0], []).append(item)
    if speed:
        by_entry = {i: spread(items) for i, items in by_entry.items()}
    gptq = any(e.method == "gptq" for e in search.space)
    entries = sorted(by_entry, key=lambda i: (gptq and search.space[i].method == "rtn", i))
    order = [x for group in itertools.zip_longest(*(by_entry[i] for i in entries)) for x in group if x is not None]
    kept, left = order[:room], order[room:]
    if not kept and not mixed:
        lows = ", ".join(f"space[{i}] ({search.space[i].method}) {low:.3f}" for i, low in sorted(smallest.items()))
        room_for = "" if target is not None else (" (after the embeddings, norms and tokenizer: "
                                                   + ", ".join(f"space[{i}] {t:.3f} bits per weight"
                                                               + (" over its layers and the embeddings"
                                                                  if i in tabled else "")
                                                               for i, t in sorted(targets.items())) + ")")
        return None, [(("target", search.target.column), f"no configuration of the space fits "
                                                         f"{search.target.describe()}{room_for}"
                                                         + (f" (smallest mixes: {lows})" if lows else "")
                                                         + ": raise the target, or add lower-bit formats")]
    top = max(logs + [math.log10(max(total, 1))])
    log_space = top + math.log10(sum(10 ** (x - top) for x in logs) + total / 10 ** top)
    return SearchPlan(tuple(probes), tuple(sorted(kept, key=lambda x: (x[0], x[2]))), tuple(mixed), total, len(fits_all),
                      tuple(_label(o) for _, o, _ in left), log_space, len(layers), smallest,
                      targets if target is None else {},
                      {_label(o): (b * params + outside(o)) / 2**23 for _, o, b in kept} if target is None else {},
                      tabled=tuple(sorted(tabled))), []


def spread(items: list) -> list:
    """``items`` (sorted) reordered so that every prefix spreads over their range: ends first, then halves."""
    n, order, seen = len(items), [], set()
    spans = [(0, n - 1)]
    for i in (0, n - 1):
        if 0 <= i < n and i not in seen:
            seen.add(i)
            order.append(i)
    while spans:
        lo, hi = spans.pop(0)
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        if mid not in seen:
            seen.add(mid)
            order.append(mid)
        spans += [(lo, mid), (mid, hi)]
    return [items[i] for i in order]


def mixed_base(entry: SpaceEntry, target_of: Callable[[dict], float]) -> dict:
    """A mixed entry's fixed options; a GGUF's with the file type llama.cpp's own rules use for what the rules do
    not name (token_embd, norms): the entry's type nearest its target."""
    base = {**entry.fixed, "method": entry.method}
    if entry.method == "gguf":
        first = target_of({**base, "gguf_type": entry.gguf_type[0]})
        if math.isinf(first):  # no size to be near (a speed target): the entry's middle type
            base["gguf_type"] = sorted(entry.gguf_type, key=lambda t: GGUF_BITS_PER_WEIGHT.get(t, 99))[
                len(entry.gguf_type) // 2]
        else:
            base["gguf_type"] = min(entry.gguf_type, key=lambda t: abs(GGUF_BITS_PER_WEIGHT.get(t, 99) - first))
    return base
