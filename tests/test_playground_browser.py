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
from selenium.webdriver.common.keys import Keys
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
    # "Download all": Chrome asks once whether a page may download several files; a user says yes.
    options.add_experimental_option("prefs", {"profile.default_content_setting_values.automatic_downloads": 1})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def said(browser, text):
    """The status line comes to say `text`: a copy is reported once the clipboard's promise
    settles, which a busy machine takes a moment for (CI read the line before it)."""
    WebDriverWait(browser, 5).until(lambda d: d.find_element(By.ID, "status").text == text,
                                    "the status line never said %r" % text)


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
    url = gateways("--demo", "--demo-seconds=2", "--poll_interval=0.5")
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
    assert "127.0.0.1:" not in browser.find_element(By.TAG_NAME, "body").text  # no upstream URL for visitors
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))

    # the same page shows invalid input plainly, and no pictures
    fill(browser, steps=0)
    generate(browser)
    assert "steps must be between 1 and 50" in error_text(browser)
    assert loaded_images(browser) == []


def test_a_signed_picture_link_loads_as_an_img_with_no_key_and_a_forged_one_does_not(browser, gateways):
    url = gateways("--demo", "--demo-seconds=0.3", "--poll_interval=0.1", "--api_keys=sk-owner")
    request = urllib.request.Request(url + "/v1/images/generations", method="POST", headers={
        "Authorization": "Bearer sk-owner", "Content-Type": "application/json"},
        data=json.dumps({"prompt": "a kite", "size": "256x256"}).encode())
    with urllib.request.urlopen(request, timeout=20) as answer:
        link = json.loads(answer.read())["data"][0]["url"]
    assert "signature=" in link
    browser.get(url + "/playground")  # any page of the gateway's: the <img> has no key to send

    def loaded(src):
        return browser.execute_async_script(
            "const done = arguments[arguments.length - 1], img = new Image();"
            "img.onload = () => done([img.naturalWidth, img.naturalHeight]); img.onerror = () => done(null);"
            "img.src = arguments[0];", src)
    assert loaded(link) == [256, 256]
    assert loaded(link.replace("signature=", "signature=x")) is None  # 403: not a picture


def test_root_sends_browsers_to_the_playground(browser, gateways):
    url = gateways("--demo")
    browser.get(url + "/")
    assert browser.current_url == url + "/playground"
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "demo").is_displayed())
    assert browser.find_element(By.ID, "demo").text == "demo: simulated pictures"
    assert browser.find_element(By.TAG_NAME, "h1").text == "Z-Image playground"


def test_upstream_down_is_shown_plainly(browser, gateways):
    url = gateways("--upstream-url=http://127.0.0.1:9")
    browser.get(url + "/playground")
    fill(browser, prompt="a lighthouse")
    generate(browser)
    assert "The upstream could not be reached" in error_text(browser)


def test_api_key_is_asked_for_and_kept_in_the_browser(browser, gateways):
    url = gateways("--demo", "--demo-seconds=1", "--poll_interval=0.5", "--api-keys=s3cret")
    browser.get(url + "/playground")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/playground")
    WebDriverWait(browser, 10).until(lambda d: "needs an API key" in error_text(d))
    assert browser.find_element(By.ID, "apikey").is_displayed()  # the page opened its settings at the field
    fill(browser, apikey="s3cret", prompt="a key-holding owl", width=256, height=256)
    browser.find_element(By.ID, "prompt").click()  # leave the key field: the page stores it
    generate(browser)
    WebDriverWait(browser, 20).until(lambda d: loaded_images(d) and loaded_images(d)[0]["done"])
    assert loaded_images(browser)[0]["w"] == 256
    browser.get(url + "/playground")
    assert browser.find_element(By.ID, "apikey").get_attribute("value") == "s3cret"


