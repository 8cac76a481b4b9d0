"""A search's ``final`` job (successive halving, ``search.halving``): once every screened candidate has ended, the
one its screen ranked ``rank`` (by the search's objective on the screen's few windows, among those that met the
target) is evaluated in full: its own artifact, loaded as the ``evaluate`` kind loads a checkpoint (a GGUF in
llama.cpp, compressed-tensors decompressed, as the candidate's own row was), nothing quantized again.

Its row is that candidate's model: the artifact's facts (method, bits per weight, layer formats, size, what the
probes predicted) carried over from the candidate's row, measured again in full (perplexity, KL, speed, tasks),
with ``search_screen`` saying what the screen measured and where it ranked. The pick is the best final
(qfarm.results.compare.mark_search_pick).

Halving over several rungs (``windows: [2, 6], keep: [6, 2]``): a ``rung`` job is this same job on the next rung's
windows, ranking the jobs of the rung before (the candidates, or an earlier rung's jobs, whose rows carry the
artifact's facts on); its row stands for the candidate it was chosen from (``search_final_of``), and
``search_screen`` nests what each rung before measured (``before``).
"""

from __future__ import annotations

import time
from pathlib import Path

from qfarm.errors import Permanent

# measured again here, in full: not carried over from the screen
REMEASURED = ("kl_div", "perplexity", "decode_tokens_per_s")
# said anew here from the chosen row's (a rung's row holds them: the candidate it stands for, its rungs' screens)
LINEAGE = ("search_final_of", "search_final_label", "search_fragment", "search_screen")


def ranked(after: list[dict], search: dict) -> list[dict]:
    """The screened candidates that succeeded and met the target with a measured objective, best first (an equal
    objective: the smaller artifact first, then the job id)."""
    from qfarm.sweep.search import rank_key

    keyed = [(rank_key(search.get("target") or {}, search.get("objective"), search.get("direction"),
                       cand.get("result") or {}), cand) for cand in after if cand.get("status") == "succeeded"]
    return [cand for _, cand in sorted(((k, c) for k, c in keyed if k is not None), key=lambda kc: (kc[0], kc[1]["id"]))]


def run(ctx) -> dict:
    from qfarm.results.rows import fragment
    from qfarm.sweep.search import SCREEN_KEYS
    from workers.evaluate.checkpoint import load_checkpoint
    from workers.evaluate.harness import PeakMemory, evaluate, reference_first
    from workers.shared.card import CARD
    from workers.shared.files import inside
    from workers.shared.models import dir_bytes, prepared_base, shared_columns, start, tensor_bytes

    start(ctx)
    search, opts = ctx.job.search or {}, ctx.job.opts
    after = ctx.job.input.after
    order = ranked(after, search)
    if len(order) < opts.rank:
        ended = sum(1 for c in after if c.get("status") == "succeeded")
        raise Permanent(f"no candidate at rank {opts.rank} of the screen: {len(order)} of the {len(after)} screened "
                        f"candidates ({ended} succeeded) met the target with a measured {search.get('objective')}")
    chosen = order[opts.rank - 1]
    screen = chosen["result"]
    if not isinstance(screen.get("artifact"), str):
        raise Permanent(f"the candidate {chosen.get('label')} ({chosen['id']}) has no artifact to evaluate")
    folder = Path(inside(ctx.output_root, screen["artifact"]))
    card = folder / CARD  # written after the candidate's row was measured (workers.actor): not what it measured
    size = dir_bytes(str(folder)) - (card.stat().st_size if card.is_file() else 0) if folder.is_dir() else None
    if size is None or abs(size / 2**20 - float(screen.get("size_mb") or -1)) > 1e-6:
        raise Permanent(f"the artifact of {chosen.get('label')} ({folder}) is not what its screen measured "
                        f"({screen.get('size_mb')} MB then, {None if size is None else size / 2**20} MB now)")
    ggufs = sorted(folder.glob("*.gguf"))
    ref = {"kind": "gguf", "location": str(folder), "gguf_file": ggufs[0].name} if ggufs else \
        {"kind": "hf_dir", "location": str(folder), "name": chosen.get("label")}
    with PeakMemory() as mem:
        base, prepare_s, cached = prepared_base(ctx)
        ctx.extra["base_during_job"] = reference_first(ctx, base)
        ctx.progress(f"loading {chosen.get('label')} (screen rank {opts.rank})")
        t0 = time.time()
        model, _, _ = load_checkpoint(ctx, ref)
        load_s = time.time() - t0
        metrics = evaluate(ctx, model, base)
    in_memory = getattr(model, "nbytes", None) or tensor_bytes(model)
    column = search.get("objective")
    carried = {k: screen[k] for k in SCREEN_KEYS if k in screen and k not in REMEASURED + LINEAGE and k != column}
    result = {
        **shared_columns(ctx, base, size_bytes=size, size_source="disk", model=model, model_bytes=in_memory,
                         peak_mb=mem.mb, prepare_s=prepare_s, cached=cached, artifact=str(folder)),
        **carried,
        "load_s": load_s,
        # the candidate it stands for: the chosen job itself, or, chosen from a rung, the candidate that rung's stood for
        "search_final_of": screen.get("search_final_of") or chosen["id"],
        "search_final_label": screen.get("search_final_label") or chosen.get("label"),
        "search_screen": {"rank": opts.rank, "of": opts.of, "met_target": len(order), "windows": opts.windows,
                          column: screen.get(column),
                          **({"before": screen["search_screen"]} if screen.get("search_screen") else {})},
        "search_fragment": screen.get("search_fragment") or fragment(chosen.get("options") or {}, screen),
        **ctx.extra,
        **getattr(model, "extra", {}),
        **metrics,
    }
    return result
