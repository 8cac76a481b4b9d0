"""Every option of every quantize method moves its artifact (issue 35): two values of one option, all else equal,
give different artifacts (weights or the artifact's own config), unless the registry declares the option as not
stored in the artifact (``Method.not_in_artifact``). ``act_order`` on llm-compressor was recorded in every row
and applied in none: this is the test that would have found it.

Jobs are expanded from a real spec (so defaults, schemes and calibration refs are qfarm's own) and run in this
process through the quantize worker (``workers.quantize.run``: quantize, store as deployed, check the artifact
against its row, load, evaluate) on a tiny random Llama. A variant whose artifact equals its baseline's fails,
naming the method and the option.
"""

from __future__ import annotations

import hashlib
import json
import typing
from pathlib import Path

import pytest

from tests.tiny import corpus_of, guanaco_rows, make_tiny_model

pytestmark = pytest.mark.integration

CAL = {"samples": 8, "seq_len": 32}

# (method, option) -> (options of the baseline, options of the variant): each differs from its baseline in that
# option only (a ``scheme`` fills in bits/symmetric: it is what it names). DATA / OTHER / ALT are filled in below.
PAIRS: dict[tuple[str, str], tuple[dict, dict]] = {
    ("rtn", "bits"): ({}, {"bits": 8}),
    ("rtn", "group_size"): ({}, {"group_size": 32}),
    ("rtn", "symmetric"): ({}, {"symmetric": False}),
    ("rtn", "scheme"): ({}, {"scheme": "W8A8", "group_size": -1}),
    ("gptq", "bits"): ({}, {"bits": 8}),
    ("gptq", "group_size"): ({}, {"group_size": 32}),
    ("gptq", "act_order"): ({}, {"act_order": False}),
    ("gptq", "symmetric"): ({}, {"symmetric": False}),
    ("gptq", "dampening_frac"): ({}, {"dampening_frac": 0.5}),
    ("gptq", "scheme"): ({}, {"scheme": "W4A16_ASYM"}),
    ("gptq", "smoothing_strength"): ({"scheme": "W8A8"}, {"scheme": "W8A8", "smoothing_strength": 0.3}),
    ("gptq", "backend"): ({}, {"backend": "gptqmodel"}),
    ("gptq", "calibration.dataset"): ({}, {"calibration": {"dataset": "OTHER"}}),
    ("gptq", "calibration.text_field"): ({}, {"calibration": {"text_field": "ALT"}}),
    ("gptq", "calibration.samples"): ({}, {"calibration": {"samples": 4}}),
    ("gptq", "calibration.seq_len"): ({}, {"calibration": {"seq_len": 16}}),
    ("gptq", "calibration.share"): ({}, {"calibration": {"share": True}}),
    ("awq", "bits"): ({}, {"bits": 8}),
    ("awq", "group_size"): ({}, {"group_size": 32}),
    ("awq", "symmetric"): ({}, {"symmetric": True}),
    ("awq", "duo_scaling"): ({}, {"duo_scaling": False}),
    ("awq", "n_grid"): ({}, {"n_grid": 3}),
    ("awq", "backend"): ({}, {"backend": "gptqmodel"}),
    ("awq", "calibration.dataset"): ({}, {"calibration": {"dataset": "OTHER"}}),
    ("awq", "calibration.text_field"): ({}, {"calibration": {"text_field": "ALT"}}),
    ("awq", "calibration.samples"): ({}, {"calibration": {"samples": 4}}),
    ("awq", "calibration.seq_len"): ({}, {"calibration": {"seq_len": 16}}),
    ("bnb-int8", "threshold"): ({}, {"threshold": 1.0}),
    ("bnb-nf4", "double_quant"): ({}, {"double_quant": True}),
    ("bnb-nf4", "compute_dtype"): ({}, {"compute_dtype": "bfloat16"}),
    ("bnb-fp4", "double_quant"): ({}, {"double_quant": True}),
    ("bnb-fp4", "compute_dtype"): ({}, {"compute_dtype": "bfloat16"}),
    ("gguf", "gguf_type"): ({}, {"gguf_type": "F16"}),
    ("gguf", "tensor_types"): ({}, {"tensor_types": ["ffn_down=Q8_0"]}),
    ("gguf", "imatrix"): ({}, {"imatrix": "im/imatrix.dat"}),  # written for the bundled model by the test
    ("rtn", "layer_rules"): ({}, {"layer_rules": ["mlp\\.down_proj$=8b g-1"]}),
    ("gptq", "layer_rules"): ({}, {"layer_rules": ["mlp\\.down_proj$=8b g-1"]}),
}


