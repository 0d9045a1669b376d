"""WiFi configuration grants and the session-key crypto behind them (DESIGN §3).

`crypto` holds the pure primitives shared by every party, `signing` the
gateway side (key ring, grant issue), and `provisiond.device` the reference
device and uploader. Everything here is synchronous and free of I/O except the
key ring's own files, so the daemon can run it in a worker thread.
"""
