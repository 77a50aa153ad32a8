"""The station in a real browser: headless Debian chromium (Selenium) against the real app on
uvicorn (127.0.0.1, a free port), fed by real ZeroMQ publishers (``fakeline``). Each test saves a
screenshot to test-output/screenshots/<test>.png.

Missing chromium or chromedriver fails these tests (the README's set-up installs both)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec

from pipeline.postprocess.defects import defect_thumbnail
from pipeline.transport.feedback import mark_false_alarm
from tests.conftest import REPO
from tests.pipeline.ui.browser import NoBrowserError, chrome, log_in, screenshot, wait
from tests.pipeline.ui.fakeline import FakeCoilService, FakeDaemon, wait_for
from tests.pipeline.ui.harness import PASSWORD, Running, running_station
from tests.pipeline.ui.scene import SCENE, publish_frame

pytestmark = pytest.mark.browser
SHOTS = REPO / "test-output" / "screenshots"


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    context = zmq.Context()
    daemon = FakeDaemon(context=context, camera_id="cam0", side="top")
    coil_service = FakeCoilService(context=context)
    try:
        tmp = tmp_path_factory.mktemp("station")
        with running_station(tmp, context=context, daemons=[daemon], coil_pub=coil_service.pub.endpoint) as r:
            r.until_following()
            yield r
    finally:
        coil_service.close()
        daemon.close()
        context.term()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    try:
        driver = chrome(width=1440, height=900)
    except NoBrowserError as err:
        pytest.fail(str(err))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def driver(browser: webdriver.Chrome, line: Running, request: pytest.FixtureRequest) -> Iterator[webdriver.Chrome]:
    """A logged-out browser on a blank page; the test's screenshot afterwards."""
    browser.get(line.url + "/healthz")
    browser.delete_all_cookies()
    browser.execute_script("window.localStorage.clear()")
    yield browser
    screenshot(browser, SHOTS / f"{request.node.name}.png")


def _thumb() -> str:
    image = np.full((128, 128), 130, np.uint8)
    image[50:70, 60:64] = 40
    return base64.b64encode(defect_thumbnail(image, (60, 50, 4, 20), side_px=64)).decode()


def _alert(line: Running, **over: Any) -> dict[str, Any]:
    h = line.daemons["cam0"].alert(thumbnail_png=_thumb(), **over)
    wait_for(lambda: line.station.state.alert("cam0", h["journal"], h["seq"]), what="the alert at the station")
    return h


def _live(driver: webdriver.Chrome) -> None:
    """Wait until the page's event stream is open (updates published before it are not seen)."""
    wait(driver).until(ec.text_to_be_present_in_element((By.ID, "conn"), "live"))


def test_login_works_and_a_wrong_password_is_refused(driver: webdriver.Chrome, line: Running) -> None:
    driver.get(line.url + "/coil")
    assert driver.current_url.startswith(line.url + "/login")
    driver.find_element(By.ID, "user").send_keys("op")
    driver.find_element(By.ID, "password").send_keys("not the password")
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    error = wait(driver).until(ec.visibility_of_element_located((By.ID, "login-error")))
    assert "Wrong user name or password" in error.text
    assert not driver.find_elements(By.CSS_SELECTOR, "header.bar .who")
    driver.find_element(By.ID, "user").send_keys("op")
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    who = wait(driver).until(ec.presence_of_element_located((By.CSS_SELECTOR, "header.bar .who")))
    assert "op" in who.text and "operator" in who.text
    assert driver.current_url == line.url + "/coil"  # back where the login was asked for


def test_live_page_updates_without_reload_when_an_alert_is_published(driver: webdriver.Chrome, line: Running) -> None:
    log_in(driver, line.url, "vi")
    _live(driver)
    driver.execute_script("window.stayedHere = 'yes'")
    h = line.daemons["cam0"].alert(thumbnail_png=_thumb(), md_m=123.45, **{"class": "scale"})
    row = wait(driver).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, f'li[data-alert="cam0/j-test/{h["seq"]}"]'))
    )
    assert "scale" in row.text and "MD 123.45 m" in row.text
    thumb = row.find_element(By.TAG_NAME, "img")
    wait(driver).until(lambda d: d.execute_script("return arguments[0].naturalWidth", thumb) == 64)
    assert driver.execute_script("return window.stayedHere") == "yes"  # the same page: no reload
    # The camera panel follows heartbeats the same way.
    line.daemons["cam0"].heartbeat(state="drift", drift={"drift_ratio": 1.4, "drifting": True})
    wait(driver).until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, '[data-camera-row="cam0"]'), "drift"))


