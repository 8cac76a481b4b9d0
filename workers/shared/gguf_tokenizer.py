"""A GGUF file's own tokenizer, as a transformers tokenizer: the one every row of a GGUF-sourced sweep uses.

The token ids llama.cpp gives are, by construction, the rows of the file's embedding matrix. transformers rebuilds a
tokenizer from the file's vocabulary (``AutoTokenizer.from_pretrained(folder, gguf_file=...)``), and for most files
it agrees with llama.cpp; for some it does not: Gemma's files are SentencePiece **BPE** (``tokenizer.ggml.model:
llama``), which llama.cpp runs as "merge the adjacent pair whose merged piece scores highest", while transformers'
Gemma converter rebuilds them as a Unigram model over the same scores and cuts words differently.

``spm_backend`` rebuilds such a vocabulary the way llama.cpp runs it (llama-vocab.cpp, ``llm_tokenizer_spm``):
- a BPE whose merges are every split ``a + b`` of every piece, ranked by the merged piece's score (highest first);
- characters without a piece fall back to ``<0xXX>`` byte pieces;
- ``' '`` becomes ``'▁'``, and ``'▁'`` is put before the text and after every special piece where the file says
  ``tokenizer.ggml.add_space_prefix`` (llama.cpp's default for these files: true);
- control and user-defined pieces are matched whole before anything else (llama.cpp's special-token partition).

``candidates`` are the tokenizers to try, transformers' own first: the first that gives llama.cpp's ids on the
probe text (workers.evaluate.checks) is the one saved beside the float copy, so calibration, training, evaluation
and prompts all use it. A file neither agrees on is refused, as before.
"""

from __future__ import annotations

from pathlib import Path

# gguf's TokenType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
REPAIRED = "rebuilt by qfarm from the file's SentencePiece scores, as llama.cpp runs them"
_KEYS = {"tokenizer.ggml.model", "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.bos_token_id",
         "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
         "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.chat_template"}
_ARRAYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"})


def vocabulary(gguf_path: str) -> dict | None:
    """The tokenizer section of a GGUF header (qfarm's plain reader: no numpy, no transformers); None where the file
    is not a SentencePiece vocabulary (``tokenizer.ggml.model`` other than ``llama``) or has no scores."""
    from qfarm.sweep.modelinfo import gguf_metadata

    meta = gguf_metadata(Path(gguf_path), _KEYS | _ARRAYS, arrays=_ARRAYS)
    if meta.get("tokenizer.ggml.model") != "llama" or not meta.get("tokenizer.ggml.scores"):
        return None
    return meta


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of every piece into two pieces of the vocabulary, highest-scoring merged piece first (ties: the
    shorter left part first, as transformers' SentencePiece extractor orders them)."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for piece, score in zip(tokens, scores):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                found.append((-score, ids[piece], cut, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def spm_backend(meta: dict):
    """A ``tokenizers.Tokenizer`` that cuts text as llama.cpp cuts it with this SentencePiece vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    tokens = [str(t) for t in meta["tokenizer.ggml.tokens"]]
    scores = [float(s) for s in meta["tokenizer.ggml.scores"]]
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    unk = _special(meta, "unknown")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated piece: llama.cpp's text-to-id map keeps the first
    backend = Tokenizer(BPE(vocab=vocab, merges=spm_merges(tokens, scores), byte_fallback=True, fuse_unk=False,
                            unk_token=None if unk is None else tokens[unk]))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # normalizers, not a Metaspace pre-tokenizer: that one puts no '▁' before a text that starts with a space, and
    # llama.cpp does; each stretch of text between two special pieces is normalized alone, as llama.cpp escapes it
    backend.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if prefix else [])
                                              + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == CONTROL and t])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == USER_DEFINED and t])
    bos, eos = _special(meta, "bos"), _special(meta, "eos")
    template = ([f"{tokens[bos]}"] if bos is not None and meta.get("tokenizer.ggml.add_bos_token") else []) + ["$A"] + \
               ([f"{tokens[eos]}"] if eos is not None and meta.get("tokenizer.ggml.add_eos_token") else [])
    if template != ["$A"]:
        used = [(tokens[i], i) for i in (bos, eos) if i is not None and tokens[i] in template]
        backend.post_processor = processors.TemplateProcessing(single=" ".join(template), special_tokens=used)
    return backend


def _special(meta: dict, name: str) -> int | None:
    """The id of the file's ``name`` token (bos, eos, unknown, padding), None where it names none."""
    i = meta.get(f"tokenizer.ggml.{name}_token_id")
    n = len(meta["tokenizer.ggml.tokens"])
    return int(i) if i is not None and 0 <= int(i) < n else None


def repaired(gguf_path: str, like=None):
    """The file's vocabulary as a transformers tokenizer that cuts text as llama.cpp does (``spm_backend``), with the
    special tokens and chat template the file names (or ``like``'s, transformers' own rebuild); None where the file
    is not a SentencePiece vocabulary."""
    from transformers import PreTrainedTokenizerFast

    meta = vocabulary(gguf_path)
    if meta is None:
        return None
    tokens = meta["tokenizer.ggml.tokens"]
    named = {f"{name}_token": tokens[i] for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
             if (i := _special(meta, key)) is not None}
    template = meta.get("tokenizer.chat_template") or getattr(like, "chat_template", None)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=spm_backend(meta), **named,
                                        **({"chat_template": template} if template else {}))
    return tokenizer


def candidates(folder: str, gguf_file: str):
    """The tokenizers to try for a GGUF file, in order, each with what it is: transformers' own rebuild, then
    qfarm's SentencePiece rebuild where the file has such a vocabulary. Lazy: the second is built only if asked."""
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    yield own, "transformers' own rebuild"
    fixed = repaired(f"{folder}/{gguf_file}", like=own)
    if fixed is not None:
        yield fixed, REPAIRED
