"""A mosquitto of a test's own, started from the `mosquitto.conf` in its directory."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

from support import MOSQUITTO


class MosquittoProcess:
    directory: Path
    local_port: int
    tls_port: int
    proc: subprocess.Popen[bytes] | None

    def launch(self, what: str, *, stderr_mode: str) -> None:
        """Start it and wait until both listeners take connections; `what` names the
        config in the error, `stderr_mode` "ab" keeps the log of an earlier run."""
        d = self.directory
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(d / "mosquitto.conf")],
            stdout=subprocess.DEVNULL, stderr=(d / "stderr.log").open(stderr_mode),
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto refused the {what} config: " + self.logs())
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.tls_port), 0.2).close()
                socket.create_connection(("127.0.0.1", self.local_port), 0.2).close()
                return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening: " + self.logs())

    def logs(self) -> str:
        return "".join(
            p.read_text()[-2000:]
            for p in (self.directory / "stderr.log", self.directory / "mosquitto.log")
            if p.exists()
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
