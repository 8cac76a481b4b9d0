"""Downstream tasks through lm-evaluation-harness (``eval.tasks``): the harness's own task definitions, prompts,
metrics and standard errors, run on every row of a sweep.

- A transformers row is wrapped as it is already loaded (``HFLM(pretrained=model)``: no second load), with the
  harness's defaults, so the reference row's figures are the ones ``lm_eval --model hf`` prints for its folder.
- A llama.cpp row (GGUF) goes through ``RunnerLM``: an lm-eval ``LM`` over the harness protocol of
  ``workers.evaluate.harness`` (log-probs of a token sequence; greedy continuation), tokenizing exactly as HFLM does
  (context/continuation split, BOS by the tokenizer's own convention, left truncation) with the tokenizer the
  reference checks (workers.evaluate.checks), so its figures are comparable with the reference's.

Columns (one set per task, named after it): ``<task>_<metric>`` (e.g. ``arc_easy_acc``, ``arc_easy_acc_norm``;
a metric under a filter other than the task's first is ``<task>_<metric>_<filter>``), each with ``_se``, the
harness's standard error; ``tasks`` records per task its main metric (the first the harness reports), which way
is better, the documents scored and the few-shot count. ``<task>_recovery`` (variant / reference on the main
metric) is computed when results are shown (qfarm.results.compare), against the sweep's reference row.
"""

from __future__ import annotations

import contextlib
import logging
import os

from qfarm.results.columns import column_name

TASK_CONTEXT = 2048  # tokens of context a llama.cpp row gets when the sweep has tasks (few-shot prompts are long)


def task_columns(name: str, results: dict) -> dict:
    """The columns of one task from lm-eval's results dict (``simple_evaluate``'s return value)."""
    scores = (results.get("results") or {}).get(name)
    if scores is None:
        groups = results.get("groups") or {}
        scores = groups.get(name)
    if scores is None:
        raise ValueError(f"lm-eval returned no scores for {name!r} (it returned {sorted(results.get('results') or {})})")
    better = (results.get("higher_is_better") or {}).get(name) or {}
    first_filter: dict[str, str] = {}
    out: dict = {}
    main = None
    for key, value in scores.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        first_filter.setdefault(metric, filt)
        col = column_name(name, metric) if filt == first_filter[metric] else column_name(name, metric, filt)
        out[col] = _number(value)
        out[f"{col}_se"] = _number(scores.get(f"{metric}_stderr,{filt}"))
        if main is None and out[col] is not None:
            main = (col, metric)
    if main is None:
        raise ValueError(f"lm-eval reported no numeric metric for {name!r}: {scores}")
    samples = (results.get("n-samples") or {}).get(name) or {}
    out["tasks"] = {name: {
        "column": main[0],
        "metric": main[1],
        "higher_is_better": bool(better.get(main[1], True)),
        "samples": samples.get("effective"),
        "num_fewshot": (results.get("n-shot") or {}).get(name),
        "version": (results.get("versions") or {}).get(name),
    }}
    return out


def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def harness_lm(model, base, batch_size: int):
    """The lm-eval ``LM`` for a row's model: HFLM around a transformers model, RunnerLM around llama.cpp."""
    if hasattr(model, "logprobs"):  # speaks the harness protocol itself (workers.quantize.gguf.LlamaCppModel)
        return runner_lm(model, base.tokenizer, getattr(model, "n_ctx", TASK_CONTEXT))
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=base.tokenizer, batch_size=batch_size)


