"""qfarm's rebuild of a GGUF's SentencePiece BPE vocabulary (workers.shared.gguf_tokenizer) against SentencePiece
itself, on a vocabulary trained here: the same ids on real text, where transformers' Gemma converter (a Unigram
over the same scores) cuts words differently."""

from __future__ import annotations

import pytest

from tests.tiny import SPM_SPECIALS, corpus_of, spm_vocabulary, train_spm_bpe


def _trained(shared_data, prefix: bool):
    import sentencepiece as spm

    model = train_spm_bpe(corpus_of(shared_data / "guanaco_llama2_1k" / "train.jsonl", 400), prefix=prefix)
    return spm.SentencePieceProcessor(model_proto=model), {**spm_vocabulary(model), "tokenizer.ggml.add_space_prefix": prefix}


@pytest.fixture(scope="module")
def trained(shared_data):
    return _trained(shared_data, prefix=False)


@pytest.mark.parametrize("prefix", [False, True], ids=["gemma-no-prefix", "llama-space-prefix"])
def test_the_rebuild_cuts_text_as_sentencepiece_bpe_does(shared_data, prefix):
    from workers.evaluate.checks import LEADING, PROBE
    from workers.shared.gguf_tokenizer import spm_backend

    sp, meta = _trained(shared_data, prefix)
    backend = spm_backend(meta)
    wiki = (shared_data / "wikitext2" / "wiki.test.raw").read_text()[:60_000]  # it starts with a space
    chat = f"{SPM_SPECIALS[0]}user\nWhat is 12+30?{SPM_SPECIALS[1]}\n  naïve 東京 ✓"
    # (after a special piece llama.cpp puts the space prefix again, SentencePiece does not: checked against
    # llama.cpp itself in tests/integration/test_llama_cpp.py)
    for text in (PROBE, LEADING, wiki) + (() if prefix else (chat,)):
        ours = backend.encode(text, add_special_tokens=False).ids
        assert ours == sp.encode(text), text[:60]
        assert backend.decode(ours) == text  # byte pieces and '▁' come back as the text
    assert backend.encode(chat, add_special_tokens=False).ids[0] == sp.piece_to_id(SPM_SPECIALS[0])  # matched whole


def test_transformers_own_gemma_rebuild_of_the_same_vocabulary_cuts_it_differently(trained, shared_data):
    """The reason for the rebuild: transformers' GGUF Gemma converter makes a Unigram model of these scores."""
    from transformers.integrations.ggml import convert_gguf_tokenizer

    sp, meta = trained
    section = {"tokens": meta["tokenizer.ggml.tokens"], "scores": meta["tokenizer.ggml.scores"],
               "token_type": meta["tokenizer.ggml.token_type"], "unk_token_id": 3, "bos_token_id": 2,
               "eos_token_id": 1, "add_prefix_space": False}
    backend, _ = convert_gguf_tokenizer("gemma2", section)
    wiki = (shared_data / "wikitext2" / "wiki.test.raw").read_text()[:60_000]
    assert backend.encode(wiki, add_special_tokens=False).ids != sp.encode(wiki)


def test_merges_rank_the_highest_scoring_piece_first():
    from workers.shared.gguf_tokenizer import spm_merges

    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [0, 0, 0, -1.0, -0.5, -2.0]
    assert spm_merges(tokens, scores) == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]
