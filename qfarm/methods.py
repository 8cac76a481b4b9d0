"""The registry of job kinds and quantization methods: names, options, and where their worker code lives.

Nothing here imports an ML library: the CLI validates a sweep against this registry without loading torch.
Each method is a pair, joined by its name: a pydantic model of its options (what a user may write) and a
``"module:Class"`` string naming its implementation under ``workers/`` (imported inside a worker only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class Options(BaseModel):
    """Base of every job's options after matrix expansion: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoneOptions(Options):
    """The reference: the base model as loaded, unquantized. Every KL and delta is measured against it."""

    method: Literal["none"]
    bits: Optional[Literal[16, 32]] = None


class BnbInt8Options(Options):
    """bitsandbytes LLM.int8(): 8-bit weights, outlier features (above ``threshold``) kept in 16-bit."""

    method: Literal["bnb-int8"]
    bits: Literal[8] = 8
    threshold: float = Field(6.0, ge=0.0, le=1000.0)


class Bnb4bitOptions(Options):
    """bitsandbytes 4-bit (NF4 or FP4) weights, optional double quantization of the scales."""

    method: Literal["bnb-nf4", "bnb-fp4"]
    bits: Literal[4] = 4
    double_quant: bool = False
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


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


class RtnOptions(Options):
    """Round-to-nearest integer weights (no calibration): the baseline every GPTQ/AWQ paper reports."""

    method: Literal["rtn"]
    bits: Literal[2, 3, 4, 8] = 4
    group_size: GroupSize = 64
    symmetric: bool = True


class GptqOptions(Options):
    """GPTQ (llm-compressor's GPTQModifier): integer weights chosen layer by layer to minimise the output error
    on calibration data. ``act_order`` processes columns by activation size (compressed-tensors' ``weight``
    ordering: better accuracy, no extra inference cost)."""

    method: Literal["gptq"]
    bits: Literal[2, 3, 4, 8] = 4
    group_size: GroupSize = 64
    act_order: bool = False
    symmetric: bool = True
    dampening_frac: float = Field(0.01, gt=0.0, le=1.0)
    calibration: Calibration = Calibration()


class AwqOptions(Options):
    """AWQ (llm-compressor's AWQModifier + weight quantization): per-channel scales searched on calibration
    activations protect salient weights before rounding. Asymmetric (with zero points) by default."""

    method: Literal["awq"]
    bits: Literal[3, 4, 8] = 4
    group_size: GroupSize = 64
    symmetric: bool = False
    duo_scaling: bool = True
    n_grid: int = Field(20, ge=1, le=1_000)
    calibration: Calibration = Calibration()


# llama.cpp file types a `gguf` job may produce, with the nominal bits of their weights (a K-quant mixes types;
# the job records the bits per weight of the file it wrote). Checked against the installed llama.cpp in a test.
GGUF_TYPES: dict[str, int] = {
    "F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8, "Q6_K": 6, "Q5_K_M": 5, "Q5_K_S": 5, "Q5_1": 5, "Q5_0": 5,
    "Q4_K_M": 4, "Q4_K_S": 4, "Q4_1": 4, "Q4_0": 4, "Q3_K_L": 3, "Q3_K_M": 3, "Q3_K_S": 3, "Q2_K": 2,
}


def _gguf_type(value: str) -> str:
    if value not in GGUF_TYPES:
        from .errors import did_you_mean

        upper = value.upper() if isinstance(value, str) else value
        hint = f" Did you mean {upper!r}?" if upper in GGUF_TYPES else did_you_mean(str(value), GGUF_TYPES)
        raise ValueError(f"{value!r} is not a llama.cpp file type.{hint} Allowed: {', '.join(GGUF_TYPES)}")
    return value


class GgufOptions(Options):
    """llama.cpp's quantizer: the model as a GGUF file of ``gguf_type``, evaluated inside llama.cpp."""

    method: Literal["gguf"]
    gguf_type: Annotated[str, AfterValidator(_gguf_type)] = "Q4_K_M"


class SleepOptions(Options):
    """A job that sleeps: for tests and benchmarks of the farm itself. Needs no model."""

    seconds: float = Field(1.0, ge=0.0, le=86_400.0)
    index: int = 0
    fail: bool = False


@dataclass(frozen=True)
class Method:
    name: str
    options: type[Options]
    worker: str  # "module:Class" under workers/, imported lazily inside a worker actor
    summary: str
    is_reference: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("none", NoneOptions, "workers.reference:Reference", "the unquantized reference", is_reference=True),
        Method("bnb-int8", BnbInt8Options, "workers.bnb:BitsAndBytes", "bitsandbytes LLM.int8()"),
        Method("bnb-nf4", Bnb4bitOptions, "workers.bnb:BitsAndBytes", "bitsandbytes 4-bit NormalFloat"),
        Method("bnb-fp4", Bnb4bitOptions, "workers.bnb:BitsAndBytes", "bitsandbytes 4-bit float"),
        Method("rtn", RtnOptions, "workers.llmc:LLMCompressor", "round-to-nearest integer weights (llm-compressor)"),
        Method("gptq", GptqOptions, "workers.llmc:LLMCompressor", "GPTQ (llm-compressor), calibrated"),
        Method("awq", AwqOptions, "workers.llmc:LLMCompressor", "AWQ (llm-compressor), calibrated"),
        Method("gguf", GgufOptions, "workers.gguf:Gguf", "llama.cpp GGUF (Q8_0, Q4_K_M, ...), run in llama.cpp"),
    ]
}

JobKind = Literal["quantize", "sleep"]
KINDS: tuple[str, ...] = ("quantize", "sleep")
# Kinds that load a model and run the evaluation harness.
MODEL_KINDS = frozenset({"quantize"})
