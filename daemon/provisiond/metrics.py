"""Prometheus metrics at `[metrics] listen` (off by default), via prometheus-client.

Most metrics are read at scrape time from state the daemon keeps anyway
(`app.counters`, `router.inflight`, the transport, the presence and command
services), by a custom collector: nothing on the hot path updates them. Two
things are only known as they happen: a finished request and a store call.
The router and the store each take one observer callback for them, which
this feature sets; with metrics off nothing is called.

The endpoint is served on the daemon's event loop by a small asyncio HTTP
server, so the collector reads state on the thread that owns it. Label
values are bounded (operation names the router knows, status codes, outcome
codes) and never carry a key, token, password or device-supplied text.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from provisiond import commands
from provisiond.config import Config, parse_listen
from provisiond.errors import ConfigError, StoreUnavailable
from provisiond.logs import get_logger
from provisiond.presence import PRESENCE

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from provisiond.rpc import Router
    from provisiond.runtime.app import App

log = get_logger("provisiond.metrics")


# The FileDescriptorName= of systemd/provisiond-metrics.socket.
SOCKET_NAME: Final = "metrics"
SD_LISTEN_FDS_START: Final = 3
BLE_UPLOAD: Final = "wifi-config/upload"
# Label values are bounded: past this many distinct values of one label, "other".
MAX_LABEL_VALUES: Final = 64
REQUEST_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # fmt: skip
STORE_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)  # fmt: skip
HTTP_TIMEOUT: Final = 5.0
# Connections served at once; more are closed at once (a scraper needs one).
MAX_CONNECTIONS: Final = 8
MAX_REQUEST_BYTES: Final = 8192


# --- the metrics of one daemon


class Metrics:
    def __init__(self, app: App, router: Router) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Histogram,
            disable_created_metrics,
        )
        from prometheus_client.process_collector import ProcessCollector

        # `*_created` series double the output and say only when the daemon
        # started, which provisiond_start_time_seconds says once.
        disable_created_metrics()  # type: ignore[no-untyped-call]

        self.app = app
        self.router = router
        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "provisiond_requests",
            "RPC requests handled, by operation and reply status "
            '("dropped": no reply path; op "unknown": not an operation)',
            ["op", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "provisiond_request_duration_seconds",
            "Time from a request's start to its reply, by operation and status",
            ["op", "status"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.ble_uploads = Counter(
            "provisiond_ble_uploads",
            "BLE bridge uploads by outcome: connected, failed, or the error code",
            ["outcome"],
            registry=self.registry,
        )
        self.store_seconds = Histogram(
            "provisiond_store_duration_seconds",
            "Store calls, from the event loop's view (queueing on the store thread included)",
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self._labels: dict[str, set[str]] = {}
        self._snapshot: dict[str, Any] = {}
        self.registry.register(_StateCollector(self))
        ProcessCollector(registry=self.registry)

    def _bounded(self, label: str, value: str) -> str:
        seen = self._labels.setdefault(label, set())
        if value in seen:
            return value
        if len(seen) >= MAX_LABEL_VALUES:
            return "other"
        seen.add(value)
        return value

    def request(
        self, router: Router, op: str, status: int | str, seconds: float, fields: dict[str, Any]
    ) -> None:
        # Anyone may publish on P/rpc/<anything>: only registered names become labels.
        name = op if op in router.operations else "unknown"
        code = str(status)
        self.requests.labels(name, code).inc()
        self.request_seconds.labels(name, code).observe(seconds)
        if name == BLE_UPLOAD and code != "dropped":
            outcome = fields.get("state") or fields.get("error") or code
            self.ble_uploads.labels(self._bounded("ble_outcome", str(outcome))).inc()

    async def refresh(self) -> None:
        """Gather, on the loop, what the collector reports at the next scrape."""
        app = self.app
        snapshot: dict[str, Any] = {
            "counters": dict(app.counters),
            "connected": app.transport.is_connected,
            "connections": app.transport.connections,
            "dropped_qos0": app.transport.dropped,
            "inflight": self.router.inflight,
            "started_at": app.started_at,
        }
        presence = app.services.find(PRESENCE)
        if presence is not None:
            snapshot["presence"] = await presence.stats()
        with contextlib.suppress(StoreUnavailable):
            snapshot["commands"] = await app.store.call(commands.live_counts)
        self._snapshot = snapshot

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _StateCollector:
    """Metrics read from the daemon's own state, as gathered by `Metrics.refresh`."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        snap = self.metrics._snapshot
        if not snap:
            return
        counters: dict[str, int] = snap["counters"]
        yield from _daemon_metrics(snap, counters)
        presence = snap.get("presence")
        if presence is not None:
            yield from _presence_metrics(presence)
        yield from _command_metrics(snap.get("commands"), counters)
        yield from _grant_metrics(counters)


