"""MixtureBatchSampler: mixture proportions, length grouping, modality-pure batches, ranks, exact resumption."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import pytest

from mllm.data import MixtureBatchSampler
from mllm.data.dataset import Item


def fake_dataset(sizes: list[int], weights: list[float] | None, seed: int = 0):
    """What the sampler reads from a MultimodalDataset: lengths, has_image, items' sources, weights."""
    rng = random.Random(seed)
    items, lengths, has_image = [], [], []
    for s, n in enumerate(sizes):
        for i in range(n):
            items.append(Item(s, i))
            lengths.append(rng.randint(20, 2000))
            has_image.append(rng.random() < 0.7)
    return SimpleNamespace(items=items, lengths=lengths, has_image=has_image, weights=weights)


def flat(batches):
    return [i for b in batches for i in b]


def test_mixture_proportions_hold_over_10000_draws():
    ds = fake_dataset([6000, 3000, 1000], weights=[1.0, 2.0, 1.0])  # source 2 is upsampled 2.5x
    sampler = MixtureBatchSampler(ds, micro_batch_size=8, seed=3)
    draws = flat(list(sampler))[:10_000]
    counts = Counter(ds.items[i].source for i in draws)
    for s, share in enumerate([0.25, 0.5, 0.25]):
        assert abs(counts[s] / len(draws) - share) < 0.02
    # within an epoch a source is used without replacement before it repeats
    src0 = [i for i in draws if ds.items[i].source == 0]
    assert len(set(src0)) == len(src0)


def test_without_weights_every_sample_once_per_epoch_and_batches_are_pure_and_grouped():
    ds = fake_dataset([500, 300], weights=None)
    sampler = MixtureBatchSampler(ds, micro_batch_size=4, seed=0)
    batches = list(sampler)
    assert sorted(flat(batches)) == list(range(800))
    assert all(len({ds.has_image[i] for i in b}) == 1 for b in batches)
    assert max(ds.lengths[i] for i in batches[0]) == max(ds.lengths)  # longest first: OOM shows at step 1

    def padding(bs):
        return sum(len(b) * max(ds.lengths[i] for i in b) - sum(ds.lengths[i] for i in b) for b in bs)

    ungrouped = list(MixtureBatchSampler(ds, micro_batch_size=4, seed=0, group_by_length=False))
    assert padding(batches) < padding(ungrouped) / 5