def test_admin_page_charts_usage_lists_keys_filters_pages_and_downloads_csv(browser, gateways, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.ops]\nkey = "sk-ops"\nadmin = true\n[keys.alice]\nkey = "sk-alice"\nimages_per_day = 3\n'
                    '[keys.bob]\nkey = "sk-bob"\n')
    url = gateways("--demo", "--demo-seconds=0.5", "--poll_interval=0.3", "--api_keys_file=%s" % keys)
    for key, prompt, n in (("sk-alice", "a red fox", 2), ("sk-bob", "a blue whale", 1), ("sk-alice", "a moth", 1)):
        request = urllib.request.Request(url + "/v1/images/generations", method="POST", headers={
            "Authorization": "Bearer " + key, "Content-Type": "application/json"},
            data=json.dumps({"prompt": prompt, "n": n, "size": "256x256"}).encode())
        with urllib.request.urlopen(request, timeout=20) as answer:
            assert answer.status == 200
    for i in range(52):  # more than a page of bob's tasks, answered at once (no wait)
        request = urllib.request.Request(url + "/v1/chat/completions", method="POST", headers={
            "Authorization": "Bearer sk-bob", "Content-Type": "application/json"},
            data=json.dumps({"model": "zimage-turbo", "prompt": "page filler %d" % i, "width": 256,
                             "height": 256}).encode())
        with urllib.request.urlopen(request, timeout=20) as answer:
            assert answer.status == 200
    browser.set_window_size(1366, 900)
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
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#legend span")] == ["alice", "bob"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart rect")) == 2  # one day with data, a segment per key
    keys_table = {row.find_elements(By.TAG_NAME, "td")[0].text: [c.text for c in row.find_elements(By.TAG_NAME, "td")]
                  for row in browser.find_elements(By.CSS_SELECTOR, "#keys tbody tr")}
    assert keys_table["alice"][3:6] == ["3 / 3", "2", "0"]  # today's images against the quota, tasks, refused
    assert keys_table["ops"][1] == "yes" and keys_table["bob"][4] == "53" and keys_table["ops"][-1] == "never"
    store = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#pictures tbody td")]
    assert store[0].startswith("directory ") and store[0].endswith("pictures") and store[3] != "0"  # kept pictures
    # numbers sit under their headings: both right-aligned
    aligned = browser.execute_script(
        "const h = document.querySelectorAll('#keys th')[4], c = document.querySelector('#keys tbody td:nth-child(5)');"
        "return [getComputedStyle(h).textAlign, getComputedStyle(c).textAlign]")
    assert aligned == ["right", "right"]
    # paging through every task
    assert len(browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")) == 50
    browser.find_element(By.ID, "next").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-page") == "2")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")) == 5
    assert browser.find_element(By.ID, "next").get_attribute("disabled")
    # filters
    from selenium.webdriver.support.ui import Select
    Select(browser.find_element(By.ID, "f-key")).select_by_value("alice")
    browser.find_element(By.ID, "apply").click()
    # read in one script: the table is re-rendered while the filter applies, so elements go stale
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#tasks tbody tr')].map(r => r.cells[6].innerText.trim())")
        == ["a moth", "a red fox"])
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#tasks img')].every(i => i.complete && i.naturalWidth === 256)"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#tasks img")) == 3  # a thumbnail per picture
    # the filtered tasks as CSV
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    browser.find_element(By.ID, "tasks-csv").click()
    WebDriverWait(browser, 10).until(lambda d: (downloads / "tasks.csv").exists())
    lines = (downloads / "tasks.csv").read_text().splitlines()
    assert lines[0].startswith("submitted_at,uuid,key,") and len(lines) == 3
    assert all(",alice," in line for line in lines[1:])
    ADMIN_SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(ADMIN_SCREENSHOT))
    # a phone: one column, nothing scrolls sideways
    browser.set_window_size(390, 844)
    browser.get(url + "/admin")  # the key is kept, and the page loads with it
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
    widths = browser.execute_script("const e = document.documentElement; return [e.scrollWidth, e.clientWidth]")
    assert widths[0] == widths[1], widths
    browser.save_screenshot(str(ROOT / "artifacts" / "admin-phone.png"))
    browser.set_window_size(1280, 900)


PHONE_SCREENSHOT = ROOT / "artifacts" / "playground-phone.png"


def history_entries(driver):
    return driver.execute_script(
        "return [...document.querySelectorAll('#history li')].map(li => ({uuid: li.dataset.uuid,"
        "  text: li.querySelector('.open').textContent}))")


def fresh_page(driver, url):
    driver.get(url + "/playground")
    driver.execute_script("localStorage.clear()")
    driver.get(url + "/playground")


