"""The registry of job kinds and their methods: names, options, and where their worker code lives.

Nothing here imports an ML library: the CLI validates a sweep against this registry without loading torch.
A ``Kind`` names its options (one model, or one per ``Method``), its worker entry point (``"module:function"``
under ``workers/``), whether it loads the model, and which kinds a stage of it may come ``from``. Validation,
expansion, the scheduler's DAG rules and the job payload (hence the worker's dispatch) all read ``KINDS``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from qfarm.errors import allowed, did_you_mean

# marks an option that changes a job's quality, not its time (``Field(..., json_schema_extra=QUALITY_ONLY)``):
# jobs differing only in such options share their timing history (qfarm.farm.eta.work_shape)
QUALITY_ONLY = {"quality_only": True}


def stored(info: ValidationInfo) -> bool:
    """Whether options are being read back from a job record (``qfarm.sweep.job``), every default written out: checks
    of what a user may write together (an option given with a backend that lacks it) do not apply to defaults."""
    return bool(info.context and info.context.get("stored"))


class Options(BaseModel):
    """Base of every job's options after matrix expansion: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def quality_only(cls) -> frozenset[str]:
        """The options marked ``QUALITY_ONLY``."""
        return _quality_only(cls)


@functools.lru_cache(maxsize=None)
def _quality_only(model: type[Options]) -> frozenset[str]:
    return frozenset(name for name, f in model.model_fields.items() if (f.json_schema_extra or {}).get("quality_only"))


class NoneOptions(Options):
    """The reference: the base model as loaded, unquantized. Every KL and delta is measured against it."""

    method: Literal["none"]
    bits: Optional[Literal[16, 32]] = Field(None, json_schema_extra=QUALITY_ONLY)


class BnbInt8Options(Options):
    """bitsandbytes LLM.int8(): 8-bit weights, outlier features (above ``threshold``) kept in 16-bit."""

    method: Literal["bnb-int8"]
    bits: Literal[8] = Field(8, json_schema_extra=QUALITY_ONLY)
    threshold: float = Field(6.0, ge=0.0, le=1000.0, json_schema_extra=QUALITY_ONLY)


class Bnb4bitOptions(Options):
    """bitsandbytes 4-bit (NF4 or FP4) weights, optional double quantization of the scales."""

    method: Literal["bnb-nf4", "bnb-fp4"]
    bits: Literal[4] = Field(4, json_schema_extra=QUALITY_ONLY)
    double_quant: bool = Field(False, json_schema_extra=QUALITY_ONLY)
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", json_schema_extra=QUALITY_ONLY)


class Calibration(Options):
    """Text that calibration-based methods (GPTQ, AWQ) run through the model: ``samples`` windows of ``seq_len``
    tokens, taken from the end of the text (the evaluation windows come from its start)."""

    dataset: str = "bundled:python-docs"
    text_field: str = "text"
    samples: int = Field(64, ge=1, le=100_000)
    seq_len: int = Field(512, ge=16, le=32_768)


GroupSize = Annotated[int, AfterValidator(lambda g: _group_size(g))]


def _group_size(value: int) -> int:
    if value != -1 and not (value >= 8 and value & (value - 1) == 0):
        raise ValueError("must be -1 (one scale per output channel) or a power of two >= 8, e.g. 32, 64, 128")
    return value


class GptqCalibration(Calibration):
    """GPTQ's calibration, and whether it is shared. ``share: true``: one ``calibrate`` job per model and data
    captures every layer's Hessian from the float model's activations, and each GPTQ job of the sweep on that model
    and data only solves from it (and resumes from its last solved layer when retried). ``false``: each job runs
    llm-compressor's sequential pipeline, where a layer's inputs come from the already-quantized layers before it."""

    share: bool = False


# llm-compressor's preset schemes (compressed-tensors' PRESET_SCHEMES) a job may name as ``scheme``: its weights'
# bits, symmetry, whether they keep ``group_size`` (else one scale per output channel: the preset's own), and what
# its activations become at inference (None: weight-only, A16). The grouped presets take the job's group_size
# (default 64), not the presets' 128, which does not divide many models' layers (SmolLM2's 576).
SCHEMES: dict[str, dict] = {
    "W4A16": {"bits": 4, "symmetric": True, "grouped": True, "activations": None},
    "W4A16_ASYM": {"bits": 4, "symmetric": False, "grouped": True, "activations": None},
    "W8A16": {"bits": 8, "symmetric": True, "grouped": True, "activations": None},
    "W8A8": {"bits": 8, "symmetric": True, "grouped": False, "activations": "int8, per token, dynamic"},
    "FP8_DYNAMIC": {"bits": 8, "symmetric": True, "grouped": False, "activations": "fp8, per token, dynamic",
                    "float": True},
}


# options added after sweeps were submitted without them: left out of a job's identity while unset (None), so
# those sweeps' jobs keep their ids (qfarm.sweep.expand)
UNSET_NOT_IDENTITY = frozenset({"scheme", "smoothing_strength", "backend", "tensor_types", "mixed", "layer_rules",
                                "imatrix"})

# The libraries that quantize ``gptq`` and ``awq`` jobs. llm-compressor (the default: installed with qfarm[ml])
# writes compressed-tensors, which runs dense on a CPU; GPTQModel (qfarm[gptqmodel]) writes the AutoGPTQ/AutoAWQ
# layout and runs it on its int4 kernels. ``backend`` unset is llm-compressor.
Backend = Optional[Literal["llm-compressor", "gptqmodel"]]


