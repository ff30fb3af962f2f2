"""EpochSampler: the training loader's sampler, which carries each epoch's draw to the workers."""

import numpy as np
import pytest

from trainer.data.epoch_sampler import PARTNERS, EpochSampler


def _shards(n, world, **kw):
    out = []
    for rank in range(world):
        s = EpochSampler(n, rank=rank, world_size=world, **kw)
        s.set_epoch(3)
        out.append(list(s))
    return out


@pytest.mark.parametrize("n, world", [(37, 2), (40, 4), (5, 3), (1, 2)])
def test_shards_are_equal_disjoint_and_cover(n, world):
    shards = _shards(n, world, batch_size=4, seed=0)
    lengths = {len(s) for s in shards}
    assert lengths == {-(-n // world)}  # ceil(n / world) each
    positions = [x.position for s in shards for x in s]
    assert set(positions) == set(range(n))
    assert len(positions) - n == (-n) % world  # only the wrap-around padding repeats


def test_whole_batches_for_rect_go_to_one_rank_each():
    n, bs, world = 23, 4, 2  # 6 batches, the last one short
    shards = _shards(n, world, batch_size=bs, seed=0, whole_batches=True)
    for rank, shard in enumerate(shards):
        pos = [x.position for x in shard]
        assert pos == sorted(pos)  # rect: no shuffling
        batches = {p // bs for p in pos}
        assert all(b % world == rank for b in batches)  # whole batches, round robin
        # every batch of this rank is complete (the short last batch excepted)
        for b in batches:
            assert [p for p in pos if p // bs == b] == list(range(b * bs, min((b + 1) * bs, n)))
    assert len(shards[0]) == 12 and len(shards[1]) == 11  # batches 0, 2, 4 and 1, 3, 5
    # world size larger than the batch count: batches wrap round so every rank trains
    tiny = _shards(5, 4, batch_size=4, seed=0, whole_batches=True)
    assert [len(s) for s in tiny] == [4, 1, 4, 1]


def test_samples_follow_the_draw_and_are_reproducible():
    s = EpochSampler(10, batch_size=2, seed=9)
    draw = np.array([4, 4, 4, 1, 1, 9, 9, 9, 9, 0])
    s.set_epoch(2, draw)
    a = list(s)
    assert [x.image for x in a] == [int(draw[x.position]) for x in a]
    assert all(len(x.partners) == PARTNERS and set(x.partners) <= set(draw.tolist()) for x in a)
    assert all(x.seed == (9, 2, x.position) for x in a)
    assert sorted(x.position for x in a) == list(range(10))
    assert list(s) == a  # iterating again gives the same epoch
    s.set_epoch(3, draw)
    assert [x.position for x in s] != [x.position for x in a]  # a new epoch reshuffles
    # the same (seed, epoch, draw) on another object and rank layout: the same sample per position
    two = [EpochSampler(10, batch_size=2, seed=9, rank=r, world_size=2) for r in range(2)]
    for t in two:
        t.set_epoch(2, draw)
    by_pos = {x.position: x for t in two for x in t}
    assert all(by_pos[x.position] == x for x in a)


def test_partner_draw_follows_weights():
    """Partners are drawn uniformly from the draw, so a weighted draw weights them alike."""
    n = 2000
    draw = np.where(np.arange(n) < n // 4, 7, 3)  # image 7 fills a quarter of the list
    s = EpochSampler(n, batch_size=16, seed=1)
    s.set_epoch(0, draw)
    partners = np.array([x.partners for x in s]).ravel()
    share = float(np.mean(partners == 7))
    assert abs(share - 0.25) < 0.02  # 14000 draws: std ~0.004


def test_bad_draws_and_ranks_are_refused():
    s = EpochSampler(4, batch_size=2)
    with pytest.raises(ValueError, match="4 indices"):
        s.set_epoch(0, [0, 1, 2])
    with pytest.raises(ValueError, match="4 indices"):
        s.set_epoch(0, [0, 1, 2, 4])
    with pytest.raises(ValueError, match="rank 2"):
        EpochSampler(4, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="at least one"):
        EpochSampler(0, batch_size=2)
