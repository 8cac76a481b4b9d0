"""Hostile input, replayed through the CLI as a user (or an attacker) gives it: each case's exit code, its wall time
(a fresh `qfarm` process each, as typed), and the first line it printed; the slowest last. Issue 36's target: exit 2
(1 for an unreachable service) with a message, in under 2 s each, no "internal error", no traceback.

    . .venv/bin/activate && python bench/hostile_specs.py [FOLDER]   # FOLDER: more *.yaml specs to replay too
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).with_name("qfarm")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.integration.test_validate_checks


def specs(folder: Path) -> dict[str, str]:
    """name -> spec text: the cases of issue 36 and the older hostile set (tests/unit/test_hostile_specs.py)."""
    bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return {
        "nested brackets (40 KB)": "name: x\nmodel: bundled:smollm2-135m\neval: {prompts: " + "[" * 20_000
                                   + "]" * 20_000 + "}\njobs: [{kind: sleep}]\n",
        "nested mappings (50 KB)": "name: x\njobs: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n",
        "block nesting (500 deep)": "name: b\njobs:\n" + "".join("  " * i + "-\n" for i in range(1, 500)),
        "a million-job matrix": "name: m\njobs:\n  - kind: sleep\n    matrix:\n"
                                f"      index: [{', '.join(map(str, range(1000)))}]\n"
                                f"      seconds: [{', '.join(str(i / 1000) for i in range(1000))}]\n",
        "alias bomb (10^9 values)": "name: bomb\n" + "\n".join(bomb) + "\neval: {prompts: *a8}\njobs:\n  - {kind: sleep}\n",
        "a 100,001-character value": "name: b\ndescription: " + "x" * 100_001 + "\njobs:\n  - {kind: sleep}\n",
        "100,001 values": "name: b\neval: {prompts: [" + ", ".join(["p"] * 100_001) + "]}\njobs:\n  - {kind: sleep}\n",
        "a key given twice": "name: d\njobs:\n  - {kind: sleep}\njobs:\n  - {kind: sleep}\n",
        "a format string reaching attributes": "name: f\nmodel: bundled:smollm2-135m\njobs:\n  - kind: train\n"
                                               "    method: lora\n    dataset: {path: x.jsonl, format: '{text.__class__}'}\n",
        "a .gguf that is not one": f"name: g\nmodel: {folder / 'fake.gguf'}\njobs:\n  - {{kind: quantize, method: none}}\n",
        "a hub model, the hub out of reach": "name: h\nmodel: acme/no-such-model\njobs:\n  - {kind: quantize, method: none}\n",
        "a checkpoint in another vocabulary": f"name: v\nmodel: {folder / 'float'}\njobs:\n  - {{kind: quantize, method: none}}\n"
                                              f"  - {{kind: evaluate, checkpoint: {folder / 'other-vocab'}}}\n",
    }


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2}


def lay_out(folder: Path) -> list[tuple[str, Path]]:
    """The files the cases name: a fake GGUF, two config-only folders in two vocabularies, and (where gguf-py and
    the bundled model are here) the bundled GGUF with its pre-tokenizer changed, which every job would refuse."""
    import json

    (folder / "fake.gguf").write_bytes(b"not a gguf at all" * 100)
    for name, vocab in (("float", 32000), ("other-vocab", 49152)):
        (folder / name).mkdir()
        (folder / name / "config.json").write_text(json.dumps({**LLAMA, "vocab_size": vocab}))
    try:
        from tests.integration.test_validate_checks import gguf_with_pre_tokenizer

        bad = gguf_with_pre_tokenizer(folder / "pre-qwen2.gguf", "qwen2")
    except ImportError:
        return []
    path = folder / "gguf_tokenizer.yaml"
    path.write_text(f"name: t\nmodel: {bad}\njobs:\n  - {{kind: quantize, method: bnb-nf4}}\n")
    return [("a GGUF every job would refuse (first)", path), ("a GGUF every job would refuse (kept)", path)]


def replay(args: list[str], env: dict) -> tuple[int, float, str]:
    start = time.time()
    run = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=600, env=env)
    said = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    first = next((line.strip() for line in said[1:2] or said[:1]), "")
    if "internal error" in run.stdout + run.stderr or "Traceback" in run.stderr:
        first = "!! " + first
    return run.returncode, time.time() - start, first


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        probes = lay_out(folder)
        # a cache of its own (the GGUF check is kept there: its first run is cold), the hub at a closed port
        env = dict(os.environ, XDG_CACHE_HOME=str(folder / "cache"), HF_ENDPOINT="http://127.0.0.1:9")
        env.pop("HF_HUB_OFFLINE", None)
        cases: list[tuple[str, list[str]]] = [(name, ["validate", "--offline", str(p)]) for name, p in probes]
        for name, text in specs(folder).items():
            path = folder / (name.replace(" ", "_").replace("/", "_") + ".yaml")
            path.write_text(text)
            cases.append((name, ["validate", "--offline", str(path)]))
        for extra in sorted(Path(sys.argv[1]).glob("*.yaml")) if len(sys.argv) > 1 else []:
            cases.append((extra.name, ["validate", "--offline", str(extra)]))
        cases.append(("a Redis URL that is not one", ["--redis-url", "notaurl", "status"]))
        cases.append(("nothing answers at the Redis URL", ["--redis-url", "redis://127.0.0.1:1/0", "status"]))
        results = [(name, *replay(args, env)) for name, args in cases]
    print(f"{'case':40} {'exit':>4} {'s':>6}  first line")
    for name, code, seconds, first in sorted(results, key=lambda r: r[2]):
        print(f"{name:40} {code:>4} {seconds:6.2f}  {first[:150]}")
    slowest = max(results, key=lambda r: r[2])
    bad = [r for r in results if r[1] not in (1, 2) or r[3].startswith("!!")]
    print(f"\nslowest: {slowest[0]} {slowest[2]:.2f} s (target < 2 s); not exit 1/2 or an internal error: "
          f"{[r[0] for r in bad] or 'none'}")


if __name__ == "__main__":
    main()
