"""The ``sleep`` job kind: for tests and benchmarks of the farm itself. Loads no model.

Sample yaml::

    jobs:
      - kind: sleep
        seconds: 1.0
        matrix: {index: [0, 1, 2, 3]}
"""

from __future__ import annotations

import time


def run(ctx) -> dict:
    seconds = float(ctx.opts.seconds)
    start = time.time()
    end = start + seconds
    while (left := end - time.time()) > 0:
        time.sleep(min(left, 0.5))
        if seconds >= 2 and not ctx.opts.busy:
            ctx.progress(f"slept {time.time() - start:.0f}/{seconds:g} s")
    if ctx.opts.fail:
        raise RuntimeError(f"sleep job {ctx.opts.index} was asked to fail (fail: true)")
    return {"slept_s": round(time.time() - start, 4)}
