"""A model's weight layers, read from its own module tree: the model built from its config on the meta device
(no weights read, no memory), every Linear, Conv1D (GPT-2's, stored transposed) and fused expert weight (a
3-D parameter of a MoE block) with its input and output size, the number of blocks, and whether the output
head is tied to the embeddings.

``qfarm validate`` runs this as a subprocess (``python -m workers.shared.architecture '<model ref as JSON>'``), so
the CLI itself imports no ML library; it prints one JSON object. Layer names are patterns: the part after the
block index (``self_attn.q_proj``, ``attn.c_attn``, ``mlp.experts.gate_up_proj``), or the whole name for a
layer outside the blocks (``lm_head``).
"""

from __future__ import annotations

import json
import re
import sys

_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


def pattern(name: str) -> tuple[str, int | None]:
    """(the layer's name without its block prefix, its block index or None)."""
    m = _BLOCK.match(name)
    if not m:
        return name, None
    return re.sub(r"\.\d+\.", ".", m.group(3)), int(m.group(2))


def describe(model) -> dict:
    import torch

    linears: dict[str, dict] = {}
    blocks = -1

    def add(name: str, kind: str, n_in: int, n_out: int, **extra) -> None:
        nonlocal blocks
        key, index = pattern(name)
        if index is not None:
            blocks = max(blocks, index)
        entry = linears.setdefault(key, {"type": kind, "in": int(n_in), "out": int(n_out), "count": 0, **extra})
        entry["count"] += 1

    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, torch.nn.Linear):
            add(name, "Linear", module.in_features, module.out_features)
        elif type(module).__name__ == "Conv1D" and "weight" in own:
            add(name, "Conv1D", own["weight"].shape[0], own["weight"].shape[1])  # stored as [in, out]
        else:
            for pname, p in own.items():
                if p.dim() == 3:  # fused experts: [experts, out, in], applied as F.linear per expert
                    add(f"{name}.{pname}", "experts", p.shape[2], p.shape[1], experts=int(p.shape[0]))
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    return {"architecture": type(model).__name__, "model_type": model.config.model_type, "blocks": blocks + 1,
            "linears": linears, "lm_head": head_name, "tied_embeddings": bool(tied)}


def from_ref(ref: dict) -> dict:
    import logging

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if ref["kind"] == "gguf":
        config = AutoConfig.from_pretrained(ref["location"], gguf_file=ref["gguf_file"])
    else:
        config = AutoConfig.from_pretrained(ref["location"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return describe(model)


def main() -> None:
    try:
        out = from_ref(json.loads(sys.argv[1]))
    except Exception as e:  # noqa: BLE001 - reported to the CLI, which falls back to the config's numbers
        out = {"error": f"{type(e).__name__}: {e}"[:500]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