class BackendOptions(Options):
    """Options of a method that more than one library implements (``backend``): what the chosen one cannot do is
    refused at its YAML line, never silently dropped."""

    @field_validator("backend", check_fields=False)
    @classmethod
    def _backend_scheme(cls, value, info: ValidationInfo):
        scheme = SCHEMES.get(info.data.get("scheme") or "")
        if value == "gptqmodel" and scheme and (scheme["activations"] or scheme.get("float")):
            raise ValueError(f"backend gptqmodel quantizes weights only: scheme {info.data['scheme']} is "
                             "llm-compressor's (drop backend, or use bits/group_size)")
        return value

    @field_validator("calibration", check_fields=False)
    @classmethod
    def _backend_share(cls, value, info: ValidationInfo):
        if info.data.get("backend") == "gptqmodel" and getattr(value, "share", False):
            raise ValueError("share is llm-compressor's shared Hessian capture: with backend gptqmodel set "
                             "share: false")
        return value

    @field_validator("duo_scaling", "n_grid", check_fields=False)
    @classmethod
    def _llmcompressor_only(cls, value, info: ValidationInfo):
        if info.data.get("backend") == "gptqmodel" and not stored(info):
            raise ValueError(f"{info.field_name} is llm-compressor's AWQ option; GPTQModel's AWQ has no such "
                             "setting (drop it, or drop backend: gptqmodel)")
        return value


MIXED_FORMAT = re.compile(r"^([2348])b g(-1|[0-9]{1,5})$|^(Q8_0|Q6_K|Q5_K|Q5_1|Q5_0|Q4_K|Q4_1|Q4_0|Q3_K|Q2_K)$")


def _mixed_formats(value: list[str]) -> list[str]:
    for text in value:
        if not MIXED_FORMAT.match(str(text)):
            raise ValueError(f"{text!r} is not a layer format: '4b g64' (bits, group size) for rtn/gptq, a ggml type "
                             "(Q4_K, Q6_K, Q8_0, ...) for gguf")
    return value


def per_layer(options) -> bool:
    """Whether a job's layers each take their own format (a search's ``mixed`` candidate, or ``layer_rules``)."""
    return bool(getattr(options, "mixed", None) or getattr(options, "layer_rules", None))


MAX_LAYER_RULES = 256  # a search's mix over up to 32 formats × a block's roles, as its pick's fragment writes it


def no_repeated_group(pattern: str) -> None:
    """Refuses a regex with a repeated group (``(a+)+``, ``(.*)*``): the nested quantifiers whose backtracking takes
    exponential time on a short name. Alternatives (``(0|7|12)``) and quantified characters are fine."""
    if re.search(r"\)[*+?{]", pattern):
        raise ValueError("a group in the pattern may not be repeated (a quantifier after ')'): list the "
                         "alternatives instead, e.g. 'model\\.layers\\.(0|1|2)\\.mlp'")


def layer_rule(text: str) -> tuple[str, str]:
    """``PATTERN=FORMAT`` (``layer_rules``): a regex searched in each quantizable layer's module name
    (``model.layers.3.mlp.down_proj``) and the format its weights take (``4b g64``: bits, group size). Raises
    ValueError saying what is wrong."""
    pattern, sep, fmt = str(text).rpartition("=")
    if not sep or not pattern:
        raise ValueError(f"{text!r} is not PATTERN=FORMAT (e.g. 'mlp\\.down_proj$=8b g64', "
                         "'layers\\.(0|1)\\.=4b g32')")
    match = MIXED_FORMAT.match(fmt)
    if not match or not match.group(1):
        raise ValueError(f"{text!r}: {fmt!r} is not a layer format: bits and group size, e.g. '4b g64', '8b g-1' "
                         "(bits 2, 3, 4 or 8; group -1 is one scale per output channel)")
    if len(pattern) > 1_000 or not pattern.isprintable():
        raise ValueError(f"{text[:60]!r}...: the pattern is over 1,000 characters or holds control characters")
    checked_regex(text, pattern)
    return pattern, fmt


def checked_regex(text: str, pattern: str) -> None:
    """A rule's pattern refused where it is not a regular expression or repeats a group (no_repeated_group)."""
    no_repeated_group(pattern)
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{text!r}: the pattern is not a regular expression ({e})") from None


def each(check: Callable[[str], object]) -> Callable[[list[str]], list[str]]:
    """A list option's validator: ``check`` on every item (it raises ValueError saying what is wrong)."""
    def validate(value: list[str]) -> list[str]:
        for text in value:
            check(text)
        return value
    return validate


class _Tables(Options):
    """``tables`` (added after searches were submitted without it) is left out of the options' dump while False, so
    that those searches' probes and candidates keep their ids (qfarm.sweep.expand hashes the dump)."""

    tables: bool = False

    @model_serializer(mode="wrap")
    def _tables_off(self, handler):
        out = handler(self)
        if not self.tables:
            out.pop("tables", None)
        return out


