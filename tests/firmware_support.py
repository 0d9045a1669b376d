"""Building firmware/ for the tests: plain CMake in a private build directory.

One build per flavour and test session (the shared library for ctypes, the
CTest binaries and the host device program come from the same build).
Missing tools are a failure, not a skip: scripts/setup.sh installs them.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"


def _require_tools() -> None:
    missing = [tool for tool in ("cmake", "ctest", "cc") if shutil.which(tool) is None]
    if not Path("/usr/include/mbedtls/gcm.h").exists():
        missing.append("libmbedtls-dev")
    if not Path("/usr/include/mosquitto.h").exists():
        missing.append("libmosquitto-dev")
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run scripts/setup.sh")


def run(cmd: list[str], cwd: Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False, **kwargs
    )


@functools.cache
def build(flavour: str = "plain") -> Path:
    """Configure and build firmware/ ("plain" or "sanitize"); returns the build dir."""
    _require_tools()
    directory = Path(tempfile.mkdtemp(prefix=f"pd-firmware-{flavour}-"))
    atexit.register(shutil.rmtree, directory, True)
    options = ["-DCMAKE_BUILD_TYPE=RelWithDebInfo"]
    env = dict(os.environ)
    if flavour == "sanitize":
        options = ["-DCMAKE_BUILD_TYPE=Debug", "-DPD_SANITIZE=ON", "-DPD_BUILD_EXAMPLES=OFF"]
        if shutil.which("clang"):
            env["CC"] = "clang"
    configured = run(["cmake", "-S", str(FIRMWARE), "-B", str(directory), *options], ROOT, env=env)
    assert configured.returncode == 0, configured.stdout + configured.stderr
    built = run(["cmake", "--build", str(directory), "-j", "2"], ROOT, env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    return directory


def shared_library() -> Path:
    return build("plain") / "libprovisiond_device.so"


def host_device() -> Path:
    return build("plain") / "pd_host_device"