def test_heat_map_overlay_toggles_over_the_latest_frame(driver: webdriver.Chrome, line: Running) -> None:
    log_in(driver, line.url, "vi")
    _live(driver)
    publish_frame(line.daemons["cam0"], planted=SCENE, coil_md_m=52.0, coil_id="C1", preview_px=768)
    fid = line.daemons["cam0"].frame_id
    card = driver.find_element(By.CSS_SELECTOR, '.frame[data-camera="cam0"]')
    preview = card.find_element(By.CSS_SELECTOR, "img.preview")
    overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
    wait(driver).until(lambda d: f"f={fid}" in (preview.get_attribute("src") or ""))
    wait(driver).until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", preview))
    button = card.find_element(By.CSS_SELECTOR, "[data-toggle-overlay]")
    assert not overlay.is_displayed() and button.get_attribute("aria-pressed") == "false"
    button.click()
    wait(driver).until(lambda d: overlay.is_displayed())
    wait(driver).until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay))
    assert button.get_attribute("aria-pressed") == "true" and "on" in button.text
    assert card.find_element(By.CSS_SELECTOR, ".legend").is_displayed()
    sizes = driver.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight, arguments[1].naturalWidth,"
        " arguments[1].naturalHeight]",
        preview,
        overlay,
    )
    assert sizes[:2] == sizes[2:] == [768, 512]  # the heat map lies exactly over the frame
    assert overlay.rect["width"] == preview.rect["width"] and overlay.rect["height"] == preview.rect["height"]
    screenshot(driver, SHOTS / "test_heat_map_overlay_on.png")
    button.click()
    wait(driver).until(lambda d: not overlay.is_displayed())
    assert button.get_attribute("aria-pressed") == "false"
    button.click()  # on again for the screenshot: the state is kept in the browser
    wait(driver).until(lambda d: overlay.is_displayed())