class MixedOptions(_Tables):
    """A search candidate (``search:``, qfarm.sweep.search): each quantizable layer gets one of ``formats``, chosen in
    its job from the sweep's sensitivity probes (the jobs it needs) so that the stored bits of the quantized layers'
    weights come to at most ``target_bits_per_weight`` per weight while the predicted KL is least. ``point`` > 0:
    the allocation ``point`` × ``step`` bits per weight under the target (several points along the frontier)."""

    target_bits_per_weight: float = Field(gt=1.0, le=16.0)
    formats: Annotated[list[str], AfterValidator(_mixed_formats), Field(min_length=1, max_length=32)]
    point: int = Field(0, ge=0, le=16)
    step: float = Field(0.25, gt=0.0, le=4.0)
    probe: "MixedProbe"  # the probes it reads (part of its identity: other probes, another allocation)
    # ``tables``: a GGUF under a size target, whose embedding table and untied output head are allocated too, from a
    # probe of them (ProbeOptions.tables) beside the layers' (``target_bits_per_weight`` is then over both)


class MixedProbe(Options):
    """The sensitivity probes a mixed candidate reads: ``parts`` probe jobs over the layers, pricing ``formats`` (every
    mixed entry's of the search) over ``windows`` windows of ``seq_len`` tokens (ProbeOptions)."""

    formats: Annotated[list[str], AfterValidator(_mixed_formats), Field(min_length=1, max_length=32)]
    parts: int = Field(4, ge=1, le=256)
    windows: int = Field(2, ge=1, le=64)
    seq_len: int = Field(128, ge=16, le=4_096)


MixedOptions.model_rebuild()


class SchemeOptions(BackendOptions):
    """Options with an optional llm-compressor preset ``scheme`` (``SCHEMES``): the scheme fills in ``bits``,
    ``symmetric`` and, for a per-channel scheme, ``group_size: -1``; one of them given as well must agree with it."""

    @model_validator(mode="before")
    @classmethod
    def _from_scheme(cls, data):
        scheme = SCHEMES.get(data.get("scheme")) if isinstance(data, dict) else None
        if scheme is None:
            return data
        implied = {"bits": scheme["bits"], "symmetric": scheme["symmetric"]}
        if not scheme["grouped"]:
            implied["group_size"] = -1
        return {**implied, **data}

    @field_validator("bits", "symmetric", "group_size", check_fields=False)
    @classmethod
    def _agrees_with_scheme(cls, value, info: ValidationInfo):
        name = info.data.get("scheme")
        scheme = SCHEMES.get(name) if isinstance(name, str) else None
        if scheme is None:
            return value
        if info.field_name == "group_size":
            if not scheme["grouped"] and value != -1:
                raise ValueError(f"scheme {name} has one scale per output channel: leave group_size out (or -1)")
        elif value != scheme[info.field_name]:
            raise ValueError(f"scheme {name} sets {info.field_name} to {scheme[info.field_name]}: leave "
                             f"{info.field_name} out, or drop the scheme")
        return value

    @field_validator("mixed", "layer_rules", check_fields=False)
    @classmethod
    def _mixed_on_llm_compressor(cls, value, info: ValidationInfo):
        name = info.field_name
        if value is not None and info.data.get("scheme"):
            raise ValueError(f"{name} gives each layer its own bits and group size: leave scheme out")
        if value is not None and info.data.get("symmetric") is False:
            raise ValueError(f"{name}: per-layer formats are symmetric; drop symmetric: false")
        if name == "layer_rules" and value is not None and info.data.get("mixed") is not None:
            raise ValueError("layer_rules and mixed both decide each layer's format: give one")
        if name == "mixed" and value is not None and value.tables:
            raise ValueError("mixed.tables: the embeddings and head keep the float dtype in compressed-tensors and "
                             "GPTQ artifacts; only a GGUF mix allocates them")
        return value


Scheme = Optional[Literal["W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8_DYNAMIC"]]


class RtnOptions(SchemeOptions):
    """Round-to-nearest integer weights (no calibration): the baseline every GPTQ/AWQ paper reports. ``scheme``:
    one of llm-compressor's presets instead of bits/symmetric (W4A16, W4A16_ASYM, W8A16; W8A8 int8 weights and
    dynamic per-token int8 activations; FP8_DYNAMIC fp8 weights per channel and dynamic per-token fp8
    activations)."""

    scheme: Scheme = None
    method: Literal["rtn"]
    bits: Literal[2, 3, 4, 8] = Field(4, json_schema_extra=QUALITY_ONLY)
    group_size: GroupSize = Field(64, json_schema_extra=QUALITY_ONLY)
    symmetric: bool = Field(True, json_schema_extra=QUALITY_ONLY)
    mixed: Optional[MixedOptions] = None  # a search candidate: per-layer formats (bits and group size above unused)
    # per-layer formats: the first rule whose pattern a layer's name holds decides; the others take bits/group_size
    layer_rules: Optional[Annotated[list[str], AfterValidator(each(layer_rule)), Field(max_length=MAX_LAYER_RULES)]] = None


