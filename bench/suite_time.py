"""The test suite's time, by tier and by file, from pytest's JUnit XML: one run, or two side by side.

    python -m pytest -ra -n 2 --dist loadgroup --junitxml=after.xml     # what `make test` runs, plus the XML
    python bench/suite_time.py after.xml                                # time by tier, the slowest files
    python bench/suite_time.py before.xml after.xml                     # the same, before | after | ratio

A tier's time is the sum of its tests' durations (setup + call + teardown), which is what it costs a serial run;
with two pytest workers the wall time is what `pytest` prints on its last line (`in ...s`), given here from the
XML's own `time` attribute of the suite. Nothing here asserts: a person reads it.
"""

from __future__ import annotations

import collections
import sys
import xml.etree.ElementTree as ET


def read(path: str) -> tuple[dict[str, tuple[int, float]], dict[str, float], float, dict[str, int]]:
    """{tier: (tests, seconds)}, {file: seconds}, the suite's wall seconds, {outcome: count}."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    wall = sum(float(s.get("time", 0)) for s in suites)
    tiers: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    files: dict[str, float] = collections.Counter()
    outcomes: dict[str, int] = collections.Counter()
    for case in root.iter("testcase"):
        module = case.get("classname", "")
        parts = module.split(".")
        tier = parts[1] if len(parts) > 2 and parts[0] == "tests" else "other"
        seconds = float(case.get("time", 0))
        tiers[tier][0] += 1
        tiers[tier][1] += seconds
        files[module] += seconds
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        outcomes[outcome] += 1
    return {k: (int(n), s) for k, (n, s) in tiers.items()}, dict(files), wall, dict(outcomes)


def mmss(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def main(paths: list[str]) -> int:
    if not 1 <= len(paths) <= 2:
        print(__doc__.strip().splitlines()[0], "\nusage: python bench/suite_time.py [BEFORE.xml] AFTER.xml",
              file=sys.stderr)
        return 2
    runs = [read(p) for p in paths]
    names = sorted(set().union(*(r[0] for r in runs)))
    head = " | ".join(f"{p} (tests, summed)" for p in paths)
    print(f"{'tier':<12} | {head}" + (" | after/before" if len(runs) == 2 else ""))
    for tier in names:
        cells = [runs[i][0].get(tier, (0, 0.0)) for i in range(len(runs))]
        line = f"{tier:<12} | " + " | ".join(f"{n:>4} tests {mmss(s):>6}" for n, s in cells)
        if len(runs) == 2 and cells[0][1]:
            line += f" | {cells[1][1] / cells[0][1]:.2f}"
        print(line)
    totals = [sum(s for _, s in r[0].values()) for r in runs]
    print(f"{'summed':<12} | " + " | ".join(f"{'':>10} {mmss(t):>6}" for t in totals)
          + (f" | {totals[1] / totals[0]:.2f}" if len(runs) == 2 and totals[0] else ""))
    walls = [r[2] for r in runs]
    print(f"{'wall':<12} | " + " | ".join(f"{'':>10} {mmss(w):>6}" for w in walls)
          + (f" | {walls[1] / walls[0]:.2f}" if len(runs) == 2 and walls[0] else ""))
    print("outcomes     | " + " | ".join(", ".join(f"{k} {v}" for k, v in sorted(r[3].items())) for r in runs))
    print("\nslowest files (summed seconds):")
    last = runs[-1][1]
    for module, seconds in sorted(last.items(), key=lambda kv: -kv[1])[:15]:
        before = f"{runs[0][1].get(module, 0.0):7.0f} -> " if len(runs) == 2 else ""
        print(f"  {before}{seconds:7.0f}  {module}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
