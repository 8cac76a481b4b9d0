"""`search:` on the bundled model (issue 40): at each target, the pick against the best uniform configuration of the
same space that fits, on the same evaluation windows, and the jobs it took.

    python bench/search.py [--targets 3.5,4.5,5.5] [--methods rtn,gptq,gguf] [--root DIR] [--model M]
    python bench/search.py --size-mb 100,130        # size targets (MB on disk) instead
    python bench/search.py --targets 4.5 --halving "2,3;1/4,6/2"   # each target also with successive halving (one
                                  # screen; rungs): the picks, the windows evaluated and the candidates' job seconds
    python bench/search.py --make-qwen2 DIR   # a Qwen2-shaped model from a config (random init, SmolLM2's
                                              # tokenizer): a second family nothing here was tuned on
    python bench/search.py --budget 5 --grid  # searches of 5 full evaluations (at most a third of the 17
                                              # configurations of the space SmolLM2 can store), against the best of
                                              # the whole uniform grid, run first as a plain sweep of the same jobs

One search per target (the issue's space: rtn and gptq at bits 3/4/8 × group 32/64/128, gguf Q3_K_M..Q8_0, each with
``mixed: true``; budget 16 full evaluations; 8 × 512 tokens of the bundled python-docs text), run one after another
through the CLI against one Redis namespace and output root, so the probes (whose identity holds no target) and the
uniform rows one target shares with another are measured once. Prints, per target: every candidate that meets it
(measured bits per weight, KL ± se, predicted KL for the mixed ones), the best uniform, the pick, the pick's KL
against the best uniform's (goal: at least 15 % lower), the full evaluations and probes run, against the uniform grid
of the space (23 configurations) and the mixed space's size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from farm import REDIS_URL, namespace  # noqa: E402
from model import head_with, prepare  # noqa: E402

SPACE = {
    "rtn": "{method: rtn, bits: [3, 4, 8], group_size: [32, 64, 128], mixed: true}",
    "gptq": "{method: gptq, bits: [3, 4, 8], group_size: [32, 64, 128], mixed: true, "
            "calibration: {samples: 32, seq_len: 256, share: true}}",
    "gguf": "{method: gguf, gguf_type: [Q3_K_M, Q4_K_M, Q5_K_M, Q6_K, Q8_0], mixed: true}",
}


def spec(folder: Path, target: float, methods: list[str], model: str = "bundled:smollm2-135m", size: bool = False,
         halving: str = "", budget: int = 16, grid: bool = False) -> Path:
    """One search's spec; ``grid``: every uniform configuration of the space (no mixes; a target all of them meet)."""
    space = "\n".join(f"    - {SPACE[m].replace(', mixed: true', '') if grid else SPACE[m]}" for m in methods)
    name = "grid" if grid else ("mb-" if size else "") + str(target).replace('.', '_') + \
        (f"-halving-{halving.replace(',', '-').replace('/', '_')}" if halving else "") + \
        (f"-budget-{budget}" if budget != 16 else "")
    path = folder / f"search-{name}.yaml"
    path.write_text(f"""name: bench-search-{name}
model: {model}
eval: {{perplexity: {{seq_len: 512, max_windows: 8}}, speed: null}}
search:
  target: {{{'size_mb' if size else 'bits_per_weight'}: {target}}}
  objective: kl_div
  space:
{space}
  budget: {{jobs: {budget}}}
  probe: {{windows: 2, seq_len: 128, jobs: 4}}
""" + (f"  halving: {halving_yaml(halving)}\n" if halving else ""))
    return path


