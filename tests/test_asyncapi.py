"""docs/asyncapi.yaml is generated from the code and must not drift from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from provisiond.asyncapi import HEADER, build, build_app, render

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "asyncapi.yaml"
REGENERATE = (
    "PYTHONPATH=daemon:plugins .venv/bin/python -m provisiond.asyncapi > docs/asyncapi.yaml"
)


def _load(text: str) -> dict[str, Any]:
    assert text.startswith(HEADER)
    doc: dict[str, Any] = json.loads(text[len(HEADER) :])
    return doc


def test_docs_asyncapi_matches_the_code() -> None:
    assert DOC.exists(), f"docs/asyncapi.yaml is missing; run: {REGENERATE}"
    assert DOC.read_text() == render(), (
        f"docs/asyncapi.yaml is out of date with the registered operations; run: {REGENERATE}"
    )


def test_module_entry_point_prints_the_document() -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'daemon'}:{ROOT / 'plugins'}"}
    env = {k: v for k, v in env.items() if not k.startswith("PROVISIOND_")}
    out = subprocess.run(
        [sys.executable, "-m", "provisiond.asyncapi"],
        capture_output=True, text=True, env=env, check=True, timeout=60,
    ).stdout  # fmt: skip
    assert out == render()


def test_it_is_yaml_too() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed; JSON is checked above")
    assert yaml.safe_load(render()) == _load(render())


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"unresolved $ref {ref}"
        node = node[part]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_operation_and_route_is_described_with_the_routers_schema() -> None:
    app, router = build_app()
    doc = build(app, router)
    assert doc["asyncapi"] == "3.0.0"
    refs = _refs(doc)
    assert refs
    for ref in refs:
        _resolve(doc, ref)

    addresses = {c["address"]: c for c in doc["channels"].values()}
    for name, op in router.operations.items():
        channel = addresses[f"{{prefix}}/rpc/{name}"]
        message = _resolve(doc, channel["messages"]["request"]["$ref"])
        schema = _resolve(doc, message["payload"]["$ref"])
        body: type[BaseModel] = op.body
        expected = body.model_json_schema(ref_template="#/components/schemas/{model}")
        expected.pop("$defs", None)
        assert schema == expected, name
        # Unknown fields are refused by the router, and the document says so.
        assert schema.get("additionalProperties") is False, name

    for route in app.topics.routes:
        suffix = "/".join("{deviceId}" if s == "+" else s for s in route.pattern)
        assert f"{{prefix}}/{suffix}" in addresses, route.pattern

    op_ids = [
        k
        for k, v in doc["operations"].items()
        if v["channel"]["$ref"].startswith("#/channels/rpc_")
    ]
    assert len(op_ids) == len(router.operations)
