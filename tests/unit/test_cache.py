"""The worker cache's eviction decisions (pure logic: no model is loaded)."""

from __future__ import annotations

from workers.shared.cache import _LRU


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


class _Model:
    """A stand-in model that records where it was moved (unit test of the cache's decisions: no torch needed)."""

    def __init__(self, device_map=None):
        self.moves, self.hf_device_map = [], device_map

    def to(self, where):
        self.moves.append(where)
        return self


def test_a_base_on_one_gpu_parks_in_host_ram_and_a_spread_one_is_dropped(monkeypatch):
    from workers.shared import cache as cache_mod
    from workers.shared.cache import Cache, Loaded

    freed = []
    monkeypatch.setattr(cache_mod, "_free", lambda: freed.append(1))
    cache = Cache()
    one = Loaded(_Model({"": "cuda:0"}), None, 0.0, "/one", {})
    cache.models.items["/one"] = one
    assert cache.park(one, on_gpu=False) == "kept" and one.model.moves == []  # a CPU worker: nothing to give back
    assert cache.park(one, on_gpu=True) == "parked" and one.model.moves == ["cpu"] and one.parked and freed
    assert cache.park(one, on_gpu=True) == "kept"  # already in host RAM
    assert "/one" in cache.models.items  # still cached: the next job moves it back instead of reading the disk

    spread = Loaded(_Model({"model.layers.0": 0, "model.layers.1": 1}), None, 0.0, "/big", {})
    cache.models.items = type(cache.models.items)({"/big": spread})
    assert cache.park(spread, on_gpu=True) == "dropped"
    assert spread.model is None and "/big" not in cache.models.items  # dispatched models do not move as a whole
