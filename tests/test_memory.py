"""trainer.memory.keep_freed_memory: freed blocks stay in the process (glibc only), opt-out by env."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# Allocate and touch 256 MB, free it, and report the resident size around the free. glibc maps a
# block that large on its own and unmaps it when freed, unless keep_freed_memory switched that off.
PROBE = """
import json, sys
import numpy as np
from trainer.memory import keep_freed_memory

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

kept = keep_freed_memory()
x = np.ones(256 * 2**20, dtype=np.uint8)
before = rss_mb()
del x
after = rss_mb()
y = np.ones(256 * 2**20, dtype=np.uint8)  # the same size again: served from the kept block
again = rss_mb()
print(json.dumps({"kept": kept, "freed_mb": before - after, "regrown_mb": again - after}))
"""

glibc_linux = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                 reason="mallopt's settings are glibc's (Linux)")


def probe(setting: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "KFYOLO_MALLOC"}
    if setting is not None:
        env["KFYOLO_MALLOC"] = setting
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120,
                          check=True)
    return json.loads(done.stdout)


@glibc_linux
def test_freed_memory_stays_in_the_process_and_is_reused():
    result = probe(None)
    assert result["kept"] is True
    assert result["freed_mb"] < 16, result  # nothing went back to the kernel
    assert result["regrown_mb"] < 16, result  # and the next allocation reused it


@glibc_linux
def test_kfyolo_malloc_default_leaves_glibc_alone():
    result = probe("default")
    assert result["kept"] is False
    assert result["freed_mb"] > 200, result  # glibc unmapped the block on free, as it does by default
