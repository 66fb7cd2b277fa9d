"""Devices registered in bulk through the REST API (`POST /api/devices`), tokens kept."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx

CONCURRENCY = 64
ATTEMPTS = 5
RETRY_S = 0.5


async def register(
    base_urls: list[str], api_key: str, ids: list[str], device_type: str
) -> tuple[dict[str, str], Counter[str]]:
    """Register *ids* round-robin over the gateways, 64 in flight, retrying what may pass.

    Returns each registered id's token, and the failures by kind (an exception name or
    `http_<status>`). A 5xx or 429 is retried; any other refusal is final.
    """
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for item in enumerate(ids):
        queue.put_nowait(item)
    tokens: dict[str, str] = {}
    failures: Counter[str] = Counter()

    async def register_one(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            index, device_id = queue.get_nowait()
            base = base_urls[index % len(base_urls)]
            body = {"device_id": device_id, "device_type": device_type}
            for _attempt in range(ATTEMPTS):
                try:
                    response = await client.post(f"{base}/api/devices", json=body)
                except httpx.HTTPError as exc:
                    failures[type(exc).__name__] += 1
                    await asyncio.sleep(RETRY_S)
                    continue
                if response.status_code == 201:
                    tokens[device_id] = response.json()["token"]
                    break
                failures[f"http_{response.status_code}"] += 1
                if response.status_code < 500 and response.status_code != 429:
                    break
                await asyncio.sleep(RETRY_S)

    headers = {"Authorization": f"Bearer {api_key}"}
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(headers=headers, timeout=30, limits=limits) as client:
        await asyncio.gather(*(register_one(client) for _ in range(CONCURRENCY)))
    return tokens, failures
