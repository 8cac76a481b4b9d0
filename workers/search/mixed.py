"""A search's mixed candidate: each layer's format, chosen in the candidate's own job from the probes it needs.

The probes' ``sensitivity.json`` (workers.search.probe) give, per layer and format, the KL with that layer alone in
that format; ``qfarm.sweep.search.allocate`` picks the formats whose stored bits meet the candidate's target with
the least summed KL. The same probes always give the same allocation, so a retried or resubmitted candidate makes
the same model. The row records what was predicted beside what is then measured.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def probes(ctx, key: str = "layers") -> dict[str, dict]:
    """Every layer's figures from the probes the job needs (each wrote its share of the layers), by layer name;
    ``key`` "tables": the embedding table's and an untied head's (by GGUF tensor name), which a probe of the tables
    prices for a GGUF mix under a size target."""
    from workers.search.probe import SENSITIVITY
    from workers.shared.files import inside

    out = {}
    for artifact in ctx.job.input.needs.values():
        if not isinstance(artifact, str):
            continue
        file = Path(inside(ctx.output_root, artifact)) / SENSITIVITY
        if file.is_file():
            out.update(json.loads(file.read_text()).get(key) or {})
    return dict(sorted(out.items(), key=lambda kv: kv[1].get("index", 0)))


def importance(ctx) -> tuple[dict, int]:
    """({layer: its inputs' mean squares}, tokens) from the probes the job needs: llama.cpp's importance matrix,
    measured on the probe windows. Empty where the probes were made before they saved it."""
    from safetensors import safe_open

    from workers.search.probe import IMPORTANCE
    from workers.shared.files import inside

    out, tokens = {}, 0
    for artifact in ctx.job.input.needs.values():
        if not isinstance(artifact, str):
            continue
        file = Path(inside(ctx.output_root, artifact)) / IMPORTANCE
        if file.is_file():
            with safe_open(str(file), "np") as f:
                tokens = int((f.metadata() or {}).get("tokens", 0))
                out.update({name: f.get_tensor(name) for name in f.keys()})
    return out, tokens


def allocation(ctx, scale_bits: int = 16) -> dict[str, str]:
    """{layer: format} for the job's ``mixed`` option, its prediction recorded in the row (``ctx.extra``)."""
    from qfarm.errors import Permanent
    from qfarm.sweep.search import Format, Layer, allocate, layout_of

    mixed = ctx.opts.mixed
    found = probes(ctx)
    if not found or any(v["index"] != i for i, v in enumerate(found.values())):
        raise Permanent("the search's probes this candidate needs do not cover the model's layers")
    def shapes(figures: dict) -> list[Layer]:
        return [Layer(name, int(v["in"]), int(v["out"])) for name, v in figures.items()]

    layers = shapes(found)
    tables = probes(ctx, "tables") if mixed.tables else {}
    if mixed.tables and not tables:
        raise Permanent("the search's probes this candidate needs did not price the embedding table it allocates")
    figures = {**found, **tables}
    sensitivity = {name: {f: v["kl"][f] for f in mixed.formats if f in v.get("kl", {})} for name, v in figures.items()}
    target = mixed.target_bits_per_weight - mixed.point * mixed.step
    over = shapes(tables)
    ctx.progress(f"allocating formats to {len(layers)} layers" + (f" and {len(over)} table(s)" if over else "")
                 + f" at ≤ {target:g} bits per weight")
    layout = layout_of({"backend": getattr(ctx.opts, "backend", None)})  # GPTQModel's GPTQ layout, or compressed-tensors
    formats = [Format(f, layout) for f in mixed.formats]
    chosen = allocate(layers + over, sensitivity, formats, target, scale_bits)
    if chosen is None:
        raise Permanent(f"no allocation of {', '.join(mixed.formats)} meets {target:g} bits per weight on this model")
    used = Counter(chosen.formats[la.name] for la in layers)
    by_name = {f.name: f for f in formats}
    stored = sum(by_name[chosen.formats[la.name]].layer_bits(la.n_in, la.n_out, scale_bits) for la in layers)
    ctx.extra.update({"search_target_bits_per_weight": target, "search_predicted_kl": chosen.predicted,
                      # over the quantized layers, as the row's bits_per_weight (the tables apart)
                      "search_predicted_bits_per_weight": stored / sum(la.params for la in layers),
                      "search_formats_used": dict(used.most_common()),
                      "search_table_formats": {t.name: chosen.formats[t.name] for t in over} or None})
    return chosen.formats
