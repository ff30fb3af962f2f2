"""trainer.torchrun is torchrun with a quick exit: same workers, same environment, same failures."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

WORKER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    out = Path(sys.argv[1])
    rank = os.environ["RANK"]
    (out / f"rank{rank}").write_text(f"{os.environ['WORLD_SIZE']} {os.environ['LOCAL_RANK']} {sys.argv[2]}")
    sys.exit(int(sys.argv[3]) if rank == "1" else 0)
""")


def launch(tmp_path: Path, rank1_status: int) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.run([sys.executable, "-m", "trainer.torchrun", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path), "hello", str(rank1_status)],
                          capture_output=True, text=True, timeout=120)


def test_both_workers_run_with_torchruns_environment_and_success_exits_zero(tmp_path):
    done = launch(tmp_path, 0)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "rank0").read_text() == "2 0 hello"
    assert (tmp_path / "rank1").read_text() == "2 1 hello"


def test_a_failing_worker_fails_the_launch_with_torchruns_report(tmp_path):
    done = launch(tmp_path, 3)
    assert done.returncode != 0
    assert "ChildFailedError" in done.stderr and "exitcode  : 3" in done.stderr, done.stderr[-2000:]
    assert (tmp_path / "rank0").exists()  # the healthy rank ran; the report names the failed one


def test_usage_errors_keep_argparses_status(tmp_path):
    done = subprocess.run([sys.executable, "-m", "trainer.torchrun", "--nproc_per_node"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "--nproc_per_node" in done.stderr
