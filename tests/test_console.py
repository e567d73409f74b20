"""The web console as an operator meets it: a real daemon process, a real Chromium driven by Selenium,
real clicks. What a click stopped or froze is read from /proc (procscan), never from the console.

Screenshots go to $DEADSTOP_SCREENSHOTS when it is set (`DEADSTOP_SCREENSHOTS=docs pytest
tests/test_console.py` refreshes the README's), else to the test's own directory.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request

import pytest

from daemonctl import Daemon
from procscan import cpu_seconds, marked_processes

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
NO_BROWSER = "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
WAIT = 45.0  # seconds any one thing may take to show in the page

CONFIG = """
[defaults]
grace = 0.5

[agents.worker]
target = "daemon_agents:console_worker"
cwd = "{work}"
tools = ["llm"]

[agents.sleeper]
target = "daemon_agents:sleeper"
cwd = "{work}"

[agents.level]
target = "daemon_agents:level"
cwd = "{work}"
tools = ["sessions.spawn"]

[tools.llm]
target = "daemon_agents:llm"
"""


@pytest.fixture
def daemon(tmp_path, workspace):
    d = Daemon(tmp_path, CONFIG, workspace).start("--console", "127.0.0.1:0")
    yield d
    d.stop()


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("DEADSTOP_CI"):
            pytest.fail(NO_BROWSER)
        pytest.skip(NO_BROWSER)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def _shots(tmp_path) -> str:
    where = os.environ.get("DEADSTOP_SCREENSHOTS") or str(tmp_path)
    os.makedirs(where, exist_ok=True)
    return where


def _until(driver, what, timeout: float = WAIT):
    """Wait for `what` to hold; an element replaced while it was read (the page re-rendered) is read again.
    If it never does, the failure says what the page showed then."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05,
                             ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(what)
    except TimeoutException:
        raise AssertionError(f"not within {timeout:g} s; the page showed: {_page_state(driver)}") from None


def _page_state(driver) -> str:
    from selenium.webdriver.common.by import By

    try:
        rows = {tr.get_attribute("data-session"): tr.get_attribute("data-state")
                for tr in driver.find_elements(By.CSS_SELECTOR, "tbody tr[data-session]")}
        found = driver.find_elements(By.ID, "feedback")
        logs = [e["message"] for e in driver.get_log("browser")]
        return f"rows {rows}, feedback {found[0].text if found else None!r}, browser log {logs}"
    except Exception as exc:  # the page itself is gone
        return f"(unreadable: {exc!r})"


def _cell(driver, key: str, field: str):
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, f'tr[data-session="{key}"] [data-field="{field}"]')
    return found[0].text if found else None


def _button(driver, key: str, action: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'tr[data-session="{key}"] [data-action="{action}"]')


def _feedback(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "feedback").text


def _samples(driver, run_id: str) -> int:
    """How many usage samples of the run the console holds (its own /api/usage, read through the page)."""
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "ds.get('/api/usage?run=' + arguments[0]).then((r) => done(r.ok ? r.points.length : -1));", run_id)


def _login_link(daemon: Daemon, *flags: str) -> str:
    return daemon.cli_json("console", *flags)["login"]


