"""GPTQ / AWQ / RTN options: validation messages at validate time, calibration data, model shape reading.

Pure logic: no services, no ML imports (the model shape comes from the GGUF header or config.json).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from qfarm.sweep.expand import load_sweep
from qfarm.sweep.modelinfo import gguf_metadata, shape_of
from tests.unit.test_spec import problems, write

HEAD = """\
    name: s
    model: bundled:smollm2-135m
    jobs:
"""


def test_group_size_that_does_not_divide_576_is_refused_with_the_layers_and_the_fix(tmp_path):
    path = write(tmp_path, HEAD + """\
      - kind: quantize
        calibration: {samples: 8, seq_len: 128}
        matrix: {method: [gptq], bits: [4], group_size: [64, 128]}
    """)
    (msg,) = problems(path)
    assert msg.startswith(f"{path}:6: jobs[0].matrix.group_size[1]: method gptq: group_size 128 does not divide")
    assert "180 of 210 Linear layers of bundled:smollm2-135m" in msg
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj (576 inputs), in each of its 30 blocks" in msg
    assert "down_proj" not in msg  # 1536 inputs: 128 divides it
    assert "Group sizes that divide every layer: 16, 32, 64, -1 (one scale per output channel)" in msg
    assert 'add to exclude: {"method": "gptq", "group_size": 128}' in msg


def test_group_size_checked_for_rtn_and_awq_too_and_per_channel_always_fits(tmp_path):
    path = write(tmp_path, HEAD + """\
      - {kind: quantize, method: rtn, group_size: 256}
      - {kind: quantize, method: awq, group_size: -1}
    """)
    (msg,) = problems(path)
    assert msg.startswith(f"{path}:4: jobs[0].group_size: method rtn: group_size 256 does not divide")
    assert "down_proj" not in msg and "exclude" not in msg  # 1536 = 6 * 256; a fixed option has no exclude fix


@pytest.mark.parametrize("method,bits,allowed", [("gptq", 5, "2, 3, 4 or 8"), ("awq", 2, "3, 4 or 8"), ("rtn", 16, "2, 3, 4 or 8")])
def test_bits_a_method_does_not_support(tmp_path, method, bits, allowed):
    path = write(tmp_path, HEAD + f"      - {{kind: quantize, method: {method}, bits: {bits}}}\n")
    (msg,) = problems(path)
    assert msg == f"{path}:4: jobs[0].bits: method {method}: bits: {bits} is not allowed. Allowed: {allowed}"


def test_group_size_must_be_a_power_of_two_or_minus_one(tmp_path):
    path = write(tmp_path, HEAD + "      - {kind: quantize, method: gptq, group_size: 100}\n")
    (msg,) = problems(path)
    assert "jobs[0].group_size: method gptq: group_size: must be -1 (one scale per output channel) or a power of two" in msg


def test_act_order_is_a_gptq_option_only(tmp_path):
    path = write(tmp_path, HEAD + """\
      - kind: quantize
        matrix: {method: [gptq, awq], act_order: [true]}
      - {kind: quantize, method: gptq, act_order: maybe}
    """)
    msgs = problems(path)
    assert any("jobs[0].matrix.act_order[0]: option 'act_order' does not apply to method awq" in m
               and "Its options: backend, bits, group_size, symmetric, duo_scaling, n_grid, calibration" in m for m in msgs)
    assert any("jobs[1].act_order: method gptq: act_order: input should be a valid boolean" in m for m in msgs)
    assert len(msgs) == 2


def test_calibration_errors_name_the_nested_key_and_the_file(tmp_path):
    path = write(tmp_path, HEAD + """\
      - kind: quantize
        method: gptq
        calibration: {dataset: missing.jsonl, samples: 0, sample: 3}
    """)
    msgs = problems(path)
    assert any(m.startswith(f"{path}:6: jobs[0].calibration.samples: method gptq: calibration.samples: input should be greater") for m in msgs)
    assert any("jobs[0].calibration.sample: method gptq: calibration.sample: unknown key 'sample'. Did you mean 'samples'?" in m for m in msgs)
    assert len(msgs) == 2  # the dataset is checked once the options themselves are valid

    path = write(tmp_path, HEAD + "      - {kind: quantize, method: awq, calibration: {dataset: missing.jsonl}}\n")
    (msg,) = problems(path)
    assert f"jobs[0].calibration.dataset: dataset 'missing.jsonl': no such file ({tmp_path / 'missing.jsonl'})" in msg


def test_calibration_applies_to_the_calibrating_methods_of_a_group(tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text("some text " * 100)
    path = write(tmp_path, HEAD + """\
      - kind: quantize
        calibration: {dataset: calib.txt, samples: 16, seq_len: 256}
        matrix: {method: [rtn, gptq, awq, bnb-nf4], bits: [4]}
        exclude: [{method: bnb-nf4, bits: 4}]
      - {kind: quantize, method: bnb-nf4}
    """)
    _, plan = load_sweep(path)
    jobs = {j.options["method"]: j for j in plan.spec_jobs}
    assert sorted(jobs) == ["awq", "bnb-nf4", "gptq", "rtn"]
    assert jobs["rtn"].calibration is None and "calibration" not in jobs["rtn"].options
    for m in ("gptq", "awq"):
        cal = jobs[m].payload()["calibration"]
        from qfarm.sweep.sources import fingerprint

        key = f"text:{data}@{fingerprint(data)}"  # the file, and what it holds
        assert cal == {"kind": "text", "location": str(data), "text_field": "text", "key": key,
                       "samples": 16, "seq_len": 256}
        # the job's identity names the data itself, not how the spec spelled its path
        assert jobs[m].options["calibration"]["dataset"] == key

    # one method alone in a group: a calibration it cannot use is a mistake, said so
    path = write(tmp_path, HEAD + "      - {kind: quantize, method: rtn, calibration: {samples: 8}}\n")
    (msg,) = problems(path)
    assert "jobs[0].calibration: option 'calibration' does not apply to method rtn" in msg


def test_calibration_size_changes_the_job_id_and_labels_show_varied_options(tmp_path):
    spec = HEAD + """\
      - kind: quantize
        calibration: {samples: %d}
        matrix: {method: [gptq], group_size: [32, 64], act_order: [false, true]}
    """
    _, a = load_sweep(write(tmp_path, spec % 8, "a.yaml"))
    _, b = load_sweep(write(tmp_path, spec % 16, "b.yaml"))
    assert len(a.spec_jobs) == 4 and not {j.id for j in a.spec_jobs} & {j.id for j in b.spec_jobs}
    assert [j.label for j in a.spec_jobs] == ["gptq g=32 act_order=false", "gptq g=32 act_order=true",
                                              "gptq g=64 act_order=false", "gptq g=64 act_order=true"]
    assert a.spec_jobs[0].options["calibration"] == {"dataset": "bundled:python-docs", "text_field": "text",
                                                "samples": 8, "seq_len": 512, "share": False}


def test_gptq_jobs_that_share_calibration_need_one_capture_per_model_and_data(tmp_path):
    from qfarm.farm.eta import ranks
    from qfarm.farm.store import JobRecord

    spec = HEAD + """\
      - kind: quantize
        method: gptq
        calibration: {samples: 8, share: true}
        matrix: {bits: [4, 8], group_size: [32, 64]}
      - {kind: quantize, method: gptq, calibration: {samples: 16, share: true}}
      - {kind: quantize, method: gptq, calibration: {samples: 8}}
      - {kind: quantize, method: awq, calibration: {samples: 8}}
    """
    _, plan = load_sweep(write(tmp_path, spec))
    captures = [j for j in plan.jobs if j.kind == "calibrate"]
    assert len(captures) == 2  # one per calibration set; none for the unshared GPTQ job nor for AWQ
    by_samples = {c.options["calibration"]["samples"]: c for c in captures}
    assert by_samples[8].options == {"capture": "hessian", "calibration": {
        "dataset": "bundled:python-docs", "text_field": "text", "samples": 8, "seq_len": 512}}
    assert by_samples[8].eval is None and by_samples[8].worker == "workers.quantize.calibrate:run"
    gptq = [j for j in plan.jobs if j.options.get("method") == "gptq"]
    (reference,) = plan.implicit  # every job of the sweep is measured against one reference, made for them
    assert all(j.needs[-1] == reference for j in gptq)
    needs = {j.id: j.needs[:-1] for j in gptq}
    assert sorted(n for n in needs.values()) == sorted([(by_samples[8].id,)] * 4 + [(by_samples[16].id,), ()])
    order = [j.id for j in plan.jobs]
    assert all(order.index(n) < order.index(i) for i, ns in needs.items() for n in ns)  # captures come first
    assert all(j.payload()["needs"] == list(j.needs) for j in plan.jobs)
    # the capture's id does not move with the options it does not capture for, nor with the evaluation
    with_eval = HEAD.replace("    jobs:\n", "    eval: {perplexity: {dataset: bundled:python-docs, max_windows: 3}}\n    jobs:\n")
    _, other = load_sweep(write(tmp_path, with_eval + """\
      - {kind: quantize, method: gptq, bits: 3, calibration: {samples: 8, share: true}}
    """, "other.yaml"))
    assert [j.id for j in other.jobs if j.kind == "calibrate"] == [by_samples[8].id]
    # the capture is dispatched before every job that needs it: its rank holds theirs
    records = [JobRecord(id=j.id, status="queued", spec=j.payload()) for j in plan.jobs]
    r = ranks(records)
    assert all(r[by_samples[8].id] > r[i] for i, ns in needs.items() if ns == (by_samples[8].id,))
    # a spec may not name the internal kind
    (msg,) = problems(write(tmp_path, HEAD + "      - {kind: calibrate}\n", "bad.yaml"))
    assert "unknown job kind 'calibrate'" in msg


# --- reading a model's shape without ML libraries -------------------------------------------------


def _gguf(path: Path, kv: dict) -> Path:
    def s(text: str) -> bytes:
        b = text.encode()
        return struct.pack("<Q", len(b)) + b

    body = b""
    for key, value in kv.items():
        if isinstance(value, str):
            body += s(key) + struct.pack("<I", 8) + s(value)
        elif isinstance(value, list):  # array of strings, skipped by the reader
            body += s(key) + struct.pack("<IIQ", 9, 8, len(value)) + b"".join(s(v) for v in value)
        else:
            body += s(key) + struct.pack("<II", 4, value)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + body)
    return path


def test_gguf_header_gives_the_linear_input_sizes(tmp_path):
    f = _gguf(tmp_path / "m.gguf", {"general.architecture": "llama", "tokenizer.ggml.tokens": ["a", "bb"],
                                    "llama.embedding_length": 768, "llama.feed_forward_length": 2048,
                                    "llama.attention.head_count": 12, "llama.block_count": 4})
    assert gguf_metadata(f)["llama.embedding_length"] == 768 and "tokenizer.ggml.tokens" not in gguf_metadata(f)
    shape = shape_of({"kind": "gguf", "location": str(tmp_path), "gguf_file": "m.gguf"})
    assert shape.layers == 4 and shape.inputs["self_attn.q_proj"] == 768 and shape.inputs["mlp.down_proj"] == 2048
    assert shape.not_divisible(512) == {k: 768 for k in shape.inputs if k != "mlp.down_proj"}
    assert shape.dividing_group_sizes() == [16, 32, 64, 128, 256]


def test_unreadable_shapes_skip_the_check_instead_of_failing(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    assert shape_of({"kind": "gguf", "location": str(tmp_path), "gguf_file": "bad.gguf"}) is None
    assert shape_of({"kind": "hub", "location": "org/name"}) is None
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 96, "intermediate_size": 256,
                                                      "num_attention_heads": 4, "num_hidden_layers": 2}))
    shape = shape_of({"kind": "hf_dir", "location": str(tmp_path)})
    assert shape.inputs["self_attn.o_proj"] == 96 and shape.dividing_group_sizes() == [16, 32]

    # a local HF folder goes through the same check in a spec
    path = write(tmp_path, f"""\
    name: s
    model: {tmp_path}
    jobs:
      - {{kind: quantize, method: rtn, group_size: 64}}
    """)
    (msg,) = problems(path)
    assert "group_size 64 does not divide the input size of 12 of 14 Linear layers" in msg


def test_hub_calibration_datasets_are_named_with_config_and_split(tmp_path):
    path = write(tmp_path, HEAD + """\
      - kind: quantize
        calibration: {dataset: "hub:Salesforce/wikitext:wikitext-2-raw-v1@train", samples: 8}
        matrix: {method: [gptq, awq]}
      - {kind: quantize, method: gptq, calibration: {dataset: "hub:allenai/c4"}}
      - {kind: quantize, method: gptq, calibration: {dataset: "hub:not a name"}}
    """)
    (msg,) = problems(path)
    assert msg == (f"{path}:8: jobs[2].calibration.dataset: dataset 'hub:not a name': a hub dataset is "
                   "hub:ORG/NAME[:CONFIG][@SPLIT], e.g. hub:Salesforce/wikitext:wikitext-2-raw-v1@test")
    _, plan = load_sweep(write(tmp_path, HEAD + """\
      - kind: quantize
        calibration: {dataset: "hub:Salesforce/wikitext:wikitext-2-raw-v1@train", samples: 8}
        matrix: {method: [gptq, awq]}
      - {kind: quantize, method: gptq, calibration: {dataset: "hub:allenai/c4", text_field: body}}
    """))
    cals = [j.calibration for j in plan.spec_jobs]
    assert cals[0]["kind"] == "hub" and cals[0]["location"] == "Salesforce/wikitext:wikitext-2-raw-v1@train"
    assert cals[2]["location"] == "allenai/c4@train" and cals[2]["key"] == "hub:allenai/c4@train[body]"


def test_gguf_types_are_checked_with_a_did_you_mean_and_label_the_jobs(tmp_path):
    path = write(tmp_path, HEAD + """\
      - kind: quantize
        matrix: {method: [gguf], gguf_type: [Q8_0, q4_k_m, Q4_K_X]}
    """)
    first, second = problems(path)
    assert "jobs[0].matrix.gguf_type[1]: method gguf: gguf_type: 'q4_k_m' is not a llama.cpp file type. Did you mean 'Q4_K_M'?" in first
    assert "jobs[0].matrix.gguf_type[2]" in second and "Did you mean 'Q4_K_S'?" in second
    assert "Allowed: F32, F16, BF16, Q8_0, Q6_K, Q5_K_M" in second
    _, plan = load_sweep(write(tmp_path, HEAD + "      - {kind: quantize, matrix: {method: [gguf], gguf_type: [F16, Q4_K_M]}}\n"))
    assert [j.label for j in plan.spec_jobs] == ["gguf F16", "gguf Q4_K_M"]
    _, plan = load_sweep(write(tmp_path, HEAD + "      - {kind: quantize, method: gguf}\n"))
    assert plan.spec_jobs[0].options == {"method": "gguf", "gguf_type": "Q4_K_M"}


def test_a_resumable_checkpoint_takes_the_layers_smoothed_at_that_epoch_end_wherever_they_lie():
    """What ``workers.quantize.llmc._smoothed_now`` adds to a subgraph's checkpoint: the smooth and balance layers of the AWQ
    and SmoothQuant mappings whose activations are cached (about to be smoothed), not those of mappings done or still
    to come, and nothing from a modifier without mappings (GPTQ, the quantization modifier)."""
    from types import SimpleNamespace as NS

    from workers.quantize.llmc import _smoothed_now

    def mapping(smooth):
        return NS(smooth_name=smooth, smooth_layer=f"{smooth}.norm", balance_layers=[f"{smooth}.q", f"{smooth}.k"])

    awq = NS(_resolved_mappings=[mapping("l0"), mapping("l1"), mapping("l2")],
             _smooth_activation_stats={"l1": [0, 1], "l2": [0, 1]})
    session = NS(lifecycle=NS(recipe=NS(modifiers=[NS(), awq, NS(_resolved_mappings=None)])))
    assert _smoothed_now(session) == ["l1.norm", "l1.q", "l1.k", "l2.norm", "l2.q", "l2.k"]
    awq._smooth_activation_stats.clear()
    assert _smoothed_now(session) == []
    smoothquant = NS(resolved_mappings_=[mapping("s0"), mapping("s1")], scales_={"s0": object()})
    session.lifecycle.recipe.modifiers.append(smoothquant)
    assert _smoothed_now(session) == ["s0.norm", "s0.q", "s0.k"]


def test_a_scheme_fills_in_bits_and_scales_and_what_contradicts_it_is_refused_where_it_is_written(tmp_path):
    path = write(tmp_path, HEAD + """\
      - {kind: quantize, method: none}
      - kind: quantize
        calibration: {samples: 8, seq_len: 128}
        matrix: {method: [gptq], scheme: [W8A8, W4A16_ASYM, null]}
      - {kind: quantize, method: rtn, scheme: FP8_DYNAMIC}
    """)
    _, plan = load_sweep(path)
    by = {j.label: j.options for j in plan.jobs}
    assert by["gptq W8A8"]["bits"] == 8 and by["gptq W8A8"]["group_size"] == -1 and by["gptq W8A8"]["symmetric"]
    assert by["gptq W4A16_ASYM g=64"]["bits"] == 4 and by["gptq W4A16_ASYM g=64"]["group_size"] == 64
    assert by["gptq W4A16_ASYM g=64"]["symmetric"] is False
    assert "scheme" not in by["gptq 4b g=64 symmetric=true"]  # unset: not in the options, nor in the job's id
    assert by["rtn FP8_DYNAMIC"]["scheme"] == "FP8_DYNAMIC" and by["rtn FP8_DYNAMIC"]["bits"] == 8

    bad = write(tmp_path, HEAD + """\
      - {kind: quantize, method: gptq, scheme: W8A8, bits: 4}
      - {kind: quantize, method: gptq, scheme: W8A8, group_size: 64}
      - {kind: quantize, method: gptq, scheme: FP8_DYNAMIC}
      - {kind: quantize, method: gptq, scheme: W8A8, calibration: {share: true}}
      - {kind: quantize, method: gptq, smoothing_strength: 0.5}
      - {kind: quantize, method: awq, scheme: W8A8}
    """, name="bad.yaml")
    msgs = problems(bad)
    assert f"{bad}:4: jobs[0].bits: method gptq: bits: scheme W8A8 sets bits to 8: leave bits out, or drop the " \
           "scheme (got 4)" in msgs
    assert any(m.startswith(f"{bad}:5: jobs[1].group_size:") and "one scale per output channel" in m for m in msgs)
    assert any(m.startswith(f"{bad}:6: jobs[2].scheme:") and "'FP8_DYNAMIC' is not allowed. Allowed: 'W4A16', 'W4A16_ASYM', 'W8A16' or 'W8A8'" in m
               for m in msgs)
    assert any(m.startswith(f"{bad}:7: jobs[3].calibration:") and "set share: false" in m for m in msgs)
    assert any(m.startswith(f"{bad}:8: jobs[4].smoothing_strength:") and "scheme: W8A8 only" in m for m in msgs)
    assert any(m.startswith(f"{bad}:9: jobs[5].scheme: option 'scheme' does not apply to method awq") for m in msgs)
    assert len(msgs) == 6


def test_a_backend_picks_the_implementation_keeps_old_ids_and_refuses_what_gptqmodel_cannot_do(tmp_path):
    plain = write(tmp_path, HEAD + """\
      - {kind: quantize, method: gptq}
    """, name="plain.yaml")
    _, before = load_sweep(plain)
    path = write(tmp_path, HEAD + """\
      - {kind: quantize, method: gptq}
      - kind: quantize
        method: gptq
        matrix: {backend: [llm-compressor, gptqmodel]}
      - {kind: quantize, method: awq, backend: gptqmodel}
    """)
    _, plan = load_sweep(path)
    by = {j.label: j for j in plan.spec_jobs}
    # a backend written in the spec is in the label (as a scheme is): unset, the label is the method's alone
    assert set(by) == {"gptq", "gptq llm-compressor", "gptq gptqmodel", "awq gptqmodel"}, set(by)
    assert by["gptq gptqmodel"].impl == by["awq gptqmodel"].impl == "workers.quantize.gptqmodel:GPTQModelBackend"
    assert by["gptq llm-compressor"].impl == by["gptq"].impl == "workers.quantize.llmc:LLMCompressor"
    # backend unset: the job id it had before the option existed (a resubmit reruns nothing)
    assert by["gptq"].id == before.spec_jobs[0].id and "backend" not in by["gptq"].options
    assert by["gptq llm-compressor"].id != by["gptq"].id  # said explicitly: another job (the label differs too)

    bad = write(tmp_path, HEAD + """\
      - {kind: quantize, method: gptq, backend: gptqmodel, scheme: W8A8}
      - {kind: quantize, method: awq, backend: gptqmodel, duo_scaling: false}
      - {kind: quantize, method: gptq, backend: gptqmodel, calibration: {share: true}}
      - {kind: quantize, method: gptq, backend: autogptq}
      - {kind: quantize, method: bnb-nf4, backend: gptqmodel}
      - {name: q, kind: quantize, method: gptq}
      - {kind: train, from: q, method: lora, dataset: {path: bundled:python-docs}}
      - {name: g, kind: quantize, method: gptq, backend: gptqmodel}
      - {kind: train, from: g, method: qlora, dataset: {path: bundled:python-docs}}
    """, name="bad.yaml")
    msgs = problems(bad)
    assert any(m.startswith(f"{bad}:4: jobs[0].backend:") and "quantizes weights only: scheme W8A8" in m for m in msgs)
    assert any(m.startswith(f"{bad}:5: jobs[1].duo_scaling:") and "llm-compressor's AWQ option" in m for m in msgs)
    assert any(m.startswith(f"{bad}:6: jobs[2].calibration:") and "set share: false" in m for m in msgs)
    assert any(m.startswith(f"{bad}:7: jobs[3].backend:") and "Allowed: 'llm-compressor' or 'gptqmodel'" in m
               for m in msgs)
    assert any(m.startswith(f"{bad}:8: jobs[4].backend: option 'backend' does not apply to method bnb-nf4") for m in msgs)
    assert any(m.startswith(f"{bad}:10: jobs[6].from:") and "not gptq (backend llm-compressor)" in m for m in msgs)
    assert any(m.startswith(f"{bad}:12: jobs[8].method:") and "only lora trains on a quantized stage" in m for m in msgs)
    assert len(msgs) == 7, msgs
