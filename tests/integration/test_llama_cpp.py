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
