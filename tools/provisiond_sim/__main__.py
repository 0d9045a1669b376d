"""`provisiond-sim` / `python -m provisiond_sim`: run a simulated fleet until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from provisiond import logs
from provisiond.config import LogConfig
from provisiond_sim.device import Broker, RpcFailed
from provisiond_sim.fleet import DEFAULT_NETWORKS, Fleet


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="provisiond-sim", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="broker host")
    p.add_argument("--port", type=int, default=1883, help="broker port")
    p.add_argument("--prefix", default="provisiond", help="topic prefix (mqtt.topic_prefix)")
    p.add_argument("--devices", type=int, default=3, help="devices to simulate")
    # From the environment by default: a key on a command line is visible to `ps`.
    key = os.environ.get("PROVISIOND_KEY")
    p.add_argument(
        "--key",
        required=key is None,
        default=key,
        help="API key with provision:write (gets tokens); default $PROVISIOND_KEY",
    )
    p.add_argument(
        "--username", default=None, help="broker account of the service asking for tokens"
    )
    p.add_argument("--password-file", default=None, help="file holding that account's password")
    p.add_argument("--org", type=int, required=True, help="organisation id")
    p.add_argument("--owner", type=int, required=True, help="owner user id")
    p.add_argument(
        "--capabilities", type=int, default=0x02, help="capability bitmask (0x02: WiFi Upload)"
    )
    p.add_argument(
        "--heartbeat", type=float, default=None, help="heartbeat interval override, seconds"
    )
    p.add_argument("--ble", type=int, default=0, help="how many devices also run a GATT peripheral")
    p.add_argument(
        "--ble-transport",
        default=None,
        help="bumble HCI transport for the peripherals (e.g. usb:1, hci-socket:1); "
        "one transport serves one device",
    )
    p.add_argument(
        "--network",
        action="append",
        default=[],
        metavar="SSID=PASSWORD",
        help="a WiFi network the devices can join (repeatable)",
    )
    return p


async def run(args: argparse.Namespace) -> int:
    networks = dict(DEFAULT_NETWORKS)
    for item in args.network:
        ssid, sep, password = item.partition("=")
        if not sep:
            print(f"provisiond-sim: --network wants SSID=PASSWORD, got {item!r}", file=sys.stderr)
            return 2
        networks[ssid] = password
    if args.ble and not args.ble_transport:
        print("provisiond-sim: --ble needs --ble-transport", file=sys.stderr)
        return 2
    password = None
    if args.password_file:
        # Read once at start, before anything else runs on the loop.
        password = Path(args.password_file).read_text(encoding="utf-8").rstrip("\r\n")  # noqa: ASYNC240
    fleet = Fleet(
        Broker(args.host, args.port, args.prefix, args.username, password),
        networks=networks,
        ble_transport=args.ble_transport,
        heartbeat_interval=args.heartbeat,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        devices = await fleet.provision(
            args.devices,
            api_key=args.key,
            org_id=args.org,
            owner_id=args.owner,
            capabilities=args.capabilities,
            ble=args.ble,
        )
    except RpcFailed as exc:
        print(f"provisiond-sim: provisioning failed: {exc}", file=sys.stderr)
        await fleet.stop()
        return 1
    ids = ", ".join(str(d.device_id) for d in devices)
    print(f"provisiond-sim: {len(devices)} device(s) online: {ids}", flush=True)
    await stop.wait()
    await fleet.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(LogConfig(format="console"))
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
