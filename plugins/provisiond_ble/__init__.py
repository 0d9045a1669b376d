"""provisiond's BLE bridge plugin: WiFi credential upload over GATT, on bumble.

Entry point `ble_bridge` (group `provisiond.plugins`); the GATT profile is in
`provisiond_ble.profile` and docs/ble-gatt.md.
"""
