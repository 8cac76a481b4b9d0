"""A job's peak memory on CPU is the kernel's high-water mark of its RSS (VmHWM, reset at the start of each
measurement): an allocation held for a moment counts, a measurement nested in another hands its peak outward, and a
new measurement does not inherit an old one's peak."""

from __future__ import annotations

import psutil
import pytest

from workers.evaluate.harness import PeakMemory, _reset_rss_high_water

MB = 2**20


def test_a_moment_s_allocation_counts_in_its_peak_and_in_every_enclosing_one():
    if not _reset_rss_high_water():
        pytest.skip("this kernel cannot reset the RSS high-water mark (/proc/self/clear_refs): PeakMemory samples")
    n = 256 * MB
    with PeakMemory() as outer:
        before = psutil.Process().memory_info().rss
        with PeakMemory() as inner:
            block = b"\x01" * n  # every page written, then freed at once: no 20 ms sampler would see it
            del block
        assert outer._thread is None and inner._thread is None  # the kernel's mark, no sampling thread
    assert inner.peak >= before + 0.9 * n, (inner.mb, before / MB)
    assert outer.peak >= inner.peak
    with PeakMemory() as later:  # a fresh measurement starts from the RSS of now, not the old peak
        pass
    assert later.peak < before + 0.5 * n, (later.mb, before / MB)
