"""Checks every job would fail on, made once at `qfarm validate` (issue 36): a GGUF whose tokenizer transformers
rebuilds differently from llama.cpp, and an `evaluate` checkpoint in another vocabulary, are refused there with
their YAML line, exit 2; the GGUF check is kept on disk by the file's content, so the next validate is instant.
The jobs keep their own checks as a second line (the vocabulary one is tested here directly)."""

from __future__ import annotations

import json
import os

import pytest

from tests.cli import lay_out_hub_cache, qfarm
from tests.tiny import corpus_of, guanaco_rows, make_tiny_model


def gguf_with_pre_tokenizer(out, pre: str):
    """The bundled SmolLM2 GGUF with one header value changed: ``tokenizer.ggml.pre``, the pre-tokenizer llama.cpp
    splits text with. transformers rebuilds the same tokenizer whatever it says, so for some values the two
    disagree (the class of Gemma 3's GGUF: a file whose tokenizer is not the one transformers rebuilds)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    from qfarm.sweep.sources import bundled_model_path

    reader = gguf.GGUFReader(str(bundled_model_path("smollm2-135m")), "r")
    writer = gguf.GGUFWriter(str(out), arch=reader.fields[gguf.Keys.General.ARCHITECTURE].contents(),
                             endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {"tokenizer.ggml.pre": MetadataDetails(gguf.GGUFValueType.STRING, pre)}, [])
    return out


def gguf_as_family(out, arch: str):
    """The bundled GGUF relabelled as another family (``general.architecture`` and its ``<arch>.*`` keys), so that
    transformers rebuilds its tokenizer through that family's converter and tokenizer class (Qwen2's BPE, Phi-3's
    SentencePiece-style one): another path through the same vocabulary."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    from qfarm.sweep.sources import bundled_model_path

    reader = gguf.GGUFReader(str(bundled_model_path("smollm2-135m")), "r")
    old = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    renamed = {f"{arch}{name[len(old):]}": MetadataDetails(field.types[0], field.contents())
               for name, field in reader.fields.items() if name.startswith(old + ".")}
    writer = gguf.GGUFWriter(str(out), arch=arch, endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, renamed, [n for n in reader.fields if n.startswith(old + ".")])
    return out


@pytest.fixture
def env(tmp_path):
    """The CLI's environment with a cache of its own (XDG_CACHE_HOME: ~/.cache/qfarm/checks moves with it)."""
    return dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), QFARM_OUTPUT_ROOT=str(tmp_path / "out"))


def spec(tmp_path, model: str, name: str = "probe") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nmodel: {model}\njobs:\n  - {{kind: quantize, method: bnb-nf4}}\n")
    return str(path)


def test_a_gguf_whose_tokenizer_every_job_would_refuse_is_refused_at_validate_once(tmp_path, env):
    bad = gguf_with_pre_tokenizer(tmp_path / "smollm2-pre-qwen2.gguf", "qwen2")
    out = qfarm(env, "validate", "--offline", spec(tmp_path, str(bad)))
    said = out.stdout + out.stderr
    assert out.returncode == 2, said
    assert "probe.yaml:2: model: the tokenizer transformers rebuilt from smollm2-pre-qwen2.gguf disagrees with the " \
           "file's own (llama.cpp)" in said and "(the check every job makes first, run here)" in said
    kept = list((tmp_path / "cache" / "qfarm" / "checks").glob("tok-*.json"))
    assert len(kept) == 1 and "refused" in json.loads(kept[0].read_text())
    # the next validate reads the verdict from the cache instead of running the probe: plant another verdict under
    # the same key and it is the one shown (no subprocess would say this)
    kept[0].write_text(json.dumps({"refused": "the verdict kept for this file's content"}))
    again = qfarm(env, "validate", "--offline", spec(tmp_path, str(bad)))
    assert again.returncode == 2 and "the verdict kept for this file's content" in again.stdout + again.stderr

    # the bundled GGUF agrees with llama.cpp: validated, and its verdict kept too
    good = qfarm(env, "validate", "--offline", spec(tmp_path, "bundled:smollm2-135m", "good"))
    assert good.returncode == 0, good.stdout + good.stderr
    verdicts = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "qfarm" / "checks").glob("tok-*.json")]
    assert any(v.get("tokenizer_check", "").startswith("agrees with llama.cpp") for v in verdicts), verdicts


