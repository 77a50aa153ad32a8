"""The followers: real ZeroMQ publishers on 127.0.0.1, the station's state and hub behind them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from pipeline.coil.model import Grading, RuleOutcome
from pipeline.config import BridgeCameraConfig, BridgeCoilServiceConfig
from pipeline.ui.hub import Hub
from pipeline.ui.line import Line
from pipeline.ui.state import LineState
from tests.pipeline.ui.fakeline import FakeCoilService, FakeDaemon, wait_for


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def test_followers_feed_the_state_and_every_browser(context: zmq.Context) -> None:
    cams = [FakeDaemon(context=context, camera_id="cam0"), FakeDaemon(context=context, camera_id="cam1", side="bottom")]
    coil = FakeCoilService(context=context)
    state = LineState(cameras=["cam0", "cam1"], recent_alerts=50, stale_s=3.0)
    hub = Hub(queue_size=100)
    loop = asyncio.new_event_loop()
    sub = hub.subscribe(loop)
    line = Line(
        cameras={d.camera_id: BridgeCameraConfig(pub=d.pub.endpoint, control=d.control) for d in cams},
        coil_service=BridgeCoilServiceConfig(pub=coil.pub.endpoint, control="tcp://127.0.0.1:1"),
        state=state,
        hub=hub,
        context=context,
    )
    line.start()
    try:
        assert line.alive

        def following(d: FakeDaemon) -> bool:
            d.heartbeat()  # PUB drops what it sends before the subscription is live: until one arrives
            time.sleep(0.02)
            return any(p.view is not None for p in state.panels(now=time.monotonic()) if p.camera_id == d.camera_id)

        for d in cams:
            wait_for(lambda d=d: following(d), what=f"{d.camera_id} followed")
        score = np.zeros((64, 128), np.float32)
        cams[0].alert(frame_id=1, box=[10, 10, 5, 5])
        cams[0].frame(image=np.full((64, 128), 100, np.uint8), score_map=score, frame_id=1, preview_px=64)
        cams[1].alert(md_m=77.0)
        wait_for(lambda: state.frame("cam0") is not None and len(state.alerts()) == 2, what="alerts and the frame")
        assert {a.camera_id for a in state.alerts()} == {"cam0", "cam1"}
        f = state.frame("cam0")
        assert f is not None and f.preview_shape == (32, 64) and f.score_map is not None
        g = Grading("DC04", "secondary", (RuleOutcome("density", 3.0, 2.0, True, "secondary"),), False)

        def graded() -> bool:
            coil.grading("C1", g)
            time.sleep(0.02)
            view = state.coil("C1")
            return view is not None and view.grading == g

        wait_for(graded, what="the coil service's grading")
        # Garbage on a camera's stream is counted and skipped; the follower goes on.
        cams[0].pub._sock.send_multipart([b"alert", b"{not json"])
        cams[0].pub._sock.send_multipart([b"alert"])
        wait_for(lambda: line.counts["bad_messages"] >= 2, what="bad messages counted")
        cams[0].alert(md_m=88.0)
        wait_for(lambda: any(a.md_m == 88.0 for a in state.alerts()), what="the next alert")
        # Every update went to the browser's queue, in kinds the pages know.
        batch = loop.run_until_complete(sub.get(0.1))
        kinds = {u.kind for u in batch.updates}
        assert {"alert", "frame", "camera", "coil"} <= kinds
    finally:
        line.stop()
        loop.close()
        coil.close()
        for d in cams:
            d.close()
    assert not line.alive


def test_the_cameras_must_be_the_states(context: zmq.Context) -> None:
    state = LineState(cameras=["cam0"], recent_alerts=5, stale_s=3.0)
    with pytest.raises(ValueError, match="differ"):
        Line(
            cameras={"cam9": BridgeCameraConfig(pub="tcp://127.0.0.1:1", control="tcp://127.0.0.1:1")},
            coil_service=None,
            state=state,
            hub=Hub(queue_size=1),
            context=context,
        )


def test_cameras_behind_the_proxy_share_one_follower(context: zmq.Context) -> None:
    from pipeline.coil.proxy import StreamProxy

    cams = [FakeDaemon(context=context, camera_id=c) for c in ("cam0", "cam1", "cam2")]
    proxy = StreamProxy(context=context, cameras=[d.pub.endpoint for d in cams], endpoint="tcp://127.0.0.1:*")
    proxy.start()
    # The station shows cam0 and cam1; cam2 goes through the same proxy to others.
    state = LineState(cameras=["cam0", "cam1"], recent_alerts=50, stale_s=3.0)
    line = Line(
        cameras={
            c: BridgeCameraConfig(pub=proxy.endpoint, control=cams[i].control) for i, c in enumerate(("cam0", "cam1"))
        },
        coil_service=None,
        state=state,
        hub=Hub(queue_size=10),
        context=context,
    )
    line.start()
    try:
        assert len(line._threads) == 1

        def all_seen() -> bool:
            for d in cams:
                d.heartbeat()
            time.sleep(0.02)
            return (
                all(p.view is not None for p in state.panels(now=time.monotonic())) and line.counts["other_cameras"] > 0
            )

        wait_for(all_seen, what="both cameras through the proxy")
        cams[1].alert(md_m=5.5)
        cams[2].alert(md_m=6.5)
        wait_for(lambda: len(state.alerts()) == 1, what="cam1's alert")
        time.sleep(0.1)
        assert [(a.camera_id, a.md_m) for a in state.alerts()] == [("cam1", 5.5)]
        assert line.counts["bad_messages"] == 0
    finally:
        line.stop()
        proxy.stop()
        for d in cams:
            d.close()