def test_history_survives_a_reload_and_restores_prompt_and_settings(browser, gateways):
    url = gateways("--demo", "--demo-seconds=1", "--poll_interval=0.5")
    fresh_page(browser, url)
    fill(browser, prompt="a fox who remembers", width=256, height=192, batch_size=2, steps=6)
    browser.execute_script("const s = document.getElementById('cfg_scale'); s.value = 4.5;"
                           "s.dispatchEvent(new Event('input'))")
    assert browser.find_element(By.ID, "cfg_value").text == "4.5"  # the slider shows its value
    generate(browser)
    WebDriverWait(browser, 20).until(lambda d: len(loaded_images(d)) == 2 and all(i["done"] for i in loaded_images(d)))
    assert [i["w"] for i in loaded_images(browser)] == [256, 256]
    alts = browser.execute_script("return [...document.querySelectorAll('#grid img')].map(i => i.alt)")
    assert alts == ["a fox who remembers — picture 1 of 2", "a fox who remembers — picture 2 of 2"]
    entries = history_entries(browser)
    assert len(entries) == 1 and "a fox who remembers" in entries[0]["text"] and "completed" in entries[0]["text"]

    browser.get(url + "/playground")  # a reload: the history and the last settings are still there
    assert history_entries(browser) == entries
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "a fox who remembers"
    fill(browser, prompt="something else", width=512, steps=8)
    browser.find_element(By.CSS_SELECTOR, "#history .open").click()  # restores the entry into the form
    WebDriverWait(browser, 10).until(lambda d: len(loaded_images(d)) == 2 and all(i["done"] for i in loaded_images(d)))
    form = browser.execute_script("return ['prompt','width','height','batch_size','steps','cfg_scale']"
                                  ".map(id => document.getElementById(id).value)")
    assert form == ["a fox who remembers", "256", "192", "2", "6", "4.5"]

    browser.find_element(By.CSS_SELECTOR, "#history .remove").click()  # one by one, or all at once
    assert history_entries(browser) == []
    browser.get(url + "/playground")
    assert history_entries(browser) == []


def test_a_picture_downloads_and_the_viewer_follows_the_keyboard(browser, gateways, tmp_path):
    url = gateways("--demo", "--demo-seconds=1", "--poll_interval=0.5")
    fresh_page(browser, url)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    fill(browser, prompt="A Lighthouse, at dusk!", width=128, height=128, batch_size=2)
    generate(browser)
    WebDriverWait(browser, 20).until(lambda d: len(loaded_images(d)) == 2 and all(i["done"] for i in loaded_images(d)))
    uuid = history_entries(browser)[0]["uuid"]
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Download picture 2']").click()
    WebDriverWait(browser, 10).until(lambda d: any(p.suffix == ".png" for p in downloads.iterdir()))
    (saved,) = [p for p in downloads.iterdir() if p.suffix == ".png"]
    assert saved.name == "a-lighthouse-at-dusk_%s_1.png" % uuid  # named from the prompt and the uuid
    assert saved.read_bytes().startswith(b"\x89PNG")

    srcs = [i["src"] for i in loaded_images(browser)]
    browser.find_elements(By.CSS_SELECTOR, "#grid img")[0].click()  # opens the full-screen viewer
    viewer = browser.find_element(By.ID, "viewer")
    assert viewer.is_displayed()
    assert browser.find_element(By.ID, "viewer_img").get_attribute("src") == srcs[0]
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.ARROW_RIGHT)
    assert browser.find_element(By.ID, "viewer_img").get_attribute("src") == srcs[1]
    body.send_keys(Keys.ARROW_RIGHT)  # wraps around
    assert browser.find_element(By.ID, "viewer_img").get_attribute("src") == srcs[0]
    body.send_keys(Keys.ESCAPE)
    assert not viewer.is_displayed()
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Copy the URL of picture 1']").click()
    said(browser, "URL copied: " + srcs[0])
    browser.find_element(By.ID, "download_all").click()
    both = {"a-lighthouse-at-dusk_%s_%d.png" % (uuid, i) for i in (0, 1)}  # picture 2 again, under its name
    WebDriverWait(browser, 10).until(lambda d: {p.name for p in downloads.iterdir()} == both)


