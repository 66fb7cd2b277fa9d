"""MQTT devices through a broker, in the same presence, shadow and commands (docs/mqtt.md)."""
