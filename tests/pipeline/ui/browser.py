"""Headless Debian chromium through its chromedriver (apt: chromium chromium-driver; nothing is
downloaded), for the browser tests and the documentation's screenshots."""

from __future__ import annotations

import shutil
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.pipeline.ui.harness import PASSWORD


class NoBrowserError(RuntimeError):
    pass


def chrome(*, width: int = 1440, height: int = 960) -> webdriver.Chrome:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        raise NoBrowserError(
            "chromium and chromedriver must be on PATH for the browser tests: apt-get install chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait(driver: webdriver.Chrome, timeout_s: float = 10.0) -> WebDriverWait[webdriver.Chrome]:
    return WebDriverWait(driver, timeout_s, poll_frequency=0.05)


def log_in(driver: webdriver.Chrome, url: str, user: str, password: str = PASSWORD) -> None:
    driver.get(url + "/login")
    driver.find_element(By.ID, "user").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait(driver).until(ec.presence_of_element_located((By.CSS_SELECTOR, "header.bar .who")))


def screenshot(driver: webdriver.Chrome, path: Path, *, full_page: bool = False) -> Path:
    """A PNG of the window (or of the whole page's height, up to 3000 px)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if full_page:
        size = driver.get_window_size()
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(size["width"], min(3000, max(size["height"], int(height) + 120)))
        driver.save_screenshot(str(path))
        driver.set_window_size(size["width"], size["height"])
    else:
        driver.save_screenshot(str(path))
    return path
