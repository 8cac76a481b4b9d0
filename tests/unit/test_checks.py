"""The reference's self-checks as pure logic (workers.evaluate.checks): tokenizations that part, BOS conventions, and the
bits-per-byte / tokens-per-byte bounds a real reference stays inside."""

from __future__ import annotations

import math

import pytest

from qfarm.errors import Permanent


def tokenizer(bos: bool):
    """A word-level tokenizer that adds <s> before every text when ``bos`` (a post-processor, as Llama's does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_disagreement_says_where_two_tokenizations_part():
    from workers.evaluate.checks import disagreement

    assert disagreement([1, 2, 3], [1, 2, 3]) is None
    assert disagreement([5, 9, 9, 9], [5, 7]) == ("4 vs 2 tokens on the probe text, first different at token 1 "
                                                 "(transformers [9, 9, 9] vs llama.cpp [7])")
    assert "first different at token 2" in disagreement([1, 2], [1, 2, 3])  # one a prefix of the other


@pytest.mark.parametrize("adds", [True, False])
def test_the_bos_convention_is_read_from_the_tokenizer(tmp_path, adds):
    from workers.evaluate.checks import conventions

    found = conventions(str(tmp_path), tokenizer(adds))
    assert found["add_bos"] is adds and found["bos_id"] == (1 if adds else None)


def test_a_gguf_folder_says_its_convention_in_its_checks_file(tmp_path):
    import json

    from workers.evaluate.checks import CHECKS_FILE, conventions

    (tmp_path / CHECKS_FILE).write_text(json.dumps({"tokenizer_check": "agrees", "add_bos": True, "bos_id": 1}))
    assert conventions(str(tmp_path), tokenizer(False)) == {"tokenizer_check": "agrees", "add_bos": True, "bos_id": 1}


def test_windows_start_with_bos_when_the_model_wants_it():
    from workers.shared.data import windows

    tok = tokenizer(False)
    text = " ".join(["a b"] * 20)  # 40 tokens
    plain = windows(tok, text, 8, 10)
    with_bos = windows(tok, text, 8, 10, bos_id=1)
    assert plain.shape == (5, 8) and with_bos.shape == (5, 8)
    assert (with_bos[:, 0] == 1).all() and (plain != 1).all()
    assert with_bos[0, 1:].tolist() == plain.flatten()[:7].tolist()  # then the text, in order


def test_a_sane_reference_passes_and_says_its_bits_per_byte():
    from workers.evaluate.checks import check_reference

    tokens, nbytes = 1000, 4000  # ~4 bytes a token, as English BPE
    out = check_reference(math.log(30.0) * tokens, tokens, nbytes, 49152)
    assert out["bits_per_byte"] == pytest.approx(math.log2(30.0) / 4) and out["tokens_per_byte"] == 0.25
    check_reference(math.log(50_000) * tokens, tokens, nbytes, 49152)  # a random model: bad, but possible


def test_a_reference_that_cannot_be_right_fails_with_the_reason():
    from workers.evaluate.checks import check_reference

    with pytest.raises(Permanent, match=r"cut the evaluation text into single characters \(1.00 tokens per byte"):
        check_reference(math.log(20.0) * 4000, 4000, 4000, 32000)  # ids one character at a time
    with pytest.raises(Permanent, match="worse than a uniform guess over bytes"):
        check_reference(math.log(30_000) * 1000, 1000, 1500, 256)  # 9.9 bits a byte
    check_reference(math.log(3.0) * 4000, 4000, 4000, 256)  # a byte-level model is allowed one token a byte
