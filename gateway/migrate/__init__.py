"""The stored layout: its version in Redis, the check every gateway makes at start, and
`gateway migrate`, which upgrades data written by an earlier release step by step."""
