"""Device simulator: a fleet of devices for tests, benchmarks and the demo.

Each simulated device provisions itself over RPC (provision token with an
API key, then activation), stays online over MQTT (status + last will,
heartbeats), acks reconfigure commands and reports WiFi results. Some of them
also run a BLE GATT peripheral (`provisiond_sim.ble`) around
`provisiond_sim.reference.ReferenceDevice`, reachable over bumble's in-memory
LocalLink (`local:NAME`) or a real HCI transport.

    python -m provisiond_sim --port 1883 --devices 3 --key sk_live_... --org 1 --owner 1
"""

from provisiond_sim.device import Broker, Identity, RpcFailed, SimDevice, provision, rpc_call
from provisiond_sim.fleet import DEFAULT_NETWORKS, Fleet

__all__ = [
    "DEFAULT_NETWORKS",
    "Broker",
    "Fleet",
    "Identity",
    "RpcFailed",
    "SimDevice",
    "provision",
    "rpc_call",
]
