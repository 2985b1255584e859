"""Routes the gate passes through, against the real engine: llama.cpp's llama-server.

llama-server closes its connection after every streamed answer while
advertising keep-alive, so the pool the gate keeps to it holds stale
connections; a passed-through body is streamed and cannot be sent twice, so
it must go out on a new connection (gate/proxy.py). Interleaving the two
shows that no passed-through request fails on one the engine closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
from test_faults_gate import start_gate, wait_ready

from batchpilot.sim.llamacpp import SERVED_MODEL, ServerOptions
from batchpilot.sim.sandbox.llama_server import LlamaServer


def test_tokenize_and_props_pass_through_between_streams(
    llama_server: Callable[..., LlamaServer], tmp_path: Path
) -> None:
    engine = llama_server(ServerOptions(parallel=2))
    gate = start_gate(tmp_path, engine.url, {"max_concurrency": 2})
    try:
        wait_ready(gate, True)

        async def scenario() -> None:
            url = f"http://127.0.0.1:{gate.proxy_port}"
            stream = {"model": SERVED_MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}
            async with aiohttp.ClientSession() as client:
                async with client.post(f"{engine.url}/tokenize", json={"content": "hello"}) as r:
                    direct = await r.json()
                for round_ in range(5):
                    async with client.post(f"{url}/v1/completions", json=stream) as response:
                        assert response.status == 200
                        await response.read()
                    body = {"content": "hello"}
                    async with client.post(f"{url}/tokenize", json=body) as response:
                        assert (response.status, await response.json()) == (200, direct), round_
                    async with client.get(f"{url}/props") as response:
                        assert response.status == 200, round_
                        assert "default_generation_settings" in await response.json()

        asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        gate.process.stop()
        engine.stop()