class GptqOptions(SchemeOptions):
    """GPTQ (llm-compressor's GPTQModifier): integer weights chosen layer by layer to minimise the output error
    on calibration data. ``act_order`` (default true) processes columns by activation size: compressed-tensors'
    ``weight`` ordering on llm-compressor (its GPTQModifier's own default; better accuracy, no extra inference
    cost), ``desc_act`` on GPTQModel; false solves the columns in their stored order on both. ``scheme``: one of
    llm-compressor's integer presets
    instead of bits/symmetric; W8A8 (int8 weights per channel, dynamic per-token int8 activations) runs
    SmoothQuant (``smoothing_strength``) before GPTQ, as llm-compressor's W8A8 recipe does."""

    scheme: Optional[Literal["W4A16", "W4A16_ASYM", "W8A16", "W8A8"]] = None
    method: Literal["gptq"]
    backend: Backend = None
    bits: Literal[2, 3, 4, 8] = Field(4, json_schema_extra=QUALITY_ONLY)
    group_size: GroupSize = Field(64, json_schema_extra=QUALITY_ONLY)
    act_order: bool = Field(True, json_schema_extra=QUALITY_ONLY)
    symmetric: bool = Field(True, json_schema_extra=QUALITY_ONLY)
    dampening_frac: float = Field(0.01, gt=0.0, le=1.0, json_schema_extra=QUALITY_ONLY)
    smoothing_strength: Optional[float] = Field(None, gt=0.0, lt=1.0)  # W8A8's SmoothQuant; None: 0.8
    calibration: GptqCalibration = GptqCalibration()
    mixed: Optional[MixedOptions] = None  # a search candidate: per-layer formats (bits and group size above unused)
    # per-layer formats: the first rule whose pattern a layer's name holds decides; the others take bits/group_size
    layer_rules: Optional[Annotated[list[str], AfterValidator(each(layer_rule)), Field(max_length=MAX_LAYER_RULES)]] = None

    @field_validator("smoothing_strength")
    @classmethod
    def _smoothing_with_w8a8(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("scheme") != "W8A8":
            raise ValueError("smoothing_strength is SmoothQuant's, which runs for scheme: W8A8 only")
        return value

    @field_validator("calibration")
    @classmethod
    def _share_weight_only(cls, value, info: ValidationInfo):
        scheme = SCHEMES.get(info.data.get("scheme") or "")
        if value.share and scheme and scheme["activations"]:
            raise ValueError(f"share: a shared capture holds float activations' Hessians, but scheme "
                             f"{info.data['scheme']} smooths and quantizes activations first: set share: false")
        return value


class AwqOptions(BackendOptions):
    """AWQ (llm-compressor's AWQModifier + weight quantization): per-channel scales searched on calibration
    activations protect salient weights before rounding. Asymmetric (with zero points) by default."""

    method: Literal["awq"]
    backend: Backend = None
    bits: Literal[3, 4, 8] = Field(4, json_schema_extra=QUALITY_ONLY)
    group_size: GroupSize = Field(64, json_schema_extra=QUALITY_ONLY)
    symmetric: bool = Field(False, json_schema_extra=QUALITY_ONLY)
    duo_scaling: bool = True
    n_grid: int = Field(20, ge=1, le=1_000, json_schema_extra=QUALITY_ONLY)
    calibration: Calibration = Calibration()


# llama.cpp file types a `gguf` job may produce, with the nominal bits of their weights (a K-quant mixes types;
# the job records the bits per weight of the file it wrote). Checked against the installed llama.cpp in a test.
# llama.cpp's file types a spec may name: (the ``bits`` column's nominal bits, the bits a weight takes in the
# file on average, scales included, as llama.cpp's quantize reports them: the memory plan's file size)
GGUF_FORMATS: dict[str, tuple[int, float]] = {
    "F32": (32, 32), "F16": (16, 16), "BF16": (16, 16), "Q8_0": (8, 8.5), "Q6_K": (6, 6.56), "Q5_K_M": (5, 5.69),
    "Q5_K_S": (5, 5.54), "Q5_1": (5, 6.0), "Q5_0": (5, 5.5), "Q4_K_M": (4, 4.85), "Q4_K_S": (4, 4.58),
    "Q4_1": (4, 5.0), "Q4_0": (4, 4.5), "Q3_K_L": (3, 4.27), "Q3_K_M": (3, 3.91), "Q3_K_S": (3, 3.5),
    "Q2_K": (2, 2.96),
}
GGUF_TYPES: dict[str, int] = {name: bits for name, (bits, _) in GGUF_FORMATS.items()}
GGUF_BITS_PER_WEIGHT: dict[str, float] = {name: bpw for name, (_, bpw) in GGUF_FORMATS.items()}


def _gguf_type(value: str) -> str:
    if value not in GGUF_TYPES:
        upper = value.upper() if isinstance(value, str) else value
        hint = f" Did you mean {upper!r}?" if upper in GGUF_TYPES else did_you_mean(str(value), GGUF_TYPES)
        raise ValueError(f"{value!r} is not a llama.cpp file type.{hint} Allowed: {', '.join(GGUF_TYPES)}")
    return value


# ggml's tensor types a ``tensor_types`` rule may name: (ggml_type id, the rows' block length, bits a weight takes
# with its block's scales). A row whose length the block does not divide is stored in another type by llama.cpp.
GGML_TYPES: dict[str, tuple[int, int, float]] = {
    "F32": (0, 1, 32.0), "F16": (1, 1, 16.0), "BF16": (30, 1, 16.0), "Q8_0": (8, 32, 8.5), "Q6_K": (14, 256, 6.5625),
    "Q5_K": (13, 256, 5.5), "Q5_1": (7, 32, 6.0), "Q5_0": (6, 32, 5.5), "Q4_K": (12, 256, 4.5), "Q4_1": (3, 32, 5.0),
    "Q4_0": (2, 32, 4.5), "Q3_K": (11, 256, 3.4375), "Q2_K": (10, 256, 2.625),
}
MAX_TENSOR_RULES = 64
_PATTERN = re.compile(r"^[A-Za-z0-9_.\\|()\[\]{},*+?^$-]{1,200}$")  # a regex of the kinds C++'s std::regex reads alike


def tensor_rule(text: str) -> tuple[str, str]:
    """``PATTERN=TYPE`` (llama.cpp's ``--tensor-type``): a regex searched in each tensor's name
    (``blk.3.ffn_down.weight``), and the ggml type its tensors are stored in. Raises ValueError saying what is wrong."""
    pattern, sep, name = str(text).rpartition("=")
    if not sep or not pattern:
        raise ValueError(f"{text!r} is not PATTERN=TYPE (e.g. 'blk\\.0\\.=Q8_0', 'ffn_down=Q6_K')")
    if name not in GGML_TYPES:
        hint = f" Did you mean {name.upper()!r}?" if name.upper() in GGML_TYPES else did_you_mean(name, GGML_TYPES)
        raise ValueError(f"{text!r}: {name!r} is not a ggml tensor type.{hint} Allowed: {', '.join(GGML_TYPES)}")
    if not _PATTERN.match(pattern):
        raise ValueError(f"{text!r}: the pattern may hold letters, digits and . _ \\ | ( ) [ ] {{ }} , * + ? ^ $ - "
                         "(at most 200)")
    checked_regex(text, pattern)
    return pattern, name


def _imatrix_path(value: str) -> str:
    if not value or len(value) > 500 or not value.isprintable() or ".." in Path(value).parts:
        raise ValueError(f"{value[:80]!r}: an imatrix is a file under the output root, named by its path from there "
                         "(e.g. my-sweep/j0123abcd/imatrix.dat), without '..'")
    if not value.endswith(".dat"):
        raise ValueError(f"{value!r}: qfarm reads llama.cpp's imatrix.dat layout (llama-imatrix --output-format dat)")
    return value


class GgufOptions(Options):
    """llama.cpp's quantizer: the model as a GGUF file of ``gguf_type``, evaluated inside llama.cpp. ``tensor_types``:
    llama.cpp's per-tensor overrides (``--tensor-type``), in order, the first rule whose pattern a tensor's name holds
    deciding its type; the file is checked to hold them (workers.quantize.gguf)."""

    method: Literal["gguf"]
    gguf_type: Annotated[str, AfterValidator(_gguf_type)] = "Q4_K_M"
    tensor_types: Optional[Annotated[list[str], AfterValidator(each(tensor_rule)), Field(max_length=MAX_TENSOR_RULES)]] = None
    mixed: Optional[MixedOptions] = None  # a search candidate: per-tensor ggml types, written as tensor_types
    # an importance matrix in llama.cpp's imatrix.dat layout, under the output root (a mixed candidate writes one)
    imatrix: Optional[Annotated[str, AfterValidator(_imatrix_path)]] = None

    @model_validator(mode="after")
    def _quantized(self):
        if self.tensor_types and GGUF_TYPES[self.gguf_type] >= 16:
            raise ValueError(f"tensor_types applies to a quantized gguf_type (llama.cpp keeps every tensor of a "
                             f"{self.gguf_type} file as it is); give gguf_type Q8_0, Q4_K_M, ... with it")
        if self.imatrix and GGUF_TYPES[self.gguf_type] >= 16:
            raise ValueError(f"an imatrix weighs a quantizer's errors; {self.gguf_type} is not quantized")
        if self.imatrix and self.mixed:
            raise ValueError("a mixed candidate takes its imatrix from the search's probes: drop imatrix")
        return self


# --- train and merge jobs ---------------------------------------------------------------------------

ALL_LINEAR = "all-linear"  # peft's name for every Linear/Conv1D layer but the output head, whatever the family


MAX_FORMAT_WIDTH = 1_000  # widths and precisions in a format string (a huge one builds a huge string per row)


def _format_string(value: Optional[str]) -> Optional[str]:
    """A format string over a JSON row's fields: ``{name}`` or ``{name[0][key]}``, no attribute access; a field's
    format spec is literal (``{text:>20}``: no fields inside it, whose values would come from the data) with
    widths and precisions at most MAX_FORMAT_WIDTH."""
    import re
    import string

    if value is None:
        return value
    try:
        parsed = list(string.Formatter().parse(value))
    except ValueError as e:
        raise ValueError(f"not a valid format string: {e}") from None
    fields = [(f, spec) for _, f, spec, _ in parsed if f is not None]
    if not fields:
        raise ValueError("a format string names at least one field of each row, e.g. '{instruction}\\n{output}'")
    for f, spec in fields:
        if not f or "." in f or f[0].isdigit():
            raise ValueError(f"{{{f}}}: name a field of the row, e.g. {{text}} or {{instances[0][output]}}")
        if spec and ("{" in spec or "}" in spec):
            raise ValueError(f"{{{f}:{spec}}}: a format spec may not name fields; write it out, e.g. {{{f}:>20}}")
        if spec and any(int(n) > MAX_FORMAT_WIDTH for n in re.findall(r"\d+", spec)):
            raise ValueError(f"{{{f}:{spec}}}: widths and precisions are at most {MAX_FORMAT_WIDTH}")
    return value


class TrainData(Options):
    """The examples a train job learns from: one per JSONL row (``text_field``, or ``format`` filled from the
    row's fields), per blank-line-separated paragraph of a text file, or per row of a hub dataset. The last
    ``eval_samples`` examples are held out: never trained on, and the ``task_loss`` of the job and of every job
    that comes from it is measured on them."""

    path: str
    text_field: str = "text"
    format: Annotated[Optional[str], AfterValidator(_format_string)] = None
    eval_samples: int = Field(32, ge=1, le=100_000)
    max_samples: Optional[int] = Field(None, ge=1, le=10_000_000)  # training examples used, from the start


class LoraOptions(Options):
    """LoRA on the float base model (peft, transformers' Trainer); with ``from:`` a gptq/awq stage of backend
    gptqmodel, on that quantized model (peft's GPTQ support: the int4 layers stay frozen, the adapters train in
    float). ``max_steps`` bounds the run; without it the job trains ``epochs`` passes over the training examples."""

    method: Literal["lora"]
    r: int = Field(8, ge=1, le=4_096)
    lora_alpha: float = Field(16, gt=0, le=100_000, json_schema_extra=QUALITY_ONLY)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, json_schema_extra=QUALITY_ONLY)
    target_modules: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]] = Field([ALL_LINEAR], min_length=1)
    dataset: TrainData
    max_steps: Optional[int] = Field(None, ge=1, le=10_000_000)
    epochs: float = Field(1.0, gt=0, le=1_000)
    learning_rate: float = Field(2e-4, gt=0, le=1.0, json_schema_extra=QUALITY_ONLY)
    batch_size: int = Field(4, ge=1, le=4_096)
    grad_accum: int = Field(1, ge=1, le=4_096)
    seq_len: int = Field(256, ge=8, le=32_768)  # examples are truncated to this many tokens
    warmup_steps: int = Field(0, ge=0, le=1_000_000)
    gradient_checkpointing: bool = False
    seed: int = Field(0, ge=0, le=2**31 - 1, json_schema_extra=QUALITY_ONLY)
    # a checkpoint (adapter, optimizer, scheduler, RNG) every N steps under the job's folder: a retried attempt
    # of the job resumes from the last complete one (resumed_from) instead of step 0. 0: none
    save_steps: int = Field(50, ge=0, le=10_000_000)


