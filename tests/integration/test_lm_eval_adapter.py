"""qfarm's lm-eval adapter (workers.evaluate.tasks.runner_lm, what GGUF rows are scored through) answers lm-eval's
requests as lm-eval's own HFLM does, on the same model: the same log-likelihoods, greedy flags, rolling
log-likelihoods and generations, with and without a tokenizer that adds BOS."""

from __future__ import annotations

import pytest

from tests.tiny import make_tiny_model

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the eval extra (make install puts it in)")

CORPUS = ["the cat sat on the mat and the dog sat on the log", "a bird flew over the house by the sea",
          "one two three four five six seven eight nine ten", "the sea is blue and the sky is blue too"] * 4


@pytest.mark.parametrize("bos", [False, True])
def test_the_adapter_answers_as_hflm_does(tmp_path, bos):
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.evaluate.harness import TorchRunner
    from workers.evaluate.tasks import runner_lm

    folder = make_tiny_model(tmp_path / "m", CORPUS, seed=3, bos=bos)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ours, theirs = runner_lm(TorchRunner(model), tok, 256), HFLM(pretrained=model, tokenizer=tok, batch_size=1)

    def reqs(kind, args):
        return [Instance(kind, {}, a, i) for i, a in enumerate(args)]

    pairs = [("the cat sat on the", " mat"), ("one two three", " four five"), ("a bird ", "flew over"),
             ("", "the sea is blue"), ("the sky is", " blue too and the dog sat on the log")]
    a = ours.loglikelihood(reqs("loglikelihood", pairs))
    b = theirs.loglikelihood(reqs("loglikelihood", pairs))
    assert [g for _, g in a] == [g for _, g in b]
    assert [x for x, _ in a] == pytest.approx([x for x, _ in b], abs=1e-4)
    assert len({round(x, 3) for x, _ in a}) == len(pairs)  # distinct figures: a real comparison, not all zeros

    texts = [(" ".join(CORPUS),), ("the cat sat",)]
    assert ours.loglikelihood_rolling(reqs("loglikelihood_rolling", texts)) == pytest.approx(
        theirs.loglikelihood_rolling(reqs("loglikelihood_rolling", texts)), abs=1e-3)

    gen = [("the cat sat on the", {"until": ["log"], "max_gen_toks": 8, "do_sample": False}),
           ("one two three", {"until": ["\n"], "max_gen_toks": 5, "do_sample": False})]
    assert ours.generate_until(reqs("generate_until", gen)) == theirs.generate_until(reqs("generate_until", gen))