def halving_yaml(text: str) -> str:
    """``W,K`` (one screen) or ``W1/W2,K1/K2`` (rungs) as the spec's halving mapping."""
    windows, keep = text.split(",")
    if "/" in windows:
        return f"{{windows: [{windows.replace('/', ', ')}], keep: [{keep.replace('/', ', ')}]}}"
    return f"{{windows: {windows}, keep: {keep}}}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", default="3.5,4.5,5.5")
    parser.add_argument("--size-mb", default="", help="size targets (MB on disk) instead of --targets, e.g. 100,130")
    parser.add_argument("--methods", default="rtn,gptq,gguf")
    parser.add_argument("--root", default=None, help="output root (default: a new temporary folder)")
    parser.add_argument("--model", default="bundled:smollm2-135m")
    parser.add_argument("--make-qwen2", default=None, metavar="DIR")
    parser.add_argument("--halving", default="", metavar="W,K[;W1/W2,K1/K2]",
                        help="also run each target with halving: {windows: W, keep: K}, or rungs {windows: [W1, W2], "
                             "keep: [K1, K2]} (several, split by ;), and compare")
    parser.add_argument("--budget", type=int, default=16, help="each search's full evaluations (budget.jobs)")
    parser.add_argument("--grid", action="store_true",
                        help="first run every uniform configuration of the space (a plain grid) and compare each "
                             "pick with the best of the whole grid that meets the target, not only the search's own")
    args = parser.parse_args()
    if args.make_qwen2:
        return make_qwen2(Path(args.make_qwen2))
    size = bool(args.size_mb)
    targets = [float(t) for t in (args.size_mb or args.targets).split(",")]
    methods = args.methods.split(",")
    root = Path(args.root or tempfile.mkdtemp(prefix="qfarm-bench-search-"))
    root.mkdir(parents=True, exist_ok=True)
    prepare(root)
    summary = []
    with namespace() as store, head_with({}, 2) as head:
        env = dict(os.environ, QFARM_REDIS_URL=REDIS_URL, QFARM_NAMESPACE=store.namespace,
                   QFARM_RAY_ADDRESS=head.address, QFARM_OUTPUT_ROOT=str(root))
        ran: set[str] = set()
        halved: dict[float, list[dict]] = {}
        runs = [(t, h) for t in targets for h in [""] + [h for h in args.halving.split(";") if h]]
        grid: list[dict] = []
        if args.grid:
            runs.insert(0, ("grid", ""))
        for target, halving in runs:
            path = (spec(root, 16, methods, args.model, budget=100, grid=True) if target == "grid" else
                    spec(root, target, methods, args.model, size, halving, args.budget))
            plan = subprocess.run([sys.executable, "-m", "qfarm.cli", "validate", str(path)], env=env,
                                  capture_output=True, text=True)
            print(f"\n=== target {target} {'MB' if size else 'bits per weight'} ===\n" + "\n".join(
                line for line in (plan.stdout + plan.stderr).splitlines() if line.startswith(("search", "  "))))
            t0 = time.time()
            out = subprocess.run([sys.executable, "-m", "qfarm.cli", "submit", str(path), "--wait"], env=env,
                                 capture_output=True, text=True, cwd=REPO)
            wall = time.time() - t0
            if out.returncode != 0:
                print(f"sweep failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
            found = store.find_sweep(path.stem.replace("search-", "bench-search-"))
            if found is None:
                continue
            sweep = found.id
            rows = json.loads(subprocess.run([sys.executable, "-m", "qfarm.cli", "results", sweep, "--format", "json"],
                                             env=env, capture_output=True, text=True).stdout)
            new = {r["job_id"] for r in rows} - ran
            ran |= {r["job_id"] for r in rows}
            if target == "grid":
                grid = [r for r in rows if r.get("search_role") == "uniform"]
                print(f"  the grid: {sum(r['status'] == 'succeeded' for r in grid)} uniform configurations measured, "
                      f"{wall / 60:.1f} min")
                continue
            halved.setdefault(target, []).append(rows)
            if not halving:
                summary.append(report({"size_mb" if size else "bits_per_weight": target}, rows, wall, len(new), grid))
    print(f"\n| target {'MB' if size else 'bpw'} | best uniform (bpw, MB, KL ± se) | pick (bpw, MB, KL ± se; predicted) | "
          f"KL vs uniform | full evals (the uniform grid: {len(grid) or 23}) | probes |\n|---|---|---|---|---|---|")
    for line in summary:
        print(line)
    if args.halving:
        variants = [h for h in args.halving.split(";") if h]
        print("\n| target | plain: pick (KL ± se) | windows | job s | " + " | ".join(
            f"halving {h}: pick (KL ± se) | windows | job s" for h in variants) + " |\n|---|---|---|---|"
            + "---|---|---|" * len(variants))
        for target, runs_of in halved.items():
            print(f"| {target} | " + " | ".join(cost(rows) for rows in runs_of) + " |")


def cost(rows: list[dict]) -> str:
    """A search's pick and what its candidates (and finals) cost: perplexity windows evaluated, job seconds."""
    mine = [r for r in rows if r.get("search_role") in ("uniform", "candidate", "rung", "final") and r["status"] == "succeeded"]
    pick = next((r for r in mine if r.get("search_pick")), None)
    windows = sum(r.get("ppl_windows") or 0 for r in mine)
    seconds = sum(r.get("duration_s") or 0 for r in mine)
    said = f"{pick.get('search_final_label') or pick['label']} ({pick['kl_div']:.4f} ± {pick['kl_div_se']:.4f})" \
        if pick else "-"
    return f"{said} | {windows} | {seconds:.0f}"


def make_qwen2(folder: Path) -> None:
    """A Qwen2 (hidden 384, 6 blocks, 6 heads of 64, 2 KV heads, MLP 1024; bf16) from its config, random weights
    (initializer range 0.05: outputs far from uniform), with the bundled SmolLM2's tokenizer (its vocabulary)."""
    import torch
    import transformers as t

    from qfarm.sweep.sources import resolve_model
    from workers.shared.models import base_dir

    ref = resolve_model("bundled:smollm2-135m", folder.parent)
    smol, _ = base_dir({"kind": ref.kind, "location": ref.location, "gguf_file": ref.gguf_file, "key": ref.key},
                       str(folder.parent))
    tokenizer = t.AutoTokenizer.from_pretrained(smol)
    torch.manual_seed(0)
    config = t.Qwen2Config(vocab_size=len(tokenizer), hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                           num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048,
                           tie_word_embeddings=True, initializer_range=0.05, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, torch_dtype="bfloat16")
    model = t.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"wrote {folder}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")


