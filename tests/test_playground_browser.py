"""The playground in a real headless Chromium, against `zimage-tornado --demo`.

The test saves what the browser shows in artifacts/playground.png (README: "Playground")."""

import json
import os
import signal
import subprocess
import sys
import urllib.request
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
ADMIN_SCREENSHOT = ROOT / "artifacts" / "admin.png"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def start_gateway(tmp_path, *args):
    sock, port = bind_unused_port()
    sock.close()
    log = (tmp_path / ("gateway-%d.log" % port)).open("w")
    proc = subprocess.Popen([sys.executable, "-m", "zimage_tornado", "--port=%d" % port, *args],
                            cwd=ROOT, stderr=log, env={**os.environ, "ZIMAGE_LOG_LEVEL": "warning",
                                                       "ZIMAGE_DATABASE": str(tmp_path / "gateway.sqlite3")})
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


def test_admin_page_charts_usage_and_lists_recent_tasks(browser, gateways, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.ops]\nkey = "sk-ops"\nadmin = true\n[keys.alice]\nkey = "sk-alice"\n'
                    '[keys.bob]\nkey = "sk-bob"\n')
    url = gateways("--demo", "--demo-seconds=0.5", "--api_keys_file=%s" % keys)
    for key, prompt, n in (("sk-alice", "a red fox", 2), ("sk-bob", "a blue whale", 1), ("sk-alice", "a moth", 1)):
        request = urllib.request.Request(url + "/v1/images/generations", method="POST", headers={
            "Authorization": "Bearer " + key, "Content-Type": "application/json"},
            data=json.dumps({"prompt": prompt, "n": n, "size": "256x256"}).encode())
        with urllib.request.urlopen(request, timeout=20) as answer:
            assert answer.status == 200
    browser.get(url + "/admin")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/admin")
    fill(browser, apikey="sk-alice")  # not an admin: told so plainly
    browser.find_element(By.ID, "load").click()
    WebDriverWait(browser, 10).until(lambda d: "admin key" in error_text(d))
    fill(browser, apikey="sk-ops")
    browser.find_element(By.ID, "load").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
    assert error_text(browser) == ""
    bars = browser.find_elements(By.CSS_SELECTOR, "#chart rect")
    assert len(bars) == 2  # today's images, one bar segment per key
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#legend span")] == ["alice", "bob"]
    totals = [[c.text for c in row.find_elements(By.TAG_NAME, "td")]
              for row in browser.find_elements(By.CSS_SELECTOR, "#totals tbody tr")]
    assert totals == [["alice", "2", "3", "0", "0"], ["bob", "1", "1", "0", "0"]]
    rows = browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[6].text for r in rows] == ["a moth", "a blue whale", "a red fox"]
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#tasks img')].every(i => i.complete && i.naturalWidth === 256)"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#tasks img")) == 4  # a thumbnail per picture
    ADMIN_SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(ADMIN_SCREENSHOT))
    browser.get(url + "/admin")  # the key is kept, and the page loads with it
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
