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
