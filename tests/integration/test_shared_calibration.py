"""Shared and resumable GPTQ (issue 20), in one process on a tiny random Llama: a capture of each layer's Hessians
solved by llm-compressor's own GPTQ gives the weights llm-compressor's one-shot GPTQ gives with float activations
(``propagate_error=False``), not those of its sequential mode; a solve whose earlier attempt had solved some layers
loads those and solves only the rest, to the same weights; qfarm's checkpointing sequential pipeline gives the
weights of llm-compressor's own, for GPTQ and for AWQ, and a retry of it replays the solved layers to the same
weights (AWQ's smoothed norms included)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qfarm.sweep.methods import AwqOptions, GptqOptions
from tests.tiny import corpus_of, guanaco_rows, make_tiny_model

pytestmark = pytest.mark.integration

OPTIONS = GptqOptions(method="gptq", bits=4, group_size=32, symmetric=True, dampening_frac=0.01)


def _quantized(model) -> dict:
    return {f"{name}.{attr}": getattr(m, attr).detach().clone() for name, m in model.named_modules()
            for attr in ("weight", "weight_scale", "weight_zero_point") if hasattr(m, "weight_scale")}


@pytest.fixture(scope="module")
def tiny(shared_data, tmp_path_factory):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("shared")
    data = guanaco_rows(shared_data, tmp, 120)
    folder = make_tiny_model(tmp / "tiny", corpus_of(data), seed=5)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(" ".join(corpus_of(data, 200)), return_tensors="pt").input_ids[0]
    windows = ids[: 8 * 32].reshape(8, 32)
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    return SimpleNamespace(folder=str(folder), data=dataset, tmp=tmp)


def _ctx(said: list | None = None):
    return SimpleNamespace(progress=(said.append if said is not None else (lambda line: None)),
                           job=SimpleNamespace(calibration={"seq_len": 32}))


def _fresh(tiny):
    from workers.shared.models import load_float

    return load_float(tiny.folder, host=True)[0]


def _params(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _oneshot(tiny, propagate_error: bool, options=OPTIONS):
    """llm-compressor's own one-shot of the tiny model, its sequential pipeline as shipped; the model."""
    from llmcompressor import oneshot

    from workers.quantize.llmc import recipe

    model = _fresh(tiny)
    oneshot(model=model, recipe=recipe(options), dataset=tiny.data, num_calibration_samples=len(tiny.data),
            max_seq_length=32, shuffle_calibration_samples=False, propagate_error=propagate_error)
    return model


def _oneshot_gptq(tiny, propagate_error: bool) -> dict:
    return _quantized(_oneshot(tiny, propagate_error))


def test_a_capture_solved_per_job_equals_llm_compressors_gptq_on_float_activations(tiny):
    from workers.quantize.llmc import capture_hessians, solve_shared

    capture = tiny.tmp / "capture"
    layers = capture_hessians(_ctx(), _fresh(tiny), tiny.data, capture)
    assert layers == 2 and len(list(capture.glob("layer_*.safetensors"))) == 2

    said: list[str] = []
    shared = _fresh(tiny)
    assert solve_shared(_ctx(said), shared, OPTIONS, str(capture), tiny.tmp / "solved") == 0
    assert said[-1].endswith("layer 2/2")
    mine = _quantized(shared)
    assert len(mine) == 2 * 7 * 3  # 7 Linear a layer, lm_head left in float

    float_acts, sequential = _oneshot_gptq(tiny, False), _oneshot_gptq(tiny, True)
    for key, value in mine.items():
        assert value.to(float_acts[key].dtype) == pytest.approx(float_acts[key], abs=1e-5), key
    # what makes the two modes differ: the second layer's inputs come from the quantized first layer
    changed = [k for k in mine if ".layers.1." in k and k.endswith(".weight")
               and not (mine[k] - sequential[k]).abs().max() < 1e-6]
    assert changed, "sequential GPTQ gave the second layer the weights of the shared solve"


