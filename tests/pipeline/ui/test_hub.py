"""Fan-out to browsers: a slow one loses its oldest updates (counted), never holds up the others."""

from __future__ import annotations

import asyncio
import threading

from pipeline.ui.hub import Hub
from pipeline.ui.state import Update


def u(i: int) -> Update:
    return Update(kind="alert", data={"i": i})


def test_a_slow_browser_loses_its_oldest_updates_and_the_others_get_all() -> None:
    async def scenario() -> None:
        hub = Hub(queue_size=4)
        loop = asyncio.get_running_loop()
        fast, slow = hub.subscribe(loop), hub.subscribe(loop)
        got: list[int] = []

        async def read_fast() -> None:
            while len(got) < 10:
                batch = await fast.get(1.0)
                got.extend(x.data["i"] for x in batch.updates)
                assert batch.lost == 0

        reader = asyncio.create_task(read_fast())
        # The followers publish from their own threads.
        for i in range(10):
            await asyncio.to_thread(hub.publish, [u(i)])
            await asyncio.sleep(0)
        await asyncio.wait_for(reader, 5)
        assert got == list(range(10))
        batch = await slow.get(0.1)  # never read until now
        assert [x.data["i"] for x in batch.updates] == [6, 7, 8, 9]
        assert batch.lost == 6 and slow.lost_total == 6 and hub.lost_total == 6
        again = await slow.get(0.01)
        assert again.updates == () and again.lost == 0 and not again.closed

    asyncio.run(scenario())


def test_publishing_never_waits_for_a_browser() -> None:
    hub = Hub(queue_size=8)
    loop = asyncio.new_event_loop()  # never run: 50 browsers that never read
    try:
        subs = [hub.subscribe(loop) for _ in range(50)]

        def publish_all() -> None:
            for i in range(2000):
                hub.publish([u(i)])

        publisher = threading.Thread(target=publish_all)
        publisher.start()
        publisher.join(30)
        assert not publisher.is_alive(), "publishing waited for browsers"
        for sub in subs:
            assert sub.lost_total == 2000 - 8
        assert hub.lost_total == 50 * (2000 - 8) and hub.published_total == 2000
    finally:
        loop.close()


def test_closing_the_hub_ends_every_stream_and_refuses_new_ones() -> None:
    async def scenario() -> None:
        hub = Hub(queue_size=4)
        loop = asyncio.get_running_loop()
        sub = hub.subscribe(loop)
        waiting = asyncio.create_task(sub.get(30.0))
        await asyncio.sleep(0.01)
        threading.Thread(target=hub.close).start()
        batch = await asyncio.wait_for(waiting, 2.0)
        assert batch.closed
        assert hub.clients == 0
        late = hub.subscribe(loop)
        assert (await late.get(0.01)).closed

    asyncio.run(scenario())


def test_a_browser_whose_loop_has_gone_is_dropped() -> None:
    hub = Hub(queue_size=4)
    loop = asyncio.new_event_loop()
    sub = hub.subscribe(loop)
    loop.close()
    hub.publish([u(1)])
    assert sub.closed and hub.clients == 0


def test_unsubscribe_forgets_the_browser() -> None:
    async def scenario() -> None:
        hub = Hub(queue_size=4)
        sub = hub.subscribe(asyncio.get_running_loop())
        assert hub.clients == 1
        hub.unsubscribe(sub)
        hub.publish([u(1)])
        assert hub.clients == 0 and (await sub.get(0.01)).updates == ()

    asyncio.run(scenario())
