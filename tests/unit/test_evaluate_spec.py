"""``kind: evaluate``'s spec: the checkpoint resolves by the rules of ``model:`` and is refused where it is written
(missing, the sweep's model itself); a checkpoint is named by its content in the job id; what a checkpoint's
quantization_config says of its bits."""

from __future__ import annotations

import shutil

from qfarm.sweep.expand import load_sweep
from tests.unit.test_spec import problems, write

HEAD = """\
    name: s
    model: bundled:smollm2-135m
    jobs:
      - {kind: quantize, method: none}
"""


def _folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    return path


def test_a_checkpoint_is_resolved_like_a_model_and_refused_where_it_is_written(tmp_path):
    _folder(tmp_path / "pub" / "gptq-4bit")
    path = write(tmp_path, HEAD + """\
      - {kind: evaluate, checkpoint: pub/gptq-4bit}
    """)
    _, plan = load_sweep(path)
    (job,) = [j for j in plan.jobs if j.kind == "evaluate"]
    assert job.label == "evaluate gptq-4bit" and job.options == {"checkpoint": "pub/gptq-4bit"}
    assert job.data["kind"] == "hf_dir" and job.data["location"] == str(tmp_path / "pub" / "gptq-4bit")

    bad = write(tmp_path, HEAD + """\
      - {kind: evaluate, checkpoint: ./nope}
      - {kind: evaluate, checkpoint: bundled:smollm2-135m}
      - {kind: evaluate}
      - {kind: evaluate, checkpoint: pub/gptq-4bit, bits: 4}
    """, name="bad.yaml")
    msgs = problems(bad)
    assert any(m.startswith(f"{bad}:5: jobs[1].checkpoint: checkpoint './nope' is not a bundled model") and
               "an existing .gguf file or model folder" in m for m in msgs), msgs
    assert f"{bad}:6: jobs[2].checkpoint: checkpoint 'bundled:smollm2-135m' is the sweep's model itself: the " \
           "reference row (quantize, method: none) already evaluates it" in msgs
    assert f"{bad}:7: jobs[3]: kind evaluate: checkpoint: required, but missing" in msgs
    assert any(m.startswith(f"{bad}:8: jobs[4].bits: option 'bits' does not apply to kind evaluate") for m in msgs)
    assert len(msgs) == 4


def test_a_checkpoint_is_named_by_its_content_so_another_one_at_the_same_path_is_another_job(tmp_path):
    folder = _folder(tmp_path / "pub")
    path = write(tmp_path, HEAD + "      - {kind: evaluate, checkpoint: pub}\n")
    before = {j.id for j in load_sweep(path)[1].jobs if j.kind == "evaluate"}
    assert before == {j.id for j in load_sweep(path)[1].jobs if j.kind == "evaluate"}  # stable
    shutil.rmtree(folder)
    _folder(folder)
    (folder / "model.safetensors").write_bytes(b"other weights")
    after = {j.id for j in load_sweep(path)[1].jobs if j.kind == "evaluate"}
    assert after and after != before


def test_the_bits_a_checkpoint_declares():
    from workers.evaluate.checkpoint import _hf_bits

    assert _hf_bits(None) is None
    assert _hf_bits({"quant_method": "bitsandbytes", "load_in_4bit": True}) == 4
    assert _hf_bits({"quant_method": "bitsandbytes", "load_in_8bit": True}) == 8
    assert _hf_bits({"quant_method": "gptq", "bits": 3}) == 3
    assert _hf_bits({"quant_method": "compressed-tensors",
                     "config_groups": {"group_0": {"weights": {"num_bits": 8}, "input_activations": {}}}}) == 8
    assert _hf_bits({"quant_method": "compressed-tensors", "config_groups": {
        "a": {"weights": {"num_bits": 4}}, "b": {"weights": {"num_bits": 8}}}}) is None  # mixed: not one number
