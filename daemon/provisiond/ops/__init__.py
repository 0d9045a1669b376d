"""RPC operations, one module per area; each has `setup(app, router)`."""
