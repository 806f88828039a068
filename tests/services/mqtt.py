"""MQTT broker fixtures (real mosquitto; the embedded pure-Python broker). Filled in by the telemetry work."""
