"""The worker cache's eviction decisions (pure logic: no model is loaded)."""

from __future__ import annotations

from workers.cache import _LRU


def test_a_model_switch_evicts_the_old_model_before_the_new_one_is_built():
    events = []
    lru = _LRU(1, evict_first=True, on_evict=lambda: events.append("freed"))

    def make(name):
        def build():
            events.append(f"build {name} beside {list(lru.items)}")
            return name
        return build

    assert lru.get("a", make("a")) == ("a", False)
    assert lru.get("a", make("a")) == ("a", True)  # a hit builds nothing
    assert lru.get("b", make("b")) == ("b", False)
    assert events == ["build a beside []", "freed", "build b beside []"]  # never two models at once
    assert list(lru.items) == ["b"]


def test_other_caches_keep_up_to_their_bound_and_drop_the_oldest_after():
    lru = _LRU(2)
    for key in "abc":
        lru.get(key, lambda k=key: k)
    assert list(lru.items) == ["b", "c"]
    off = _LRU(0, evict_first=True)  # 0 turns caching off: nothing kept, nothing to evict
    assert off.get("a", lambda: 1) == (1, False) and not off.items
