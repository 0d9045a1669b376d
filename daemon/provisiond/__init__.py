"""provisiond: provisioning, WiFi-grant and presence daemon for MQTT gateways."""

__version__ = "0.1.0"