class QloraOptions(LoraOptions):
    """QLoRA: LoRA on a bitsandbytes 4-bit base (NF4 with double quantization, as in the QLoRA paper)."""

    method: Literal["qlora"]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, json_schema_extra=QUALITY_ONLY)
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", json_schema_extra=QUALITY_ONLY)


class MergeOptions(Options):
    """Merge a train job's adapter into a base: ``base`` (the sweep's float model) or ``dequantized`` (the 4-bit
    base a QLoRA adapter, or a LoRA trained from a GPTQ/AWQ stage, was trained on, dequantized: what the adapter
    actually learned against). The merged model is float: never merged into int4 weights.
    The merged model's logits are compared with the adapter model's on ``check_samples`` held-out examples."""

    onto: Literal["base", "dequantized"] = Field("base", json_schema_extra=QUALITY_ONLY)
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", json_schema_extra=QUALITY_ONLY)
    check_samples: int = Field(4, ge=1, le=1_000)


class CaptureOptions(Options):
    """What a ``calibrate`` job captures: for GPTQ, each Linear's input Hessian (2/n·XᵀX over the calibration
    tokens) with every layer fed the float model's activations. Made by qfarm.sweep.expand for GPTQ jobs whose
    ``calibration.share`` is true, never written in a spec."""

    capture: Literal["hessian"] = "hessian"
    calibration: Calibration


