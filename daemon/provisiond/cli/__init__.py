"""The `provisiond` command: `main` parses and runs; one module per group of commands.

`main` holds the daemon's own commands (run, check-config, orgs, users,
keys); `devices` the device and token commands, `ops` the operator commands
(status, db backup, keys rotate-signing, keys reseal), `call` the RPC client command.
"""
