"""The chat page at `/`, in a real headless Chromium (Debian's chromium + chromium-driver, driven
with selenium), against real processes: `fogline cloud serve` and `fogline edge serve` paired
over a real websocket, so tokens of every origin reach the page: accepted drafts and cloud
corrections in `spec` mode, exit-head tokens in `edge` mode. The screenshot is saved in the
test's tmp dir."""

from __future__ import annotations

import os
import shutil

import openai
import pytest
from edge_server_util import start_edge_server
from test_collab_modes import Cloud, _free_port, _wait_connected

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,900")
QUESTION = "What is the capital of France?"
N_TOKENS = 40


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and DRIVER):
        why = "Debian's chromium and chromium-driver are not installed (`make test` installs them as root)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def edge(demo_bundle, tmp_path_factory):
    logs = tmp_path_factory.mktemp("page-logs")
    cloud = Cloud(demo_bundle, _free_port(), logs / "cloud.log")
    cloud.start()
    env = dict(os.environ, FOGLINE_EDGE_CLOUD_URL=f"ws://127.0.0.1:{cloud.port}/ws", FOGLINE_EDGE_THREADS="1",
               FOGLINE_EDGE_PARALLEL="2", FOGLINE_EDGE_CTX_SIZE="512", FOGLINE_EDGE_CLOUD_PING_S="0.5",
               FOGLINE_EDGE_CLOUD_DEADLINE_MS="90000")
    try:
        srv = start_edge_server(demo_bundle / "edge", logs / "edge.log", env=env)
        _wait_connected(srv)
        yield srv
        assert srv.stop() == 0, srv.log()
    finally:
        cloud.stop()


def _ask(drv, mode: str, text: str) -> tuple[list[tuple[str, str, str]], str]:
    """Send one message in `mode`; wait for its answer; return its token spans
    (class, data-origin, text) and its meta line."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    Select(drv.find_element(By.ID, "mode")).select_by_value(mode)
    n_before = len(drv.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    drv.find_element(By.ID, "prompt").send_keys(text)
    drv.find_element(By.ID, "send").click()
    wait = WebDriverWait(drv, 180)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) > n_before)
    msg = drv.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    wait.until(lambda d: msg.find_element(By.CSS_SELECTOR, ".meta").text)
    spans = [(s.get_attribute("class"), s.get_attribute("data-origin"), s.get_attribute("textContent"))
             for s in msg.find_elements(By.CSS_SELECTOR, ".body .tok")]
    return spans, msg.find_element(By.CSS_SELECTOR, ".meta").text


@pytest.mark.slow
def test_page_streams_tokens_coloured_by_origin(browser, edge, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(edge.base + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("fogline-edge-k20"))
    wait.until(lambda d: d.find_element(By.ID, "p-cloud").text == "connected")
    wait.until(lambda d: d.find_element(By.ID, "p-rtt").text.endswith(" ms"))
    mt = browser.find_element(By.ID, "max_tokens")
    mt.clear()
    mt.send_keys(str(N_TOKENS))

    spans, meta = _ask(browser, "spec", QUESTION)
    origins = [o for _, o, _ in spans]
    assert "draft" in origins and "cloud" in origins, spans  # verified drafts and the cloud's corrections
    assert set(origins) <= {"draft", "cloud"} and all(c == f"tok tok-{o}" for c, o, _ in spans)
    assert meta.startswith("mode spec") and "round trips" in meta
    # the page shows exactly what the API streams: spec is lossless, so it equals cloud mode greedy
    oa = openai.OpenAI(base_url=edge.v1, api_key="x", max_retries=0, timeout=180)
    ref = oa.chat.completions.create(model="any", messages=[{"role": "user", "content": QUESTION}],
                                     max_tokens=N_TOKENS, temperature=0, extra_body={"mode": "cloud"})
    assert "".join(t for _, _, t in spans) == ref.choices[0].message.content

    spans, meta = _ask(browser, "edge", "And of Italy?")
    assert spans and {o for _, o, _ in spans} == {"edge"} and meta.startswith("mode edge")
    def counts(d) -> tuple[int, ...] | None:
        text = d.find_element(By.ID, "p-tokens").text
        return None if text == "–" else tuple(int(x) for x in text.split(" / "))

    # the panel polls /metrics every 2 s: wait for a poll that saw the edge-mode answer
    wait.until(lambda d: (c := counts(d)) is not None and c[0] > 0)
    edge_n, draft_n, cloud_n = counts(browser)
    assert edge_n > 0 and draft_n > 0 and cloud_n > 0
    assert browser.find_element(By.ID, "p-fallbacks").text == "0"
    assert browser.find_element(By.ID, "p-share").text.endswith("%")
    shot = tmp_path / "chat-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors  # no script error, no failed load (CSP: everything from this origin)
