"""The small bounded structures the hub keeps without a store."""

from __future__ import annotations

from netra.limits import BoundedMap


def test_bounded_map_remembers_the_most_recent_half_to_all_of_its_size():
    ids: BoundedMap[str, int] = BoundedMap(10)
    for i in range(1, 101):
        ids[f"k{i}"] = i
        assert len(ids) <= 10
        # the newest five are always there, whatever the generation boundary
        assert [ids.get(f"k{j}") for j in range(max(1, i - 4), i + 1)] == list(range(max(1, i - 4), i + 1))
    assert ids.get("k1") is None and ids.get("k90") is None
    assert ids.pop("k100") == 100 and ids.get("k100") is None
    assert ids.pop("k96") == 96 and ids.pop("k96") is None


def test_setting_a_key_again_keeps_one_copy_in_the_newest_generation():
    ids: BoundedMap[str, int] = BoundedMap(4)
    ids["a"], ids["b"] = 1, 2  # "a" and "b" now the older generation
    ids["a"] = 3
    assert len(ids) == 2 and ids.get("a") == 3
    ids["c"] = 4  # the newer generation fills: "b" is dropped with the old one
    assert ids.get("b") is None and ids.get("a") == 3 and ids.get("c") == 4
