"""A load test of quickdraft serve on 127.0.0.1: 32 concurrent clients x 3 requests each,
every one with its own prompt and seed, the server verifying its streams' proposals
together (lanes). No response may be lost, duplicated or mixed up: each equals the same
request run alone, on a pair without lanes. Latency percentiles are printed (-s shows
them). Bounded: a wall-clock cap of 60 s on the whole load."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from test_serve import MODEL, ServerThread, reference  # noqa: E402

from quickdraft.ort_backend.cli import default_model_dir  # noqa: E402
from quickdraft.ort_backend.generator import load_pair  # noqa: E402
from quickdraft.serve.app import create_app  # noqa: E402
from quickdraft.serve.settings import ServeSettings  # noqa: E402

CLIENTS = 32
PER_CLIENT = 3
CAP_S = 60.0
BASES = ["def fib(n):", "import os\n", "class Stack:\n    def", "for i in range(10):",
         "with open(path) as f:", "try:\n    import numpy", "async def main():",
         "x = [i * i for i in"]


def _requests() -> list[dict]:
    out = []
    for c in range(CLIENTS):
        for k in range(PER_CLIENT):
            i = c * PER_CLIENT + k
            greedy = i % 3 == 0
            out.append({
                "client": c,
                "prompt": f"{BASES[i % len(BASES)]}  # {i}\n",
                "max_tokens": 8 + (i * 7) % 17,
                "temperature": 0.0 if greedy else 0.9,
                "top_p": 1.0 if greedy else 0.95,
                "seed": 1000 + i,
                "stream": i % 4 == 1,
            })
    return out


def test_32_clients_x_3_requests_no_lost_or_mixed_responses():
    pair = load_pair(default_model_dir(), device="cpu", max_gamma=8)
    reqs = _requests()
    expected = [reference(pair, r["prompt"], max_tokens=r["max_tokens"],
                          temperature=r["temperature"], top_p=r["top_p"],
                          seed=r["seed"]).text for r in reqs]
    assert len(set(expected)) > len(expected) // 2  # the requests really differ
    served = load_pair(default_model_dir(), device="cpu", max_gamma=8, lanes=8)
    app = create_app(ServeSettings(max_concurrency=8, max_queue=128), pair=served)
    with ServerThread(app) as s:
        got: dict[int, str] = {}
        latency: dict[int, float] = {}
        ttft: dict[int, float] = {}

        async def one(client, i: int) -> None:
            r = reqs[i]
            kw = dict(model=MODEL, prompt=r["prompt"], max_tokens=r["max_tokens"],
                      temperature=r["temperature"], top_p=r["top_p"], seed=r["seed"])
            t0 = time.perf_counter()
            if r["stream"]:
                parts = []
                async for chunk in await client.completions.create(stream=True, **kw):
                    if chunk.choices and chunk.choices[0].text and i not in ttft:
                        ttft[i] = time.perf_counter() - t0
                    parts.append(chunk.choices[0].text if chunk.choices else "")
                text = "".join(parts)
            else:
                out = await client.completions.create(**kw)
                assert len(out.choices) == 1
                text = out.choices[0].text
                assert out.usage.completion_tokens <= r["max_tokens"]
            latency[i] = time.perf_counter() - t0
            assert i not in got, f"request {i} answered twice"
            got[i] = text

        async def user(c: int) -> None:
            client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0,
                                        timeout=CAP_S)
            try:
                for k in range(PER_CLIENT):
                    await one(client, c * PER_CLIENT + k)
            finally:
                await client.close()

        async def load() -> float:
            t0 = time.perf_counter()
            await asyncio.wait_for(asyncio.gather(*(user(c) for c in range(CLIENTS))), CAP_S)
            return time.perf_counter() - t0

        wall = asyncio.run(load())
        health = s.health()
    assert sorted(got) == list(range(len(reqs))), "lost responses"
    wrong = [i for i in range(len(reqs)) if got[i] != expected[i]]
    assert not wrong, f"{len(wrong)} responses differ from the request run alone: {wrong[:5]}"
    assert health["active"] == 0 and health["queued"] == 0
    assert health["lane_calls"] > 0  # streams were verified together
    assert health["draft_lane_calls"] > 0  # greedy streams' proposals drafted together
    lat = sorted(latency.values())
    q = statistics.quantiles(lat, n=100)
    print(f"\nquickdraft serve load: {len(reqs)} requests from {CLIENTS} clients in "
          f"{wall:.2f} s; latency p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms, "
          f"max {lat[-1] * 1000:.0f} ms; streamed time to first text p50 "
          f"{statistics.median(ttft.values()) * 1000:.0f} ms; generators made "
          f"{health['generators_made']}, reused {health['generators_reused']}; target calls "
          f"over several streams {health['lane_calls']}, draft chains over several "
          f"{health['draft_lane_calls']}")
    assert wall < CAP_S
