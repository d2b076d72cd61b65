"""The collector skips what a stream started with, until the last concurrent stream ends;
threads share one malloc arena."""

import gc
import platform
import subprocess
import sys

import pytest

from flows.memory import YOUNG_COLLECTION_EVERY, frozen_heap, long_lived_heap


def test_objects_alive_at_the_start_stay_frozen_until_the_last_stream_ends() -> None:
    # Frozen objects may still be freed by other threads, so the count can drop a little
    # while frozen; unfreezing moves every one of them back (count 0).
    assert gc.get_freeze_count() == 0
    with frozen_heap():
        outer = gc.get_freeze_count()
        assert outer > 1000
        with frozen_heap():
            assert gc.get_freeze_count() > outer // 2
        assert gc.get_freeze_count() > outer // 2  # the outer stream still runs
    assert gc.get_freeze_count() == 0


def test_a_failing_stream_unfreezes_too() -> None:
    try:
        with frozen_heap():
            raise RuntimeError("the database went away")
    except RuntimeError:
        pass
    assert gc.get_freeze_count() == 0


ARENAS = """
import ctypes, os, sys, tempfile, threading
from flows.memory import one_malloc_arena
if sys.argv[1] == "one":
    assert one_malloc_arena()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
kept = []
def allocate():
    kept.extend(libc.malloc(64 * 1024) for _ in range(8))  # below the mmap threshold: from an arena
threads = [threading.Thread(target=allocate) for _ in range(6)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
with tempfile.TemporaryFile() as report:
    libc.fdopen.restype = ctypes.c_void_p
    stream = ctypes.c_void_p(libc.fdopen(os.dup(report.fileno()), b"w"))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    report.seek(0)
    print(report.read().decode().count("<heap nr="))
"""


def arenas_after_six_threads(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, check=True)
    return int(run.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_threads_share_one_malloc_arena() -> None:
    assert arenas_after_six_threads("many") > 1  # glibc's default: an arena per thread, up to 8 per core
    assert arenas_after_six_threads("one") == 1


def test_a_process_loading_events_collects_its_youngest_objects_less_often_and_restores_it() -> None:
    before = gc.get_threshold()
    with long_lived_heap():
        assert gc.get_freeze_count() > 1000
        assert gc.get_threshold() == (YOUNG_COLLECTION_EVERY, *before[1:])
        with long_lived_heap():  # a second scope (two apps in one process) ends inside the first
            pass
        assert gc.get_threshold()[0] == YOUNG_COLLECTION_EVERY
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
