"""Device prefetch: the next batches are already on the devices while the current step runs.

``jax.make_array_from_process_local_data`` returns before the copy to the devices is done, so
keeping ``depth`` global batches in a queue overlaps reading, decoding and copying the next
batches with the running step; the loop never waits for the host unless the input pipeline
itself is slower than the step.

Reading ahead moves the grain iterator past the batches that saved steps have consumed, so a
checkpoint must not save the iterator itself. Each queued item carries the iterator's position
captured right after its batches were read (``InputPosition``); the loop saves the position of
the last item it consumed, which is where a resumed run must continue.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

HostBatch = Mapping[str, np.ndarray]
DeviceBatch = dict[str, jax.Array]


class InputPosition:
    """A data iterator's saved position, in the form grain's checkpoint handler saves
    (``get_state()`` returning bytes, as for its non-dataset iterators)."""

    def __init__(self, state: Any):
        self._state = state  # serialized only when saved: most positions never are

    def get_state(self) -> bytes:
        return json.dumps(self._state, indent=4).encode()


def stack(batches: list[HostBatch]) -> dict[str, np.ndarray]:
    """``K`` batches -> one batch whose arrays have a leading axis of ``K`` (one per step)."""
    return {name: np.stack([b[name] for b in batches]) for name in batches[0]}


class DevicePrefetcher:
    """Iterates ``(device_batch, position)`` for ``num_items`` items, ``depth`` queued ahead.

    An item is ``batches_per_item`` consecutive host batches (stacked when more than one: the
    steps of one jitted call), placed on the devices by ``put``. Reads stop after ``num_items``
    so that nothing beyond the last step is read.
    """

    def __init__(self, iterator: Iterator[HostBatch], put: Callable[[Any], DeviceBatch], *, depth: int,
                 batches_per_item: int, num_items: int):
        self._iterator = iterator
        self._put = put
        self._depth = depth
        self._batches_per_item = batches_per_item
        self._left_to_read = num_items
        self._queue: collections.deque[tuple[DeviceBatch, InputPosition]] = collections.deque()
        self._fill()

    def _fill(self) -> None:
        while len(self._queue) < self._depth and self._left_to_read > 0:
            batches = [next(self._iterator) for _ in range(self._batches_per_item)]
            position = InputPosition(self._iterator.get_state())
            host = batches[0] if self._batches_per_item == 1 else stack(batches)
            self._queue.append((self._put(host), position))
            self._left_to_read -= 1

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> tuple[DeviceBatch, InputPosition]:
        if not self._queue:
            raise StopIteration
        return self._queue.popleft()

    def peek(self) -> DeviceBatch:
        """The next item's batch, without consuming it (to compile the step for its shapes)."""
        return self._queue[0][0]

    def refill(self) -> None:
        """Reads until ``depth`` items are queued. Call it right after dispatching a step: the
        reads then run while that step computes."""
        self._fill()