def _fields(model, prefix: str = "") -> list[str]:
    """An options model's option paths (one level of nested options, ``calibration.samples``), but ``method`` and
    those with a single allowed value (nothing to vary)."""
    from qfarm.sweep.methods import Options

    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        nested = [a for a in (typing.get_args(annotation) or (annotation,)) if isinstance(a, type) and issubclass(a, Options)]
        if name in ("method", "mixed"):  # mixed: a search's per-layer formats, tried in tests/e2e/test_search.py
            continue
        if nested:
            out += _fields(nested[0], f"{prefix}{name}.")
        elif typing.get_origin(annotation) is typing.Literal and len(typing.get_args(annotation)) == 1:
            continue
        else:
            out.append(prefix + name)
    return out


def test_every_option_of_every_artifact_method_is_tried_or_declared():
    """Pure bookkeeping, and the guard on new options: an option added to a method without a pair here (or a
    ``not_in_artifact`` declaration in the registry) fails this test."""
    from qfarm.sweep.methods import METHODS

    for name, method in METHODS.items():
        if not method.writes_artifact:
            continue
        for option in _fields(method.options):
            assert (name, option) in PAIRS or option in method.not_in_artifact, (
                f"method {name}: option {option} is neither tried here nor declared not_in_artifact in the registry")
    assert all(option in _fields(METHODS[name].options) for name, option in PAIRS), "a pair names no option"