def test_a_checkpoint_in_another_vocabulary_is_refused_at_validate_and_by_its_job(tmp_path, env, shared_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qfarm.errors import Permanent
    from workers.evaluate.checkpoint import same_vocabulary

    data = guanaco_rows(shared_data, tmp_path, 120)
    model = make_tiny_model(tmp_path / "tiny", corpus_of(data), seed=4)
    other = make_tiny_model(tmp_path / "other-vocab", corpus_of(data)[60:], seed=4)
    path = tmp_path / "evaluate.yaml"
    path.write_text(f"name: evaluate\nmodel: {model}\njobs:\n  - {{kind: quantize, method: none}}\n"
                    f"  - {{kind: evaluate, checkpoint: {other}}}\n  - {{kind: evaluate, checkpoint: {model}-copy}}\n")
    import shutil

    shutil.copytree(model, f"{model}-copy")
    out = qfarm(env, "validate", "--offline", str(path))
    said = out.stdout + out.stderr
    assert out.returncode == 2 and said.count("is not in the sweep's model's vocabulary") == 1, said
    assert "evaluate.yaml:5: jobs[1].checkpoint: checkpoint" in said and "vocabulary differs" in said, said

    # the job's own check (the second line), on the same two folders
    reference = AutoTokenizer.from_pretrained(model)
    loaded = AutoModelForCausalLM.from_pretrained(other)
    with pytest.raises(Permanent, match="vocabulary differs"):
        same_vocabulary(loaded, reference, loaded.config.vocab_size, str(other))
    same_vocabulary(AutoModelForCausalLM.from_pretrained(f"{model}-copy"), reference, loaded.config.vocab_size,
                    f"{model}-copy")


@pytest.mark.parametrize("pre", [None, "qwen2", "llama-bpe", "family:qwen2", "family:phi3"])
def test_validate_s_light_tokenizer_gives_the_ids_a_job_s_autotokenizer_gives(tmp_path, shared_data, pre):
    """`qfarm validate` rebuilds a GGUF's tokenizer without transformers' model stack (workers.evaluate.checks.rebuilt_backend,
    ~1 s instead of ~10): it must be the tokenizer a job builds (AutoTokenizer), id for id, on the probe and on
    real text, or validate would pass files that jobs refuse, or refuse files that jobs take."""
    from transformers import AutoTokenizer

    from qfarm.sweep.sources import bundled_model_path
    from workers.evaluate.checks import PROBE, rebuilt_backend

    if pre is None:
        path = bundled_model_path("smollm2-135m")
    elif pre.startswith("family:"):
        path = gguf_as_family(tmp_path / "v.gguf", pre.removeprefix("family:"))
    else:
        path = gguf_with_pre_tokenizer(tmp_path / "v.gguf", pre)
    light = rebuilt_backend(str(path))
    assert light is not None, "llama, qwen2 and phi3 GGUFs go the light way"
    job = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = (shared_data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")[:20_000]
    for sample in (PROBE, text):
        ids = light(sample, add_special_tokens=False)["input_ids"]
        assert len(ids) > 50 and ids == job(sample, add_special_tokens=False)["input_ids"]


def test_a_folder_llama_cpps_converter_refuses_is_refused_at_validate_where_a_gguf_job_would_convert_it(
        tmp_path, env, shared_data):
    """A Hugging Face folder whose tokenizer llama.cpp's converter does not know (a word-level BPE: its pre-tokenizer's
    hash is in no list) fails every gguf job of it, minutes after submit, at the conversion: validate asks the
    converter itself (its vocabulary pass) once, refuses the gguf job at its line and the search's gguf entry at
    its own, and keeps the verdict; the same folder without gguf jobs is not asked about; a folder the converter
    takes (a SentencePiece tokenizer.model) validates with a gguf job."""
    from tests.tiny import make_spm_gguf

    data = guanaco_rows(shared_data, tmp_path, 120)
    model = make_tiny_model(tmp_path / "tiny", corpus_of(data), seed=4)
    checks = tmp_path / "cache" / "qfarm" / "checks"

    plain = qfarm(env, "validate", "--offline", spec(tmp_path, str(model), "plain"))
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert not list(checks.glob("convert-*.json"))  # no gguf job: the converter is not asked

    path = tmp_path / "gguf.yaml"
    path.write_text(f"name: gguf\nmodel: {model}\njobs:\n  - {{kind: quantize, method: bnb-nf4}}\n"
                    "  - {kind: quantize, method: gguf, gguf_type: Q8_0}\n")
    out = qfarm(env, "validate", "--offline", str(path))
    said = out.stdout + out.stderr
    assert out.returncode == 2, said
    assert "gguf.yaml:5: jobs[1].method: llama.cpp's converter refuses the sweep's model" in said, said
    assert "BPE pre-tokenizer was not recognized" in said and "Give the model as a GGUF file" in said
    kept = list(checks.glob("convert-*.json"))
    assert len(kept) == 1 and "BPE pre-tokenizer" in json.loads(kept[0].read_text())["refused"]

    search = tmp_path / "search.yaml"
    search.write_text(f"name: s\nmodel: {model}\neval: {{perplexity: {{dataset: {shared_data / 'wikitext2' / 'wiki.test.raw'}, "
                      "seq_len: 64, max_windows: 2}}\nsearch:\n  target: {bits_per_weight: 6}\n  space:\n"
                      "    - {method: rtn, bits: [4, 8], group_size: [32], mixed: true}\n"
                      "    - {method: gguf, gguf_type: [Q4_0, Q8_0], mixed: true}\n")
    out = qfarm(env, "validate", "--offline", str(search))
    said = out.stdout + out.stderr
    assert out.returncode == 2 and "search.space[1]" in said and "converter refuses" in said, said
    assert "search.space[0]" not in said, said

    # the same folder as a hub model whose download is in the cache: asked about the same way, refused at its line;
    # a hub model of which validate has only the config.json it fetched is not asked about (no tokenizer to read)
    hub_env = dict(env, HF_HUB_OFFLINE="1")
    lay_out_hub_cache(model, tmp_path / "out" / "_hub", "acme/tiny-words")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((model / "config.json").read_bytes())
    lay_out_hub_cache(config_only, tmp_path / "out" / "_hub", "acme/config-only")
    for repo, refused in (("acme/tiny-words", True), ("acme/config-only", False)):
        hub = tmp_path / "hub.yaml"
        hub.write_text(path.read_text().replace(f"model: {model}", f"model: {repo}\nrevision: main"))
        out = qfarm(hub_env, "validate", "--offline", str(hub))
        said = out.stdout + out.stderr
        assert (out.returncode, "hub.yaml:6: jobs[1].method: llama.cpp's converter refuses" in said) == \
            ((2, True) if refused else (0, False)), said
    assert len(list(checks.glob("convert-*.json"))) == 2  # the folder's verdict and its snapshot's (another key)

    good = make_spm_gguf(tmp_path / "spm", corpus_of(data), family="llama").parent / "hf"
    path.write_text(path.read_text().replace(str(model), str(good)))
    out = qfarm(env, "validate", "--offline", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert sum(json.loads(p.read_text()).get("converts") is True for p in checks.glob("convert-*.json")) == 1


@pytest.mark.parametrize("family, kind", [("gpt2", "GPT-2-style Conv1D layers"),
                                          ("mixtral", "fused MoE expert weights")])
def test_a_search_on_weights_it_cannot_allocate_is_refused_at_validate(tmp_path, env, shared_data, family, kind):
    """A search prices and allocates formats per Linear layer: a model whose weights are GPT-2's Conv1D or fused MoE
    experts would have them left out of every mix (in float, or in a format nothing chose) and out of the predicted
    sizes; validate refuses it at the search, naming those layers, where it used to fail on a derived option
    (GPT-2: ``target_bits_per_weight ... got 0.0``) or plan a Mixtral's mixes over its attention alone."""
    model = make_tiny_model(tmp_path / family, corpus_of(guanaco_rows(shared_data, tmp_path, 120)), family=family)
    path = tmp_path / "search.yaml"
    path.write_text(f"name: s\nmodel: {model}\neval: {{perplexity: {{dataset: {shared_data / 'wikitext2' / 'wiki.test.raw'}, "
                    "seq_len: 64, max_windows: 2}}\nsearch:\n  target: {bits_per_weight: 6}\n  space:\n"
                    "    - {method: rtn, bits: [4, 8], group_size: [32], mixed: true}\n")
    out = qfarm(env, "validate", "--offline", str(path))
    said = out.stdout + out.stderr
    assert out.returncode == 2 and "search.yaml:4: search: a search gives each Linear layer its format" in said, said
    assert kind in said and "Traceback" not in said and "got 0.0" not in said, said