def test_an_operator_watches_pauses_resumes_and_stops_a_tree_from_the_browser(daemon, ready, browser, tmp_path):
    from selenium.webdriver.common.by import By

    send = daemon.cli("sessions", "send", "work", json.dumps({"ready": ready.path}), "--agent", "worker")
    assert send.returncode == 0, send.stderr
    daemon.cli("sessions", "send", "idle-chat", json.dumps({"ready": ready.path}), "--agent", "sleeper")
    daemon.cli("sessions", "send", "planner", json.dumps({"ready": ready.path, "depth": 2}), "--agent", "level")
    ready.wait(4)  # work, idle-chat, planner and planner's sub-agent
    run = daemon.cli_json("sessions", "show", "work")["active_run"]
    pids = list(marked_processes(run))
    assert len(pids) == 4  # the agent and its three busy children

    browser.get(_login_link(daemon))
    _until(browser, lambda d: _cell(d, "work", "state") == "running")
    # live: both cells move while the run works, pushed by the feed (the page polls nothing)
    tokens, cpu = _cell(browser, "work", "tokens"), _cell(browser, "work", "cpu")
    _until(browser, lambda d: _cell(d, "work", "tokens") != tokens and _cell(d, "work", "cpu") != cpu)
    # the sub-agent sits under its parent
    _until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr.child[data-session^="planner/"]'))
    keys = [tr.get_attribute("data-session") for tr in browser.find_elements(By.CSS_SELECTOR, "tbody tr")]
    child = next(k for k in keys if k.startswith("planner/"))
    assert keys.index(child) == keys.index("planner") + 1

    _until(browser, lambda d: _button(d, "work", "pause").is_enabled())
    _button(browser, "work", "pause").click()
    _until(browser, lambda d: _cell(d, "work", "state") == "paused")
    _until(browser, lambda d: "sessions.pause work: true" in _feedback(d))  # the reply may land after the event
    frozen = cpu_seconds(pids)
    time.sleep(0.3)  # the thing measured: no CPU time may accrue while paused
    assert cpu_seconds(pids) == frozen, "a process of the paused tree ran"

    _until(browser, lambda d: _button(d, "work", "resume").is_enabled())
    _button(browser, "work", "resume").click()
    _until(browser, lambda d: _cell(d, "work", "state") == "running")
    time.sleep(0.3)
    assert cpu_seconds(pids) > frozen, "resume must thaw the tree"

    _until(browser, lambda d: _samples(d, run) >= 2)  # enough of the run seen for a chart of it
    _until(browser, lambda d: _button(d, "work", "stop").is_enabled())
    _button(browser, "work", "stop").click()
    _until(browser, lambda d: _cell(d, "work", "state") == "idle")
    assert marked_processes(run) == {}, "the page said stopped with a process of the run alive"
    report = _cell(browser, "work", "report")
    assert re.search(r"stopped by (sigterm|sigkill), 0 survivors", report), report
    _until(browser, lambda d: f"sessions.stop work: {run}: stopped by" in _feedback(d))
    stored = daemon.cli_json("sessions", "show", "work")
    assert stored["state"] == "idle" and stored["last_outcome"] == "stopped"
    browser.save_screenshot(os.path.join(_shots(tmp_path), "console-sessions.png"))

    # the session page: the stop report drawn to scale, and the after-revoke check read from the journal
    browser.find_element(By.CSS_SELECTOR, 'tr[data-session="work"] [data-field="key"] a').click()
    _until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'[data-report="{run}"] [data-mark="reaped_at"]'))
    marks = _until(browser, lambda d: {m.get_attribute("data-mark"): float(m.value_of_css_property("left").rstrip("px"))
                                       for m in d.find_elements(By.CSS_SELECTOR, f'[data-report="{run}"] [data-mark]')})
    assert marks["requested_at"] == 0 and marks["requested_at"] <= marks["revoked_at"] <= marks["term_sent_at"] \
        <= marks["reaped_at"], marks
    _until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'[data-run="{run}"] [data-check="pass"]'))
    decisions = _until(browser, lambda d: {td.text for td in d.find_elements(By.CSS_SELECTOR,
                                                                            f'[data-run="{run}"] td.decision')})
    assert "dispatched" in decisions  # the llm calls, each journaled
    assert browser.find_elements(By.CSS_SELECTOR, '[data-chart="cpu_seconds"] polyline')
    browser.set_window_size(1280, 1500)
    browser.save_screenshot(os.path.join(_shots(tmp_path), "console-session.png"))
    browser.set_window_size(1280, 900)

    # the egress log pages: 50 rows a page, the rest on the next
    caption = _until(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'[data-run="{run}"] table.egress caption').text)
    total = int(caption.rsplit(" of ", 1)[1])
    if total > 50:
        browser.find_element(By.CSS_SELECTOR, f'[data-run="{run}"] .pager button:last-child').click()
        _until(browser, lambda d: d.find_element(By.CSS_SELECTOR, f'[data-run="{run}"] table.egress caption').text
               == f"Egress log: rows 51–{total} of {total}")

    # Stop all, confirmed: every active tree ends
    browser.find_element(By.CSS_SELECTOR, "header h1 a").click()
    _until(browser, lambda d: _cell(d, "planner", "state") == "running")
    live = [daemon.cli_json("sessions", "show", k)["active_run"] for k in ("idle-chat", "planner", child)]
    # filters: one agent's sessions only, then everyone again
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "f-agent")).select_by_value("sleeper")

    def shown(d):
        return [tr.get_attribute("data-session") for tr in d.find_elements(By.CSS_SELECTOR, "tbody tr") if tr.is_displayed()]

    _until(browser, lambda d: shown(d) == ["idle-chat"])
    Select(browser.find_element(By.ID, "f-agent")).select_by_value("")
    browser.find_element(By.CSS_SELECTOR, '[data-action="stop-all"]').click()
    _until(browser, lambda d: d.find_element(By.ID, "confirm-stop-all").is_displayed())
    browser.find_element(By.ID, "confirm-stop").click()
    _until(browser, lambda d: all(_cell(d, k, "state") == "idle" for k in ("idle-chat", "planner", child)))
    assert all(marked_processes(r) == {} for r in live)
    _until(browser, lambda d: "sessions.stop planner:" in _feedback(d))

    # a narrow screen: a card per session, its buttons within reach
    browser.set_window_size(400, 900)
    stop = _button(browser, "planner", "stop")
    assert stop.is_displayed() and stop.rect["x"] + stop.rect["width"] <= 400
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_every_route_needs_a_login_and_every_post_its_csrf_token(daemon, ready):
    daemon.cli("sessions", "send", "chat", json.dumps({"ready": ready.path}), "--agent", "sleeper")
    ready.wait(1)
    base = daemon.connection()["console"]
    routes = [("GET", "/"), ("GET", "/session?key=chat"), ("GET", "/static/console.js"), ("GET", "/api/sessions"),
              ("GET", "/api/session?key=chat"), ("GET", "/api/egress?run=x"), ("GET", "/api/usage?run=x"),
              ("GET", "/api/events"), ("POST", "/api/call/sessions.stop"), ("POST", "/api/stop-all"),
              ("POST", "/logout"), ("GET", "/no-such-page")]
    for method, path in routes:
        assert _status(base + path.lstrip("/"), method) == 401, (method, path)
    assert _status(base + "login?token=not-a-token") == 401

    link = daemon.connection()["console_login"]
    jar, opener = _session()
    assert opener.open(link).status == 200
    (cookie,) = list(jar)
    assert cookie.name == "deadstop_console" and cookie.has_nonstandard_attr("HttpOnly")
    assert cookie.get_nonstandard_attr("SameSite") == "Strict"
    assert _status(link) == 401, "a login link is good once"
    assert daemon.connection()["console_login"] != link, "the file's link is replaced once used"

    csrf = re.search(r'name="csrf-token" content="([^"]+)"', opener.open(base).read().decode()).group(1)
    stop = json.dumps({"key": "chat"}).encode()
    for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": csrf, "Origin": "http://evil.example"}):
        assert _status(base + "api/call/sessions.stop", "POST", stop, headers, opener) == 403, headers
    assert daemon.cli_json("sessions", "show", "chat")["state"] == "running", "a refused POST stopped nothing"
    assert _status(base + "api/call/sessions.send", "POST", stop, {"X-CSRF-Token": csrf}, opener) == 400
    reply = json.loads(_open(base + "api/call/sessions.stop", "POST", stop, {"X-CSRF-Token": csrf}, opener).read())
    assert reply["ok"] and reply["result"]["reports"][0]["survivors"] == 0
    assert reply["result"]["reports"][0]["revoke_source"] == "console"
    missing = _open(base + "api/call/sessions.stop", "POST", b'{"key": "nobody"}', {"X-CSRF-Token": csrf}, opener,
                    expect=404)
    assert json.loads(missing.read())["fault"] == 10  # the daemon's own fault, passed through