def report(wanted: dict, rows: list[dict], wall: float, new: int, grid: list[dict] = ()) -> str:
    """One target's rows and the line of the summary table; ``grid``: the whole uniform grid's rows (--grid), whose
    best that meets the target is the baseline instead of the best uniform the search ran itself."""
    from qfarm.sweep.search import meets_target

    target = next(iter(wanted.values()))
    ok = [r for r in rows if r.get("search_role") in ("uniform", "candidate") and r["status"] == "succeeded"]
    failed = [r for r in rows if r["status"] != "succeeded"]
    for r in sorted(ok, key=lambda r: r["kl_div"]):
        fits = meets_target(wanted, r)
        pred = f"  predicted {r['search_predicted_kl']:.4f}" if r.get("search_predicted_kl") is not None else ""
        print(f"  {'★' if r.get('search_pick') else ' '} {r['label']:<24} {r['search_role']:<9} bpw {r['bits_per_weight']:.3f}"
              f" {r['size_mb']:.1f} MB"
              f"{'' if fits else ' (over)'}  KL {r['kl_div']:.4f} ± {r['kl_div_se']:.4f}{pred}  Δppl {r['ppl_delta_pct']:+.1f} %")
    for r in failed:
        print(f"  ! {r['label']} {r['status']}: {r.get('error')}")
    uniform = [r for r in ok + [g for g in grid if g["status"] == "succeeded"]
               if r["search_role"] == "uniform" and meets_target(wanted, r)]
    best_u = min(uniform, key=lambda r: r["kl_div"]) if uniform else None
    pick = next((r for r in ok if r.get("search_pick")), None)
    evals = sum(1 for r in rows if r.get("search_role") in ("uniform", "candidate"))
    probes = sum(1 for r in rows if r.get("search_role") == "probe")
    gain = (1 - pick["kl_div"] / best_u["kl_div"]) * 100 if pick and best_u else None
    if grid:  # what the search's own jobs took against the whole grid's (probes, its capture's share apart)
        seconds = sum(r.get("duration_s") or 0 for r in rows if r.get("search_role") in ("uniform", "candidate"))
        probed = sum(r.get("duration_s") or 0 for r in rows if r.get("search_role") == "probe")
        whole = sum(r.get("duration_s") or 0 for r in grid)
        print(f"  job seconds: the search's full evaluations {seconds:.0f} + its probes {probed:.0f}, the grid's "
              f"{len(grid)} jobs {whole:.0f}")
    print(f"  wall {wall / 60:.1f} min ({new} jobs run for this target, the rest reused); best uniform "
          f"{best_u['label'] if best_u else '-'}; pick {pick['label'] if pick else '-'}; KL "
          + (f"{gain:.1f} % below the best uniform (goal >= 15 %)" if gain is not None else "-"))
    cell = (lambda r: f"{r['label']} ({r['bits_per_weight']:.3f}, {r['size_mb']:.1f}, {r['kl_div']:.4f} ± {r['kl_div_se']:.4f}"
            + (f"; {r['search_predicted_kl']:.4f}" if r.get("search_predicted_kl") is not None else "") + ")")
    return (f"| {target} | {cell(best_u) if best_u else '-'} | {cell(pick) if pick else '-'} | "
            f"{f'{-gain:+.1f} %' if gain is not None else '-'} | {evals} | {probes} |")


if __name__ == "__main__":
    main()
