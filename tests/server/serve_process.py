"""``pruneserve serve`` as a subprocess on a free localhost port, for tests that need a real process.

A real process is what SIGTERM, RSS and peak-memory measurements are about; the port is read
from the server's own "gRPC listening on" log line (``--grpc-port 0``). The metrics endpoint is
off (``--no-metrics``) unless a test passes ``--metrics``; its port then comes from the log too.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path


class ServeProcess:
    """``pruneserve serve ARTIFACTS... EXTRA_FLAGS...`` on 127.0.0.1; stderr kept for failure messages."""

    def __init__(self, artifacts: list[Path], *flags: str) -> None:
        cmd = [
            sys.executable, "-m", "pruneserve.cli", "serve", *map(str, artifacts), "--host", "127.0.0.1",
            "--grpc-port", "0", "--http-port", "0", "--no-metrics", "--metrics-port", "0", "--threads", "1", *flags,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self._port: int | None = None
        self._ready = threading.Event()
        self._eof = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            match = re.search(r"gRPC listening on 127\.0\.0\.1:(\d+)", line)
            if match:
                self._port = int(match.group(1))
                self._ready.set()
        self._ready.set()
        self._eof.set()

    @property
    def url(self) -> str:
        """``127.0.0.1:<port>`` once the server listens (waits up to two minutes)."""
        if not self._ready.wait(120) or self._port is None:
            raise AssertionError("server did not start:\n" + self.log())
        return f"127.0.0.1:{self._port}"

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        """The first log line matching ``pattern`` (waits up to ``timeout`` s, or until the process ends)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            lines = self.lines[:]  # the reader thread appends; a copy is a consistent view
            for line in lines[seen:]:
                if match := re.search(pattern, line):
                    return match
            ended = self._eof.is_set() and len(self.lines) == len(lines)
            seen = len(lines)
            if ended or time.monotonic() > deadline:
                raise AssertionError(f"no log line matches {pattern!r}:\n" + self.log())
            time.sleep(0.05)

    def log(self) -> str:
        """The last lines the server logged."""
        return "".join(self.lines[-60:])

    def peak_rss(self) -> int:
        """The process's peak resident set (VmHWM), in bytes."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        assert match, status
        return int(match.group(1)) * 1024

    def close(self) -> None:
        """Kill the server if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