def test_stop_waiting_leaves_the_task_running_and_a_reload_picks_it_up(browser, gateways):
    url = gateways("--demo", "--demo-seconds=30", "--poll_interval=0.5")
    fresh_page(browser, url)
    fill(browser, prompt="a slow snail", width=128, height=128)
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 10).until(lambda d: "drawing" in d.find_element(By.ID, "status").text
                                     or "queued" in d.find_element(By.ID, "status").text)
    WebDriverWait(browser, 5).until(lambda d: " s" in d.find_element(By.ID, "status").text)  # elapsed time
    stop = browser.find_element(By.ID, "stop")
    assert stop.is_displayed()
    stop.click()
    WebDriverWait(browser, 5).until(lambda d: "Stopped waiting" in d.find_element(By.ID, "status").text)
    assert error_text(browser) == ""
    assert browser.find_element(By.ID, "submit").is_enabled() and not stop.is_displayed()
    assert "running" in history_entries(browser)[0]["text"]  # it stays in the history
    browser.get(url + "/playground")  # opened again: its progress resumes
    WebDriverWait(browser, 10).until(lambda d: "a slow snail" not in d.find_element(By.ID, "status").text
                                     and "%" in d.find_element(By.ID, "status").text)
    assert browser.find_element(By.ID, "stop").is_displayed()
    browser.find_element(By.ID, "stop").click()


def test_errors_are_shown_where_they_help(browser, gateways):
    url = gateways("--demo", "--demo-seconds=1", "--poll_interval=0.5", "--ip_requests_per_minute=1")
    fresh_page(browser, url)
    fill(browser, prompt="a checked owl", width=128, height=128, steps=0)
    generate(browser)
    assert "steps must be between 1 and 50" in browser.find_element(By.ID, "steps-error").text
    assert browser.find_element(By.ID, "steps").get_attribute("aria-invalid") == "true"
    assert browser.switch_to.active_element == browser.find_element(By.ID, "steps")  # focused to fix it
    fill(browser, steps=8)
    generate(browser)
    WebDriverWait(browser, 20).until(lambda d: len(loaded_images(d)) == 1)
    assert browser.find_element(By.ID, "steps-error").text == ""
    generate(browser)  # a second submit within the minute: the limit, and when to try again
    assert "Rate limit reached" in error_text(browser) and "try again in" in error_text(browser)
    assert "retry in" not in error_text(browser)  # when to try again is said once


def test_the_page_fits_a_phone(browser, gateways):
    url = gateways("--demo", "--demo-seconds=1", "--poll_interval=0.5")
    fresh_page(browser, url)
    fill(browser, prompt="a small screen", width=256, height=256)
    generate(browser)
    WebDriverWait(browser, 20).until(lambda d: loaded_images(d) and loaded_images(d)[0]["done"])
    WebDriverWait(browser, 5).until(lambda d: d.execute_script(  # the bar's animation has finished
        "const b = document.getElementById('progress'); return b.offsetWidth === b.parentElement.clientWidth"))
    browser.save_screenshot(str(SCREENSHOT))  # the desktop view, with its history
    browser.set_window_size(390, 844)
    try:
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        labels = browser.execute_script(
            "return [...document.querySelectorAll('input, select, textarea')].filter(e => e.id !== 'apikey')"
            ".every(e => e.closest('label'))")
        assert labels  # every control has its label
        PHONE_SCREENSHOT.parent.mkdir(exist_ok=True)
        browser.save_screenshot(str(PHONE_SCREENSHOT))
    finally:
        browser.set_window_size(1280, 900)


CONTRAST = """
const lum = (color) => color.match(/[\\d.]+/g).slice(0, 3).map(Number).map((v) => {
  v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); })
  .reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0);
const background = (el) => {
  for (; el; el = el.parentElement) {
    const c = getComputedStyle(el).backgroundColor, parts = c.match(/[\\d.]+/g);
    if (parts && (parts.length < 4 || Number(parts[3]) > 0.5)) return c;
  }
  return "rgb(255, 255, 255)";
};
const ratio = (el) => { const a = lum(getComputedStyle(el).color), b = lum(background(el));
                        return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05); };
return Object.fromEntries(arguments[0].map((selector) => [selector, ratio(document.querySelector(selector))]));
"""
# the main text, the labels, the muted status and hints, the buttons
CONTRASTED = ["#headline", "label .name", "#status", ".hint", "#submit", "#download_all", "#history .meta",
              "#task_id"]
