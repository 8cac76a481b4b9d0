"""The installed llama.cpp (llama-cpp-python) against qfarm's list of GGUF file types, and its converter."""

from __future__ import annotations

import pytest

from qfarm.sweep.job import Job
from qfarm.sweep.methods import GGUF_TYPES

pytestmark = pytest.mark.integration


def test_every_gguf_type_a_spec_may_name_exists_in_the_installed_llama_cpp():
    from workers.quantize.gguf import ftype

    values = {name: ftype(name) for name in GGUF_TYPES}
    assert len(set(values.values())) == len(GGUF_TYPES)  # distinct llama.cpp file types
    with pytest.raises(ValueError, match="no file type Q9_Z"):
        ftype("Q9_Z")


def test_the_hf_to_gguf_converter_is_unpacked_beside_the_installed_version():
    from workers.quantize.gguf import converter

    script = converter()
    assert script is not None, "run `make llama-cpp-tools`"
    assert (script.parent / "gguf-py" / "gguf" / "__init__.py").is_file() and (script.parent / "conversion").is_dir()


def test_a_tokenizer_rebuilt_from_a_gguf_is_checked_against_llama_cpps_own(tmp_path):
    """The bundled GGUF's tokenizer as transformers rebuilds it agrees with llama.cpp; a tokenizer that cuts text
    differently (here one of characters) is refused, naming where the two part."""
    from transformers import AutoTokenizer

    from qfarm.errors import Permanent
    from qfarm.sweep.sources import resolve_model
    from tests.tiny import make_tiny_model
    from workers.evaluate.checks import PROBE, gguf_conventions

    ref = resolve_model("bundled:smollm2-135m", tmp_path)
    gguf = f"{ref.location}/{ref.gguf_file}"
    own = gguf_conventions(gguf, AutoTokenizer.from_pretrained(ref.location, gguf_file=ref.gguf_file))
    assert own["tokenizer_check"].startswith("agrees with llama.cpp") and own["add_bos"] is False
    characters = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "chars", [PROBE], characters=True))
    with pytest.raises(Permanent, match=r"disagrees with the file's own \(llama.cpp\): \d+ vs \d+ tokens on the probe "
                                        r"text, first different at token 0"):
        gguf_conventions(gguf, characters)


