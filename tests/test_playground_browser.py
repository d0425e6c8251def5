"""The playground in a real headless Chromium, against `zimage-tornado --demo`.

The test saves what the browser shows in artifacts/playground.png (README: "Playground")."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from tornado.testing import bind_unused_port

from helpers import wait_listening

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "artifacts" / "playground.png"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def start_gateway(tmp_path, *args):
    sock, port = bind_unused_port()
    sock.close()
    log = (tmp_path / ("gateway-%d.log" % port)).open("w")
    proc = subprocess.Popen([sys.executable, "-m", "zimage_tornado", "--port=%d" % port, *args],
                            cwd=ROOT, stderr=log, env={**os.environ, "ZIMAGE_LOG_LEVEL": "warning"})
    wait_listening(port, proc)
    return proc, "http://127.0.0.1:%d" % port


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    for path in (CHROMIUM, CHROMEDRIVER):
        assert os.path.exists(path), ("%s is missing: install Debian's chromium and chromium-driver "
                                      "(.ci/system-packages does)" % path)
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-quic", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                     "--user-data-dir=%s" % tmp_path_factory.mktemp("chromium")):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def gateways(tmp_path):
    procs = []

    def start(*args):
        proc, url = start_gateway(tmp_path, *args)
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def fill(driver, **fields):
    for name, value in fields.items():
        element = driver.find_element(By.ID, name)
        element.clear()
        element.send_keys(str(value))


def error_text(driver):
    return driver.find_element(By.ID, "error").text


def generate(driver, timeout=30):
    driver.find_element(By.ID, "submit").click()
    # done when the button is back (the page disables it while it works)
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.ID, "submit").is_enabled()
        and d.find_element(By.ID, "status").text != "Submitting…")


def loaded_images(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('#grid img')].map("
        "  i => ({done: i.complete, w: i.naturalWidth, h: i.naturalHeight, src: i.src,"
        "         href: i.closest('a').href, target: i.closest('a').target}))")


def test_prompt_to_pictures_in_the_demo(browser, gateways):
    url = gateways("--demo", "--demo-seconds=2")
    browser.get(url + "/playground")
    fill(browser, prompt="a lighthouse at dusk", width=512, height=384, batch_size=3)
    generate(browser)
    WebDriverWait(browser, 20).until(lambda d: len(loaded_images(d)) == 3 and all(i["done"] for i in loaded_images(d)))
    images = loaded_images(browser)
    assert [(i["w"], i["h"]) for i in images] == [(512, 384)] * 3  # real pictures of the requested size
    assert all(i["href"] == i["src"] and i["target"] == "_blank" for i in images)  # each opens full size
    assert "completed" in browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "progress").get_attribute("style").find("100%") >= 0
    assert error_text(browser) == ""
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))

    # the same page shows invalid input plainly, and no pictures
    fill(browser, steps=0)
    generate(browser)
    assert "steps must be between 1 and 50" in error_text(browser)
    assert loaded_images(browser) == []


def test_root_sends_browsers_to_the_playground(browser, gateways):
    url = gateways("--demo")
    browser.get(url + "/")
    assert browser.current_url == url + "/playground"
    WebDriverWait(browser, 10).until(lambda d: "demo mode" in d.find_element(By.ID, "service").text)


def test_upstream_down_is_shown_plainly(browser, gateways):
    url = gateways("--upstream-url=http://127.0.0.1:9")
    browser.get(url + "/playground")
    fill(browser, prompt="a lighthouse")
    generate(browser)
    assert "The upstream could not be reached" in error_text(browser)


def test_api_key_is_asked_for_and_kept_in_the_browser(browser, gateways):
    url = gateways("--demo", "--demo-seconds=1", "--api-keys=s3cret")
    browser.get(url + "/playground")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/playground")
    WebDriverWait(browser, 10).until(lambda d: "needs an API key" in error_text(d))
    browser.find_element(By.TAG_NAME, "summary").click()
    fill(browser, apikey="s3cret", prompt="a key-holding owl", width=256, height=256)
    browser.find_element(By.ID, "prompt").click()  # leave the key field: the page stores it
    generate(browser)
    WebDriverWait(browser, 20).until(lambda d: loaded_images(d) and loaded_images(d)[0]["done"])
    assert loaded_images(browser)[0]["w"] == 256
    browser.get(url + "/playground")
    assert browser.find_element(By.ID, "apikey").get_attribute("value") == "s3cret"
