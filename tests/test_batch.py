"""learner/batch.py's regroup: a served batch back into its GRPO groups (collation is tested in test_trainer.py)."""

from __future__ import annotations

import pytest

from learner.batch import regroup
from tests.helpers import make_sample


def group(group_id: str, size: int = 4) -> list:
    return [make_sample(group_id=group_id, group_size=size, index=i, seq=i, reward=float(i)) for i in range(size)]


def test_groups_come_back_in_order_and_two_groups_sharing_an_id_stay_two():
    """Found by a helper's hunt: merged by id, two groups a sender gave one id made one group of 8 with two rewards
    per index, and the trainer's ragged reward table stopped the learner, again after every resume."""
    batch = [*group("dup"), *group("other", 2), *group("dup")]
    groups = regroup(batch)
    assert [[(s.group_id, s.index) for s in g] for g in groups] == [
        [("dup", i) for i in range(4)], [("other", 0), ("other", 1)], [("dup", i) for i in range(4)]]  # fmt: skip


@pytest.mark.parametrize("batch", [group("a")[:3], [*group("a")[:2], *group("b")[:2]]])
def test_samples_that_do_not_form_whole_groups_are_refused_by_name(batch):
    with pytest.raises(ValueError, match="do not form a group of 4"):
        regroup(batch)