def test_a_read_only_login_sees_everything_and_no_button_and_its_post_is_refused(daemon, ready, browser):
    from selenium.webdriver.common.by import By

    daemon.cli("sessions", "send", "chat", json.dumps({"ready": ready.path}), "--agent", "sleeper")
    ready.wait(1)
    link = _login_link(daemon, "--read-only")
    browser.get(link)
    _until(browser, lambda d: _cell(d, "chat", "state") == "running")
    assert browser.find_elements(By.CSS_SELECTOR, "[data-action]") == []
    assert browser.find_element(By.CSS_SELECTOR, ".scope").text == "read"
    # the page's own call path shows the daemon's refusal with its number (what a button would show)
    shown = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "ds.call('sessions.stop', {key: 'chat'}).then((r) => done(ds.replyText('sessions.stop', 'chat', r)));")
    assert shown.startswith("sessions.stop chat: refused: fault 20 FORBIDDEN"), shown

    jar, opener = _session()
    opener.open(_login_link(daemon, "--read-only"))
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', opener.open(daemon.connection()["console"]).read().decode())
    refused = _open(daemon.connection()["console"] + "api/call/sessions.stop", "POST", b'{"key": "chat"}',
                    {"X-CSRF-Token": csrf.group(1)}, opener, expect=403)
    assert json.loads(refused.read())["name"] == "FORBIDDEN"  # the daemon's policy said no, not the page
    assert daemon.cli_json("sessions", "show", "chat")["state"] == "running"


