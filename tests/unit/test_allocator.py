"""The C allocator's mmap threshold every ``dealstream`` command runs with
(DEALSTREAM_MALLOC_MMAP_THRESHOLD)."""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import textwrap

import pytest

from streams.cli import main as cli_main
from streams.errors import ConfigError
from streams.operations.allocator import fix_mmap_threshold
from streams.settings import MAX_MMAP_THRESHOLD, Settings

GLIBC = platform.libc_ver()[0] == "glibc"

# Frees a 4 MiB block (glibc then raises a dynamic threshold to 4 MiB) and reports whether a
# 256 KiB block allocated after it got a mapping of its own (mallinfo2's count of them). The
# heap's free top is given back first (malloc_trim): a block the top can hold comes from it
# whatever the threshold, and how much is free there depends on what the imports allocated.
_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from streams.operations.allocator import fix_mmap_threshold
    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = Info
    print(fix_mmap_threshold(int(sys.argv[1])))
    libc.free(libc.malloc(4 << 20))
    libc.malloc_trim(0)
    before = libc.mallinfo2().hblks
    block = libc.malloc(256 << 10)
    print(libc.mallinfo2().hblks - before)
    libc.free(block)
    """
)


def _probe(threshold: int) -> tuple[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(threshold)], capture_output=True, text=True, check=True
    )
    fixed, mapped = done.stdout.split()
    return fixed, mapped


def test_a_fixed_threshold_keeps_large_blocks_off_the_heap_after_a_larger_one_was_freed() -> None:
    if not GLIBC:
        assert _probe(128 << 10)[0] == "False"  # no mallopt to call: nothing changes
        return
    assert _probe(128 << 10) == ("True", "1")  # the 256 KiB block has its own mapping
    assert _probe(0) == ("False", "0")  # glibc's dynamic threshold: it came from the heap


def test_the_threshold_must_be_within_glibcs_bounds() -> None:
    with pytest.raises(ValueError, match="between 0 and"):
        fix_mmap_threshold(-1)
    with pytest.raises(ValueError, match="between 0 and"):
        fix_mmap_threshold(MAX_MMAP_THRESHOLD + 1)


def test_the_setting_is_read_from_the_environment() -> None:
    assert Settings.from_env({}).malloc_mmap_threshold == 131_072
    assert Settings.from_env({"DEALSTREAM_MALLOC_MMAP_THRESHOLD": "0"}).malloc_mmap_threshold == 0
    with pytest.raises(ConfigError, match="at most 33554432 bytes"):
        Settings.from_env({"DEALSTREAM_MALLOC_MMAP_THRESHOLD": str(MAX_MMAP_THRESHOLD + 1)})
    with pytest.raises(ConfigError, match="MALLOC_MMAP_THRESHOLD"):
        Settings.from_env({"DEALSTREAM_MALLOC_MMAP_THRESHOLD": "-1"})


def test_every_command_runs_with_the_configured_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    fixed: list[int] = []

    def parser() -> argparse.ArgumentParser:
        root = argparse.ArgumentParser()
        root.set_defaults(handler=lambda settings, args: 0)
        return root

    monkeypatch.setattr(cli_main, "build_parser", parser)
    monkeypatch.setattr(cli_main, "configure_logging", lambda *args, **kwargs: None)
    monkeypatch.setattr(cli_main, "tune_garbage_collector", lambda threshold: None)
    monkeypatch.setattr(cli_main, "fix_mmap_threshold", fixed.append)
    monkeypatch.setenv("DEALSTREAM_MALLOC_MMAP_THRESHOLD", "262144")
    assert cli_main.main([]) == 0
    assert fixed == [262_144]
