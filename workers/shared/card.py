"""Model cards: every artifact folder a job saves gets a README.md in the Hugging Face model-card format, so the
folder can be published as it is (``huggingface-cli upload``): YAML metadata (base model, how it relates to it,
library, license carried from the source, the quantization's method/bits/group, library versions) and a body
with the job's measured figures and how they were measured.

Written by the worker once the job's row is complete (workers.actor), never failing a job: a card that cannot
be written is said in the row (``model_card_error``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qfarm.sweep.job import Job
from qfarm.sweep.modelinfo import gguf_metadata

CARD = "README.md"

# what the job made of its base model, in the hub's own words (base_model_relation)
RELATION = {"quantize": "quantized", "train": "adapter", "merge": "merge"}


def source_info(model: dict, output_root: str) -> dict[str, Any]:
    """What the source model says of itself: a hub id (``base_model``) and a license, from the hub key, its
    own model card (README.md metadata) or a GGUF file's ``general.*`` metadata."""
    out: dict[str, Any] = {}
    folder = model.get("location") if model.get("kind") == "hf_dir" else None
    if model.get("kind") == "hub":
        from qfarm.sweep.hub import cache_dir, snapshot

        out["base_model"] = model.get("location")
        folder = snapshot(cache_dir(output_root), model["location"], model.get("revision") or "")
    if folder:
        meta = _card_metadata(Path(folder) / CARD)
        out.setdefault("license", meta.get("license"))  # its own base_model is not ours: a local folder names none
    if model.get("kind") == "gguf" and model.get("gguf_file"):
        meta = _gguf_metadata(str(Path(model["location"]) / model["gguf_file"]))
        out.setdefault("license", meta.get("general.license"))
        from qfarm.sweep.sources import BUNDLED_SOURCES

        # what the GGUF was converted from: its header says, or qfarm knows its bundled file's origin
        repo = meta.get("general.source.huggingface.repository") or BUNDLED_SOURCES.get(model["gguf_file"])
        if isinstance(repo, str) and "base_model" not in out:
            out["base_model"] = repo.removeprefix("https://huggingface.co/").strip("/")
        out.setdefault("name", meta.get("general.name"))
    return {k: v for k, v in out.items() if v}


