"""Commands to devices with delivery guarantees: results, timeouts and an offline queue.

`model` holds the pure rules (statuses, bounds, ids, records), `queue` the Redis side (every
status change is one Lua script on the device's partition), `service` what one gateway
process does (frames to its sessions, batched results, timers, waiting callers).
"""
