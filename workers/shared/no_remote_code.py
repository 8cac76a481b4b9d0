"""Run a script (llama.cpp's ``convert_hf_to_gguf.py``) with transformers unable to run a model folder's own code.

The converter loads tokenizers with ``trust_remote_code=True``: a model folder (a hub download, a merged
fine-tune) whose ``tokenizer_config.json`` or ``config.json`` names an ``auto_map`` class would have its Python
file imported, or fetched from another hub repo and imported. qfarm never runs a model's code: here the one
function transformers loads such classes with raises instead, so conversion of such a model fails with the
reason, and every other model converts as before.

    python -m workers.shared.no_remote_code SCRIPT [ARGS...]
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

REFUSAL = ("the model asks to run its own Python code ({ref}: an auto_map entry, trust_remote_code); qfarm "
           "does not run a model's code, so it cannot convert this model to GGUF")


def _refuse(class_reference, *args, **kwargs):
    raise RuntimeError(REFUSAL.format(ref=class_reference))


def forbid_remote_code() -> None:
    """Replace ``get_class_from_dynamic_module`` wherever transformers bound it (its auto classes import it by
    name), before and after importing them."""
    import transformers.dynamic_module_utils as dynamic
    from transformers.models.auto import (  # noqa: F401
        auto_factory,
        configuration_auto,
        feature_extraction_auto,
        image_processing_auto,
        processing_auto,
        tokenization_auto,
    )

    dynamic.get_class_from_dynamic_module = _refuse
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers") and "get_class_from_dynamic_module" in getattr(module, "__dict__", {}):
            module.get_class_from_dynamic_module = _refuse


def main() -> None:
    script = Path(sys.argv[1]).resolve()
    forbid_remote_code()
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path.insert(0, str(script.parent))  # as `python SCRIPT` would: the converter imports its own package
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
