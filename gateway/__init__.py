"""Real-time presence gateway for IoT fleets, on Redis."""

__version__ = "0.2.0"