class ProbeOptions(_Tables):
    """A search's sensitivity probe (made by qfarm.sweep.expand for ``search:``, never written in a spec): part
    ``part`` of ``parts`` of the model's quantizable layers. For each, the KL of the model's next-token distribution
    from the float model's with only that layer in its coarsest format of ``formats`` (one forward per layer), and
    every format's importance-weighted error of the layer's weights (the input activations' squares: llama.cpp's
    importance matrix), which prices the other formats; over the first ``windows`` windows of ``seq_len`` tokens of
    the sweep's evaluation text (workers.search.probe)."""

    formats: Annotated[list[str], AfterValidator(_mixed_formats), Field(min_length=1, max_length=32)]
    part: int = Field(0, ge=0, le=255)
    parts: int = Field(1, ge=1, le=256)
    windows: int = Field(2, ge=1, le=64)
    seq_len: int = Field(128, ge=16, le=4_096)
    # ``tables``: a probe of the embedding table and an untied output head instead of the layers, in ``formats``
    # (ggml types): what a mixed GGUF candidate under a size target allocates beside them (its ``mixed.tables``)


class FinalOptions(Options):
    """A search's final evaluation under successive halving (made by qfarm.sweep.expand, never written in a spec):
    once every screened candidate has finished, the one ranked ``rank`` (1: the best) among those that met the target
    on the screen's ``windows`` windows, its artifact evaluated in full (workers.search.final)."""

    rank: int = Field(1, ge=1, le=64)
    of: int = Field(1, ge=1, le=1_000)  # candidates screened
    windows: int = Field(2, ge=1, le=64)


class EvaluateOptions(Options):
    """An existing checkpoint, evaluated against the sweep's reference like any row (a published quant beside your
    own): a local Hugging Face folder (float, compressed-tensors, bitsandbytes; GPTQ/AWQ-format ones need
    GPTQModel), a ``.gguf`` file (run in llama.cpp) or a hub id, resolved as ``model:`` is. Its vocabulary must be
    the reference's: KL and top-1 compare the same tokens."""

    checkpoint: str = Field(min_length=1)