@pytest.fixture(scope="module")
def farm(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("options")
    data = guanaco_rows(shared_data, tmp, 160)
    model = make_tiny_model(tmp / "tiny", corpus_of(data), seed=3)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    other = tmp / "other.jsonl"  # the same rows reversed, and a second text field: another calibration set
    other.write_text("\n".join(json.dumps({"text": r["text"]}) for r in reversed(rows)))
    alt = tmp / "alt.jsonl"
    alt.write_text("\n".join(json.dumps({"text": r["text"], "alt": r["text"][::-1]}) for r in rows))
    return {"tmp": tmp, "data": data, "model": model, "other": other, "alt": alt}


def _options_yaml(method: str, options: dict, farm: dict) -> str:
    cal = {"dataset": str(farm["alt"]), **CAL}
    options = json.loads(json.dumps(options).replace('"OTHER"', json.dumps(str(farm["other"]))).replace(
        '"ALT"', '"alt"'))
    if method in ("gptq", "awq"):
        options = {**options, "calibration": {**cal, **options.get("calibration", {})}}
    return json.dumps({"kind": "quantize", "method": method, **options})


def _expand(farm: dict, method: str, variants: list[dict]):
    from qfarm.sweep.expand import load_sweep

    spec = farm["tmp"] / f"{method}.yaml"
    # llama.cpp's converter knows no tiny word-level tokenizer: the gguf pair quantizes the bundled GGUF itself
    model = "bundled:smollm2-135m" if method == "gguf" else farm["model"]
    spec.write_text(f"name: options-{method}\nmodel: {model}\n"
                    f"eval: {{perplexity: {{dataset: {farm['data']}, seq_len: 32, max_windows: 1}}, "
                    f"speed: {{prompt_tokens: 4, new_tokens: 1, runs: 1}}}}\njobs:\n"
                    + "".join(f"  - {_options_yaml(method, v, farm)}\n" for v in variants))
    return load_sweep(spec)[1]


def _run(job, root: Path, cache, plan=None) -> dict:
    """The job run in this process by its kind's worker, as a worker actor runs it; a job that ``needs`` another
    (a shared capture, the reference) gets that one's artifact, as the scheduler gives it, when ``plan`` is given;
    without it the job computes the reference itself, as a job whose reference's files are gone does."""
    from qfarm.sweep.job import Job
    from workers.actor import JobContext, entry_point

    needs = {dep: _run(next(j for j in plan.jobs if j.id == dep), root, cache)["artifact"]
             for dep in (job.needs if plan is not None else ())}
    payload = {**job.payload(), "input": {"needs": needs} if needs else {}}
    ctx = JobContext(Job.from_payload(payload), "a1", "options", str(root / "sweep" / job.id), str(root), cache, 2, lambda line: None)
    return entry_point(job.worker, "worker")(ctx)


def _fingerprint(row: dict) -> str:
    """The artifact's content: every weight file's tensors and its quantization config (not its card or paths)."""
    folder = Path(row["artifact"])
    h = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.gguf")):
        h.update(file.read_bytes() if file.suffix == ".gguf" else _tensors(file))
    for name in ("config.json", "quantize_config.json"):
        if (folder / name).is_file():
            cfg = json.loads((folder / name).read_text())
            h.update(json.dumps(cfg.get("quantization_config", cfg) if name == "config.json" else cfg,
                                sort_keys=True).encode())
    return h.hexdigest()


def _tensors(file: Path) -> bytes:
    from safetensors.torch import load_file

    tensors = load_file(str(file))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.digest()


@pytest.mark.parametrize("method", sorted({m for m, _ in PAIRS}))
def test_each_option_gives_another_artifact(farm, method, tmp_path):
    from workers.shared.cache import Cache

    pairs = {option: pair for (m, option), pair in PAIRS.items() if m == method}
    entries = list({json.dumps(o, sort_keys=True): o for pair in pairs.values() for o in pair}.values())
    plan = _expand(farm, method, entries)
    by_group = {job.group: job for job in plan.jobs if job.kind == "quantize"}  # (a calibrate job shares a group)
    assert sorted(by_group) == list(range(len(entries))), "two entries made one job: a pair differs in nothing"
    cache, prints = Cache(), {}
    if method == "gguf":  # an importance matrix for the bundled model: uneven weights on every block matrix's columns
        import numpy as np

        from qfarm.sweep.sources import bundled_model_path
        from workers.quantize.gguf import file_tensors, write_imatrix

        _, _, matrices = file_tensors(str(bundled_model_path("smollm2-135m")))
        rng = np.random.default_rng(0)
        (tmp_path / "im").mkdir()
        write_imatrix(tmp_path / "im" / "imatrix.dat", {name: rng.gamma(0.5, size=v[1]).astype(np.float32)
                                                        for name, v in matrices.items() if name.startswith("blk.")},
                      1, "test")
    for group, job in sorted(by_group.items()):
        row = _run(job, tmp_path, cache, plan)
        assert row["artifact_config"], (method, job.label)  # every artifact says what it is
        prints[json.dumps(entries[group], sort_keys=True)] = _fingerprint(row)
    same = [option for option, (base, variant) in pairs.items()
            if prints[json.dumps(base, sort_keys=True)] == prints[json.dumps(variant, sort_keys=True)]]
    assert not same, f"method {method}: these options left the artifact as it was: {same}"


@pytest.mark.parametrize("method,option,planted", [
    ("gptq", "act_order", ("workers.quantize.llmc", "actorder", lambda options: None)),
    ("bnb-nf4", "double_quant", ("workers.quantize.bnb", "config", None)),
])
def test_a_worker_that_drops_an_option_fails_its_job_naming_it(farm, tmp_path, monkeypatch, method, option, planted):
    """A planted bug (the worker ignores one option) is caught by the artifact check before anything is published:
    the job fails, naming the option and what the checkpoint says instead."""
    import importlib

    from qfarm.errors import Permanent
    from workers.shared.cache import Cache

    module, name, replacement = planted
    module = importlib.import_module(module)
    if replacement is None:  # bitsandbytes' config built from the options with the planted one at its default
        real = module.config
        replacement = lambda opts: real(opts.model_copy(update={option: type(opts).model_fields[option].default}))  # noqa: E731
    monkeypatch.setattr(module, name, replacement)
    value = {"act_order": True, "double_quant": True}[option]
    (job,) = [j for j in _expand(farm, method, [{option: value}]).spec_jobs if j.kind == "quantize"]
    with pytest.raises(Permanent) as failed:
        _run(job, tmp_path, Cache())
    said = str(failed.value)
    assert f"the row says {option} true" in said, said
    assert {"act_order": "the checkpoint says actorder null", "double_quant": "bnb_4bit_use_double_quant false"}[option] in said


@pytest.mark.parametrize("method", ["rtn", "bnb-nf4"])
def test_an_artifact_is_stored_as_its_source_whatever_the_job_computed_in(farm, tmp_path, monkeypatch, method):
    """A tied bfloat16 Qwen2 (another family than the Llama above): the 4-bit artifact made computing in float32
    (a CPU) and the one made computing in bfloat16 (a GPU) store their unquantized tensors in the source's bfloat16,
    within 5 % of each other in size, with the tied embedding stored once and the config still tying it."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import workers.shared.models
    from workers.shared.cache import Cache

    source = make_tiny_model(tmp_path / "qwen2", corpus_of(farm["data"]), seed=4, family="qwen2")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, tie_word_embeddings=True)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(source)  # as checkpoints ship: bfloat16, one embedding matrix
    farm = {**farm, "model": source}
    (job,) = [j for j in _expand(farm, method, [{}]).spec_jobs if j.kind == "quantize"]
    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        monkeypatch.setattr(workers.shared.models, "compute_dtype", lambda path, d=dtype: d)
        rows[dtype] = _run(job, tmp_path / str(dtype), Cache())
    cpu, gpu = rows[torch.float32], rows[torch.bfloat16]
    assert cpu["stored_dtype"] == gpu["stored_dtype"] == "bfloat16", (cpu["stored_dtype"], gpu["stored_dtype"])
    assert abs(cpu["size_mb"] / gpu["size_mb"] - 1) < 0.05, (cpu["size_mb"], gpu["size_mb"])
    for row in (cpu, gpu):
        folder = Path(row["artifact"])
        names = [k for f in folder.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]
        assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names, names
        assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
        assert row["artifact_params"] == sum(p.numel() for p in model.parameters())  # tied: counted once


def test_a_gguf_without_an_output_tensor_gives_a_float_copy_that_stores_its_embedding_once(farm, tmp_path):
    """llama.cpp ties a model's head to its embedding by leaving output.weight out of the file; transformers' GGUF
    loader gives some families (Qwen2) an untied copy. The float copy made from such a file ties them again, so
    every artifact made from it stores one matrix (workers.shared.models.tie_embeddings)."""
    import numpy as np
    import torch
    from gguf import GGUFWriter
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from workers.shared.models import _has_output_weight, tie_embeddings

    for name, tensors in (("tied", ["token_embd.weight"]), ("untied", ["token_embd.weight", "output.weight"])):
        writer = GGUFWriter(str(tmp_path / f"{name}.gguf"), "qwen2")
        for t in tensors:
            writer.add_tensor(t, np.zeros((4, 8), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    assert not _has_output_weight(str(tmp_path / "tied.gguf")) and _has_output_weight(str(tmp_path / "untied.gguf"))

    folder = make_tiny_model(tmp_path / "qwen2", corpus_of(farm["data"]), seed=1, family="qwen2")  # untied
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    head = model.get_output_embeddings().weight.detach().clone()
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    tie_embeddings(model)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert not torch.equal(head, model.get_output_embeddings().weight)  # the head is now the embedding itself
    model.save_pretrained(tmp_path / "copy")
    names = [k for f in (tmp_path / "copy").glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "copy")
    assert again.config.tie_word_embeddings and again.get_output_embeddings().weight is again.get_input_embeddings().weight


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_layer_rules_on_gptqmodel_are_its_per_module_overrides_and_the_artifact_holds_them(farm, tmp_path, family):
    """``layer_rules`` with backend gptqmodel: GPTQModel's ``dynamic`` overrides (one per layer off the job's own
    format), read back from the artifact layer by layer (the row's ``layer_formats``), and the layers' stored bits
    (qweight, qzeros, float16 scales, g_idx: what the row measures) as the search prices the GPTQ layout; on a Llama
    and on a Qwen2 (biased q/k/v projections, stored apart)."""
    from qfarm.sweep.search import Format
    from workers.quantize.artifacts import safetensors_sizes
    from workers.shared.cache import Cache

    if family != "llama":
        farm = {**farm, "model": make_tiny_model(tmp_path / family, corpus_of(farm["data"]), seed=4, family=family)}

    rules = ["mlp\\.down_proj$=8b g-1", "layers\\.0\\.self_attn=3b g32"]
    plan = _expand(farm, "gptq", [{"backend": "gptqmodel"}, {"backend": "gptqmodel", "layer_rules": rules}])
    jobs = sorted((j for j in plan.jobs if j.kind == "quantize" and j.method == "gptq"), key=lambda j: j.group)
    cache = Cache()
    plain, ruled = (_run(job, tmp_path / str(job.group), cache) for job in jobs)
    assert _fingerprint(plain) != _fingerprint(ruled)
    for row in (plain, ruled):  # sane numbers from GPTQModel's own loader (the mix on its torch kernel)
        assert 0 <= row["kl_div"] < 0.5 and 1 < row["perplexity"] < 1e4, (family, row["kl_div"], row["perplexity"])
    formats = ruled["layer_formats"]
    assert {f for name, f in formats.items() if name.endswith("mlp.down_proj")} == {"8b g-1"}
    assert {f for name, f in formats.items() if ".layers.0.self_attn." in name} == {"3b g32"}
    assert {f for name, f in formats.items() if "down_proj" not in name and ".layers.0.self_attn." not in name} \
        == {"4b g64"} == set(plain["layer_formats"].values())
    dynamic = json.loads((Path(ruled["artifact"]) / "quantize_config.json").read_text())["dynamic"]
    assert len(dynamic) == sum(1 for f in formats.values() if f != "4b g64")
    # the stored bits of every quantized layer, as the search's GPTQ layout prices them
    sizes = safetensors_sizes(ruled["artifact"])
    for name, fmt in formats.items():
        stored = sum(v for k, v in sizes.items() if k.startswith(name + ".") and not k.endswith(".bias")) * 8
        n_in = sizes[name + ".g_idx"] // 4
        n_out = sizes[name + ".scales"] // 2 // (1 if Format(fmt).group == -1 else n_in // Format(fmt).group)
        assert stored == Format(fmt, "gptq").layer_bits(n_in, n_out), (name, fmt)
