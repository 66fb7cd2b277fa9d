"""Running a Lua script from Python: the gateway's own `Script` against redis-py's `AsyncScript`.

Both send `EVALSHA` and reload on `NOSCRIPT`; this measures what each costs the gateway per
call, alone and in pipelines of 50 (how heartbeat ticks and pages run them), against a private
valkey-server. CPU time is the process's own (`time.process_time`), so the server's work and
the machine's other load count for little; wall time is shown beside it.

    python -m loadtest.bench_scripts --calls 20000

redis-py's `AsyncScript` in a pipeline first asks `SCRIPT EXISTS` (one more round trip per
pipeline), and a cluster pipeline refuses `SCRIPT EXISTS` altogether, so there it cannot run.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from gateway import redisconn
from gateway.embedded import EmbeddedRedis
from gateway.keys import Keys
from gateway.scripts import Scripts

KEYS = ["device:state:a", "device:heartbeat:a"]
ARGS = ["device_id"]
PIPELINE = 50


async def per_call(calls: int, run: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(µs wall, µs CPU) per call."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        await run()
    return (time.perf_counter() - wall) / calls * 1e6, (time.process_time() - cpu) / calls * 1e6


async def measure(calls: int) -> list[tuple[str, float, float]]:
    async with EmbeddedRedis(Path(tempfile.mkdtemp(prefix="bench-scripts-"))) as server:
        client = redisconn.connect(server.url)
        ours = Scripts(Keys()).describe
        theirs = client.register_script(ours.source)

        async def our_pipeline() -> None:
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(PIPELINE):
                    pipe.execute_command("EVALSHA", ours.sha, len(KEYS), *KEYS, *ARGS)
                await pipe.execute()

        async def their_pipeline() -> None:
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(PIPELINE):
                    await theirs(KEYS, ARGS, client=pipe)
                await pipe.execute()

        await ours(client, KEYS, ARGS)
        await theirs(KEYS, ARGS)
        rows = []
        for name, run, count in (
            ("gateway Script", lambda: ours(client, KEYS, ARGS), calls),
            ("redis-py AsyncScript", lambda: theirs(KEYS, ARGS), calls),
            (f"gateway Script, pipelines of {PIPELINE}", our_pipeline, calls // PIPELINE),
            (f"redis-py AsyncScript, pipelines of {PIPELINE}", their_pipeline, calls // PIPELINE),
        ):
            wall, cpu = await per_call(count, run)
            scale = PIPELINE if "pipelines" in name else 1
            rows.append((name, wall / scale, cpu / scale))
        await client.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_scripts")
    parser.add_argument("--calls", type=int, default=20_000, help="script calls per variant")
    args = parser.parse_args()
    for name, wall, cpu in asyncio.run(measure(args.calls)):
        print(f"{name:45s} {wall:7.1f} µs wall {cpu:7.1f} µs CPU per call")


if __name__ == "__main__":
    main()
