"""A real ``phi-onnx serve`` process on 127.0.0.1 (port 0: the OS picks a free one), for the server tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

_READY = re.compile(r"ready on http://127\.0\.0\.1:(\d+)")


class ServerProcess:
    """Starts ``phi-onnx serve MODEL --port 0 ...``, waits for its ready line, and reads its log."""

    def __init__(self, model: Path, log: Path, *args: str, env: dict | None = None, timeout: float = 120) -> None:
        self.log_path = log
        self.model = model
        self._log = open(log, "w")  # noqa: SIM115 - open for the life of the process
        command = [sys.executable, "-m", "phi_onnx", "serve", str(model), "--port", "0", "--model-name", "tiny", *args]
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _READY.search(self.log())
            if match:
                self.port = int(match.group(1))
                self.url = f"http://127.0.0.1:{self.port}"
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"phi-onnx serve exited with {self.process.returncode}: {self.log()[-2000:]}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"phi-onnx serve was not ready within {timeout} s: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access(self, request_id: str, timeout: float = 10) -> str:
        """The access-log line of one request (it is written when the response ends)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if f"id={request_id} " in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no access-log line for {request_id}: {self.log()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode
