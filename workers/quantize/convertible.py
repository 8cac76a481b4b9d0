"""Whether llama.cpp's converter takes a Hugging Face model folder, without converting a weight: the converter's
own vocabulary pass (``convert_hf_to_gguf.py --vocab-only``: its class for the architecture, the tokenizer, the
hash of its BPE pre-tokenizer), run as every gguf job's conversion runs it (workers.quantize.gguf.source_gguf).
``qfarm validate`` asks it once per model folder (qfarm.sweep.modelinfo.gguf_conversion), in a subprocess:

    python -m workers.quantize.convertible MODEL_JSON   # {"converts": true} | {"refused": why} | {"error": why}

"error": the check could not run here (no converter unpacked, a timeout): nothing is said about the model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

TIMEOUT_S = 300


def check(model: dict) -> dict:
    from workers.quantize.gguf import converter, run_converter

    script = converter()
    if script is None:
        return {"error": "llama.cpp's convert_hf_to_gguf.py is not unpacked here"}
    with tempfile.TemporaryDirectory(prefix="qfarm-vocab-") as tmp:
        try:
            failed = run_converter(script, model["location"], ["--vocab-only", "--outfile", f"{tmp}/vocab.gguf"],
                                   timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"error": f"the converter's vocabulary pass ran over {TIMEOUT_S} s"}
    return {"converts": True} if failed is None else {"refused": failed}


if __name__ == "__main__":
    print(json.dumps(check(json.loads(sys.argv[1]))))