def test_conversion_never_runs_a_model_folders_own_code(tmp_path, shared_data):
    """llama.cpp's converter loads tokenizers with trust_remote_code=True: a folder whose tokenizer_config.json
    names its own class would have that file imported. qfarm's conversion refuses it, saying why; the same
    folder through the converter as shipped runs the code (the hazard is real)."""
    import json
    import subprocess
    import sys
    from types import SimpleNamespace

    from tests.tiny import corpus_of, make_tiny_model
    from workers.quantize.gguf import converter, source_gguf

    folder = make_tiny_model(tmp_path / "evil", corpus_of(shared_data / "guanaco_llama2_1k" / "train.jsonl", 50))
    marker = tmp_path / "code-ran"
    (folder / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    # a tokenizer class the converter loads with trust_remote_code=True (its HybridDNA path), and the folder's own
    config.update(tokenizer_class="HybridDNATokenizer", auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    job = Job.from_payload({"id": "j1", "kind": "quantize", "options": {"method": "gguf"},
                            "model": {"kind": "hf_dir", "key": f"hf_dir:{folder}"}})
    ctx = SimpleNamespace(job=job, output_root=str(tmp_path / "out"),
                          progress=lambda line: None)
    with pytest.raises(RuntimeError, match="asks to run its own Python code"):
        source_gguf(ctx, SimpleNamespace(path=str(folder)))
    assert not marker.exists()

    script = converter()
    env = {**__import__("os").environ, "PYTHONPATH": str(script.parent / "gguf-py")}
    subprocess.run([sys.executable, str(script), str(folder), "--outfile", str(tmp_path / "x.gguf"), "--outtype", "f32"],
                   env=env, capture_output=True, text=True, timeout=300)
    assert marker.read_text() == "ran"  # without the guard, the folder's code runs


@pytest.mark.parametrize("family,prefix", [("gemma3", False), ("phi3", True)])
def test_a_sentencepiece_gguf_is_rebuilt_as_llama_cpp_cuts_it(tmp_path, shared_data, family, prefix):
    """A tiny GGUF with a SentencePiece BPE vocabulary, made by llama.cpp's converter (Gemma 3's kind: no space
    prefix; Phi-3's: a space before the text): transformers' own rebuild disagrees with llama.cpp; qfarm's gives
    llama.cpp's ids on real text, on texts that start with spaces, and around user-defined pieces."""
    import llama_cpp

    from tests.tiny import SPM_SPECIALS, corpus_of, make_spm_gguf
    from workers.evaluate.checks import PROBE, probe
    from workers.shared.gguf_tokenizer import spm_backend, vocabulary

    gguf = make_spm_gguf(tmp_path, corpus_of(shared_data / "guanaco_llama2_1k" / "train.jsonl", 400) + [PROBE] * 3,
                         family=family, prefix=prefix)
    checked = probe({"location": str(gguf.parent), "gguf_file": gguf.name})
    assert checked["tokenizer_check"].startswith("agrees with llama.cpp") and "rebuilt by qfarm" in checked["tokenizer_check"]
    assert "transformers' own rebuild: " in checked["tokenizer_check"]  # which disagreed
    backend = spm_backend(vocabulary(str(gguf)))
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        wiki = (shared_data / "wikitext2" / "wiki.test.raw").read_text()[:40_000]
        for text in (wiki, "  two spaces\n\n x", f"{SPM_SPECIALS[0]}user\nhi there{SPM_SPECIALS[1]} ok{SPM_SPECIALS[1]}",
                     f" {SPM_SPECIALS[0]} x"):
            assert backend.encode(text, add_special_tokens=False).ids == \
                llm.tokenize(text.encode(), add_bos=False, special=False), text[:40]
    finally:
        llm.close()


def test_the_ggml_types_a_tensor_rule_may_name_are_the_installed_ggmls():
    """qfarm.sweep.methods.GGML_TYPES (ids, block lengths, bits a weight) against gguf-py's own tables."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from qfarm.sweep.methods import GGML_TYPES

    for name, (type_id, block, bits) in GGML_TYPES.items():
        kind = GGMLQuantizationType[name]
        assert kind.value == type_id, name
        elements, nbytes = GGML_QUANT_SIZES[kind]
        assert (elements, nbytes * 8 / elements) == (block, bits), name


def _synthetic_gguf(path, blocks: int, hidden: int, ffn: int, heads: int, kv_heads: int, arch: str = "llama") -> list:
    """A float32 GGUF of random weights of a Llama-shaped ``arch`` (llama.cpp quantizes from the header and tensors
    alone; a Qwen2 with its q/k/v biases), and its block layers as a search names them (qfarm.sweep.search.Layer:
    ``3.self_attn.v_proj``)."""
    import numpy as np
    from gguf import GGUFWriter

    from qfarm.sweep.search import Layer

    rng = np.random.default_rng(0)
    kv = kv_heads * hidden // heads
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(blocks)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tensor("token_embd.weight", rng.standard_normal((64, hidden), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    shapes = {"attn_q": ("self_attn.q_proj", hidden, hidden), "attn_k": ("self_attn.k_proj", hidden, kv),
              "attn_v": ("self_attn.v_proj", hidden, kv), "attn_output": ("self_attn.o_proj", hidden, hidden),
              "ffn_gate": ("mlp.gate_proj", hidden, ffn), "ffn_up": ("mlp.up_proj", hidden, ffn),
              "ffn_down": ("mlp.down_proj", ffn, hidden)}
    layers = []
    for b in range(blocks):
        writer.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        for role, (module, n_in, n_out) in shapes.items():
            writer.add_tensor(f"blk.{b}.{role}.weight", rng.standard_normal((n_out, n_in), dtype=np.float32))
            if arch == "qwen2" and role in ("attn_q", "attn_k", "attn_v"):
                writer.add_tensor(f"blk.{b}.{role}.bias", np.zeros(n_out, dtype=np.float32))
            layers.append(Layer(f"{b}.{module}", n_in, n_out))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return layers


@pytest.mark.parametrize("shape", [(16, 256, 512, 4, 1), (9, 96, 200, 4, 4), (24, 128, 384, 4, 2, "qwen2")],
                         ids=["k-blocks-gqa4", "fallbacks", "qwen2"])
def test_each_file_type_stores_each_layer_in_the_type_validate_prices(tmp_path, shape):
    """What a search's plan says a uniform GGUF costs (qfarm.sweep.search.gguf_file_types: llama.cpp's own mix rules,
    then its fallbacks) against the files the installed llama.cpp writes, tensor by tensor, for every quantized file
    type a spec may name, with and without tensor_types rules: on rows K-quants' blocks divide (16 blocks, so the
    first/last eighth and every third between differ; 4 query heads a key head), on rows they do not (96 wide,
    and 200, which no 32-block divides either: float16), and on a Qwen2 of 24 blocks (another family's file)."""
    import ctypes

    import llama_cpp

    from qfarm.sweep.methods import GGML_TYPES, GGUF_TYPES, tensor_rule
    from qfarm.sweep.search import gguf_file_types, uniform_bits_per_weight
    from workers.quantize.gguf import file_tensors, ftype, layer_columns

    source = tmp_path / "f32.gguf"
    layers = _synthetic_gguf(source, *shape)
    role = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    tensor = {la.name: f"blk.{la.name.split('.')[0]}.{role[la.name.rsplit('.', 1)[1]]}.weight" for la in layers}
    cases = [(name, []) for name, bits in GGUF_TYPES.items() if bits < 16]
    cases += [("Q4_K_M", ["blk\\.1\\.attn_v=Q8_0", "blk\\.(3|4)\\.ffn_down=Q2_K"]), ("Q3_K_M", ["attn_v=Q4_0"])]
    for name, texts in cases:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread, params.allow_requantize = ftype(name), 2, True
        rules = [tensor_rule(t) for t in texts]
        overrides = (llama_cpp.llama_model_tensor_override * (len(rules) + 1))()
        for i, (pattern, type_name) in enumerate(rules):
            overrides[i].pattern, overrides[i].type = pattern.encode(), GGML_TYPES[type_name][0]
        if rules:
            params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        target = tmp_path / f"{name}.gguf"
        assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) == 0
        _, _, stored = file_tensors(str(target))
        predicted = gguf_file_types(name, layers, tensor_types=texts)
        assert {la.name: stored[tensor[la.name]][0] for la in layers} == predicted, (name, texts)
        measured = layer_columns(stored)["bits_per_weight"]
        assert uniform_bits_per_weight({"method": "gguf", "gguf_type": name, "tensor_types": texts}, layers) \
            == pytest.approx(measured, rel=1e-12), (name, texts)
        target.unlink()


