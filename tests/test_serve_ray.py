"""quickdraft serve --ray: the same app as a Ray Serve deployment with 2 replicas on the
CPU, on a local Ray instance bound to 127.0.0.1. Several requests are answered and both
replicas serve some (each response names its replica's pid). Bounded: about a minute."""

from __future__ import annotations

import socket
import time

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from quickdraft.serve.settings import BUNDLED_MODEL_NAME, ServeSettings  # noqa: E402

REPLICAS = 2
REQUESTS = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server():
    from ray import serve

    from quickdraft.serve.ray_app import start

    try:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
    except Exception as e:  # a sandbox without what Ray needs: say exactly why
        pytest.skip(f"Ray could not start here: {type(e).__name__}: {e}")
    port = _free_port()
    try:
        start(ServeSettings(max_concurrency=2, max_queue=32), replicas=REPLICAS,
              host="127.0.0.1", port=port, num_cpus=0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_requests_spread_over_two_replicas(ray_server):
    url = ray_server
    deadline = time.monotonic() + 60
    while True:  # the proxy answers once the replicas are up
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the Ray Serve app did not come up"
        time.sleep(0.5)
    body = {"model": BUNDLED_MODEL_NAME, "prompt": "def fib(n):", "max_tokens": 8,
            "temperature": 0}
    pids, texts = set(), set()
    with httpx.Client(timeout=30) as client:
        for _ in range(REQUESTS):
            r = client.post(url + "/v1/completions", json=body)
            assert r.status_code == 200, r.text
            pids.add(r.headers["x-quickdraft-pid"])
            texts.add(r.json()["choices"][0]["text"])
        chunks = []
        with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            chunks = [line for line in r.iter_lines() if line]
        assert chunks[-1] == "data: [DONE]"
        health = {client.get(url + "/health").json()["pid"] for _ in range(10)}
    assert len(texts) == 1  # greedy: every replica gives the same text
    assert len(pids) == REPLICAS, f"responses came from {pids}"
    assert {str(p) for p in health} <= pids
