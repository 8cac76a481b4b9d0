"""Two local lm-evaluation-harness tasks made from ../shared/data, written as lm-eval task YAMLs:

- ``qfarm_wikinext`` (multiple choice): a WikiText sentence, and which of four sentences comes next in its
  article (the true one, three from other articles); metrics acc and acc_norm;
- ``qfarm_nextword`` (generate until a newline, at most 4 tokens): the first words of a WikiText sentence, and
  whether the first word generated is the one that follows in the article (exact match, case ignored).

Their data files are written beside the YAMLs and named by absolute path, as lm-eval reads them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.conftest import SHARED_DATA as DATA

WIKINEXT = """task: qfarm_wikinext
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

NEXTWORD = """task: qfarm_nextword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prefix}}}}"
doc_to_target: "{{{{word}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
filter_list:
  - name: first-word
    filter:
      - function: regex
        regex_pattern: '(\\S+)'
        group_select: 0
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 1.0
"""


def _sentences(line: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=\.) (?=[A-Z])", line) if len(s.split()) >= 6]


def wikinext_docs(n: int) -> list[dict]:
    text = (DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    pairs = []
    for line in text.splitlines():
        s = _sentences(line.strip())
        if len(s) >= 2 and not line.strip().startswith("="):
            pairs.append((s[0], s[1]))
        if len(pairs) >= n + 3:
            break
    docs = []
    for i in range(n):
        context, true = pairs[i]
        # distractors of about the true sentence's length, from other articles' paragraphs, so that the
        # summed log-likelihood (acc) measures content, not length
        pool = [p[1] for j, p in enumerate(pairs) if abs(j - i) > 5]
        others = sorted(pool, key=lambda s: (abs(len(s.split()) - len(true.split())), s))[:3]
        label = i % 4
        choices = others[:label] + [true] + others[label:]
        docs.append({"context": context, "choices": [" " + c for c in choices], "label": label})
    return docs


def nextword_docs(n: int) -> list[dict]:
    """The first words of a WikiText sentence (at least 8), and the word that follows them."""
    text = (DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    docs = []
    for line in text.splitlines()[200:]:
        for sentence in _sentences(line.strip()):
            words = sentence.split()
            cut = max(8, len(words) * 2 // 3)
            if cut < len(words) and words[cut].isalpha():
                docs.append({"prefix": " ".join(words[:cut]), "word": words[cut]})
                break
        if len(docs) >= n:
            break
    return docs


def write_tasks(folder: Path, mc_docs: int = 60, gen_docs: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, docs, template in (("wikinext", wikinext_docs(mc_docs), WIKINEXT),
                                 ("nextword", nextword_docs(gen_docs), NEXTWORD)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        (folder / f"{name}.yaml").write_text(template.format(data=data), encoding="utf-8")
    return folder
