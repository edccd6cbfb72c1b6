"""The web chat page at /, in headless Chromium driven by selenium: type a message, watch the answer stream in (with
its code block shown as code), press stop, and send a follow-up that carries the conversation.

The server runs the scripted tiny model of test_serve_tools (slowed down, so that there is a stream to stop), which
answers a prompt of a known length with a known text: the follow-up's answer comes out right only if the page sent
the whole conversation.
"""
import shutil
import tempfile
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the server tests use httpx: pip install -e '.[test]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="the page test needs selenium: pip install -e '.[test]'")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip("headless Chromium is not installed: apt-get install -y chromium chromium-driver (.ci/run does)",
                allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_serve_tools import ScriptedQwen  # noqa: E402

from nanoqwen import LLM  # noqa: E402
from nanoqwen.serve.app import BackgroundServer, create_app  # noqa: E402

SYSTEM = "You are a helpful assistant."  # the page's default system prompt
FIRST = "Here is the code:\n```python\nprint('hello')\n```\nAnd now a long explanation:" + " more" * 400
SECOND = "Second answer."


@pytest.fixture(scope="module")
def page_server(tiny_ckpt):
    llm = LLM(tiny_ckpt, device="cpu", dtype=torch.float32, num_kv_blocks=256, max_model_len=4096, progress=False)
    llm.model.__class__ = ScriptedQwen
    llm.model.delay = 0.03  # about 30 tokens/s: seconds of stream to watch and stop
    with BackgroundServer(create_app(llm, "tiny-page")) as url:
        def script(messages, text):
            r = httpx.post(f"{url}/tokenize", json={"messages": messages}, timeout=30)
            llm.model.script = (r.json()["count"], llm.tokenizer.encode(text, allowed_special=set()))

        yield url, script


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="nanoqwen-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def last(driver, selector: str) -> str | None:
    """innerText of the last element matching selector, read in one go (the page re-renders an answer as it grows,
    so an element found first and read later may be gone)."""
    return driver.execute_script("const e = document.querySelectorAll(arguments[0]);"
                                 "return e.length ? e[e.length - 1].innerText : null;", selector)


def running(url) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith("nanoqwen_num_requests_running")))


def test_page_streams_stops_and_keeps_the_conversation(page_server, browser):
    url, script = page_server
    wait = WebDriverWait(browser, 30)
    browser.get(url)
    wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny-page")

    script([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Show me code"}], FIRST)
    browser.find_element(By.ID, "input").send_keys("Show me code")
    browser.find_element(By.ID, "send").click()
    answer = lambda d: last(d, ".msg.assistant .body")  # noqa: E731
    wait.until(lambda d: last(d, ".msg.assistant pre code") == "print('hello')")  # the fenced block, shown as code
    assert last(browser, ".msg.assistant pre .lang") == "python"
    seen = len(answer(browser))
    wait.until(lambda d: len(answer(d)) > seen + 10)  # still streaming in
    assert browser.find_element(By.ID, "send").get_attribute("disabled")

    browser.find_element(By.ID, "stop").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text == "stopped")
    stopped = answer(browser)
    assert last(browser, ".msg.assistant .note") == "(stopped)"
    assert len(stopped) < len(FIRST)
    deadline = time.monotonic() + 2  # the server aborted the request
    while running(url) != 0:
        assert time.monotonic() < deadline, "the request still runs 2 s after stop"
        time.sleep(0.05)
    time.sleep(0.3)
    assert answer(browser) == stopped

    # the follow-up carries the whole conversation, the stopped answer included
    conversation = browser.execute_script("return conversation")
    assert [m["role"] for m in conversation] == ["user", "assistant"]
    assert FIRST.startswith(conversation[1]["content"]) and conversation[1]["content"]
    script([{"role": "system", "content": SYSTEM}, *conversation, {"role": "user", "content": "Thanks"}], SECOND)
    browser.find_element(By.ID, "input").send_keys("Thanks")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text == "ready")
    assert answer(browser) == SECOND
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 4