def test_the_console_is_loopback_unless_told_otherwise(tmp_path, workspace):
    d = Daemon(tmp_path, CONFIG, workspace)
    refused = d.cli("serve", "--config", d.config, "--state-dir", d.state, "--runtime-dir", d.runtime,
                    "--console", "0.0.0.0:0")
    assert refused.returncode == 2 and "--console-insecure" in refused.stderr
    assert d.cli("serve", "--config", d.config, "--console", "nonsense:port").returncode == 2
    d.start()  # --no-console
    try:
        none = d.cli("console", "--no-browser")
        assert none.returncode == 1 and "no console" in none.stderr
    finally:
        d.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed (it makes the test's certificate)")
def test_the_console_serves_tls_with_a_secure_cookie(tmp_path, workspace):
    import ssl
    import subprocess

    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True, timeout=60)
    d = Daemon(tmp_path, CONFIG, workspace).start("--console", "127.0.0.1:0", "--console-cert", cert,
                                                   "--console-key", key)
    try:
        info = d.connection()
        assert info["console"].startswith("https://127.0.0.1:")
        tls = ssl.create_default_context(cafile=cert)
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar),
                                             urllib.request.HTTPSHandler(context=tls))
        assert opener.open(info["console_login"], timeout=30).status == 200
        (cookie,) = list(jar)
        assert cookie.secure and cookie.has_nonstandard_attr("HttpOnly")
        plain = "http://" + info["console"].split("://", 1)[1] + "api/sessions"
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(plain, timeout=30)  # no plain HTTP on a TLS console
    finally:
        d.stop()


# -- plain HTTP, for what a browser would not let a test do ------------------------------------------------------
def _session():
    jar = http.cookiejar.CookieJar()
    return jar, urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))


def _open(url, method="GET", body=None, headers=None, opener=None, expect=200):
    request = urllib.request.Request(url, data=body if method == "POST" else None, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        response = (opener or urllib.request.build_opener()).open(request, timeout=30)
    except urllib.error.HTTPError as exc:
        response = exc
    assert response.status == expect, (url, response.status, response.read()[:300])
    return response


def _status(url, method="GET", body=b"{}", headers=None, opener=None) -> int:
    request = urllib.request.Request(url, data=body if method == "POST" else None, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with (opener or urllib.request.build_opener()).open(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
