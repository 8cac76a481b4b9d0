"""Checks of a sweep's reference before anything is compared with it: numbers that prove their own inputs.

- **Tokenizer**: for a GGUF source, the tokenizer every row uses must give llama.cpp's own ids on a probe text.
  transformers' rebuild from the file is tried first; where it disagrees (Gemma's SentencePiece BPE comes back as
  a Unigram model), qfarm's rebuild from the file's own scores (workers.shared.gguf_tokenizer); a file neither
  agrees on is refused with where each parts from llama.cpp, instead of feeding wrong ids to both sides.
- **BOS**: evaluation windows start with the BOS token when the model's convention says so (the GGUF's
  ``tokenizer.ggml.add_bos_token``, else whether the tokenizer itself adds it); rows record it (``ppl_bos``).
- **Sanity of the reference**: its perplexity as bits per byte of the evaluated text must be below 8 (a uniform
  guess over bytes), and a tokenizer with a real vocabulary must not cut the text into single characters. A
  reference that fails either fails its jobs with the reason; nothing is published.

The conventions of a GGUF-derived float folder are written beside it (``QFARM_CHECKS.json``) when it is made.
The tokenizer check also runs at `qfarm validate` (``python -m workers.evaluate.checks MODEL_JSON``, through
``qfarm.sweep.modelinfo.gguf_tokenizer``): a file every job would refuse is refused there, once, with its YAML line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from qfarm.errors import Permanent

CHECKS_FILE = "QFARM_CHECKS.json"
PROBE = ("The quick brown fox jumps over the lazy dog. It's 3.14 -- naïve café, Straße, 東京, Москва!\n"
         "def square(x):\n    return x ** 2  # tabs\tand  double  spaces\n\nA new paragraph, 1999-2024.")
# a text that starts with spaces: llama.cpp puts its SentencePiece space prefix before it all the same, where a
# rebuilt tokenizer may not (the probe itself starts with a word)
LEADING = "  Two spaces lead this line, and\ttabs follow."
MAX_BITS_PER_BYTE = 8.0  # a uniform guess over the 256 byte values
CHARACTER_LEVEL = 0.9  # tokens per byte at which a tokenizer is cutting text into single characters
REAL_VOCAB = 1000  # vocabularies above this are not character-level by design


def llama_cpp_view(gguf_path: str) -> dict | None:
    """How llama.cpp (vocabulary only) tokenizes the probe text with the file's own tokenizer, and its BOS
    convention; None where llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    try:
        return {"ids": llm.tokenize(PROBE.encode(), add_bos=False, special=False), "bos_id": llm.token_bos(),
                "leading": llm.tokenize(LEADING.encode(), add_bos=False, special=False),
                "add_bos": str(llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"}
    finally:
        llm.close()


def gguf_conventions(gguf_path: str, tokenizer, what: str | None = None) -> dict:
    """What the GGUF file says of its own tokenization (llama.cpp, vocabulary only), checked against
    ``tokenizer`` (``what``: which rebuild it is, said in the check). Raises Permanent when the two tokenize the
    probe differently."""
    return choose_tokenizer(gguf_path, [(tokenizer, what)])[1]


def choose_tokenizer(gguf_path: str, candidates, theirs: dict | None = None) -> tuple:
    """The first of ``candidates`` ((tokenizer, what it is) pairs, tried in order, lazily) that gives llama.cpp's
    own ids on the probe text (``theirs``: ``llama_cpp_view``'s, read here when not given), and the file's
    conventions with it. Raises Permanent when none does, saying where each parts from llama.cpp."""
    theirs = theirs or llama_cpp_view(gguf_path)
    tried = []
    for tokenizer, what in candidates:
        if theirs is None:
            return tokenizer, {"tokenizer_check": "skipped: llama-cpp-python is not installed", "add_bos": None,
                               "bos_id": None}
        try:
            ours = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
            problem = disagreement(ours, theirs["ids"])
            if problem is None:
                leading = disagreement(tokenizer(LEADING, add_special_tokens=False)["input_ids"], theirs["leading"])
                problem = leading and leading.replace("the probe text", "a text that starts with spaces")
        except Exception as e:  # noqa: BLE001 - a rebuild that cannot even tokenize the probe disagrees, saying why
            problem = f"it fails on the probe text ({type(e).__name__}: {str(e)[:200]})"
        if problem is None:
            said = f" ({what}; transformers' own rebuild: {tried[0]})" if tried else ""
            return tokenizer, {"tokenizer_check": f"agrees with llama.cpp on a {len(ours)}-token probe{said}",
                               "add_bos": theirs["add_bos"], "bos_id": theirs["bos_id"] if theirs["add_bos"] else None}
        tried.append(problem if not tried else f"{what or 'another rebuild'}: {problem}")
    name = Path(gguf_path).name
    raise Permanent(f"the tokenizer transformers rebuilt from {name} disagrees with the file's own (llama.cpp): "
                    f"{'; '.join(tried) or 'no tokenizer to try'}. Its numbers would be wrong: give the model as the "
                    "Hugging Face folder or hub id it came from instead of the GGUF file")


def disagreement(ours: list[int], theirs: list[int]) -> str | None:
    """Where two tokenizations of the same text part, said briefly; None when they are equal."""
    if ours == theirs:
        return None
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return (f"{len(ours)} vs {len(theirs)} tokens on the probe text, first different at token {at} "
            f"(transformers {ours[at:at + 4]} vs llama.cpp {theirs[at:at + 4]})")


def conventions(folder: str, tokenizer) -> dict:
    """The model's BOS convention and tokenizer check: from ``QFARM_CHECKS.json`` beside a GGUF-derived folder,
    else what the tokenizer itself does (it adds BOS to ``tokenizer(text)``, or it does not)."""
    written = Path(folder) / CHECKS_FILE
    if written.is_file():
        found = json.loads(written.read_text())
        if found.get("add_bos") is not None:
            return found
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a b", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    adds = bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]
    return {"tokenizer_check": None, "add_bos": adds, "bos_id": bos if adds else None}


def check_reference(nll: float, tokens: int, text_bytes: int, vocab_size: int, what: str = "the reference") -> dict:
    """Bits per byte and tokens per byte of an evaluation; raises Permanent when the numbers cannot be right."""
    bits_per_byte = nll / math.log(2) / max(text_bytes, 1)
    tokens_per_byte = tokens / max(text_bytes, 1)
    if tokens_per_byte >= CHARACTER_LEVEL and vocab_size > REAL_VOCAB:
        raise Permanent(f"{what}'s tokenizer cut the evaluation text into single characters ({tokens_per_byte:.2f} "
                        f"tokens per byte with a vocabulary of {vocab_size}): it is not the tokenizer this model was "
                        "trained with. No numbers were published")
    if bits_per_byte > MAX_BITS_PER_BYTE:
        raise Permanent(f"{what}'s perplexity {math.exp(nll / max(tokens, 1)):.4g} is {bits_per_byte:.2f} bits per byte "
                        f"of text, worse than a uniform guess over bytes ({MAX_BITS_PER_BYTE:g}): the tokenizer, the "
                        "BOS convention or the weights are wrong for this model. No numbers were published")
    return {"bits_per_byte": bits_per_byte, "tokens_per_byte": tokens_per_byte}


def probe(model: dict) -> dict:
    """The tokenizer check a job makes first (``choose_tokenizer`` over transformers' rebuild of the file's tokenizer,
    then qfarm's SentencePiece rebuild: workers.shared.gguf_tokenizer), for ``qfarm validate``: the conventions of
    the first that agrees, or ``{"refused": why}`` where every job would refuse the file. transformers' tokenizer is
    rebuilt the light way where it can be (``rebuilt_backend``: a second, not ten), else as a job does
    (AutoTokenizer, which loads transformers' model stack and parses the whole header with gguf-py)."""
    path = f"{model['location']}/{model['gguf_file']}"

    def candidates():
        own = rebuilt_backend(path)
        if own is None:
            from transformers import AutoTokenizer

            own = AutoTokenizer.from_pretrained(model["location"], gguf_file=model["gguf_file"])
        yield own, "transformers' own rebuild"
        from workers.shared.gguf_tokenizer import REPAIRED, spm_backend, vocabulary

        meta = vocabulary(path)
        if meta is not None:
            yield _Backend(spm_backend(meta)), REPAIRED

    try:
        return choose_tokenizer(path, candidates())[1]
    except Permanent as e:
        return {"refused": str(e)}


# general.architecture -> transformers' model_type where they differ (transformers' load_gguf_checkpoint); those
# in _RENAMED are renamed in the file's string values too, as transformers does
_RENAMED = {"qwen2moe": "qwen2_moe", "gpt-oss": "gpt_oss", "qwen3moe": "qwen3_moe", "minimax-m2": "minimax_m2"}
_MODEL_TYPES = {**_RENAMED, "gemma3": "gemma3_text", "gemma4": "gemma4_text", "qwen35": "qwen3_5_text"}


class _Backend:
    """A ``tokenizers.Tokenizer`` called as a transformers tokenizer is (``tok(text, add_special_tokens=...)``)."""

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}


def rebuilt_backend(gguf_path: str):
    """The backend tokenizer transformers builds from a GGUF file (``convert_gguf_tokenizer`` on the vocabulary
    section, renamed by its own ``GGUF_TOKENIZER_MAPPING``), read with qfarm's header reader instead of loading
    transformers' model stack. No transformers tokenizer class changes its backend's pre-tokenizer or normalizer
    after building it (tests/integration/test_validate_checks.py compares the ids with AutoTokenizer's). None
    where this file's family has no converter or its header does not read so: the caller goes the long way."""
    from transformers.integrations.ggml import GGUF_TO_FAST_CONVERTERS, GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    from qfarm.sweep.modelinfo import gguf_metadata

    keys = {f"tokenizer.{k}" for section in GGUF_TOKENIZER_MAPPING.values() for k in section}
    try:
        meta = gguf_metadata(Path(gguf_path), keys | {"general.architecture", "general.name"},
                             arrays=frozenset(k for k in keys if k.endswith(("tokens", "scores", "token_type", "merges"))))
    except (OSError, ValueError):
        return None
    arch, name = str(meta.get("general.architecture", "")), str(meta.get("general.name", "")).lower()
    model_type = _MODEL_TYPES.get(arch, arch)
    if model_type not in GGUF_TO_FAST_CONVERTERS or "llama" in arch and "mistral" in name:
        return None  # t5, and a Mistral transformers renames by its name: the long way
    renames = GGUF_TOKENIZER_MAPPING["tokenizer"]
    section = {renames[k[len("tokenizer."):]]: v for k, v in meta.items() if k[len("tokenizer."):] in renames}
    if arch in _RENAMED:
        section = {k: v.replace(arch, model_type) if isinstance(v, str) else v for k, v in section.items()}
    try:
        backend, _ = convert_gguf_tokenizer(model_type, section)
    except Exception:  # noqa: BLE001 - a vocabulary the light way cannot convert: the long way says why
        return None
    return _Backend(backend)


if __name__ == "__main__":  # python -m workers.evaluate.checks MODEL_JSON: one JSON line (qfarm.sweep.modelinfo.gguf_tokenizer)
    import sys

    try:
        found = probe(json.loads(sys.argv[1]))
    except Exception as e:  # noqa: BLE001 - whatever stops the probe here is for the jobs to report
        found = {"error": f"{type(e).__name__}: {e}"[:300]}
    print(json.dumps(found))