def test_a_retried_solve_loads_the_layers_an_earlier_attempt_solved_and_solves_the_rest(tiny):
    from workers.quantize.llmc import capture_hessians, solve_shared

    capture = tiny.tmp / "capture2"
    capture_hessians(_ctx(), _fresh(tiny), tiny.data, capture)
    whole = _fresh(tiny)
    progress = tiny.tmp / "progress"
    assert solve_shared(_ctx(), whole, OPTIONS, str(capture), progress) == 0
    solved = sorted(progress.glob("layer_*.safetensors"))
    assert [p.name for p in solved] == ["layer_0000.safetensors", "layer_0001.safetensors"]
    solved[1].unlink()  # the attempt died solving the second layer
    said: list[str] = []
    retried = _fresh(tiny)
    assert solve_shared(_ctx(said), retried, OPTIONS, str(capture), progress) == 1
    assert said == ["gptq 4-bit: solving from the shared capture, layer 1/2 (1 solved by an earlier attempt)",
                    "gptq 4-bit: solving from the shared capture, layer 2/2 (1 solved by an earlier attempt)"]
    expected, got = _quantized(whole), _quantized(retried)
    assert got.keys() == expected.keys()
    for key in expected:
        assert bool((got[key] == expected[key]).all()), key


def test_sequential_gptq_checkpoints_each_layer_and_a_retry_replays_the_solved_ones(tiny):
    from safetensors import safe_open

    from workers.quantize.llmc import sequential

    progress, said = tiny.tmp / "sequential", []
    first = _fresh(tiny)
    ctx = SimpleNamespace(progress=None, job=SimpleNamespace(calibration={"seq_len": 32}))
    assert sequential(ctx, first, OPTIONS, tiny.data, progress, lambda i, n, r: said.append((i, n, r))) == 0
    library = _oneshot_gptq(tiny, True)
    whole = _quantized(first)
    assert whole.keys() == library.keys()
    for key in whole:
        assert whole[key].to(library[key].dtype) == pytest.approx(library[key], abs=1e-5), key
    files = sorted(progress.glob("subgraph_*.safetensors"))
    assert len(files) == said[-1][1] >= 2 and [r for _, _, r in said] == [0] * len(files)
    layers = [f for f in files if any(".layers." in k for k in safe_open(str(f), "pt").keys())]
    assert len(layers) == 2  # one subgraph per decoder layer holds its quantized Linears
    layers[-1].unlink()  # the attempt died in the last decoder layer
    said.clear()
    retried = _fresh(tiny)
    assert sequential(ctx, retried, OPTIONS, tiny.data, progress, lambda i, n, r: said.append((i, n, r))) == \
        len(files) - 1
    got = _quantized(retried)
    for key in whole:
        assert bool((got[key] == whole[key]).all()), key


def test_sequential_awq_checkpoints_each_layer_with_its_smoothed_norms_and_a_retry_replays_them(tiny):
    from safetensors import safe_open

    from workers.quantize.llmc import sequential

    options = AwqOptions(method="awq", bits=4, group_size=32, symmetric=False, duo_scaling=True, n_grid=4)
    progress, said = tiny.tmp / "awq", []
    ctx = SimpleNamespace(progress=None, job=SimpleNamespace(calibration={"seq_len": 32}))
    first = _fresh(tiny)
    assert sequential(ctx, first, options, tiny.data, progress, lambda i, n, r: said.append((i, n, r))) == 0
    whole, library, float_ = _params(first), _params(_oneshot(tiny, True, options)), _params(_fresh(tiny))
    assert whole.keys() == library.keys()
    for key in whole:
        assert whole[key].to(library[key].dtype) == pytest.approx(library[key], abs=1e-5), key
    norms = [k for k in whole if "layernorm" in k]
    assert norms and any(not bool((whole[k] == float_[k]).all()) for k in norms)  # AWQ smoothed them
    files = sorted(progress.glob("subgraph_*.safetensors"))
    assert len(files) == said[-1][1] >= 2
    layers = [f for f in files if any(".layers." in k for k in safe_open(str(f), "pt").keys())]
    assert len(layers) == 2 and all(any("layernorm" in k for k in safe_open(str(f), "pt").keys()) for f in layers)
    layers[-1].unlink()  # the attempt died in the last decoder layer
    said.clear()
    retried = _fresh(tiny)
    assert sequential(ctx, retried, options, tiny.data, progress, lambda i, n, r: said.append((i, n, r))) == \
        len(files) - 1
    assert [r for _, _, r in said][-1] == len(files) - 1
    got = _params(retried)
    for key in whole:
        assert bool((got[key] == whole[key]).all()), key
