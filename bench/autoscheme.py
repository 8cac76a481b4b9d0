"""qfarm's `search` against AutoRound's AutoScheme (issue 40's peer table): per-layer bits under the same target.

    python bench/autoscheme.py [--targets 3.5,4.5,5.5] [--root DIR] [--samples 16] [--seq-len 256]

AutoScheme (auto-round, installed with qfarm[ml]) scores every layer in every option by its delta loss (a gradient
pass per option over its calibration samples), then picks per-layer schemes for an ``avg_bits`` target. Here its
options are the search space's weight-only formats (symmetric int, bits 3/4/8 × group 32/64/128) and its
calibration text is the evaluation's own (the start of the bundled python-docs text, which every evaluation window
comes from): as favourable to it as this can be made.

The allocation AutoScheme returns is then run through qfarm as plain jobs (``layer_rules``), round-to-nearest and
GPTQ, in the same sweep as a search whose space is the same formats (rtn and gptq, ``mixed: true``; budget 4: the
mixed candidates only): one model, one reference, the same 8 × 512 evaluation windows. AutoRound counts a zero
point for symmetric int groups, which compressed-tensors does not store, so by qfarm's measure (the artifact's
stored bits over the quantized weights) its allocation for a target comes in a little under it; both are printed.
Prints per target: each row's bits per weight and KL ± se, and the search's mix's KL against AutoScheme's with the
same quantizer.
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
sys.path.insert(0, str(REPO))
from farm import REDIS_URL, namespace  # noqa: E402
from model import head_with, prepare  # noqa: E402

BITS, GROUPS = (3, 4, 8), (32, 64, 128)
EVAL = "eval: {perplexity: {seq_len: 512, max_windows: 8}, speed: null}"
CALIBRATION = "{samples: 32, seq_len: 256, share: true}"


def model_folder(root: Path) -> str:
    from qfarm.sweep.sources import resolve_model
    from workers.shared.models import base_dir

    ref = resolve_model("bundled:smollm2-135m", str(root))
    folder, _ = base_dir({"kind": ref.kind, "location": ref.location, "gguf_file": ref.gguf_file, "key": ref.key},
                         str(root))
    return folder


def autoscheme(folder: str, targets: list[float], root: Path, samples: int, seq_len: int,
               groups: tuple[int, ...] = GROUPS) -> dict[float, dict]:
    """{qfarm target: {"formats": {layer: "4b g64"}, "avg_bits": AutoRound's target, "bpw": qfarm's measure,
    "seconds": AutoScheme's time}}."""
    import torch
    from auto_round.auto_scheme.gen_auto_scheme import AutoScheme, GenScheme
    from auto_round.schemes import QuantizationScheme
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qfarm.sweep.search import Format
    from workers.search.probe import quantizable
    from workers.shared.data import python_docs_text

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = python_docs_text()
    ids = tokenizer(text[:200_000], add_special_tokens=False)["input_ids"]
    step = seq_len + 16  # a little over seq_len: AutoRound drops samples shorter than its seqlen
    data = root / "autoscheme-calibration.json"
    data.write_text(json.dumps([tokenizer.decode(ids[i * step:(i + 1) * step]) for i in range(samples)]))
    options = [QuantizationScheme(bits=b, group_size=g, sym=True, data_type="int", act_bits=16)
               for b in BITS for g in groups]
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    layers = dict(quantizable(model))
    params = sum(m.weight.numel() for m in layers.values())

    def run(asked: list[float]) -> dict[float, tuple[dict, float]]:
        """AutoScheme at each of ``asked`` (its own count): {asked: (formats, qfarm's bits per weight)}."""
        scheme = AutoScheme(avg_bits=list(asked), options=options, dataset=str(data), nsamples=samples,
                            seqlen=seq_len, batch_size=1, device_map="cpu", enable_torch_compile=False)
        configs = GenScheme(scheme, model, list(layers), {}, str(data), device_map="cpu", tokenizer=tokenizer,
                            enable_torch_compile=False).get_layer_config()
        found = {}
        for avg, config in configs.items():
            formats = {name: f"{config[name]['bits']}b g{config[name]['group_size']}" for name in layers
                       if name in config and config[name].get("bits", 16) < 16}
            if len(formats) == len(layers):
                bits = sum(Format(f).layer_bits(layers[n].in_features, layers[n].out_features)
                           for n, f in formats.items())
                found[avg] = (formats, bits / params)
        return found

    t0 = time.time()
    # one call for every target (its scores are shared, each target is one DP over the layers: minutes each on a
    # CPU). AutoRound counts a zero point per int group, which compressed-tensors does not store: by qfarm's measure
    # its allocation comes in under the target, by what the zero points would have taken
    found = run(targets)
    seconds = time.time() - t0
    return {t: {"formats": found[t][0], "avg_bits": t, "bpw": found[t][1], "seconds": seconds}
            for t in targets if t in found}


def spec(root: Path, target: float, rules: list[str] | None, search: bool = True) -> Path:
    jobs = ""
    if rules:
        flow = json.dumps(rules)
        jobs = (f"jobs:\n  - {{kind: quantize, method: rtn, layer_rules: {flow}}}\n"
                f"  - {{kind: quantize, method: gptq, layer_rules: {flow}, "
                f"calibration: {CALIBRATION}}}\n")
    path = root / f"vs-autoscheme-{str(target).replace('.', '_')}.yaml"
    if not search:  # AutoScheme's jobs alone (the search's mixes: bench/search.py's rows on the same windows)
        path.write_text(f"name: vs-autoscheme-{str(target).replace('.', '_')}\nmodel: bundled:smollm2-135m\n{EVAL}\n"
                        + jobs)
        return path
    path.write_text(f"""name: vs-autoscheme-{str(target).replace('.', '_')}
model: bundled:smollm2-135m
{EVAL}
search:
  target: {{bits_per_weight: {target}}}
  objective: kl_div
  space:
    - {{method: rtn, bits: {list(BITS)}, group_size: {list(GROUPS)}, mixed: true}}
    - {{method: gptq, bits: {list(BITS)}, group_size: {list(GROUPS)}, mixed: true, calibration: {CALIBRATION}}}
  budget: {{jobs: 4}}
{jobs}""")
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", default="3.5,4.5,5.5")
    parser.add_argument("--root", default=None, help="output root (default: a new temporary folder)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--jobs-only", action="store_true",
                        help="run AutoScheme's allocations alone (compare with bench/search.py's mixed rows)")
    parser.add_argument("--autoscheme-groups", default="32,64,128",
                        help="AutoScheme's group sizes (it gives a 576-input layer g128, which compressed-tensors "
                             "cannot store: 32,64 on SmolLM2)")
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    root = Path(args.root or tempfile.mkdtemp(prefix="qfarm-bench-autoscheme-"))
    root.mkdir(parents=True, exist_ok=True)
    prepare(root)
    picks = autoscheme(model_folder(root), targets, root, args.samples, args.seq_len,
                       tuple(int(g) for g in args.autoscheme_groups.split(",")))
    for t, p in picks.items():
        print(f"AutoScheme at {t}: avg_bits {p['avg_bits']} (AutoRound's count) = {p['bpw']:.3f} bits per weight "
              f"(qfarm's); {p['seconds']:.0f} s for all targets")
    table = []
    with namespace() as store, head_with({}, 2) as head:
        env = dict(os.environ, QFARM_REDIS_URL=REDIS_URL, QFARM_NAMESPACE=store.namespace,
                   QFARM_RAY_ADDRESS=head.address, QFARM_OUTPUT_ROOT=str(root))
        for target in targets:
            mine = picks.get(target)
            path = spec(root, target, [f"^{n.replace('.', chr(92) + '.')}$={f}" for n, f in mine["formats"].items()]
                        if mine else None, not args.jobs_only)
            t0 = time.time()
            out = subprocess.run([sys.executable, "-m", "qfarm.cli", "submit", str(path), "--wait"], env=env,
                                 capture_output=True, text=True, cwd=REPO)
            if out.returncode != 0:
                print(f"sweep failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
            found = store.find_sweep(path.stem)
            if found is None:
                continue
            rows = json.loads(subprocess.run([sys.executable, "-m", "qfarm.cli", "results", found.id, "--format",
                                              "json"], env=env, capture_output=True, text=True).stdout)
            print(f"\n=== target {target} bits per weight ({(time.time() - t0) / 60:.1f} min) ===")
            table.append(report(target, rows))
    print("\n| target bpw | quantizer | AutoScheme's allocation (bpw, KL ± se) | qfarm search's mix (bpw, KL ± se) | "
          "KL vs AutoScheme |\n|---|---|---|---|---|")
    for lines in table:
        for line in lines:
            print(line)


def report(target: float, rows: list[dict]) -> list[str]:
    done = [r for r in rows if r["status"] == "succeeded" and r.get("kl_div") is not None
            and (r.get("search_role") == "candidate" or r.get("layer_rules"))]
    for r in sorted(done, key=lambda r: r["kl_div"]):
        who = r["label"] if r.get("search_role") else f"AutoScheme's, {r['method']}"
        print(f"  {'★' if r.get('search_pick') else ' '} {who:<36} bpw {r['bits_per_weight']:.3f}  "
              f"KL {r['kl_div']:.4f} ± {r['kl_div_se']:.4f}  Δppl {r['ppl_delta_pct']:+.1f} %")
    for r in rows:
        if r["status"] != "succeeded":
            print(f"  ! {r.get('label')} {r['status']}: {r.get('error')}")
    out = []
    for method in ("rtn", "gptq"):
        theirs = next((r for r in done if r.get("layer_rules") and r["method"] == method), None)
        ours = min((r for r in done if r.get("search_role") == "candidate" and r["method"] == method),
                   key=lambda r: r["kl_div"], default=None)
        cell = (lambda r: f"{r['bits_per_weight']:.3f}, {r['kl_div']:.4f} ± {r['kl_div_se']:.4f}" if r else "-")
        gain = f"{(ours['kl_div'] / theirs['kl_div'] - 1) * 100:+.1f} %" if ours and theirs else "-"
        out.append(f"| {target} | {method} | {cell(theirs)} | {cell(ours)} | {gain} |")
    return out


if __name__ == "__main__":
    main()
