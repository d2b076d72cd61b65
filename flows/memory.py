"""How a run keeps its memory small: the garbage collector off long-lived objects, and
one malloc arena per process.

A run allocates a few tuples per recipient, batch after batch, and CPython's collector
answers with a full collection every few batches, each walking every object the process
holds: Prefect, SQLAlchemy, pydantic and compiled templates, some 170,000 objects. That
cost a quarter of the time of a 360,000-row audience. Freezing the objects that exist when
the stream starts (``gc.freeze``) takes them out of those scans; they return to the
collector when the last concurrent stream ends.

glibc gives each thread that allocates its own malloc arena (up to eight per core), and
memory freed in one arena serves no other. A run's process has a dozen threads (Prefect's,
the audience's read-ahead, the SMTP loop), and rendered mails and result rows are larger
than CPython's small-object allocator takes, so each thread's arena kept its own high-water
mark: 13 MB in the flow's process and 7 MB in a sender, measured at 100,000 customers.
Nearly all of a run's allocations happen under the GIL anyway, so one arena adds no lock
contention to speak of.
"""

import ctypes
import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_streams = 0


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Objects alive now are left out of collections until the last stream inside this ends."""
    global _streams
    with _lock:
        _streams += 1
        gc.freeze()
    try:
        yield
    finally:
        with _lock:
            _streams -= 1
            if _streams == 0:
                gc.unfreeze()


_M_ARENA_MAX = -8  # mallopt parameter, glibc's malloc.h


def one_malloc_arena() -> bool:
    """From now on, threads that allocate share the arenas that exist instead of adding one
    each. Call it before the process starts its threads; ``False`` where the C library is
    not glibc (nothing changes there)."""
    try:
        done: int = ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 1)
        return done == 1
    except (OSError, AttributeError):
        return False


# Allocations between two collections of the youngest generation (CPython's default: 700).
YOUNG_COLLECTION_EVERY = 10_000
_young = 0  # long_lived_heap scopes open
_young_before = 700


@contextmanager
def long_lived_heap() -> Iterator[None]:
    """For as long as a process loads events (``lifecycle web`` while it serves, ``lifecycle
    ingest`` to the end of its file): the heap alive at the start frozen out of collections
    (``frozen_heap``), and the youngest generation collected every 10,000 allocations
    instead of 700. A request's events allocate tens of thousands of short-lived objects;
    with the defaults, collections took 40 % of the loader's Python time (reading and
    loading 20,000 events of bench/collect.py's mix in one process: about 170 µs an event,
    100 µs without), and bench/collect.py's events/s rose by half."""
    global _young, _young_before
    with frozen_heap():
        with _lock:
            _young += 1
            if _young == 1:
                _young_before = gc.get_threshold()[0]
                gc.set_threshold(YOUNG_COLLECTION_EVERY, *gc.get_threshold()[1:])
        try:
            yield
        finally:
            with _lock:
                _young -= 1
                if _young == 0:
                    gc.set_threshold(_young_before, *gc.get_threshold()[1:])
