"""The store's identity index (store/index.py) against a dict, the structure it replaces:
any sequence of keys added, removed and looked up gives the dict's answers, with the real
hash and with a weak one that crowds the buckets (shared windows, tags of other keys,
probes past the window, rebuilds)."""

import numpy as np
from hypothesis import given, settings, strategies as st

from ovsflow.polled import KEY, key_rows
from ovsflow.store.index import KeyIndex


class CrowdedIndex(KeyIndex):
    """Hashes with 16 home places and 3 tags: most keys share both with others."""

    def _hashes(self, words):
        first = words[:, 0]
        return ((first % np.uint64(16)) << np.uint64(60)) | (first % np.uint64(3))


def keys_of(numbers):
    return key_rows([int(n).to_bytes(8, "little") + bytes(19) for n in numbers])


operations = st.lists(st.tuples(st.sampled_from(["add", "remove", "find"]),
                                st.lists(st.integers(0, 400), max_size=40)), max_size=40)


def check(index_type, steps):
    capacity = 2000
    rows = np.zeros(capacity, KEY)
    index = index_type(rows, capacity, seed=7)
    model: dict[int, int] = {}  # key number -> slot
    free = list(range(capacity))
    for operation, numbers in steps:
        numbers = list(dict.fromkeys(numbers))  # distinct, in order
        if operation == "add":
            new = [n for n in numbers if n not in model]
            slots = np.array([free.pop() for _ in new], np.int64)
            rows[slots] = keys_of(new)
            index.add(slots, index.hashes(rows[slots]))
            model.update(zip(new, slots.tolist()))
        elif operation == "remove":
            gone = [n for n in numbers if n in model]
            slots = np.array([model.pop(n) for n in gone], np.int64)
            index.remove(slots)
            free += slots.tolist()
        keys = keys_of(numbers) if numbers else np.zeros(0, KEY)
        assert index.find(keys, index.hashes(keys)).tolist() == [
            model.get(n, -1) for n in numbers]
        assert len(index) == len(model)
    everything = sorted(model)
    keys = keys_of(everything) if everything else np.zeros(0, KEY)
    assert index.find(keys, index.hashes(keys)).tolist() == [model[n] for n in everything]


@settings(max_examples=150)
@given(operations)
def test_the_index_answers_as_a_dict(steps):
    check(KeyIndex, steps)


@settings(max_examples=150)
@given(operations)
def test_crowded_buckets_answer_as_a_dict(steps):
    check(CrowdedIndex, steps)


def test_a_large_table_with_churn_keeps_every_key():
    """100k keys, then rounds of 10% removed and 10% new: every key found in its slot,
    and the buckets stay within bounds (rebuilt as removed slots pile up)."""
    capacity = 130_000
    rows = np.zeros(capacity, KEY)
    index = KeyIndex(rows, capacity, seed=1)
    rng = np.random.default_rng(3)
    numbers = np.unique(rng.integers(0, 2**62, 260_000))[:250_000]
    numbers = rng.permutation(numbers)
    live = dict(zip(numbers[:100_000].tolist(), range(100_000)))
    rows[:100_000] = keys_of(numbers[:100_000])
    index.add(np.arange(100_000), index.hashes(rows[:100_000]))
    free, fresh = list(range(100_000, capacity)), iter(numbers[100_000:].tolist())
    for _ in range(10):
        gone = rng.choice(list(live), 10_000, replace=False).tolist()
        index.remove(np.array([live[n] for n in gone]))
        free += [live.pop(n) for n in gone]
        new = [next(fresh) for _ in range(10_000)]
        slots = np.array([free.pop() for _ in new])
        rows[slots] = keys_of(new)
        index.add(slots, index.hashes(rows[slots]))
        live.update(zip(new, slots.tolist()))
        probe = list(live)[::7] + gone[:500]
        keys = keys_of(probe)
        assert index.find(keys, index.hashes(keys)).tolist() == [live.get(n, -1)
                                                                for n in probe]
    assert len(index) == 100_000 and len(index._buckets) < 600_000
