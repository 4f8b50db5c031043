"""``evaluation.engines.live.watched``: the stall watch of engine=libertem_live's result loop (issue #17,
point 3). Plain Python iterables stand in for LiberTEM's ``run_udf_iter``; no LiberTEM needed."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from evaluation.engines.live import LiveStallError, receivers_abandoned, watched


def _stalled(timeout_s: float) -> LiveStallError:
    return LiveStallError(f"no item for {timeout_s:g} s")


def test_items_are_handed_over_unchanged_while_used():
    """Like LiberTEM's result buffers, one array is updated in place between items: the caller must see
    each state in turn (the producer thread does not advance while the caller holds an item)."""
    buffer = np.zeros(4)

    def updates():
        for step in range(1, 6):
            buffer[:] = step
            yield buffer

    seen = []
    for item in watched(updates(), 30.0, _stalled):
        first = item.copy()
        threading.Event().wait(0.02)  # give a runaway producer the time to overwrite the buffer
        assert np.array_equal(item, first)
        seen.append(float(item[0]))
    assert seen == [1, 2, 3, 4, 5]


def test_errors_of_the_items_reach_the_caller():
    def failing():
        yield 1
        raise ValueError("partition 2 failed")

    got = []
    with pytest.raises(ValueError, match="partition 2 failed"):
        for item in watched(failing(), 30.0, _stalled):
            got.append(item)
    assert got == [1]


def test_a_stalled_producer_raises_the_stall_error_and_is_counted():
    release = threading.Event()
    finished = threading.Event()

    def stalling():
        yield "row block 1"
        release.wait()  # a receive that never returns (until the test releases it)
        finished.set()
        yield "row block 2"

    before = receivers_abandoned()
    got = []
    with pytest.raises(LiveStallError, match=r"no item for 0\.3 s"):
        for item in watched(stalling(), 0.3, _stalled):
            got.append(item)
    assert got == ["row block 1"]
    assert receivers_abandoned() == before + 1
    release.set()  # let the abandoned thread end: it stops at its next step
    assert finished.wait(30)


def test_stopping_early_closes_the_items_in_their_thread():
    closed = threading.Event()

    def endless():
        try:
            while True:
                yield 0
        finally:
            closed.set()

    for count, _ in enumerate(watched(endless(), 30.0, _stalled)):
        if count == 2:
            break
    assert closed.wait(30)