class SleepOptions(Options):
    """A job that sleeps: for tests and benchmarks of the farm itself. Needs no model."""

    seconds: float = Field(1.0, ge=0.0, le=86_400.0)
    index: int = Field(0, json_schema_extra=QUALITY_ONLY)
    fail: bool = False
    busy: bool = False  # never reports progress, so a cancel cannot stop it cooperatively (tests of the kill)


@dataclass(frozen=True)
class Method:
    """A method of a kind (quantize: gptq, bnb-nf4, ...; train: lora, qlora): its options and its implementation."""

    name: str
    options: type[Options]
    summary: str
    worker: Optional[str] = None  # "module:Class" under workers/ (a quantizer), imported lazily inside a worker
    # the ``bits`` column, from the job's options (typed): decided once, by expansion (``Job.bits``)
    nominal_bits: Callable[[Options], Optional[int]] = lambda options: (
        None if per_layer(options) else getattr(options, "bits", None))  # a mix (per-layer formats) has no one
    vllm: bool = False  # its checkpoint is one vLLM serves (``eval.engine: vllm``): float or compressed-tensors
    # the kinds of weight layer it quantizes (qfarm.sweep.modelinfo: Linear, Conv1D, experts); a model with others
    # is refused for it at validate time, since they would silently stay in float. None: every kind
    quantizes: Optional[frozenset[str]] = None
    # relative time of a job of this method per token it evaluates, calibrates or trains on: the order jobs are
    # dispatched in before any of their shape has run (qfarm.farm.eta). Measured on the bundled model, 2 CPU cores
    cost: float = 2.0
    # other libraries that implement it, by the ``backend`` option's value: "module:Class" as ``worker``
    backends: Optional[dict[str, str]] = None
    # whether a job of it saves an artifact (the reference does not), and which of its options, by path
    # (``calibration.samples``), change what it evaluates but not its artifact: every other option must make
    # another artifact (weights or its own config), which tests/integration/test_every_option.py tries
    writes_artifact: bool = True
    not_in_artifact: frozenset[str] = frozenset()
    # the memory plan's terms for a job of it: a key of qfarm.sweep.plan.PLAN_TERMS (tests/unit/test_plan.py holds every
    # entry to one), so a new method gets its own plan or says which existing one it shares
    plan: str = "none"
    # it runs calibration data through the model (its time counts those tokens: qfarm.farm.eta), and with ``captures``
    # a ``calibration.share: true`` job of it solves from one shared ``calibrate`` job's capture (qfarm.sweep.expand)
    calibrates: bool = False
    captures: bool = False
    # the ``backend`` values whose checkpoints of it a LoRA can train on (peft through GPTQModel's layers), and the
    # ``quant_method`` a checkpoint of it declares in its config.json (a folder refused as a sweep's float model)
    trains_on: frozenset[str] = frozenset()
    library: str = "transformers"  # the model card's library_name for what its jobs make
    # its job is the reference itself (``none``: the float model as loaded, its figures written for the others): the
    # job every comparing job of the sweep needs (``Kind.compares``), made by expansion when a spec has none
    reference: bool = False

    def impl(self, options: Options) -> Optional[str]:
        """The implementation a job with these (typed) options runs: its ``backend``'s, else ``worker``."""
        return (self.backends or {}).get(getattr(options, "backend", None), self.worker)


GPTQMODEL = {"gptqmodel": "workers.quantize.gptqmodel:GPTQModelBackend"}
BNB_LAYERS = frozenset({"Linear", "Conv1D"})  # measured: transformers' bnb replaces GPT-2's Conv1D, not fused experts
LLMC_LAYERS = frozenset({"Linear", "experts"})  # measured: llm-compressor unfuses MoE experts, skips Conv1D


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("none", NoneOptions, "the unquantized reference", "workers.quantize.reference:Reference", vllm=True, cost=1.0,
               writes_artifact=False, plan="reference", reference=True),
        Method("bnb-int8", BnbInt8Options, "bitsandbytes LLM.int8()", "workers.quantize.bnb:BitsAndBytes", quantizes=BNB_LAYERS,
               cost=1.6, plan="bnb-int8"),
        Method("bnb-nf4", Bnb4bitOptions, "bitsandbytes 4-bit NormalFloat", "workers.quantize.bnb:BitsAndBytes",
               quantizes=BNB_LAYERS, cost=1.4, plan="bnb-4bit"),
        Method("bnb-fp4", Bnb4bitOptions, "bitsandbytes 4-bit float", "workers.quantize.bnb:BitsAndBytes", quantizes=BNB_LAYERS,
               cost=1.4, plan="bnb-4bit"),
        Method("rtn", RtnOptions, "round-to-nearest integer weights (llm-compressor)", "workers.quantize.llmc:LLMCompressor",
               vllm=True, quantizes=LLMC_LAYERS, plan="llm-compressor"),
        Method("gptq", GptqOptions, "GPTQ (llm-compressor; backend: gptqmodel for GPTQModel), calibrated",
               "workers.quantize.llmc:LLMCompressor", vllm=True, quantizes=LLMC_LAYERS, cost=8.0, backends=GPTQMODEL,
               plan="llm-compressor+hessians", calibrates=True, captures=True, trains_on=frozenset({"gptqmodel"})),
        Method("awq", AwqOptions, "AWQ (llm-compressor; backend: gptqmodel for GPTQModel), calibrated",
               "workers.quantize.llmc:LLMCompressor", vllm=True, quantizes=LLMC_LAYERS, cost=12.0, backends=GPTQMODEL,
               plan="llm-compressor", calibrates=True, trains_on=frozenset({"gptqmodel"})),
        Method("gguf", GgufOptions, "llama.cpp GGUF (Q8_0, Q4_K_M, ...), run in llama.cpp", "workers.quantize.gguf:Gguf",
               nominal_bits=lambda options: None if options.mixed else GGUF_TYPES.get(options.gguf_type), cost=1.5, plan="gguf",
               library="gguf"),
    ]
}

