"""WiFi configuration grants and the session-key crypto behind them (docs/wifi-crypto.md).

`crypto` holds the pure primitives shared by every party, `jws` reads a grant
without trusting it, `signing` is the gateway side (key ring, grant issue),
`uploader` the app's or bridge's side, and `service` the daemon's grant
service (issue, consumed-grant ledger, key loading). The device's side is the
reference device in the simulator package (`provisiond_sim.reference`).
The primitives are synchronous; `service` runs file I/O in threads and keeps
the fixed, small signing work on the event loop (see docs/architecture.md).
"""
