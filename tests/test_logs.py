"""The daemon's log output itself: redaction runs on every rendered line."""

from __future__ import annotations

import io
import json

import structlog

from provisiond import logs
from provisiond.config import LogConfig

KEY = "sk_live_" + "Q" * 40
TOKEN = "gSNIYf9l7vdaLEMWK0jRCHT9RKe5rDSO"


class _Stream(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_rendered_json_lines_carry_no_secret() -> None:
    stream = _Stream()
    # Put back afterwards: the suite-wide leak check lives in the global config.
    saved = structlog.get_config()
    logs.setup(LogConfig(level="debug", format="json"), stream=stream)
    try:
        log = logs.get_logger("test")
        log.info("rpc", authorization=f"Bearer {KEY}", token=TOKEN, op="keys/whoami")
        log.info("nested", body={"password": "hunter2", "inner": [{"session_key": "abc"}]})
        log.warning("message with a key inside", detail=f"bad key {KEY} given")
        log.info("bearer in text", detail=f"Authorization: Bearer {TOKEN}")
    finally:
        structlog.configure(**saved)
    out = stream.getvalue()
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 4
    for secret in (KEY, KEY[8:], TOKEN, "hunter2", '"abc"'):
        assert secret not in out, secret
    assert lines[0]["authorization"] == logs.REDACTED and lines[0]["token"] == logs.REDACTED
    assert lines[0]["op"] == "keys/whoami"  # ordinary fields stay readable
    assert lines[1]["body"]["password"] == logs.REDACTED
    assert lines[1]["body"]["inner"][0]["session_key"] == logs.REDACTED
    assert "sk_live_[redacted]" in lines[2]["detail"]


def test_level_filter_applies() -> None:
    stream = _Stream()
    # Put back afterwards: the suite-wide leak check lives in the global config.
    saved = structlog.get_config()
    logs.setup(LogConfig(level="warning", format="json"), stream=stream)
    try:
        logs.get_logger("test").info("quiet")
        logs.get_logger("test").warning("loud")
    finally:
        structlog.configure(**saved)
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["loud"]
