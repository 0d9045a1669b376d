"""The docs stand alone and their examples run as written.

- Every link in README.md and docs/*.md resolves to a file inside the repository.
- Every Python block of docs/protocol.md §8 and the README's client example run
  against a real daemon; every `provisiond call` line of the docs runs as a
  real process with the exit status it is documented to have.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
from daemon_proc import ROOT, write_toml
from structlog.testing import LogCapture
from test_ble_bridge import PASSWORD, ble_env

from provisiond.client import ProvisiondClient
from support import Broker, make_config, remember_secret, running, seed_key

PROVISIOND = ROOT / ".venv" / "bin" / "provisiond"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def links(text: str) -> list[str]:
    """Link targets outside code: code blocks and spans are blanked first (a
    span like `f["x"](y)` is code, not a link; [`docs/`](docs/) still is one)."""
    return LINK.findall(CODE_SPAN.sub("CODE", FENCE.sub("", text)))


def blocks(text: str, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(text) if kind == lang]


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else None]


def test_every_link_resolves_inside_the_repository() -> None:
    checked = 0
    for doc in DOCS:
        text = doc.read_text()
        assert "../shared" not in text, doc
        for target in links(text):
            where = f"{doc.relative_to(ROOT)}: {target}"
            assert "://" not in target and not target.startswith("mailto:"), where
            path = target.split("#", 1)[0]
            if not path:
                continue  # an anchor in the same page
            resolved = (doc.parent / path).resolve()
            assert resolved.is_relative_to(ROOT), f"{where} leaves the repository"
            assert resolved.exists(), f"{where} does not exist"
            checked += 1
    assert checked > 20


def test_the_link_check_catches_a_bad_link(tmp_path: Path) -> None:
    """The regex finds the link forms the docs use (so the test above means something)."""
    sample = "see [`../shared/DESIGN.md`](../shared/DESIGN.md) and [x](docs/a.md#b)"
    assert links(sample) == ["../shared/DESIGN.md", "docs/a.md#b"]
    assert links('`app.services["x"](device_id)` and\n```sh\n[a](b)\n```\n') == []


async def run_block(source: str, namespace: dict[str, Any]) -> None:
    code = compile(source, "<docs>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)
    if asyncio.iscoroutine(result):
        await result


@pytest.mark.store
async def test_protocol_client_examples_run_as_written(
    tmp_path: Path, broker: Broker, logs: LogCapture
) -> None:
    examples = blocks(section((ROOT / "docs/protocol.md").read_text(), "## 8."), "python")
    program, per_operation = examples[0], examples[1:]
    assert len(per_operation) >= 8
    async with ble_env(tmp_path, broker) as env:
        ble_device = await env.device()
        config = env.server.config
        async with ProvisiondClient(
            "127.0.0.1", config.mqtt.port, key=env.key, prefix=config.mqtt.topic_prefix
        ) as c:
            namespace: dict[str, Any] = {
                "c": c,
                "ble_device_id": ble_device.device_id,
                "wifi_password": PASSWORD,
            }
            for source in per_operation:
                await run_block(source, namespace)
            remember_secret(namespace["token"])
            remember_secret(namespace["again"]["token"])
            assert namespace["result"]["state"] == "connected"
            assert namespace["activated"]["deviceId"] == namespace["device_id"]
            called = {m for src in per_operation for m in re.findall(r"c\.(\w+)\(", src)}
    from provisiond.client import OPERATIONS

    assert {method for method, _fields in OPERATIONS.values()} <= called
    assert "async with ProvisiondClient(" in program


@pytest.mark.store
async def test_protocol_program_runs_as_written(tmp_path: Path, broker: Broker) -> None:
    """The first example is a whole program: run it as one, with the default prefix."""
    program = blocks(section((ROOT / "docs/protocol.md").read_text(), "## 8."), "python")[0]
    own = Broker(tmp_path / "own").start()
    try:
        config = make_config(tmp_path, own, mqtt={"topic_prefix": "provisiond"})
        _id, key = seed_key(config, scopes=("devices:read",))
        script = tmp_path / "example.py"
        script.write_text(program)
        async with running(config):
            env = {**os.environ, "MQTT_PORT": str(own.port), "PROVISIOND_KEY": key}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(script), env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert out.decode().strip() == "1 ['devices:read']"
    finally:
        own.stop()


async def test_readme_client_example_runs_as_written(config: Any, daemon: Any) -> None:
    readme = (ROOT / "README.md").read_text()
    [example] = [b for b in blocks(readme, "python") if "ProvisiondClient" in b]
    _id, key = seed_key(config, users=(1,))
    source = "async def example():\n" + "".join(f"    {line}\n" for line in example.splitlines())
    namespace: dict[str, Any] = {
        "ProvisiondClient": lambda *a, **kw: ProvisiondClient(
            *a, prefix=config.mqtt.topic_prefix, **kw
        ),
        "host": "127.0.0.1",
        "port": config.mqtt.port,
        "api_key": key,
        "use_tls": False,
    }
    exec(source + "    return created, device\n", namespace)
    created, device = await namespace["example"]()
    remember_secret(created["token"])
    assert device["state"] == "pending"


def call_lines() -> list[tuple[str, list[str], int]]:
    found = []
    for doc in DOCS:
        for block in blocks(doc.read_text(), "sh"):
            for line in block.splitlines():
                if line.startswith("provisiond call "):
                    command, _, comment = line.partition("#")
                    status = re.search(r"exit (\d+)", comment)
                    found.append((line, shlex.split(command), int(status[1]) if status else 0))
    return found


async def test_call_lines_in_the_docs_run_as_written(
    config: Any, daemon: Any, tmp_path: Path
) -> None:
    lines = call_lines()
    assert len(lines) >= 4
    _id, key = seed_key(config, users=(1,))
    # The examples look at device 1.
    async with ProvisiondClient(
        "127.0.0.1", config.mqtt.port, key=key, prefix=config.mqtt.topic_prefix
    ) as c:
        remember_secret((await c.provision_token(org_id=1, owner_id=1))["token"])
    config_file = write_toml(config, tmp_path / "p.toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVISIOND_")}
    env.update(PROVISIOND_CONFIG=str(config_file), PROVISIOND_KEY=key)
    for line, argv, expected in lines:
        proc = await asyncio.create_subprocess_exec(
            str(PROVISIOND), *argv[1:], env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        for token in re.findall(r'"token": "(\w+)"', out.decode()):
            remember_secret(token)
        assert proc.returncode == expected, (line, err.decode())
