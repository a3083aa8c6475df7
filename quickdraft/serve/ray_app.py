"""The same FastAPI app as a Ray Serve deployment: ``quickdraft serve --ray --replicas N``.

``serve.ingress(app)`` wraps a deployment class around the app of
:func:`quickdraft.serve.app.create_app`; each replica is its own process whose copy of the
app loads the pair in its lifespan (so every replica has its own pair, scheduler and
metrics), and Ray's proxy spreads the requests over the replicas. Every response carries
the replica's pid in the ``x-quickdraft-pid`` header (and ``/health`` in its body).
"""

from __future__ import annotations

import os
import sys
import time

from quickdraft.serve.settings import ServeSettings

__all__ = ["deployment", "run_ray", "APP_NAME"]

APP_NAME = "quickdraft"


def deployment(settings: ServeSettings, *, replicas: int = 1, num_cpus: float = 0.5):
    """A bound Ray Serve application of ``replicas`` replicas of the server."""
    from ray import serve

    from quickdraft.serve.app import create_app

    app = create_app(settings)  # each replica's lifespan loads the pair

    @serve.deployment(name="QuickdraftServer", num_replicas=replicas,
                      ray_actor_options={"num_cpus": num_cpus},
                      max_ongoing_requests=settings.max_concurrency + settings.max_queue)
    @serve.ingress(app)
    class QuickdraftServer:
        def __init__(self) -> None:
            self.pid = os.getpid()
            settings.resolved_model_dir()  # the folder must exist on every replica's host

    return QuickdraftServer.bind()


def start(settings: ServeSettings, *, replicas: int, host: str = "127.0.0.1",
          port: int = 8000, num_cpus: float = 0.5, blocking: bool = False):
    """Start Ray (a local instance unless one is running) and the deployment."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(include_dashboard=False, _node_ip_address=host if host != "0.0.0.0"
                 else None, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(deployment(settings, replicas=replicas, num_cpus=num_cpus),
                     name=APP_NAME, route_prefix="/", blocking=blocking)


def run_ray(settings: ServeSettings, *, replicas: int, host: str, port: int) -> int:
    from ray import serve

    start(settings, replicas=replicas, host=host, port=port)
    print(f"quickdraft serve: {replicas} Ray Serve replica(s) of {settings.served_name()} on "
          f"http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