def _counter(name: str, doc: str, value: float) -> Metric:
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> Metric:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, doc, value=value)


def _daemon_metrics(snap: dict[str, Any], counters: dict[str, int]) -> Iterable[Metric]:
    from prometheus_client.core import CounterMetricFamily

    yield _gauge(
        "provisiond_start_time_seconds",
        "When the daemon started (Unix time)",
        snap["started_at"],
    )
    yield _gauge("provisiond_inflight_requests", "Requests being handled now", snap["inflight"])
    yield _gauge(
        "provisiond_mqtt_connected",
        "1 while the broker connection is up",
        int(snap["connected"]),
    )
    yield _counter(
        "provisiond_mqtt_connections",
        "Broker connections made since start",
        snap["connections"],
    )
    yield _counter(
        "provisiond_mqtt_reconnects",
        "Broker connections made after the first (each follows a lost connection)",
        max(0, snap["connections"] - 1),
    )
    dropped = CounterMetricFamily(
        "provisiond_dropped_messages",
        "Messages dropped: QoS 0 ones (heartbeats) while the daemon fell behind, "
        "requests with no way to reply",
        labels=["reason"],
    )
    dropped.add_metric(["backlog"], snap["dropped_qos0"])
    dropped.add_metric(["no_reply_path"], counters.get("rpc.dropped", 0))
    yield dropped


def _presence_metrics(presence: dict[str, Any]) -> Iterable[Metric]:
    from prometheus_client.core import CounterMetricFamily

    yield _gauge(
        "provisiond_presence_tracked_devices",
        "Active devices whose presence is tracked",
        presence["tracked"],
    )
    yield _gauge(
        "provisiond_presence_online_devices",
        "Tracked devices online on some channel",
        presence["online"],
    )
    yield _gauge(
        "provisiond_presence_offline_devices",
        "Tracked devices offline on every channel",
        presence["offline"],
    )
    heartbeats = CounterMetricFamily(
        "provisiond_heartbeats",
        "Heartbeats received: ok, or why they were ignored",
        labels=["result"],
    )
    heartbeats.add_metric(["ok"], presence["heartbeats"])
    for result in ("unknown", "malformed", "oversize", "lookup_overflow"):
        heartbeats.add_metric([result], presence[f"heartbeats_{result}"])
    yield heartbeats


