"""`skiptree serve ARTIFACT`: check the options, load the engine, run uvicorn until SIGTERM / Ctrl-C.

uvicorn's shutdown on SIGTERM stops accepting connections and waits for the requests in flight
(streams included) to finish; the engine thread stops after them.
"""

from __future__ import annotations

import ipaddress
import signal
from dataclasses import dataclass
from pathlib import Path

from skiptree.errors import ModelSourceError, SkiptreeError
from skiptree.runtime.artifact import is_artifact


@dataclass(frozen=True)
class ServeOptions:
    artifact: Path
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int | None = None
    api_key: str | None = None
    threads: int | None = None
    speculative: bool = True
    max_queue: int = 64
    model_id: str | None = None  # default: the artifact folder's name
    replicas: int = 1  # > 1: a Ray Serve deployment of that many engines (serve/replicas.py)


class ServeOptionError(SkiptreeError):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(options: ServeOptions) -> None:
    """Every refusal that needs no model, before anything loads."""
    if not is_artifact(options.artifact):
        raise ModelSourceError(f"{options.artifact} is not a skiptree artifact (no manifest.json)",
                               "pass a folder written by `skiptree compile ... --max-batch N`")  # fmt: skip
    if not is_loopback(options.host) and not options.api_key:
        raise ServeOptionError(f"--host {options.host} would serve beyond this machine without a key",
                               "add --api-key KEY (clients send 'Authorization: Bearer KEY'), or bind "
                               "127.0.0.1")  # fmt: skip
    if not 0 <= options.port <= 65535:
        raise ServeOptionError(
            f"--port {options.port} is not a TCP port", "pass 1 to 65535 (0: any free port)"
        )
    if options.max_queue < 1:
        raise ServeOptionError(f"--max-queue {options.max_queue} is below 1", "pass 1 or more")
    if options.replicas < 1:
        raise ServeOptionError(f"--replicas {options.replicas} is below 1", "pass 1 or more (Ray Serve)")


def model_id_of(options: ServeOptions) -> str:
    return options.model_id or Path(options.artifact).resolve().name


def serve(options: ServeOptions, log=print) -> None:
    import uvicorn  # the server's stack (uvicorn, FastAPI, onnxruntime) loads after the option checks

    # the app and the engine import that stack too
    from skiptree.serve.api import create_app
    from skiptree.serve.metrics import Metrics
    from skiptree.serve.worker import EngineOptions, EngineThread

    check_options(options)
    if options.replicas > 1:
        from skiptree.serve.replicas import serve_replicas  # Ray: an optional extra

        serve_replicas(options, options.replicas, log)
        return
    engine = EngineThread(EngineOptions(options.artifact, options.max_batch, options.threads,
                                        options.speculative), Metrics(), log)  # fmt: skip
    model_id = model_id_of(options)
    app = create_app(engine, model_id, options.api_key, options.max_queue)
    mode = "speculative (one budget per step)" if engine.engine.speculative else "plain steps"
    log(f"[serve] {model_id}: up to {engine.rows.rows} requests a step, {mode}; "
        f"http://{options.host}:{options.port}/v1")  # fmt: skip
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            timeout_graceful_shutdown=None)  # fmt: skip
    # uvicorn re-raises the signal it stopped on once drained; SIGTERM then ends the process cleanly (0)
    signal.signal(signal.SIGTERM, lambda number, frame: None)
    uvicorn.Server(config).run()
    log(f"[serve] {model_id}: stopped after the requests in flight finished")
