"""`skiptree serve ARTIFACT --replicas N`: the same application as a Ray Serve deployment of N replicas.

Each replica is a Ray actor that builds its own engine (its own KV cache rows and continuous
batching) and the same FastAPI app (`serve.ingress` with a builder, evaluated on the replica);
Ray Serve's proxy spreads requests over the replicas. Ray is an optional extra
(`pip install -e '.[ray]'`): plain `skiptree serve` never imports it. A local Ray instance is started
on this machine, bound to the address `--host` names (loopback by default).
"""

from __future__ import annotations

import importlib.util
import multiprocessing
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
    """Run until SIGTERM / Ctrl-C, then shut the deployment down and return (exit status 0).

    Ray runs in a child process: Ray installs signal handlers of its own in the driver (its C++
    core worker exited with status 15 on SIGTERM, past ours, when the process ran other work first),
    so this process, which owns the user's signals and exit status, never imports it."""
    if importlib.util.find_spec("ray") is None:
        raise RayUnavailableError("--replicas needs Ray, which is not installed",
                                  "pip install -e '.[ray]' (Ray Serve), or drop --replicas")  # fmt: skip
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    child = context.Process(target=run_replicas, args=(options, replicas, stop), name="ray-driver")
    requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda number, frame: requested.set())
    child.start()
    try:
        while not requested.wait(0.5) and child.is_alive():
            pass
    except KeyboardInterrupt:
        requested.set()
    if not requested.is_set():  # the child ended on its own: deploying failed (it said why)
        raise SkiptreeError(f"the Ray Serve deployment stopped (exit status {child.exitcode})",
                            "see the messages above; plain skiptree serve runs without Ray")  # fmt: skip
    stop.set()
    child.join(SHUTDOWN_SECONDS)
    if child.is_alive():
        child.kill()
    log("[serve] replicas stopped")


SHUTDOWN_SECONDS = 120


def run_replicas(options: ServeOptions, replicas: int, stop) -> None:
    """The Ray driver (a child process): deploy, wait for `stop`, shut down, leave."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    deploy(options, replicas, options.port)
    print(f"[serve] {replicas} replicas: http://{options.host}:{options.port}/v1", flush=True)
    stop.wait()
    try:
        shutdown()
    except SystemExit:  # Ray's own SIGTERM handler, where it fired during shutdown
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    # Ray's core worker can abort (SIGABRT) in its destructors at interpreter exit: leave without them
    os._exit(0)
