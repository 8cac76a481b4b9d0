"""The registry of job kinds and quantization methods: names, options, and where their worker code lives.

Nothing here imports an ML library: the CLI validates a sweep against this registry without loading torch.
Each method is a pair, joined by its name: a pydantic model of its options (what a user may write) and a
``"module:Class"`` string naming its implementation under ``workers/`` (imported inside a worker only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


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
    ]
}

JobKind = Literal["quantize", "sleep"]
KINDS: tuple[str, ...] = ("quantize", "sleep")
# Kinds that load a model and run the evaluation harness.
MODEL_KINDS = frozenset({"quantize"})


def bits_of(options: Options) -> int | None:
    bits = getattr(options, "bits", None)
    if bits is None and getattr(options, "method", None) == "none":
        return None
    return bits