def _command_metrics(commands: dict[str, int] | None, counters: dict[str, int]) -> Iterable[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    if commands is not None:
        live = GaugeMetricFamily(
            "provisiond_commands",
            "Commands waiting: queued (device offline) or sent and not yet acknowledged",
            labels=["state"],
        )
        for state in ("queued", "sent"):
            live.add_metric([state], commands[state])
        yield live
    yield _counter(
        "provisiond_commands_sent",
        "Commands published to devices since start",
        counters.get("commands.sent", 0),
    )
    yield _counter(
        "provisiond_commands_acked",
        "Command acknowledgements recorded since start",
        counters.get("commands.acked", 0),
    )


def _grant_metrics(counters: dict[str, int]) -> Iterable[Metric]:
    from prometheus_client.core import CounterMetricFamily

    grants = CounterMetricFamily(
        "provisiond_wifi_grants", "WiFi grants issued since start, by mode", labels=["mode"]
    )
    for name, value in sorted(counters.items()):
        if name.startswith("wifi.grants."):
            grants.add_metric([name.removeprefix("wifi.grants.")], value)
    yield grants


# --- the feature


def systemd_socket(env: dict[str, str] | None = None) -> socket.socket | None:
    """The listening socket systemd passed us as `metrics` (socket activation), if any."""
    env = dict(os.environ) if env is None else env
    if env.get("LISTEN_PID") != str(os.getpid()):
        return None  # not ours: inherited from a parent that was socket-activated
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for index in range(min(count, len(names))):
        if names[index] == SOCKET_NAME:
            sock = socket.socket(fileno=SD_LISTEN_FDS_START + index)
            sock.set_inheritable(False)
            return sock
    return None


def setup(app: App, router: Router) -> None:
    """Serve metrics when `[metrics] listen` is set or systemd passed a `metrics`
    socket; otherwise do nothing at all."""
    listen = app.config.metrics.listen
    inherited = systemd_socket()
    if not listen and inherited is None:
        return
    metrics = Metrics(app, router)
    # The two things only known as they happen are reported to it as they do.
    router.on_finished = partial(metrics.request, router)
    app.store.on_call = metrics.store_seconds.observe
    server = MetricsServer(metrics, listen, inherited)
    app.on_start.append(server.start)
    app.on_stop.append(server.stop)

    async def reload(new: Config) -> None:
        if new.metrics.listen != listen:
            log.warning("config.needs_restart", keys=["metrics.listen"], kept=listen)

    app.on_reload.append(reload)


class MetricsServer:
    """GET /metrics over HTTP/1.0-style one-shot connections, on the event loop."""

    def __init__(self, metrics: Metrics, listen: str, sock: socket.socket | None = None) -> None:
        self.metrics = metrics
        self.listen = listen
        # A socket systemd holds for us wins over `listen`: it stays open
        # across restarts, so scrapes wait instead of being refused.
        self.sock = sock
        self._server: asyncio.Server | None = None
        self._open = 0

    async def start(self) -> None:
        if self.sock is not None:
            self._server = await asyncio.start_server(
                self._serve, sock=self.sock, limit=MAX_REQUEST_BYTES
            )
            host, port = self.sock.getsockname()[:2]
            log.info("metrics.listening", listen=f"{host}:{port}", systemd_socket=True)
            return
        host, port = parse_listen(self.listen)
        try:
            self._server = await asyncio.start_server(
                self._serve, host, port, limit=MAX_REQUEST_BYTES
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {self.listen}: {exc.strerror or exc}",
                key="metrics.listen",
            ) from None
        log.info("metrics.listening", listen=self.listen)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            writer.close()
            return
        self._open += 1
        try:
            async with asyncio.timeout(HTTP_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await self._reply(writer, 405, b"only GET\n", "text/plain; charset=utf-8")
            elif path != "/metrics":
                await self._reply(
                    writer, 404, b"metrics are at /metrics\n", "text/plain; charset=utf-8"
                )
            else:
                from prometheus_client import CONTENT_TYPE_LATEST

                await self.metrics.refresh()
                body = self.metrics.render()
                await self._reply(
                    writer, 200, body if method == "GET" else b"", CONTENT_TYPE_LATEST, len(body)
                )
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass  # a client that is slow, rude or gone gets nothing
        except Exception:
            log.exception("metrics.scrape_failed")
            with contextlib.suppress(Exception):
                await self._reply(
                    writer, 500, b"scrape failed; see the daemon's log\n", "text/plain"
                )
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _reply(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str,
        length: int | None = None,
    ) -> None:
        reason = {
            200: "OK",
            404: "Not Found",
            405: "Method Not Allowed",
            500: "Internal Server Error",
        }
        writer.write(
            f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
