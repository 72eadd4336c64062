"""Start `python -m core.serve` as a subprocess on a free loopback port, wait for /health, and always stop it
(SIGTERM, then SIGKILL after a bounded wait)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
MODEL = "deepseek-v3-default"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`with ServerProcess(*options) as server:` -> `server.base_url` ('http://127.0.0.1:PORT'), `server.url(path)`,
    `server.stop() -> exit status`, `server.log()`."""

    def __init__(self, *options: str, start_timeout: float = 240.0):
        self.options, self.start_timeout = list(options), start_timeout
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="serve-", suffix=".log", delete=False)

    def url(self, path: str) -> str:
        return self.base_url + path

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def start(self) -> "ServerProcess":
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "core.serve", "--port", str(self.port), *self.options]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server did not become healthy in {self.start_timeout} s:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to `timeout` s, then SIGKILL. Returns the exit status (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                return None
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        Path(self._log.name).unlink(missing_ok=True)


def metric(text: str, name: str) -> float:
    """The value of an unlabelled-or-labelled sample `name` in Prometheus text (the first sample of that name)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"metric {name} not found")