TRAIN_METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("lora", LoraOptions, "LoRA adapters on the float base (peft)", nominal_bits=lambda options: None,
               cost=1.0, plan="lora", library="peft"),
        Method("qlora", QloraOptions, "LoRA adapters on a bitsandbytes 4-bit base", nominal_bits=lambda options: 4,
               cost=1.5, plan="qlora", library="peft"),
    ]
}


def trainable_quantized() -> dict[str, frozenset[str]]:
    """The quantize methods whose checkpoints a LoRA can train on, with the backends that make such checkpoints
    (read at each call, so a method added to the registry is one)."""
    return {name: m.trains_on for name, m in METHODS.items() if m.trains_on}


@dataclass(frozen=True)
class Kind:
    """A job kind: how its options are found, which worker function runs it, and where it may sit in a DAG.

    ``options`` is one options model for every job of the kind, or None when the job's ``method`` picks one
    from ``methods``. ``worker`` is a ``"module:function"`` under ``workers/`` taking the job's context and
    returning its result row; it travels in the job's payload, so a worker never reads this registry."""

    name: str
    worker: str
    summary: str
    needs_model: bool  # loads the sweep's model and runs the evaluation harness
    parents: frozenset[str] = frozenset()  # kinds whose jobs a stage of this kind may come ``from``
    options: Optional[type[Options]] = None
    methods: Optional[dict[str, Method]] = None
    cost: float = 2.0  # as Method.cost, for a kind without methods
    internal: bool = False  # made by qfarm.sweep.expand for other jobs (a shared calibration), never named in a spec
    plan: str = "none"  # as Method.plan, for a kind without methods
    # its rows are measured against the reference (KL, top-1, Δ perplexity) and read the reference's figures from
    # disk: each of its jobs needs the sweep's reference job (the ``Method.reference`` one), so only that job ever
    # holds the float model; a job of a kind that trains on the float model (train, merge) loads it anyway
    compares: bool = False

    def method(self, name: object) -> Optional[Method]:
        return (self.methods or {}).get(name) if isinstance(name, str) else None

    def options_for(self, combo: dict) -> tuple[type[Options], str, Optional[Method]]:
        """(options model, how errors name it, method) for one matrix combination; LookupError says what is
        wrong when the combination names no method, or one this kind does not have."""
        if self.methods is None:
            return self.options, f"kind {self.name}", None
        name = combo.get("method")
        method = self.method(name)
        if method is not None:
            return method.options, f"method {name}", method
        what = "training method" if self.name == "train" else "method"
        if name is None:
            raise LookupError(f"every {self.name} job needs a method (in matrix or as a key). "
                              f"Allowed: {allowed(self.methods)}")
        raise LookupError(f"unknown {what} {name!r}.{did_you_mean(str(name), self.methods)} "
                          f"Allowed: {allowed(self.methods)}")


KINDS: dict[str, Kind] = {
    k.name: k
    for k in [
        Kind("quantize", "workers.quantize:run", "quantize the model (or a merged one) and evaluate it",
             needs_model=True, parents=frozenset({"merge"}), methods=METHODS, compares=True),
        Kind("train", "workers.train:run", "train LoRA / QLoRA adapters and evaluate the adapter model",
             needs_model=True, parents=frozenset({"quantize"}), methods=TRAIN_METHODS),
        Kind("merge", "workers.train.merge:run", "merge a train job's adapter into a base, check it, evaluate it",
             needs_model=True, parents=frozenset({"train"}), options=MergeOptions, cost=2.0, plan="merge"),
        Kind("calibrate", "workers.quantize.calibrate:run", "capture what GPTQ needs of the calibration data, once for the jobs "
             "that share it", needs_model=True, options=CaptureOptions, cost=4.0, internal=True, plan="calibrate"),
        Kind("probe", "workers.search.probe:run", "measure how much each layer in one format moves the model's output "
             "(a search's sensitivity)", needs_model=True, options=ProbeOptions, cost=1.0, internal=True,
             plan="reference"),
        Kind("final", "workers.search.final:run", "evaluate in full the candidate of a search that its screen ranked "
             "at this place (successive halving)", needs_model=True, options=FinalOptions, cost=1.0, internal=True,
             plan="evaluate", compares=True),
        Kind("evaluate", "workers.evaluate.checkpoint:run", "evaluate an existing checkpoint (a published quant, a model made "
             "elsewhere) against the sweep's reference", needs_model=True, options=EvaluateOptions, cost=1.0,
             plan="evaluate", compares=True),
        Kind("sleep", "workers.sleep:run", "sleep: tests and benchmarks of the farm itself",
             needs_model=False, parents=frozenset({"sleep"}), options=SleepOptions),
    ]
}


def user_kinds() -> dict[str, Kind]:
    """The kinds a spec may name: every kind of ``KINDS`` but the internal ones (read at each call, so a kind added
    to the registry is one)."""
    return {name: k for name, k in KINDS.items() if not k.internal}
