"""``stripinspect proxy`` and ``stripinspect coil-service``: the two processes beside the camera
daemons. Each runs until SIGTERM or SIGINT, logs one line per event to stderr, and exits 0; a
start-up problem raises a StripinspectError of one line (the CLI exits 2)."""

from __future__ import annotations

import logging
import sys
import threading
import time

import zmq

from pipeline.coil.proxy import StreamProxy
from pipeline.coil.records import CoilRecords
from pipeline.coil.service import CoilService
from pipeline.config import CoilConfig
from pipeline.process import logging_to, stop_on_signals

log = logging.getLogger("stripinspect.coil")


def run_proxy(cfg: CoilConfig, *, quiet: bool = False, stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    context = zmq.Context()
    with logging_to(sys.stderr, quiet=quiet, log_json=False, tty=False), stop_on_signals(stop):
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
    with logging_to(sys.stderr, quiet=quiet, log_json=False, tty=False), stop_on_signals(stop):
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
