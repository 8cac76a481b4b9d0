"""An artifact checked against its row: stored as a user would deploy it, and saying what the row says.

After a quantize job saves its artifact and before it is evaluated:

1. **Stored as deployed** (:func:`store_as_source`): the unquantized float tensors (embeddings, head, norms,
   biases, compressed-tensors' scales) are rewritten in the source checkpoint's dtype (:func:`source_dtype`: a
   Hugging Face folder's declared dtype, a GGUF's float tensors' type, bfloat16 otherwise), whatever dtype the job
   computed in. A CPU computes in float32 and a GPU in bfloat16: without this the size column said where a row ran,
   not what its format costs. Tensors whose dtype the format fixes (bitsandbytes' quantization state, GPTQ/AWQ's
   float16 scales) are left as they are.
2. **Described by itself** (:func:`describe`): what the artifact's own metadata says it is — compressed-tensors'
   ``quantization_config``, GPTQModel's ``quantize_config.json``, bitsandbytes' ``quantization_config``, a GGUF's
   file type and tensor types. The row carries it (``artifact_config``).
3. **Checked against the row** (:func:`check`): every fact the metadata holds about an option of the job
   (:func:`claims`) must be the option's value; a disagreement fails the job naming both ("the row says act_order
   false, the checkpoint says actorder weight"). An option recorded but not applied is the worst defect a
   comparison table can have: it is refused here, not published.
4. **Counted** (:func:`logical_parameters`): the loaded artifact may not hold more parameters than the reference (a
   duplicated tensor, such as a tied embedding saved twice, fails the job with the counts).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qfarm.errors import Permanent
from qfarm.sweep.methods import per_layer
from qfarm.sweep.modelinfo import DEFAULT_STORAGE, gguf_float_dtype, gguf_metadata
from qfarm.sweep.modelinfo import GGUF_FLOATS as FLOAT_NAMES

# tensors whose dtype is part of the format, never rewritten: bitsandbytes' quantization state (absmax, code book,
# nested statistics, LLM.int8's row scales) and GPTQ/AWQ's float16 scales and integer packs
FORMAT_FIXED = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state", ".SCB",
                ".scales", ".qweight", ".qzeros", ".g_idx")


# --- 1. stored as deployed -------------------------------------------------------------------------------------

def source_dtype(job, base_path: str) -> str:
    """The dtype a user's checkpoint of this job's base stores its float tensors in: the sweep's GGUF's float
    tensors (bfloat16 when it has none: a quantized file), else the base folder's declared dtype."""
    from workers.shared.models import checkpoint_dtype

    model = job.model or {}
    if model.get("kind") == "gguf" and not job.input.artifact:
        return gguf_float_dtype(str(Path(model["location"]) / model["gguf_file"]))
    declared = checkpoint_dtype(base_path)
    return declared if declared in ("float32", "float16", "bfloat16") else DEFAULT_STORAGE


def store_as_source(folder: str, dtype: str) -> int:
    """Rewrite the float tensors of ``folder``'s safetensors files in ``dtype`` (but those FORMAT_FIXED) and say
    so in its config.json; returns how many tensors changed. A folder without safetensors (a GGUF) is untouched."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = getattr(torch, dtype)
    floats = (torch.float32, torch.float16, torch.bfloat16)
    changed = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            metadata = f.metadata()
            names = list(f.keys())
            tensors = {name: f.get_tensor(name) for name in names}
        cast = [n for n, t in tensors.items() if t.dtype in floats and t.dtype != target and not n.endswith(FORMAT_FIXED)
                and ".quant_state." not in n]
        if not cast:
            continue
        for name in cast:
            tensors[name] = tensors[name].to(target).contiguous()
        changed += len(cast)
        tmp = file.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, file)
    config = Path(folder) / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        cfg["dtype"] = dtype
        if "torch_dtype" in cfg:  # the older name, where a library still writes it
            cfg["torch_dtype"] = dtype
        config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return changed


def stored_dtype(folder: str) -> str | None:
    """The dtype of the artifact's input embedding as stored (what its unquantized tensors are kept in)."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                if name.endswith(("embed_tokens.weight", "wte.weight")):
                    stored = str(f.get_slice(name).get_dtype())  # safetensors' names: BF16, F16, F32
                    return FLOAT_NAMES.get(stored.upper(), stored.lower())
    return None


# --- 2. described by itself ------------------------------------------------------------------------------------

