"""A rank killed outright (as the kernel's OOM killer does: SIGKILL, no chance to report) ends the whole torchrun in
bounded time with a non-zero status; no surviving rank is left waiting in a collective."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_parallel import PROMPT, _env, _spawn, free_port

END_WITHIN_S = 30


def _rank_pids(launcher: int) -> dict[int, int]:
    """RANK -> pid of the processes whose environment says they are a rank of this launcher's run."""
    ranks = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:  # the parent pid
                continue
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(proc.name)
    return ranks


def test_a_rank_killed_outright_ends_every_rank_within_30_s():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "core.run", "--prompt-ids", PROMPT, "--max-new-tokens", "1500",
           "--ignore-eos", "--json"]
    launcher = _spawn(cmd, _env())
    try:
        deadline = time.monotonic() + 120
        ranks = {}
        while len(ranks) < 2 and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.2)
            ranks = _rank_pids(launcher.pid)
        assert len(ranks) == 2, f"torchrun did not start 2 ranks: {launcher.poll()}"
        time.sleep(5)  # loading or generating: both are collectives a dead peer would leave hanging
        assert launcher.poll() is None, "the run ended before a rank could be killed"
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        try:
            status = launcher.wait(timeout=END_WITHIN_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"torchrun still running {END_WITHIN_S} s after rank 1 was killed") from None
        print(f"ended {time.monotonic() - killed:.1f} s after the kill, status {status}")
        assert status != 0 and time.monotonic() - killed < END_WITHIN_S
        time.sleep(0.5)
        assert not any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
                       for pid in ranks.values()), "a rank outlived the run"
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
