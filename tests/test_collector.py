"""The collector skips what a stream started with, until the last concurrent stream ends."""

import gc

from flows.collector import frozen_heap


def test_objects_alive_at_the_start_stay_frozen_until_the_last_stream_ends() -> None:
    assert gc.get_freeze_count() == 0
    with frozen_heap():
        outer = gc.get_freeze_count()
        assert outer > 0
        with frozen_heap():
            assert gc.get_freeze_count() >= outer
        assert gc.get_freeze_count() >= outer  # the outer stream still runs
    assert gc.get_freeze_count() == 0


def test_a_failing_stream_unfreezes_too() -> None:
    try:
        with frozen_heap():
            raise RuntimeError("the database went away")
    except RuntimeError:
        pass
    assert gc.get_freeze_count() == 0
