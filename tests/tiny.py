"""A tiny random Llama (2 layers, hidden 64) with a word-level tokenizer trained here: a real Hugging Face model
folder, made in a second with no hub, for tests of the farm's plumbing (DAG, train, merge) rather than quality."""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("llama", "qwen2", "gemma2", "gpt2", "phi3", "mixtral")


def family_config(family: str, vocab: int, pad: int, eos: int):
    """A tiny config of one model family (2 blocks, hidden 64), as transformers defines the family."""
    import transformers as t

    common = dict(vocab_size=vocab, pad_token_id=pad, eos_token_id=eos, bos_token_id=None, tie_word_embeddings=False)
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=512, **common)
    return {
        "llama": lambda: t.LlamaConfig(num_key_value_heads=4, **small),
        "qwen2": lambda: t.Qwen2Config(num_key_value_heads=2, **small),
        "gemma2": lambda: t.Gemma2Config(num_key_value_heads=2, head_dim=16, **small),
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