def test_a_viewer_sees_no_actions_and_gets_403_when_posting(driver: webdriver.Chrome, line: Running) -> None:
    h = _alert(line)
    log_in(driver, line.url, "vi")
    driver.get(f"{line.url}/defect/cam0/j-test/{h['seq']}")
    assert driver.find_element(By.ID, "viewer-note").is_displayed()
    assert not driver.find_elements(By.ID, "false-alarm") and not driver.find_elements(By.ID, "label")
    # A viewer who posts anyway (the session's own CSRF token, from this origin): refused.
    status = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const body = new URLSearchParams({csrf: document.querySelector('input[name=csrf]').value,
            camera: 'cam0', journal: 'j-test', seq: arguments[0]});
        fetch('/action/false_alarm', {method: 'POST', body: body, redirect: 'manual'}).then(r => done(r.status));
        """,
        h["seq"],
    )
    assert status == 403
    assert [c for c in line.daemons["cam0"].calls_of("false_alarm") if c["seq"] == h["seq"]] == []


def test_an_operators_false_alarm_reaches_the_daemon_and_shows_the_reply(
    driver: webdriver.Chrome, line: Running
) -> None:
    h = _alert(line, max_score=3.2, threshold=2.0)
    log_in(driver, line.url, "op")
    _live(driver)
    # From the live list to the defect page, as an operator would.
    wait(driver).until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, f'li[data-alert="cam0/j-test/{h["seq"]}"] a'))
    ).click()
    wait(driver).until(ec.presence_of_element_located((By.ID, "false-alarm"))).click()
    flash = wait(driver).until(ec.visibility_of_element_located((By.ID, "flash")))
    assert "marked a false alarm" in flash.text and "overlay entry" in flash.text
    assert "ok" in (flash.get_attribute("class") or "")
    calls = [c for c in line.daemons["cam0"].calls_of("false_alarm") if c["seq"] == h["seq"]]
    assert calls == [{"cmd": "false_alarm", "journal": "j-test", "seq": h["seq"], "user": "op"}]
    # A score far above the threshold: the daemon refuses, and the page says why.
    hot = _alert(line, max_score=9.0, threshold=2.0)
    driver.get(f"{line.url}/defect/cam0/j-test/{hot['seq']}")
    driver.find_element(By.ID, "false-alarm").click()
    flash = wait(driver).until(ec.visibility_of_element_located((By.ID, "flash")))
    assert "refused" in (flash.get_attribute("class") or "") and "max_score_ratio" in flash.text


def test_label_as_calls_the_daemons_label(driver: webdriver.Chrome, line: Running) -> None:
    h = _alert(line, **{"class": "pit", "class_confidence": 0.6})
    log_in(driver, line.url, "op")
    driver.get(f"{line.url}/defect/cam0/j-test/{h['seq']}")
    options = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#known-classes option")]
    assert "pit" in options  # a class recent alerts carry is offered
    field = driver.find_element(By.ID, "class-name")
    field.send_keys("edge crack")
    driver.find_element(By.ID, "label").click()
    flash = wait(driver).until(ec.visibility_of_element_located((By.ID, "flash")))
    assert "labelled 'edge crack'" in flash.text
    calls = [c for c in line.daemons["cam0"].calls_of("label") if c["seq"] == h["seq"]]
    assert calls == [{"cmd": "label", "journal": "j-test", "seq": h["seq"], "class": "edge crack", "user": "op"}]
    # Now the daemon knows the class: it is offered for the next label.
    line.station.classes_cache.clear()
    driver.refresh()
    options = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#known-classes option")]
    assert "edge crack" in options


def test_overlay_page_lists_entries_and_undo_takes_one_out(driver: webdriver.Chrome, line: Running) -> None:
    h = _alert(line, max_score=2.5, threshold=2.0)
    context = zmq.Context()
    try:
        reply = mark_false_alarm(context, line.daemons["cam0"].control, journal="j-test", seq=h["seq"], user="op")
    finally:
        context.term()
    entry = reply["entry"]["id"]
    log_in(driver, line.url, "op")
    driver.get(line.url + "/overlay")
    row = driver.find_element(By.CSS_SELECTOR, f'tr[data-entry="{entry}"]')
    assert "false alarm (normal)" in row.text and "op" in row.text
    row.find_element(By.TAG_NAME, "button").click()
    flash = wait(driver).until(ec.visibility_of_element_located((By.ID, "flash")))
    assert f"overlay entry {entry} removed" in flash.text
    row = driver.find_element(By.CSS_SELECTOR, f'tr[data-entry="{entry}"]')
    assert "removed by op" in row.text and not row.find_elements(By.TAG_NAME, "button")
    assert {"cmd": "overlay_undo", "id": entry, "user": "op"} in line.daemons["cam0"].calls_of("overlay_undo")


def test_coil_page_draws_the_map_and_grows_as_alerts_arrive(driver: webdriver.Chrome, line: Running) -> None:
    d = line.daemons["cam0"]
    d.coil("start", "24-118734")
    d.heartbeat(coil={"coil_id": "24-118734", "md_m": 180.0, "camera_line": 1})
    for i in range(5):
        _alert(line, coil_id="24-118734", md_m=20.0 + 35 * i, cd_mm=150.0 + 220 * i, area_mm2=20.0 + 40 * i)
    wait_for(lambda: line.station.state.current_coil_id() == "24-118734", what="the coil to be current")
    log_in(driver, line.url, "vi")
    driver.get(line.url + "/coil")
    _live(driver)
    marks = driver.find_elements(By.CSS_SELECTOR, 'svg.coilmap g[data-side="top"] circle.defect')
    assert len(marks) == 5
    assert "Coil 24-118734" in driver.find_element(By.ID, "coil").text
    before = {(m.get_attribute("cx"), m.get_attribute("cy")) for m in marks}
    # One more alert further along: the map grows without a reload.
    driver.execute_script("window.stayedHere = 'yes'")
    d.alert(coil_id="24-118734", md_m=420.0, cd_mm=900.0, area_mm2=150.0, thumbnail_png=_thumb())
    wait(driver).until(
        lambda drv: len(drv.find_elements(By.CSS_SELECTOR, 'svg.coilmap g[data-side="top"] circle.defect')) == 6
    )
    assert driver.execute_script("return window.stayedHere") == "yes"
    after = {
        (m.get_attribute("cx"), m.get_attribute("cy"))
        for m in driver.find_elements(By.CSS_SELECTOR, 'svg.coilmap g[data-side="top"] circle.defect')
    }
    assert after != before  # the MD axis grew to 420 m, so the old marks moved left
    labels = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "svg.coilmap text.tick.md")]
    assert "400" in labels
