"""`provisiond call OP [JSON]`: one RPC request from the shell, through `provisiond.client`.

The broker settings (host, port, prefix, account, TLS) are the daemon's own,
from its config file; the API key comes from `$PROVISIOND_KEY` or
`--key-file`, never from the command line, where other users could read it.
The reply envelope is printed as JSON; the exit code says how it went.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any

from provisiond.cli.common import number_argument
from provisiond.config import (
    ENV_KEY,
    Config,
    config_path,
    load,
    read_secret,
)
from provisiond.errors import ConfigError

EXIT_OK = 0
EXIT_ERROR_REPLY = 1
EXIT_USAGE = 2
EXIT_NO_REPLY = 4
# The one operation authenticated by its body (the device's token), not a key.
KEYLESS = frozenset({"device/activate"})


class CallUsageError(Exception):
    """Bad input to `provisiond call`; printed as one line, exit 2."""


def _read_key(args: argparse.Namespace) -> str | None:
    if args.key_file:
        try:
            key = Path(args.key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CallUsageError(
                f"cannot read --key-file {args.key_file}: {exc.strerror}"
            ) from None
        if not key:
            raise CallUsageError(f"--key-file {args.key_file} is empty")
        return key
    return os.environ.get(ENV_KEY) or None


def _read_body(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    if text == "-":
        # Bodies holding secrets (a WiFi password) need not be on the command line.
        text = sys.stdin.read()
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise CallUsageError(f"JSON body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise CallUsageError("JSON body must be an object, e.g. '{\"deviceId\": 1}'")
    return body


def _tls(config: Config) -> ssl.SSLContext | bool:
    from provisiond.transport import tls_context

    return tls_context(config) if config.mqtt.tls.enabled else False


_positive_float = number_argument(float, "positive", lambda value: value > 0)
_retries = number_argument(int, "0..100", lambda value: 0 <= value <= 100)


def cmd_call(args: argparse.Namespace) -> int:
    from provisiond.client import CallTimeout, ClientError, ConnectionFailed, ProvisiondClient

    try:
        if (
            not args.operation
            or args.operation.startswith("/")
            or "#" in args.operation
            or "+" in args.operation
        ):
            raise CallUsageError(f"not an operation name: {args.operation!r} (e.g. keys/whoami)")
        body = _read_body(args.json)
        key = _read_key(args)
        if key is None and args.operation not in KEYLESS:
            raise CallUsageError(f"call needs an API key: ${ENV_KEY} or --key-file FILE")
    except CallUsageError as exc:
        print(f"provisiond: {exc}", file=sys.stderr)
        return EXIT_USAGE
    config = load(config_path(args.config))
    mqtt = config.mqtt
    password = None
    if mqtt.username and mqtt.password_file:
        password = read_secret(config, mqtt.password_file, key="mqtt.password_file").decode()
    try:
        tls = _tls(config)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot set up TLS: {exc}", key="mqtt.tls") from None

    async def run() -> int:
        client = ProvisiondClient(
            mqtt.host,
            mqtt.port,
            key=key,
            tls=tls,
            username=mqtt.username or None,
            password=password,
            prefix=mqtt.topic_prefix,
            protocol=args.protocol,
            timeout=args.timeout,
            retries=args.retries,
            # Never the daemon's own client id: the broker would disconnect the daemon.
            client_id=f"{mqtt.client_id}-call-{os.getpid()}",
        )
        async with client:
            reply = await client.call(args.operation, body)
        print(json.dumps(reply.as_dict(), indent=2, sort_keys=True))
        return EXIT_OK if reply.ok else EXIT_ERROR_REPLY

    where = f"{mqtt.host}:{mqtt.port}"
    try:
        return asyncio.run(run())
    except CallTimeout as exc:
        print(f"provisiond: {exc} (broker {where}, prefix {mqtt.topic_prefix})", file=sys.stderr)
    except ConnectionFailed as exc:
        print(f"provisiond: {exc}", file=sys.stderr)
    except ClientError as exc:
        print(f"provisiond: {exc}", file=sys.stderr)
    return EXIT_NO_REPLY


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register `call` on the main parser."""
    p = sub.add_parser(
        "call",
        parents=[common],
        help="send one RPC request to the running daemon and print the reply as JSON",
        description="Exit status: 0 for a 2xx reply, 1 for an error reply, 2 for bad usage, "
        "3 for a bad config, 4 when no reply came or the broker was unreachable. "
        f"The API key is read from ${ENV_KEY} or --key-file.",
    )
    p.add_argument("operation", metavar="OP", help="operation name, e.g. keys/whoami")
    p.add_argument(
        "json", metavar="JSON", nargs="?", help="request body (a JSON object; '-' reads stdin)"
    )
    p.add_argument("--key-file", metavar="FILE", help=f"file holding the API key (else ${ENV_KEY})")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=10.0,
        help="seconds to wait for the reply (default 10)",
    )
    p.add_argument(
        "--retries",
        type=_retries,
        default=2,
        help="re-publish (as a replay, same correlation data) this many times within the timeout",
    )
    p.add_argument(
        "--protocol", choices=["5", "3.1.1"], default="5", help="MQTT version (default 5)"
    )
    p.set_defaults(fn=cmd_call)
