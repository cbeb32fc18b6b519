"""Sample builders shared by the tests."""

from __future__ import annotations

import numpy as np

from protocol.sample import Sample


def make_sample(**overrides) -> Sample:
    """A valid sample (3 prompt tokens, 2 completion tokens); any field can be overridden."""
    fields = dict(
        prompt_ids=np.array([1, 2, 3], dtype=np.int32),
        completion_ids=np.array([4, 5], dtype=np.int32),
        behavior_logprobs=np.array([-0.5, -1.25], dtype=np.float32),
        reward=1.0,
        group_id="g0",
        group_size=4,
        index=0,
        version_start=0,
        version_end=0,
        actor_id="a",
        incarnation="i0",
        seq=0,
        finish_reason="stop",
        metadata={},
    )
    fields.update(overrides)
    return Sample(**fields)