def _card_metadata(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(path).data.to_dict()
    except Exception:  # noqa: BLE001 - a source card we cannot read carries nothing over
        return {}


def _gguf_metadata(path: str | None) -> dict:
    if not path or not Path(path).is_file():
        return {}
    try:
        return {k: v for k, v in gguf_metadata(Path(path)).items() if k.startswith("general.") and isinstance(v, str)}
    except Exception:  # noqa: BLE001
        return {}


def _fmt(value, spec: str, se=None, unit: str = "") -> str:
    """A figure, its standard error, then its unit: "+27.14 ± 1.5 %"."""
    if value is None:
        return "–"
    text = spec.format(value) + (f" ± {se:.2g}" if isinstance(se, (int, float)) and se else "")
    return f"{text} {unit}" if unit else text


def library(kind: str | None, method: str | None) -> str:
    """The card's ``library_name``: the registry's ``Method.library`` of the job's method (transformers for a
    kind without methods: a merged model, a checkpoint evaluated)."""
    from qfarm.sweep.methods import KINDS

    found = KINDS[kind].method(method) if kind in KINDS else None
    return found.library if found is not None else "transformers"


def card_text(job: Job, result: dict, source: dict, sweep_id: str) -> tuple[dict, str]:
    """(the card's metadata, its markdown body) for one job's artifact. The options it shows are those the job's
    method has, as stored (the card names whichever of them it knows)."""
    opts = job.stored  # as stored: an option the record does not hold reads as None
    kind = job.kind
    method = job.method or result.get("method")
    quant = {k: v for k, v in {"method": method, "bits": job.bits, "group_size": opts.group_size, "scheme": opts.scheme,
                               "gguf_type": opts.gguf_type, "act_order": opts.act_order}.items() if v is not None}
    family = str(method or "").split("-")[0]
    tags = ["qfarm"] + [t for t in (family, str(method) if method and method != family else None,
                                     f"{quant['bits']}-bit" if quant.get("bits") else None,
                                     "lora" if kind == "train" else None) if t]
    meta: dict[str, Any] = {
        "base_model": source.get("base_model"),
        "base_model_relation": RELATION.get(kind) if source.get("base_model") else None,
        "library_name": library(kind, method),
        "license": source.get("license"),
        "tags": tags,
        "quantization": quant if kind == "quantize" else None,
        "training": {k: getattr(opts, k) for k in ("r", "lora_alpha", "lora_dropout", "learning_rate", "max_steps",
                                                    "quantize_base") if getattr(opts, k) is not None}
        if kind == "train" else None,
        "qfarm": {k: v for k, v in {
            "sweep_id": sweep_id, "job_id": job.id, "label": job.label,
            "source": source_name(job.model or {}), "lineage": list(job.lineage) or None,
            "model_revision": result.get("model_revision"), "versions": result.get("versions") or None}.items()
            if v is not None},
    }
    meta = {k: v for k, v in meta.items() if v not in (None, {}, [])}
    ev = job.evaluation
    ppl, speed = (ev.perplexity, ev.speed) if ev is not None else (None, None)
    base = source.get("base_model") or source.get("name") or "the source model"
    what = {"quantize": f"{base} quantized with `{method}`" + (f" ({quant.get('bits')}-bit)" if quant.get("bits") else ""),
            "train": f"a LoRA adapter trained on {base}", "merge": f"{base} with a LoRA adapter merged in"}
    rows = [
        ("size on disk", _fmt(result.get("size_mb"), "{:.1f} MB")
         + (f" (× {result['size_vs_ref']:.2f} of the reference checkpoint)" if result.get("size_vs_ref") else "")),
        ("perplexity", _fmt(result.get("perplexity"), "{:.3f}", result.get("perplexity_se"))
         + (f" (reference {result['ref_perplexity']:.3f})" if result.get("ref_perplexity") else "")),
        ("Δ perplexity vs reference", _fmt(result.get("ppl_delta_pct"), "{:+.2f}", result.get("ppl_delta_pct_se"), "%")),
        ("KL divergence vs reference", _fmt(result.get("kl_div"), "{:.4f}", result.get("kl_div_se"), "nats/token")),
        ("top-1 agreement vs reference", _fmt(result.get("top1_agree"), "{:.3f}", result.get("top1_agree_se"))),
        ("decode speed", _fmt(result.get("decode_tokens_per_s"), "{:.1f} tokens/s")
         + (f" ({result.get('runtime') or 'runtime not recorded'}, {result.get('device') or 'device not recorded'})")),
        ("peak memory", _fmt(result.get("peak_mem_mb"), "{:.0f} MB")),
    ]
    if kind == "train":
        rows += [("training loss (last)", _fmt(result.get("train_loss"), "{:.3f}")),
                 ("trainable parameters", _fmt(result.get("trainable_params"), "{:,}")),
                 ("training time", _fmt(result.get("train_s"), "{:.0f} s"))]
    for d in (ev.domains if ev is not None else [])[1:]:  # the first domain is the rows above
        rows.append((f"Δ perplexity / KL on {d.name}",
                     _fmt(result.get(f"ppl_delta_pct@{d.name}"), "{:+.2f}", result.get(f"ppl_delta_pct@{d.name}_se"), "%")
                     + " / " + _fmt(result.get(f"kl@{d.name}"), "{:.4f}", result.get(f"kl@{d.name}_se"), "nats/token")))
    for task, info in (result.get("tasks") or {}).items():
        if isinstance(info, dict) and info.get("column") in result:
            rows.append((f"{task} ({info.get('metric')})",
                         _fmt(result.get(info["column"]), "{:.3f}", result.get(f"{info['column']}_se"))))
    table = "\n".join(["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    how = [f"- perplexity, KL and top-1: {result.get('ppl_windows') or '?'} windows of {ppl.seq_len if ppl else '?'} "
           f"tokens ({result.get('ppl_tokens') or '?'} tokens scored) of `{_dataset_name(ppl.dataset if ppl else None)}`, "
           "compared token by token with the unquantized reference; ± is one standard error.",
           *[f"- domain {d.name}: {d.max_windows} windows (at most) of {d.seq_len} tokens of `{_dataset_name(d.dataset)}`."
             for d in (ev.domains if ev is not None else [])[1:]],
           f"- speed: {speed.prompt_tokens if speed else '?'}-token prompt, {speed.new_tokens if speed else '?'} new "
           f"tokens, median of {speed.runs if speed else '?'} runs, batch 1.",
           *([f"- made from the GGUF file `{(job.model or {}).get('gguf_file')}`, dequantized to float "
              "(the reference is that float model)."] if (job.model or {}).get("kind") == "gguf" else []),
           f"- made by qfarm, sweep `{sweep_id}`, job `{job.id}`"
           + (f" (from {' → '.join(job.lineage)})" if job.lineage else "") + "."]
    body = (f"\n# {job.label or job.id}\n\n{what.get(kind, base)}.\n\n## Measured\n\n{table}\n\n"
            "## How it was measured\n\n" + "\n".join(how) + "\n")
    return meta, body


def source_name(model: dict) -> str | None:
    """The source model as a card may publish it: a hub id at its commit, or a local file's or folder's name (never
    the path on this machine) with its content fingerprint."""
    kind = model.get("kind")
    if kind == "hub":
        return f"hub:{model.get('location')}@{model.get('revision')}"
    if kind == "gguf":
        name = model.get("gguf_file")
    elif kind == "hf_dir":
        name = Path(str(model.get("location") or "")).name
    else:
        return None
    key = str(model.get("key") or "")
    fp = model.get("fingerprint") or (key.rsplit("@", 1)[1] if "@" in key else None)
    return f"{kind}:{name}" + (f"@{fp}" if fp else "")


def _dataset_name(ds) -> str:
    if isinstance(ds, dict):
        return str(ds.get("location") or ds.get("key") or "?")
    return str(ds or "?")


def write_card(job: Job, result: dict, sweep_id: str, output_root: str) -> str | None:
    """Write README.md into the job's artifact folder (when it saved one inside the output root); its path."""
    from huggingface_hub import ModelCard, ModelCardData

    from workers.shared.files import inside

    artifact = result.get("artifact")
    if not artifact:
        return None
    folder = Path(inside(output_root, artifact))
    if not folder.is_dir():
        return None
    meta, body = card_text(job, result, source_info(job.model or {}, output_root), sweep_id)
    card = ModelCard(f"---\n{ModelCardData(**meta).to_yaml()}\n---\n{body}")
    path = folder / CARD
    card.save(str(path))
    return str(path)