def test_lm_eval_s_choices_of_one_context_evaluate_it_once_with_the_log_probs_of_a_fresh_evaluation():
    """A GGUF row's lm-eval scoring (workers.evaluate.tasks.runner_lm -> LlamaCppModel.continuation_logprobs) keeps
    the KV cache of the prefix a request shares with the one before: the choices of a multiple-choice question
    evaluate its context once, and their log-probs are those of evaluating each request from scratch."""
    import torch

    from qfarm.sweep.sources import bundled_model_path
    from workers.quantize.gguf import LlamaCppModel

    model = LlamaCppModel(str(bundled_model_path("smollm2-135m")), 256, 1)
    try:
        tok = model.llm.tokenize
        context = tok(b"The abbey was founded beside the river in the early middle ages, and a town grew around it.",
                      add_bos=True)
        choices = [tok(t, add_bos=False) for t in (b" It became a market town.", b" The sea is blue.",
                                                    b" Trade grew quickly along the river.")]
        evaluated, run = [], model.llm.eval
        model.llm.eval = lambda ids: (evaluated.append(len(ids)), run(ids))[1]
        ours = [model.continuation_logprobs(context + c, len(c)) for c in choices]
        assert evaluated == [len(context) + len(choices[0])] + [len(c) for c in choices[1:]]  # the context once
        for c, lp in zip(choices, ours):
            fresh = model.logprobs(torch.tensor(context + c))[-len(c):]  # reset: the whole request
            assert lp.shape == fresh.shape and torch.allclose(lp, fresh, atol=1e-4), (lp - fresh).abs().max()
        other = context[:3] + tok(b" different question entirely.", add_bos=False)
        model.continuation_logprobs(other + choices[0], len(choices[0]))  # shares 3 tokens: evaluated from there
        assert evaluated[-1] == len(other) + len(choices[0]) - 3
    finally:
        model.llm.close()
