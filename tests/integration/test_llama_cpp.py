"""The installed llama.cpp (llama-cpp-python) against qfarm's list of GGUF file types, and its converter."""

from __future__ import annotations

import pytest

from qfarm.methods import GGUF_TYPES

pytestmark = pytest.mark.integration


def test_every_gguf_type_a_spec_may_name_exists_in_the_installed_llama_cpp():
    from workers.gguf import ftype

    values = {name: ftype(name) for name in GGUF_TYPES}
    assert len(set(values.values())) == len(GGUF_TYPES)  # distinct llama.cpp file types
    with pytest.raises(ValueError, match="no file type Q9_Z"):
        ftype("Q9_Z")


def test_the_hf_to_gguf_converter_is_unpacked_beside_the_installed_version():
    from workers.gguf import converter

    script = converter()
    assert script is not None, "run `make llama-cpp-tools`"
    assert (script.parent / "gguf-py" / "gguf" / "__init__.py").is_file() and (script.parent / "conversion").is_dir()


def test_a_tokenizer_rebuilt_from_a_gguf_is_checked_against_llama_cpps_own(tmp_path):
    """The bundled GGUF's tokenizer as transformers rebuilds it agrees with llama.cpp; a tokenizer that cuts text
    differently (here one of characters) is refused, naming where the two part."""
    from transformers import AutoTokenizer

    from qfarm.errors import Permanent
    from qfarm.refs import resolve_model
    from tests.tiny import make_tiny_model
    from workers.checks import PROBE, gguf_conventions

    ref = resolve_model("bundled:smollm2-135m", tmp_path)
    gguf = f"{ref.location}/{ref.gguf_file}"
    own = gguf_conventions(gguf, AutoTokenizer.from_pretrained(ref.location, gguf_file=ref.gguf_file))
    assert own["tokenizer_check"].startswith("agrees with llama.cpp") and own["add_bos"] is False
    characters = AutoTokenizer.from_pretrained(make_tiny_model(tmp_path / "chars", [PROBE], characters=True))
    with pytest.raises(Permanent, match=r"disagrees with the file's own \(llama.cpp\): \d+ vs \d+ tokens on the probe "
                                        r"text, first different at token 0"):
        gguf_conventions(gguf, characters)
