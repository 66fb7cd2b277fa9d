"""The gateway's load test and benchmark suite: `python -m loadtest SCENARIO` (see README.md).

The gateway never imports this package; it is a measuring instrument pointed at loopback only.
"""