def run_tasks(ctx, model, base) -> dict:
    """Every ``eval.tasks`` entry on ``model``: its columns (see the module docstring)."""
    ev = ctx.job.evaluation
    if ev is None or not ev.tasks:
        return {}
    try:
        import lm_eval
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError:
        from qfarm.errors import Permanent

        raise Permanent("eval.tasks needs lm-evaluation-harness on the workers: pip install 'qfarm[eval]' "
                        "(lm_eval)") from None
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars would fill the worker's log
    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "lm_eval.models.huggingface"):
        logging.getLogger(name).setLevel(logging.WARNING)
    paths = [p["path"] for p in ev.task_paths]
    manager = task_manager(TaskManager, paths, [task.name for task in ev.tasks])
    lms: dict[int, object] = {}
    out: dict = {"lm_eval_version": lm_eval.__version__, "tasks": {}}
    for i, task in enumerate(ev.tasks):
        ctx.progress(f"lm-eval {task.name} ({i + 1}/{len(ev.tasks)})")
        bs = task.batch_size
        if bs not in lms:
            lms[bs] = harness_lm(model, base, bs)
        try:
            with _cwd(paths[0] if paths else None):  # relative data_files of a local task start at its folder
                results = simple_evaluate(model=lms[bs], tasks=[task.name], num_fewshot=task.num_fewshot,
                                          limit=task.limit, task_manager=manager, log_samples=False,
                                          bootstrap_iters=task.bootstrap_iters)
        except (KeyError, ValueError) as e:
            from qfarm.errors import Permanent

            raise Permanent(f"lm-eval could not run task {task.name!r}: {e}") from None
        cols = task_columns(task.name, results)
        out["tasks"].update(cols.pop("tasks"))
        out.update(cols)
    return out


def task_manager(manager_class, paths: list[str], names: list[str]):
    """lm-eval's task index over the spec's task folders alone where they define every task asked for as a plain
    task (not a group or tag, which may name lm-eval's own tasks); else over lm-eval's own ~14,000 task files too
    (indexing those takes ~15 s of a job). A folder's task overrides lm-eval's of the same name either way."""
    if paths:
        local = manager_class(include_path=paths, include_defaults=False)
        if all(name in local.all_subtasks for name in names):
            return local
    return manager_class(include_path=paths or None)


@contextlib.contextmanager
def _cwd(path: str | None):
    before = os.getcwd()
    if path:
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def runner_lm(runner, tokenizer, max_length: int):
    """An lm-eval LM over a model that answers ``logprobs(window)`` and ``greedy(ids, n, pad, stop=)``."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class RunnerLM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.runner, self.tokenizer, self._max_length = runner, tokenizer, max_length

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        @property
        def max_length(self) -> int:
            return self._max_length

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            bos = self.tokenizer.decode(self.prefix_token_id)
            if add_special_tokens is None and bos and string.startswith(bos):
                kw["add_special_tokens"] = False  # as HFLM: a string that already starts with BOS
            return self.tokenizer.encode(string, **kw)

        def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
            import torch

            ids = (context + continuation)[-(self.max_length + 1):]  # HFLM's left truncation
            lp = self.runner.continuation_logprobs(ids, len(continuation))
            target = torch.tensor(continuation, dtype=torch.long)
            total = lp.gather(-1, target.unsqueeze(-1)).sum().item()
            return float(total), bool((lp.argmax(-1) == target).all())

        def _loglikelihood_tokens(self, requests, **kwargs):
            return [self._score(ctx_ids, cont_ids) for _, ctx_ids, cont_ids in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for (string,) in (r.args for r in requests):
                windows = map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1))
                out.append(sum(self._score(c, t)[0] for c, t in windows))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for context, gen_kwargs in (r.args for r in requests):
                kw = normalize_gen_kwargs(dict(gen_kwargs), 256)
                until = handle_stop_sequences(kw.pop("until", None), eos=self.tokenizer.decode(self.eot_token_id))
                budget = kw.pop("max_gen_toks")
                ids = self.tok_encode(context)[-(self.max_length - budget):]

                def stop(new: list[int]) -> bool:
                    text = self.tokenizer.decode(new)
                    return any(u and u in text for u in until)

                new = self.runner.greedy(ids, budget, self.tokenizer.eos_token_id, stop=stop)
                text = postprocess_generated_text(self.tokenizer.decode(new), stop=until, think_end_token=None)
                out.append(text)
            return out

    return RunnerLM()