def test_deterministic_per_seed_and_epoch():
    ds = fake_dataset([200], weights=None)
    a, b = MixtureBatchSampler(ds, 4, seed=1), MixtureBatchSampler(ds, 4, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != b.batches(0) and epoch1 == b.batches(1)
    assert list(a) == b.batches(2)  # iterating again without set_epoch moves on to the next epoch


def test_ranks_get_disjoint_equal_shares():
    ds = fake_dataset([101], weights=None)
    per_rank = [list(MixtureBatchSampler(ds, 4, seed=0, rank=r, world_size=3)) for r in range(3)]
    assert len({len(p) for p in per_rank}) == 1
    everything = [i for p in per_rank for i in flat(p)]
    assert set(everything) == set(range(101))
    assert len(everything) - 101 < 3 * 4  # only the padding to equal step counts repeats


@pytest.mark.parametrize("stop_at", [0, 7, 24])
def test_resume_continues_with_the_same_batches(stop_at):
    ds = fake_dataset([60, 40], weights=[1.0, 1.0])
    reference = MixtureBatchSampler(ds, 4, seed=5)
    reference.set_epoch(2)
    expected = list(reference)

    first = MixtureBatchSampler(ds, 4, seed=5)
    first.set_epoch(2)
    it = iter(first)
    seen = [next(it) for _ in range(stop_at)]
    state = first.state_dict()

    resumed = MixtureBatchSampler(ds, 4, seed=5)  # a fresh process
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop calls this again: it must not rewind
    assert seen + list(resumed) == expected
    assert len(resumed) == len(expected)
    resumed.set_epoch(3)
    assert list(resumed) == reference.batches(3)


def test_state_with_consumed_count_and_mismatch_errors():
    ds = fake_dataset([50], weights=None)
    s = MixtureBatchSampler(ds, 2, seed=0)
    it = iter(s)
    for _ in range(6):  # a prefetching loader pulled 6, the trainer used 4
        next(it)
    r = MixtureBatchSampler(ds, 2, seed=0)
    r.load_state_dict(s.state_dict(consumed=4))
    assert list(r) == s.batches()[4:]
    with pytest.raises(ValueError, match="micro_batch_size was 2 and is now 3"):
        MixtureBatchSampler(ds, 3, seed=0).load_state_dict(s.state_dict())


@pytest.mark.parametrize("group_by_length", [True, False])
def test_token_budget_per_micro_batch(group_by_length):
    ds = fake_dataset([700, 300], weights=None, seed=4)  # lengths 20..2000
    budget = 3000  # samples over 1,500 tokens come alone
    sampler = MixtureBatchSampler(
        ds, micro_batch_size=16, seed=2, max_tokens=budget, group_by_length=group_by_length
    )
    batches = list(sampler)
    assert sorted(flat(batches)) == list(range(1000))  # every sample once, none dropped for being long
    for b in batches:
        padded = len(b) * max(ds.lengths[i] for i in b)
        assert len(b) <= 16 and (padded <= budget or len(b) == 1)
    sizes = Counter(len(b) for b in batches)
    assert sizes[1] > 0
    if group_by_length:  # short samples come many at a time: far fewer steps than the one sample per
        assert sizes[16] > 0  # micro-batch a fixed size needs to keep the longest (2,000) under the budget
        assert len(batches) < 0.6 * len(list(MixtureBatchSampler(ds, micro_batch_size=1, seed=2)))
    # resumable, and a changed budget is refused on resume
    state = sampler.state_dict(consumed=5)
    again = MixtureBatchSampler(ds, 16, seed=2, max_tokens=budget, group_by_length=group_by_length)
    again.load_state_dict(state)
    assert list(again) == batches[5:]
    with pytest.raises(ValueError, match="max_tokens was 3000 and is now 2048"):
        MixtureBatchSampler(ds, 16, seed=2, max_tokens=2048, group_by_length=group_by_length).load_state_dict(
            state
        )
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        MixtureBatchSampler(ds, 16, seed=2, max_tokens=0)


@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 2), (2, 3)])
def test_resume_on_another_world_size_continues_the_same_global_order(saved, resumed):
    """The global order does not depend on the world size; a resume on another one deals out what is left of it."""
    ds = fake_dataset([60, 40], weights=None)
    everything = MixtureBatchSampler(ds, 4, seed=5).batches(0)  # one rank sees the global order
    old = [MixtureBatchSampler(ds, 4, seed=5, rank=r, world_size=saved) for r in range(saved)]
    iterators = [iter(sampler) for sampler in old]
    seen = [next(it) for _step in range(3) for it in iterators]
    assert seen == everything[: 3 * saved]
    state = old[-1].state_dict()
    assert state["global_position"] == 3 * saved

    new = [MixtureBatchSampler(ds, 4, seed=5, rank=r, world_size=resumed) for r in range(resumed)]
    for sampler in new:
        sampler.load_state_dict(state)
    dealt = [batch for step in zip(*[list(sampler) for sampler in new], strict=True) for batch in step]
    assert dealt[: len(everything) - 3 * saved] == everything[3 * saved :]
    assert len(dealt) - (len(everything) - 3 * saved) < resumed  # padding only to even out the ranks
    assert [list(sampler) for sampler in new] == [
        MixtureBatchSampler(ds, 4, seed=5, rank=r, world_size=resumed).batches(1) for r in range(resumed)
    ]
