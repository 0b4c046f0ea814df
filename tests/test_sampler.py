"""Megatron's micro-batch order: the samples of a global batch do not depend on how it is split."""
import pytest

from kotomamba.data import PretrainingSampler


def global_batches(total, consumed, mbs, dp, accumulation):
    """The samples each global batch covers, gathered from every rank's sampler."""
    iters = [iter(PretrainingSampler(total, consumed, mbs, r, dp)) for r in range(dp)]
    batches = []
    while True:
        try:
            batch = []
            for _ in range(accumulation):
                for it in iters:
                    batch.extend(next(it))
            batches.append(batch)
        except StopIteration:
            return batches


@pytest.mark.parametrize("mbs,dp", [(8, 1), (4, 2), (2, 2), (1, 4), (2, 1)])
def test_global_batches_independent_of_layout(mbs, dp):
    gbs = 8
    batches = global_batches(40, 0, mbs, dp, gbs // (mbs * dp))
    assert [sorted(b) for b in batches] == [list(range(i * gbs, (i + 1) * gbs)) for i in range(5)]


def test_rank_slices_are_megatron_order():
    assert list(PretrainingSampler(16, 0, 2, 1, 2)) == [[2, 3], [6, 7], [10, 11], [14, 15]]


def test_resume_continues_after_consumed_samples():
    full = list(PretrainingSampler(32, 0, 2, 0, 2))
    resumed = list(PretrainingSampler(32, 8, 2, 0, 2))
    assert resumed == full[2:]
    assert len(PretrainingSampler(32, 8, 2, 0, 2)) == len(resumed)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank 2 outside size 2"):
        PretrainingSampler(10, 0, 1, 2, 2)
    with pytest.raises(ValueError, match="no samples"):
        PretrainingSampler(0, 0, 1, 0, 1)