DESKTOP_SCREENSHOT = ROOT / "artifacts" / "playground-desktop.png"
DARK_SCREENSHOT = ROOT / "artifacts" / "playground-dark.png"


def single_line(driver, element_id):
    return driver.execute_script(
        "const e = document.getElementById(arguments[0]);"
        "return e.getBoundingClientRect().height < 1.5 * parseFloat(getComputedStyle(e).lineHeight)", element_id)


def test_the_empty_state_invites_and_the_picture_comes_first(browser, gateways):
    url = gateways("--demo", "--demo-seconds=1", "--poll_interval=0.5")
    browser.set_window_size(1366, 900)
    try:
        fresh_page(browser, url)
        empty = browser.find_element(By.ID, "empty")
        assert empty.is_displayed() and not browser.find_element(By.ID, "bar").is_displayed()  # no empty bar
        chips = browser.find_elements(By.CSS_SELECTOR, "#examples .chip")
        assert len(chips) >= 3
        chips[2].click()  # an example fills the form
        assert browser.find_element(By.ID, "prompt").get_attribute("value") == chips[2].text
        assert single_line(browser, "apikey_name") and single_line(browser, "cfg_name")  # labels read as one line
        fill(browser, width=512, height=384, batch_size=1)
        prompt = browser.find_element(By.ID, "prompt").get_attribute("value")
        generate(browser)
        WebDriverWait(browser, 20).until(lambda d: loaded_images(d) and loaded_images(d)[0]["done"])
        assert not empty.is_displayed()
        # one picture fills the stage: at least 60 % of the window's width
        width = browser.execute_script("return document.querySelector('#grid img').getBoundingClientRect().width"
                                       " / window.innerWidth")
        assert width >= 0.6, width
        # the prompt is the headline; the task id is one click from the clipboard
        assert browser.find_element(By.ID, "headline").text == prompt
        uuid = history_entries(browser)[0]["uuid"]
        browser.find_element(By.ID, "task_id").click()
        said(browser, "Task id copied: " + uuid)
        assert uuid not in browser.find_element(By.ID, "headline").text
        assert "127.0.0.1:" not in browser.find_element(By.TAG_NAME, "body").text  # no upstream URL anywhere
        contrast = browser.execute_script(CONTRAST, CONTRASTED)
        assert all(value >= 4.5 for value in contrast.values()), contrast
        # keyboard users see where they are
        browser.find_element(By.ID, "prompt").send_keys(Keys.TAB)
        focused = browser.switch_to.active_element
        assert focused.get_attribute("id") == "submit"
        assert browser.execute_script("return getComputedStyle(arguments[0]).outlineStyle", focused) == "solid"
        DESKTOP_SCREENSHOT.parent.mkdir(exist_ok=True)
        browser.save_screenshot(str(DESKTOP_SCREENSHOT))
        # dark, when the system prefers it
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [
            {"name": "prefers-color-scheme", "value": "dark"}]})
        background = browser.execute_script(CONTRAST.replace(
            "return Object.fromEntries", "return lum(background(document.body)); //"), [])
        assert background < 0.05, background  # a dark page
        contrast = browser.execute_script(CONTRAST, CONTRASTED)
        assert all(value >= 4.5 for value in contrast.values()), contrast
        browser.save_screenshot(str(DARK_SCREENSHOT))
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        browser.set_window_size(1280, 900)


def test_on_a_phone_generate_scrolls_to_the_stage(browser, gateways):
    url = gateways("--demo", "--demo-seconds=2", "--poll_interval=0.5")
    browser.set_window_size(390, 844)
    try:
        fresh_page(browser, url)
        assert not browser.find_element(By.ID, "width").is_displayed()  # the settings are folded away
        browser.save_screenshot(str(ROOT / "artifacts" / "playground-phone-before.png"))
        fill(browser, prompt="a pocket-sized lighthouse")
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "bar").is_displayed())
        in_view = browser.execute_script(
            "const r = document.getElementById('bar').getBoundingClientRect();"
            "return r.top >= 0 && r.bottom <= window.innerHeight")
        assert in_view  # the progress is on screen without scrolling
        WebDriverWait(browser, 20).until(lambda d: loaded_images(d) and loaded_images(d)[0]["done"])
        browser.save_screenshot(str(ROOT / "artifacts" / "playground-phone-after.png"))
        browser.set_window_size(360, 800)
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    finally:
        browser.set_window_size(1280, 900)


