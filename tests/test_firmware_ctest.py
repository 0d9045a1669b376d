"""firmware/ under CTest, from pytest so scripts/test.sh runs it: every test
vector, the unit tests and the bounded fuzz, plain and with ASan + UBSan."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from firmware_support import FIRMWARE, ROOT, build, run

VECTORS = ROOT / "tests" / "vectors" / "wifi-grant-v1.json"


@pytest.mark.parametrize("flavour", ["plain", "sanitize"])
def test_ctest_passes(flavour: str) -> None:
    directory = build(flavour)
    env = {
        **os.environ,
        "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    }
    result = run(["ctest", "--output-on-failure", "-j", "2"], directory, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "100% tests passed, 0 tests failed out of 3" in out
    for name in ("vectors", "units", "fuzz"):
        assert f": {name} " in out, out


def test_vector_run_covers_every_es256_reject_case() -> None:
    vec = json.loads(VECTORS.read_text())
    result = run([str(build("plain") / "test_vectors"), str(VECTORS)], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    cases = len(vec["es256"]["rejects"]["cases"])
    assert f"es256.rejects: {cases} reject cases" in result.stdout


def test_vector_test_fails_on_a_wrong_vector(tmp_path: Path) -> None:
    """The C vector test really compares bytes: one flipped bit fails it."""
    vec = json.loads(VECTORS.read_text())
    message = bytearray.fromhex(vec["status"][0]["message"])
    message[-1] ^= 1
    vec["status"][0]["message"] = message.hex()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(vec))
    result = run([str(build("plain") / "test_vectors"), str(bad)], ROOT)
    assert result.returncode != 0 and "check(s) failed" in result.stderr


def test_library_never_allocates() -> None:
    """No malloc in the library itself: buffers are the documented constants."""
    archive = build("plain") / "libprovisiond_device.a"
    undefined = subprocess.run(
        ["nm", "-u", str(archive)], capture_output=True, text=True, check=True
    ).stdout.split()
    for symbol in ("malloc", "calloc", "realloc", "free"):
        assert symbol not in undefined, f"{symbol} is referenced"
    assert "mbedtls_gcm_auth_decrypt" in undefined  # the check sees real references


def test_esp_idf_component_registers_every_source(tmp_path: Path) -> None:
    """firmware/CMakeLists.txt as ESP-IDF reads it (ESP_PLATFORM set): a stand-in
    `idf_component_register` builds what it is given, and a program calling
    every entry point must link against that alone."""
    manifest = (FIRMWARE / "idf_component.yml").read_text()
    assert "version:" in manifest and "idf:" in manifest
    project = tmp_path / "idf"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(
        f"""
cmake_minimum_required(VERSION 3.16)
project(idf_standin C)
set(ESP_PLATFORM 1)
function(idf_component_register)
    cmake_parse_arguments(A "" "" "SRCS;INCLUDE_DIRS;PRIV_INCLUDE_DIRS;PRIV_REQUIRES" ${{ARGN}})
    if(NOT A_PRIV_REQUIRES STREQUAL "mbedtls")
        message(FATAL_ERROR "component must require mbedtls, got ${{A_PRIV_REQUIRES}}")
    endif()
    add_library(component STATIC ${{A_SRCS}})
    target_include_directories(component PUBLIC ${{A_INCLUDE_DIRS}} PRIVATE ${{A_PRIV_INCLUDE_DIRS}})
endfunction()
add_subdirectory({FIRMWARE} component)
add_executable(app {FIRMWARE}/tools/size_probe.c)
target_link_libraries(app PRIVATE component mbedcrypto)
"""
    )
    out = tmp_path / "out"
    configured = run(["cmake", "-S", str(project), "-B", str(out)], ROOT)
    assert configured.returncode == 0, configured.stdout + configured.stderr
    built = run(["cmake", "--build", str(out)], ROOT)
    assert built.returncode == 0, built.stdout + built.stderr
    assert (out / "app").exists()


def test_documented_memory_bounds_hold() -> None:
    """firmware/README.md's RAM and size figures, as upper bounds that must keep holding."""
    directory = build("plain")
    probe = run([str(directory / "pd_ram_probe"), str(VECTORS)], ROOT)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    sizes = {
        line.split()[0]: int(line.split()[1])
        for line in probe.stdout.splitlines()
        if line.startswith("sizeof")
    }
    assert sizes["sizeof(pd_device_t)"] + sizes["sizeof(pd_gatt_t)"] <= 8 * 1024
    heaps = [
        int(line.split("heap")[1].split()[0])
        for line in probe.stdout.splitlines()
        if line.startswith("call")
    ]
    assert heaps and max(heaps) <= 6 * 1024, probe.stdout
    text = run(["size", "-t", str(directory / "libprovisiond_device_size.a")], ROOT)
    total = next(line for line in text.stdout.splitlines() if "TOTALS" in line)
    assert int(total.split()[0]) <= 32 * 1024, text.stdout
