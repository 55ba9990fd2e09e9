"""lmvic.heap: with the heap retained, a large block allocated again after being freed reuses its pages."""
import subprocess
import sys

import pytest

from lmvic.heap import retain_freed_memory

# A child process (mallopt is process-wide): the minor page faults of writing a 64 MiB block the
# second time, after the first one was freed (C malloc, as PyTorch's CPU allocator uses it).
CHILD = """
import ctypes, resource, sys
from lmvic.heap import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def write_and_free():
    block = libc.malloc(2**26)
    ctypes.memset(block, 1, 2**26)
    libc.free(block)
write_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
write_and_free()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_allocation_faults(heap: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, heap], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt thresholds are glibc's")
def test_a_freed_large_block_is_reused_without_page_faults_only_when_the_heap_is_retained():
    pages = 2**26 // 4096
    assert second_allocation_faults("system") > pages // 2  # glibc unmaps it: every page faults again
    assert second_allocation_faults("retain") < pages // 100


def test_retaining_the_heap_reports_whether_it_applied():
    assert retain_freed_memory() is sys.platform.startswith("linux")