def describe(folder: str) -> dict:
    """What the artifact's own metadata says it is, in one flat dict ({} when it says nothing: a float model)."""
    path = Path(folder)
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        return _describe_gguf(str(ggufs[0]))
    quantize_config = path / "quantize_config.json"
    if quantize_config.is_file():  # GPTQModel's own (AutoGPTQ/AutoAWQ layout)
        qc = json.loads(quantize_config.read_text())
        out = {"format": qc.get("quant_method") or qc.get("method"), "bits": qc.get("bits"),
               "group_size": qc.get("group_size"), "sym": qc.get("sym")}
        meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
        for key in ("desc_act", "damp_percent", "act_group_aware", "zero_point"):  # GPTQModel 7 keeps some under meta
            if key in qc or key in meta:
                out[key] = qc.get(key, meta.get(key))
        return out
    config = path / "config.json"
    qc = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    if not qc:
        return {}
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        if len(groups) != 1:
            return {"format": "compressed-tensors", "config_groups": len(groups)}
        (group,) = groups.values()
        weights, acts = group.get("weights") or {}, group.get("input_activations")
        return {"format": "compressed-tensors", "bits": weights.get("num_bits"), "type": weights.get("type"),
                "strategy": weights.get("strategy"),
                "group_size": -1 if weights.get("strategy") == "channel" else weights.get("group_size"),
                "symmetric": weights.get("symmetric"), "actorder": weights.get("actorder"),
                "input_activations": None if not acts else f"{acts.get('type')}{acts.get('num_bits')} "
                                                           f"{acts.get('strategy')}{' dynamic' if acts.get('dynamic') else ''}",
                "ignore": sorted(qc.get("ignore") or [])}
    if method == "bitsandbytes":
        if qc.get("load_in_8bit"):
            return {"format": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": qc.get("llm_int8_threshold")}
        return {"format": "bitsandbytes", "load_in_4bit": bool(qc.get("load_in_4bit")),
                "bnb_4bit_quant_type": qc.get("bnb_4bit_quant_type"),
                "bnb_4bit_use_double_quant": qc.get("bnb_4bit_use_double_quant"),
                "bnb_4bit_compute_dtype": qc.get("bnb_4bit_compute_dtype")}
    return {"format": method}


def _describe_gguf(path: str) -> dict:
    import gguf

    meta = gguf_metadata(Path(path), wanted={"general.file_type"}, tensors=True)
    value = meta.get("general.file_type")
    file_type = None
    if isinstance(value, int):
        try:
            file_type = gguf.LlamaFileType(value).name
        except ValueError:
            file_type = str(value)
    types: dict[str, int] = {}
    for number, _ in meta["#tensor_info"].values():
        try:
            name = gguf.GGMLQuantizationType(number).name
        except ValueError:
            name = str(number)
        types[name] = types.get(name, 0) + 1
    return {"format": "gguf", "file_type": file_type, "tensor_types": dict(sorted(types.items())),
            "output_weight": "output.weight" in meta["#tensors"]}


# --- 3. checked against the row --------------------------------------------------------------------------------

def claims(opts, impl: str | None) -> list[tuple[str, object, str, object]]:
    """What the artifact's metadata must say for a row with these (typed) options: (option, its value in the row,
    the metadata's key, the value that key must have). Options the metadata does not record (dampening of
    llm-compressor's GPTQ, AWQ's grid) are not here: tests/integration/test_every_option.py shows they move the
    weights."""
    method = opts.method
    gptqmodel = method in ("rtn", "gptq", "awq") and bool(impl) and "gptqmodel" in impl
    if per_layer(opts) and method != "gguf" and not gptqmodel:  # per layer: check_mixed
        return [("method", method, "format", "compressed-tensors")]
    if gptqmodel:
        out = [("method", method, "format", method)]
        if not per_layer(opts):  # per layer: check_mixed, against its per-module overrides
            out += [("bits", opts.bits, "bits", opts.bits), ("group_size", opts.group_size, "group_size", opts.group_size)]
        if method == "awq":  # AutoAWQ's layout says zero_point where GPTQ's says sym
            out.append(("symmetric", opts.symmetric, "zero_point", not opts.symmetric))
        else:
            out.append(("symmetric", opts.symmetric, "sym", opts.symmetric))
        if method == "gptq":
            out += [("act_order", opts.act_order, "desc_act", opts.act_order),
                    ("dampening_frac", opts.dampening_frac, "damp_percent", opts.dampening_frac)]
        return out
    if method in ("rtn", "gptq", "awq"):
        scheme = getattr(opts, "scheme", None)  # AWQ has none
        act = {"W8A8": "int8 token dynamic", "FP8_DYNAMIC": "float8 token dynamic"}.get(scheme)
        out = [("method", method, "format", "compressed-tensors"),
               ("bits", opts.bits, "bits", opts.bits),
               ("group_size", opts.group_size, "group_size", opts.group_size),
               ("symmetric", opts.symmetric, "symmetric", opts.symmetric),
               ("scheme", scheme, "type", "float" if scheme == "FP8_DYNAMIC" else "int"),
               ("scheme", scheme, "input_activations", act)]
        if method == "gptq":
            out.append(("act_order", opts.act_order, "actorder", "weight" if opts.act_order else None))
        else:
            out.append(("method", method, "actorder", None))
        return out
    if method == "bnb-int8":
        return [("method", method, "load_in_8bit", True),
                ("threshold", opts.threshold, "llm_int8_threshold", opts.threshold)]
    if method in ("bnb-nf4", "bnb-fp4"):
        return [("method", method, "bnb_4bit_quant_type", method.removeprefix("bnb-")),
                ("double_quant", opts.double_quant, "bnb_4bit_use_double_quant", opts.double_quant),
                ("compute_dtype", opts.compute_dtype, "bnb_4bit_compute_dtype", opts.compute_dtype)]
    if method == "gguf":
        name = opts.gguf_type
        return [("gguf_type", name, "file_type", ("ALL_" if name == "F32" else "MOSTLY_") + name)]
    return []


def check(opts, impl: str | None, described: dict) -> None:
    """Raises Permanent naming the first option whose value the artifact's metadata contradicts (or does not hold)."""
    for option, value, key, expected in claims(opts, impl):
        found = described.get(key, "nothing")
        if not _same(found, expected):
            raise Permanent(f"the artifact is not what its row says: the row says {option} {_text(value)}, the "
                            f"checkpoint says {key} {_text(found)} (expected {_text(expected)}); refusing to publish "
                            "a row whose option was not applied")


def layer_formats(folder: str) -> dict[str, str] | None:
    """Each quantized layer of a compressed-tensors artifact (its stored tensors) with the format its config group
    gives it (``4b g64``): a group names its layers, or their class (``Linear``); of a GPTQModel one, the format its
    ``dynamic`` overrides give it (the first that matches its name), else the config's bits and group size. None for
    another format."""
    config = Path(folder) / "config.json"
    qc = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    if (Path(folder) / "quantize_config.json").is_file():
        return _gptq_layer_formats(folder)
    if not qc or qc.get("quant_method") != "compressed-tensors":
        return None
    groups = []
    for group in (qc.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        group_size = -1 if weights.get("strategy") == "channel" else weights.get("group_size")
        groups.append((set(group.get("targets") or []), f"{weights.get('num_bits')}b g{group_size}"))
    sizes = safetensors_sizes(folder)
    layers = sorted({name.split(f".{mark}")[0] for name in sizes for mark in _QUANTIZED_MARKS if f".{mark}" in name})
    out = {}
    for layer in layers:
        out[layer] = next((fmt for targets, fmt in groups if layer in targets), None) or \
            next((fmt for targets, fmt in groups if "Linear" in targets), "?")
    return out


def _gptq_layer_formats(folder: str) -> dict[str, str]:
    import re

    qc = json.loads((Path(folder) / "quantize_config.json").read_text())
    rules = []
    for pattern, over in (qc.get("dynamic") or {}).items():
        negative, raw = pattern.startswith("-:"), pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        rules.append((re.compile(raw), None if negative else over if isinstance(over, dict) else {}))
    out = {}
    for layer in sorted({name.rsplit(".qweight", 1)[0] for name in safetensors_sizes(folder) if name.endswith(".qweight")}):
        over = next((o for rx, o in rules if rx.match(layer)), {}) or {}
        out[layer] = f"{over.get('bits', qc.get('bits'))}b g{over.get('group_size', qc.get('group_size'))}"
    return out


def check_mixed(said: dict[str, str], layers: dict[str, str]) -> None:
    """A mixed candidate's artifact (``said``: its layer formats as its config groups give them) against its
    allocation: Permanent naming the first layer whose format is not the one it was given."""
    for layer, fmt in layers.items():
        if said.get(layer) != fmt:
            raise Permanent(f"the artifact is not what its row says: the allocation gives {layer} {fmt}, the "
                            f"checkpoint's config groups say {said.get(layer, 'nothing')}; refusing to publish it")


def _same(found, expected) -> bool:
    if isinstance(expected, float) and isinstance(found, (int, float)) and not isinstance(found, bool):
        return abs(found - expected) <= 1e-9 * max(1.0, abs(expected))
    return found == expected


def _text(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def finish(ctx, base, artifact: str) -> dict:
    """Store the artifact as deployed, describe it and check it against the job's options; the row's columns."""
    dtype = source_dtype(ctx.job, base.path)
    if sorted(Path(artifact).glob("*.safetensors")):
        ctx.progress(f"storing the artifact's unquantized tensors in {dtype}")
        store_as_source(artifact, dtype)
    described = describe(artifact)
    check(ctx.opts, ctx.job.impl, described)
    out = {"artifact_config": described, "stored_dtype": stored_dtype(artifact)}
    formats = layer_formats(artifact)
    if formats is not None:  # each layer's format, as the artifact's config says (a GGUF row: its file's types)
        if per_layer(ctx.opts):
            check_mixed(formats, ctx.extra.get("layer_formats") or {})
        out["layer_formats"] = formats
    if ctx.opts.method != "gguf":  # a GGUF row counts its file's tensors (workers.quantize.gguf.layer_columns)
        out["bits_per_weight"] = bits_per_weight(artifact, base.skeleton)
    return out


# a quantized layer's stored tensors, by the last part of their names: compressed-tensors (weight_packed,
# weight_scale, weight_zero_point, weight_g_idx, weight_shape), GPTQModel/AutoGPTQ (qweight, qzeros, scales,
# g_idx), bitsandbytes (weight + weight.absmax, weight.quant_map, weight.nested_*, weight.quant_state.*; int8: SCB)
_QUANTIZED_MARKS = ("weight_packed", "qweight", "weight.absmax", "SCB", "weight_scale")
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
                      "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_sizes(folder: str) -> dict[str, int]:
    """Every tensor of the folder's safetensors files and its bytes, from the files' headers (no tensor read)."""
    import struct

    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for d in info["shape"]:
                    count *= int(d)
                out[name] = count * _SAFETENSORS_BYTES.get(info["dtype"], 4)
    return out


def bits_per_weight(folder: str, skeleton) -> float | None:
    """Every stored bit of the artifact's quantized layers' weights (the packed weights with their scales, zero
    points, group indices and quantization state; not biases) over those layers' weights as the architecture counts
    them (``skeleton``: the model on the meta device): the same measure as a GGUF row's. None for a float artifact."""
    sizes = safetensors_sizes(folder)
    layers = {name.split(f".{mark}")[0] for name in sizes for mark in _QUANTIZED_MARKS if f".{mark}" in name}
    if not layers:
        return None
    stored = weights = 0
    for layer in sorted(layers):
        try:
            weights += skeleton.get_submodule(layer).weight.numel()
        except AttributeError:
            return None  # a layout this count does not know: no figure rather than a wrong one
        stored += sum(b for name, b in sizes.items() if name.startswith(f"{layer}.") and not name.endswith(".bias"))
    return stored * 8 / weights if weights else None


# --- 4. counted --------------------------------------------------------------------------------------------------

def logical_parameters(model) -> int:
    """The parameters a model holds as its architecture counts them: a linear layer (dense, bitsandbytes, fp8,
    GPTQModel's kernels, compressed-tensors) as in_features × out_features (+ bias) whatever its packing, its scales
    and zero points not counted; a tensor two modules share (tied embeddings) once."""
    import torch

    seen: set[int] = set()
    total = 0

    def once(t) -> int:
        if not isinstance(t, torch.Tensor) or id(t) in seen:
            return 0
        seen.add(id(t))
        return t.numel()

    for module in model.modules():
        features = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if all(isinstance(f, int) for f in features) and not list(module.children()):
            weight = module._parameters.get("weight")
            if weight is None or id(weight) not in seen:  # a tied head is its embedding's weight, counted there
                total += features[0] * features[1]
                if weight is not None:
                    seen.add(id(weight))
            total += once(getattr(module, "bias", None))
            continue
        for p in module.parameters(recurse=False):
            total += once(p)
    return total


def check_parameters(model, reference) -> dict:
    """Fails the job when the loaded artifact holds more parameters than the reference (a tensor stored twice)."""
    if not hasattr(model, "modules") or not hasattr(reference, "modules"):
        return {}
    mine, theirs = logical_parameters(model), logical_parameters(reference)
    if mine > theirs:
        tied = getattr(getattr(reference, "config", None), "tie_word_embeddings", None)
        hint = (" (the reference ties its input and output embeddings; the artifact stores them apart)"
                if tied and not getattr(model.config, "tie_word_embeddings", True) else "")
        raise Permanent(f"the artifact holds {mine:,} parameters, the reference {theirs:,}: {mine - theirs:,} stored "
                        f"twice{hint}; its size would not be its format's")
    return {"artifact_params": mine}
