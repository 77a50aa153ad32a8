"""``stripinspect proxy`` and ``stripinspect coil-service``: the two processes beside the camera
daemons. Each runs until SIGTERM or SIGINT, logs one line per event to stderr, and exits 0; a
start-up problem raises a StripinspectError of one line (the CLI exits 2)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import zmq

from pipeline.coil.proxy import StreamProxy
from pipeline.coil.records import CoilRecords
from pipeline.coil.service import CoilService
from pipeline.config import CoilConfig

log = logging.getLogger("stripinspect.coil")


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop`` (only on the main thread, where Python allows handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def logging_to_stderr(*, quiet: bool) -> Iterator[None]:
    logger = logging.getLogger("stripinspect")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_proxy(cfg: CoilConfig, *, quiet: bool = False, stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    context = zmq.Context()
    with logging_to_stderr(quiet=quiet), stop_on_signals(stop):
        proxy = StreamProxy(context=context, cameras=[c.pub for c in cfg.cameras.values()], endpoint=cfg.proxy_endpoint)
        proxy.start()
        log.info("proxy: %d camera(s) -> %s", len(cfg.cameras), proxy.endpoint)
        try:
            while not stop.wait(0.5):
                if not proxy.alive():
                    log.error("proxy stopped: %r", proxy.failed)
                    return 1
        finally:
            proxy.stop()
            context.term()
    return 0


def run_coil_service(cfg: CoilConfig, *, quiet: bool = False, stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    context = zmq.Context()
    with logging_to_stderr(quiet=quiet), stop_on_signals(stop):
        records = CoilRecords(
            path=cfg.db.path,
            synchronous=cfg.db.synchronous,
            max_age_days=cfg.db.max_age_days,
            max_coils=cfg.db.max_coils,
        )
        try:
            service = CoilService(cfg=cfg, records=records, context=context)
        except BaseException:
            records.close()
            context.term()
            raise
        log.info(
            "coil service: %d camera(s) via %s, control %s, records %s",
            len(cfg.cameras),
            cfg.proxy_endpoint,
            service.control_endpoint,
            cfg.db.path,
        )
        t0 = time.monotonic()
        try:
            service.run(stop)
        finally:
            service.close()
            records.close()
            context.term()
        log.info("coil service stopped after %.0f s: %s", time.monotonic() - t0, service.counts)
    return 0
