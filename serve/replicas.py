"""`skiptree serve ARTIFACT --replicas N`: the same application as a Ray Serve deployment of N replicas.

Each replica is a Ray actor that builds its own engine (its own KV cache rows and continuous
batching) and the same FastAPI app (`serve.ingress` with a builder, evaluated on the replica);
Ray Serve's proxy spreads requests over the replicas. Ray is an optional extra
(`pip install -e '.[ray]'`): plain `skiptree serve` never imports it. A local Ray instance is started
on this machine, bound to the address `--host` names (loopback by default).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from skiptree.errors import SkiptreeError
from skiptree.serve.launch import ServeOptions


class RayUnavailableError(SkiptreeError):
    pass


def replica_app_builder(options: ServeOptions):
    """A builder Ray Serve runs on each replica: the engine and the app, as `skiptree serve` builds them."""

    def build():
        # each replica loads its own engine: heavy imports happen in the replica's process
        from skiptree.serve.api import create_app
        from skiptree.serve.launch import model_id_of
        from skiptree.serve.metrics import Metrics
        from skiptree.serve.worker import EngineOptions, EngineThread

        engine = EngineThread(EngineOptions(options.artifact, options.max_batch, options.threads,
                                            options.speculative), Metrics(), log=print)  # fmt: skip
        engine.start()  # Ray's ASGI wrapper may not run the app's lifespan: start here (idempotent)
        return create_app(engine, model_id_of(options), options.api_key, options.max_queue)

    return build


def deploy(options: ServeOptions, replicas: int, port: int, log=print):
    """Start a local Ray instance and Serve on `options.host:port`, deploy `replicas` replicas; returns
    the Serve handle (the caller shuts down with `shutdown()`)."""
    try:
        import ray  # optional: the `ray` extra
        from ray import serve
    except ImportError as error:
        fix = "pip install -e '.[ray]' (Ray Serve), or drop --replicas"
        raise RayUnavailableError("--replicas needs Ray, which is not installed", fix) from error
    ray.init(num_cpus=max(replicas, 1) + 1, include_dashboard=False, log_to_driver=False,
             _node_ip_address=options.host if options.host != "localhost" else "127.0.0.1")  # fmt: skip
    serve.start(http_options={"host": options.host, "port": port})
    threads = options.threads or 1
    ingress = serve.ingress(replica_app_builder(options))(type("SkiptreeReplica", (), {}))
    deployment = serve.deployment(ingress, name="skiptree", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": 1}, max_ongoing_requests=1000)  # fmt: skip
    log(f"[serve] deploying {replicas} replicas on Ray ({threads} threads each)")
    return serve.run(deployment.bind(), name="skiptree", route_prefix="/")


def shutdown() -> None:
    import ray  # optional: the `ray` extra
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def serve_replicas(options: ServeOptions, replicas: int, log=print) -> None:
    """Run until SIGTERM / Ctrl-C, then shut the deployment down."""
    deploy(options, replicas, options.port, log)
    log(f"[serve] {replicas} replicas: http://{options.host}:{options.port}/v1")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda number, frame: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C; or Ray's own SIGTERM handler, where it still holds
        pass
    finally:
        try:
            shutdown()
        except SystemExit:  # Ray's own SIGTERM handler (ray.init installs it) fired during shutdown
            pass
    log("[serve] replicas stopped")
    sys.stdout.flush()
    sys.stderr.flush()
    # Ray's core worker can abort (SIGABRT) in its destructors at interpreter exit, after a clean
    # shutdown (seen with Ray 2.60 when the process ran other work first): leave without them
    os._exit(0)
