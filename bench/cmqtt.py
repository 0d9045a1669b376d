"""The physical limit: an echo responder and a load driver in C on libmosquitto.

`bench/c/mqtt_echo.c` and `bench/c/mqtt_load.c` are built here on first use
(`cc`, Debian `libmosquitto-dev`) into `bench/c/build/`. The driver does
what `common.rpc_load` does (closed loop, same request shape), so "C driver
-> C echo" is the most this machine and broker can carry, and "C driver ->
daemon" is the daemon measured without the Python driver's own cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Unpack

from bench.common import LoadOptions, LoadResult, load_shape, responder

SOURCES = Path(__file__).resolve().parent / "c"
BUILD = SOURCES / "build"
PROGRAMS = ("mqtt_echo", "mqtt_load")


class Unavailable(RuntimeError):
    """No C compiler or no libmosquitto headers: the C figures are skipped."""


def build() -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise Unavailable("no C compiler (cc)")
    if not Path("/usr/include/mosquitto.h").exists():
        raise Unavailable("libmosquitto-dev is not installed")
    BUILD.mkdir(exist_ok=True)
    for name in PROGRAMS:
        source, binary = SOURCES / f"{name}.c", BUILD / name
        newest = max(p.stat().st_mtime for p in (source, *SOURCES.glob("*.h")))
        if binary.exists() and binary.stat().st_mtime >= newest:
            continue
        subprocess.run(
            [cc, "-O2", "-Wall", "-Wextra", "-o", str(binary), str(source), "-lmosquitto"],
            check=True,
        )
    return BUILD


def c_echo_process(
    port: int, topic: str
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    return responder([str(build() / "mqtt_echo"), str(port), topic])


async def c_load(
    port: int, topic: str, body: dict[str, Any] | bytes, **options: Unpack[LoadOptions]
) -> LoadResult:
    key, n = options["key"], options["n"]
    concurrency, warmup, timeout = load_shape(options)
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(payload)
        f.flush()
        proc = await asyncio.create_subprocess_exec(
            str(build() / "mqtt_load"), str(port), topic, f.name, key or "-", str(n),
            str(concurrency), str(warmup), str(int(timeout)),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"mqtt_load failed ({proc.returncode}): {err.decode().strip()}")
    data = json.loads(out)
    statuses = {int(k): v for k, v in data["statuses"].items()}
    return LoadResult(data["n"], data["seconds"], data["latencies_ms"], statuses)
