"""A tiny random Llama (2 layers, hidden 64) with a word-level tokenizer trained here: a real Hugging Face model
folder, made in a second with no hub, for tests of the farm's plumbing (DAG, train, merge) rather than quality."""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("llama", "qwen2", "gemma2", "gpt2", "phi3", "mixtral")


def family_config(family: str, vocab: int, pad: int, eos: int):
    """A tiny config of one model family (2 blocks, hidden 64), as transformers defines the family: FAMILIES, and
    Gemma 3's text model (``gemma3``: the GGUF tokenizer test's)."""
    import transformers as t

    common = dict(vocab_size=vocab, pad_token_id=pad, eos_token_id=eos, bos_token_id=None, tie_word_embeddings=False)
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=512, **common)
    return {
        "llama": lambda: t.LlamaConfig(num_key_value_heads=4, **small),
        "qwen2": lambda: t.Qwen2Config(num_key_value_heads=2, **small),
        "gemma2": lambda: t.Gemma2Config(num_key_value_heads=2, head_dim=16, **small),
        "gemma3": lambda: t.Gemma3TextConfig(num_key_value_heads=1, head_dim=16, sliding_window=64, **small),
        "gpt2": lambda: t.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common),
        "phi3": lambda: t.Phi3Config(num_key_value_heads=4, **small),
        "mixtral": lambda: t.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **small),
    }[family]()


def make_tiny_model(folder: Path, corpus: list[str], seed: int = 0, bos: bool = False,
                    characters: bool = False, family: str = "llama") -> Path:
    """``bos``: its tokenizer puts <s> before every text (as Llama's does); ``characters``: a tokenizer that cuts
    text into single characters although its vocabulary is large (what a wrongly rebuilt tokenizer does);
    ``family``: one of FAMILIES (a Llama by default)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<pad>", "</s>", "<s>"]
    if characters:
        chars = sorted({c for text in corpus for c in text} - set(specials))
        vocab = {t: i for i, t in enumerate(specials + chars + [f"<x{i}>" for i in range(1200)])}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    else:
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(corpus, trainers.WordLevelTrainer(vocab_size=512, special_tokens=specials))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>")
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = family_config(family, len(fast), fast.pad_token_id, fast.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def corpus_of(jsonl: Path, n: int = 300, field: str = "text") -> list[str]:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()[:n] if line.strip()]
    return [str(r[field]) for r in rows]


def guanaco_rows(shared_data: Path, folder: Path, n: int) -> Path:
    """The first ``n`` rows of ../shared/data's guanaco-llama2-1k as a .jsonl under ``folder``: a small real dataset
    for training and evaluation in tests."""
    data = folder / "guanaco.jsonl"
    data.write_text("\n".join((shared_data / "guanaco_llama2_1k" / "train.jsonl").read_text().splitlines()[:n]))
    return data


SPM_SPECIALS = ("<start_of_turn>", "<end_of_turn>")  # user-defined pieces, as Gemma's vocabulary has


def train_spm_bpe(corpus: list[str], vocab_size: int = 3000, prefix: bool = False) -> bytes:
    """A SentencePiece **BPE** model trained here on ``corpus`` (Gemma's kind: byte fallback, digits split, no
    normalization, Gemma's ids for pad/eos/bos/unk, two user-defined pieces; ``prefix``: a space before the text,
    as Llama-2's), as the bytes of its ``tokenizer.model``."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=out, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        add_dummy_prefix=prefix, pad_id=0, eos_id=1, bos_id=2, unk_id=3, split_digits=True, character_coverage=1.0,
        user_defined_symbols=list(SPM_SPECIALS), remove_extra_whitespaces=False, normalization_rule_name="identity",
        minloglevel=2, num_threads=1)
    return out.getvalue()


def spm_vocabulary(model: bytes) -> dict:
    """A SentencePiece model's vocabulary as a GGUF header holds it (``tokenizer.ggml.*``: tokens, scores, types)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    n = sp.get_piece_size()
    kinds = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i)
             else 4 if sp.id_to_piece(i) in SPM_SPECIALS else 1 for i in range(n)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)], "tokenizer.ggml.token_type": kinds,
            "tokenizer.ggml.unknown_token_id": sp.unk_id(), "tokenizer.ggml.bos_token_id": sp.bos_id(),
            "tokenizer.ggml.eos_token_id": sp.eos_id(), "tokenizer.ggml.add_space_prefix": False}


def make_spm_gguf(folder: Path, corpus: list[str], family: str = "gemma3", seed: int = 0, prefix: bool = False) -> Path:
    """A tiny ``family`` model whose tokenizer is a SentencePiece BPE trained here (``train_spm_bpe``), made a GGUF
    (float32) by llama.cpp's own converter from a folder with that ``tokenizer.model``: a file of the kind Gemma's
    are, whose tokenizer transformers rebuilds as a Unigram model. Its weights are random but peaked (a larger
    initializer range), so that cutting the text differently changes its perplexity; ``prefix``: a vocabulary that
    puts a space before the text (Llama-2's and Phi-3's kind). Returns the .gguf path."""
    import os
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    from workers.quantize.gguf import converter

    hf = folder / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    model = train_spm_bpe(corpus, prefix=prefix)
    (hf / "tokenizer.model").write_bytes(model)
    vocab = len(spm_vocabulary(model)["tokenizer.ggml.tokens"])
    (hf / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False,
                                                          "tokenizer_class": "LlamaTokenizer",
                                                          "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                                          "unk_token": "<unk>"}))
    torch.manual_seed(seed)
    config = family_config(family, vocab, 0, 1)
    config.bos_token_id, config.initializer_range = 2, 0.2
    if hasattr(config, "query_pre_attn_scalar"):  # Gemma: heads of 256 as its attention scale says (transformers
        config.head_dim = config.query_pre_attn_scalar  # reads no scale from a GGUF, llama.cpp takes the head size),
        config.tie_word_embeddings = True  # and one embedding matrix (llama.cpp's converter drops a Gemma's lm_head)
    AutoModelForCausalLM.from_config(config).save_pretrained(hf)
    script = converter()
    if script is None:
        raise RuntimeError("llama.cpp's converter is not unpacked: run `make llama-cpp-tools`")
    out = folder / f"tiny-{family}-spm-f32.gguf"
    done = subprocess.run([sys.executable, str(script), str(hf), "--outfile", str(out), "--outtype", "f32"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")})
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed: {done.stderr[-2000:]}")
    return out