# -- the first visit, at a desktop's and a phone's size, light and dark (issue: the first visit works) -----

SCREENS = {"desktop": (1366, 900), "phone": (390, 844)}
# artifacts/ by default (not kept in git); ZIMAGE_SCREENSHOTS=docs/screenshots refreshes the docs' own
SHOTS = Path(os.environ.get("ZIMAGE_SCREENSHOTS") or ROOT / "artifacts" / "screenshots")


def screen(browser, name, scheme="light"):
    """The page's viewport as a desktop's or a phone's, in the light or dark scheme."""
    width, height = SCREENS[name]
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": name == "phone"})
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme",
                                                                          "value": scheme}]})


def shot(browser, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / ("%s.png" % name)))


@pytest.fixture
def reset_screen(browser):
    yield
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})


def running_percent(status):
    """The percentage a running task's status line says, when it is neither 0 nor 100."""
    if "%" not in status:
        return None
    percent = int(status.split("%")[0].split()[-1])
    return percent if 0 < percent < 100 else None


def clipped_buttons(browser):
    return browser.execute_script(
        "return [...document.querySelectorAll('#grid figcaption button')]"
        ".filter(b => b.scrollWidth > b.clientWidth || b.getBoundingClientRect().right >"
        "  b.closest('figure').getBoundingClientRect().right + 0.5).map(b => b.textContent)")


@pytest.mark.parametrize("name", SCREENS)
def test_a_teams_first_visit_is_shown_where_to_paste_the_key(browser, gateways, reset_screen, name):
    screen(browser, name)
    url = gateways("--demo", "--demo-seconds=0.5", "--poll_interval=0.2", "--api-keys=s3cret")
    browser.get(url + "/playground")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/playground")
    fill(browser, prompt="a key-holding owl")
    generate(browser)
    key = browser.find_element(By.ID, "apikey")
    assert browser.switch_to.active_element == key  # it takes the focus
    assert browser.execute_script("const r = arguments[0].getBoundingClientRect();"
                                  "return r.top >= 0 && r.bottom <= innerHeight", key)  # in view
    assert "needs an API key" in error_text(browser) and "administrator" in error_text(browser)
    assert "Authorization: Bearer <key>" not in error_text(browser)
    shot(browser, "playground-key-%s" % name)
    fill(browser, apikey="wrong")
    generate(browser)
    assert "refused" in error_text(browser)


# each size once, each scheme once: the suite stays within its time (the screenshots show both)
@pytest.mark.parametrize("name, scheme", [("desktop", "light"), ("phone", "dark")])
def test_pictures_fit_the_screen_and_no_button_is_clipped(browser, gateways, reset_screen, name, scheme):
    screen(browser, name, scheme)
    url = gateways("--demo", "--demo-seconds=2", "--poll_interval=0.2")
    browser.get(url + "/playground")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/playground")
    shot(browser, "playground-empty-%s-%s" % (name, scheme))
    browser.execute_script("document.getElementById('more').open = true")  # a phone's user opens Settings
    for count in (1, 2, 4):
        fill(browser, prompt="a harbour at dawn", width=512, height=512, batch_size=count)
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 10).until(lambda d: "%" in d.find_element(By.ID, "status").text)
        tiles = browser.find_elements(By.CSS_SELECTOR, "#grid .placeholder")
        assert len(tiles) == count  # the pictures to come, in their number
        def sample(driver):  # the status line and the bar, read at one moment, once the task is mid-way
            text, ratio = driver.execute_script(
                "const bar = document.getElementById('bar'), fill = document.getElementById('progress');"
                "return [document.getElementById('status').textContent,"
                "        100 * fill.getBoundingClientRect().width / bar.getBoundingClientRect().width]")
            return (text, ratio) if running_percent(text) else None
        status, shown = WebDriverWait(browser, 10).until(sample)
        percent = running_percent(status)
        assert abs(shown - percent) <= 2, (status, shown)  # the bar says what the text says, mid-way
        if count == 4:
            shot(browser, "playground-running-%s-%s" % (name, scheme))
        WebDriverWait(browser, 20).until(lambda d, wanted=count: len(loaded_images(d)) == wanted
                                         and all(i["done"] for i in loaded_images(d)))
        WebDriverWait(browser, 5).until(lambda d: d.find_element(By.ID, "submit").is_enabled())
        assert clipped_buttons(browser) == []
        assert browser.find_element(By.ID, "download_all").is_displayed() == (count > 1)
        if name == "desktop":  # the whole result on the screen
            bottoms = browser.execute_script("return [...document.querySelectorAll('#grid figure')]"
                                             ".map(f => f.getBoundingClientRect().bottom <= innerHeight)")
            assert bottoms == [True] * count
        assert browser.execute_script("return document.documentElement.scrollWidth <= innerWidth")
        shot(browser, "playground-%d-%s-%s" % (count, name, scheme))


