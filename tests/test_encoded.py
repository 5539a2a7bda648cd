"""The on-disk store of encoded training examples (alignkit.models.encoded)."""

from __future__ import annotations

import re

import pytest
import torch

from alignkit.models.encoded import encode_to_disk


def _features(item: int) -> tuple[dict[str, torch.Tensor], ...]:
    """Two parts per item (as a reward-model pair), of the dtypes and shapes a processor returns."""
    g = torch.Generator().manual_seed(item)
    return tuple(
        {
            "input_ids": torch.randint(0, 100, (5 + item + part,), generator=g),
            "pixel_values": torch.randn(4, 6, generator=g),
            "image_grid_thw": torch.tensor([[1, 2, 2]]),
            "half": torch.randn(3, generator=g).to(torch.bfloat16),
        }
        for part in range(2)
    )


def test_examples_read_back_exactly_as_encoded(tmp_path, monkeypatch):
    monkeypatch.setattr("alignkit.models.encoded.OPEN_SHARDS", 1)  # reading also closes and reopens shards
    items = list(range(7))
    store = encode_to_disk(tmp_path / "enc", items, _features, ["data", 1], shard_size=3)
    assert len(store) == 7 and len(list((tmp_path / "enc").glob("shard-*.safetensors"))) == 3
    for i in [*items, 0]:
        got, want = store[i], _features(i)
        assert len(got) == 2
        for g, w in zip(got, want):
            assert g.keys() == w.keys()
            for k in w:
                assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), (i, k)
    only = store.get(4, ("input_ids",))
    assert [set(p) for p in only] == [{"input_ids"}, {"input_ids"}]
    with pytest.raises(IndexError):
        store[7]


def test_a_rerun_encodes_only_missing_shards_and_another_key_starts_over(tmp_path):
    seen: list[int] = []

    def counted(item):
        seen.append(item)
        return _features(item)

    directory, settings = tmp_path / "enc", ["data", 1]
    encode_to_disk(directory, list(range(7)), counted, settings, shard_size=3)
    assert seen == list(range(7))

    seen.clear()  # the same key, every shard there: nothing is encoded again
    encode_to_disk(directory, list(range(7)), counted, settings, shard_size=3)
    assert seen == []

    seen.clear()  # a kill during shard 1: its file never appeared under its name (only a temporary)
    (directory / "shard-000001.safetensors").rename(directory / "shard-000001.safetensors.tmp")
    store = encode_to_disk(directory, list(range(7)), counted, settings, shard_size=3)
    assert seen == [3, 4, 5]
    assert torch.equal(store[4][1]["pixel_values"], _features(4)[1]["pixel_values"])

    seen.clear()  # other data (another key): the old encodings are not reused
    store = encode_to_disk(directory, [10, 11], counted, ["other data", 1], shard_size=3)
    assert seen == [10, 11] and len(store) == 2
    assert sorted(p.name for p in directory.iterdir()) == ["key.json", "shard-000000.safetensors"]


def _anonymous_memory_kb() -> int:
    """This process's resident anonymous memory (heap), not counting pages mapped from files."""
    return int(re.search(r"RssAnon:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def test_examples_read_back_live_in_the_mapped_file_not_on_the_heap(tmp_path):
    """20 examples of 8 MB each (about 7 images at 448 px): held as encoded, they take 160 MB of heap
    in every process; read back from the store, even all at once, they are pages of the shard files
    (shared between processes, dropped by the OS under pressure), and the heap does not grow."""
    big = lambda i: ({"pixel_values": torch.full((2048, 1024), float(i))},)  # noqa: E731
    store = encode_to_disk(tmp_path / "enc", list(range(20)), big, ["big"], shard_size=4)
    before = _anonymous_memory_kb()
    in_memory = [big(i) for i in range(20)]
    assert _anonymous_memory_kb() - before > 150_000  # the measure sees what encoding up front costs
    del in_memory
    before = _anonymous_memory_kb()
    read = [store[i] for i in range(20)]
    assert [float(r[0]["pixel_values"][-1, -1]) for r in read] == list(range(20))
    assert _anonymous_memory_kb() - before < 20_000, "encoded examples were copied onto the heap"