def post(url, path, body, key=None):
    headers = {"Content-Type": "application/json", **({"Authorization": "Bearer " + key} if key else {})}
    request = urllib.request.Request(url + path, method="POST", headers=headers, data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=20) as answer:
        return json.loads(answer.read())


@pytest.mark.parametrize("name, scheme", [("desktop", "dark"), ("phone", "light")])
def test_the_admin_page_asks_for_a_key_first_agrees_with_itself_and_fits_a_phone(
        browser, gateways, tmp_path, reset_screen, name, scheme):
    screen(browser, name, scheme)
    proc, open_url = start_gateway(tmp_path, "--demo", "--demo-seconds=0.2", "--poll_interval=0.1")
    try:
        for i in range(3):  # used before keys were set up: anonymous usage, 2 images each
            post(open_url, "/v1/images/generations", {"prompt": "an open-gateway picture %d" % i, "n": 2,
                                                       "size": "256x256"})
    finally:
        proc.send_signal(signal.SIGTERM)  # the same database, then with keys
        proc.wait(timeout=15)
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys.ops]\nkey = "sk-ops"\nadmin = true\n')
    url = gateways("--demo", "--demo-seconds=0.2", "--poll_interval=0.1", "--api_keys_file=%s" % keys)
    post(url, "/v1/images/generations", {"prompt": "a long prompt " * 30, "size": "256x256"}, key="sk-ops")
    browser.get(url + "/admin")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/admin")
    welcome = browser.find_element(By.ID, "welcome")
    assert welcome.is_displayed() and "admin key" in welcome.text and error_text(browser) == ""
    assert not browser.find_element(By.ID, "chart").is_displayed()  # no blank chart before a key
    shot(browser, "admin-key-%s-%s" % (name, scheme))
    fill(browser, apikey="sk-ops")
    browser.find_element(By.ID, "load").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
    rows = {r.find_elements(By.TAG_NAME, "td")[0].text: [c.text for c in r.find_elements(By.TAG_NAME, "td")]
            for r in browser.find_elements(By.CSS_SELECTOR, "#keys tbody tr")}
    assert rows["anonymous"][3].startswith("6 / ") and rows["anonymous"][4] == "3"  # as the chart: 6 images today
    assert rows["anonymous"][-1] != "never"
    charted = browser.execute_script("return [...document.querySelectorAll('#chart rect title')]"
                                     ".map(t => t.textContent).filter(t => t.includes('anonymous'))")
    assert charted and charted[-1].endswith("anonymous: 6 images")
    fits = browser.execute_script("return document.documentElement.scrollWidth <= innerWidth")
    labels = browser.execute_script("return Math.min(...[...document.querySelectorAll('#chart text')]"
                                    ".map(t => t.getBoundingClientRect().height))")
    tall = browser.execute_script("return Math.max(...[...document.querySelectorAll('#tasks tbody tr')]"
                                  ".map(r => r.getBoundingClientRect().height))")
    sticky = browser.execute_script("return getComputedStyle(document.querySelector('#tasks td')).position")
    assert fits and labels >= 11 and tall < 100 and sticky == "sticky", (fits, labels, tall, sticky)
    prompt = browser.find_element(By.CSS_SELECTOR, "#tasks td.prompt")
    assert prompt.get_attribute("title").startswith("a long prompt a long prompt")  # the whole of it on hover
    shot(browser, "admin-%s-%s" % (name, scheme))
