"""The chat page in a real browser: Debian's headless Chromium, driven through chromedriver by
selenium, against a live server whose model (GLM-Z1's template) is steered to think, then answer
slowly enough that the page shows the answer growing. Saves a screenshot."""
from __future__ import annotations

import os
import shutil
import time

import pytest

import glmrt
from serving import live_server
from steer import Script

REASONING = "The user asks for 2+2.\nTwo and two make four."
ANSWER = "The answer is 4, as two and two make four."
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,860"]


def browser_paths():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    why = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; .ci/run installs them, so CI must have them")
    pytest.skip(why)


class SlowScript(Script):
    def __call__(self, ids, logits):
        time.sleep(0.03)                    # ~30 ms a token: the answer visibly grows
        return super().__call__(ids, logits)


@pytest.fixture()
def browser(tmp_path):
    chromium, driver_path = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def test_chat_page_streams_an_answer_with_folded_reasoning(exported, browser, tmp_path):
    from selenium.webdriver.common.by import By
    m = glmrt.load(exported("z1"))
    scripts = []

    def steer(body):
        scripts.append(SlowScript(m.tokenizer, lambda p: f"{REASONING}</think>\n{ANSWER}<|user|>"))
        return scripts[-1]
    with live_server(m, model_name="glm-z1-tiny", logits_processor_for=steer) as url:
        browser.get(url + "/")
        wait(lambda: "glm-z1-tiny" in browser.find_element(By.ID, "model").text, "the model's name")
        browser.find_element(By.ID, "system").send_keys("Be brief.")
        browser.find_element(By.ID, "prompt").send_keys("What is 2+2?")
        browser.find_element(By.ID, "send").click()

        seen = set()                        # the answer's text as the page showed it over time

        def finished():
            views = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")
            if views:
                seen.add(views[-1].text)
            return bool(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']"))
        wait(finished, "the answer to finish", poll=0.02)
        answer = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")[-1].text
        assert answer == ANSWER
        partial = {s for s in seen if s and s != ANSWER}
        assert partial and all(ANSWER.startswith(s) for s in partial), f"not streamed: {seen}"
        folded = browser.find_element(By.CSS_SELECTOR, ".msg.assistant details.reasoning")
        assert folded.get_attribute("open") is None                          # folded
        assert browser.execute_script("return arguments[0].querySelector('.text').textContent", folded) == REASONING
        assert "Be brief." in scripts[0].prompts[0] and "What is 2+2?" in scripts[0].prompts[0]

        # a second question: the conversation (question and answer, not the reasoning) goes along
        browser.find_element(By.ID, "prompt").send_keys("And 3+3?")
        browser.find_element(By.ID, "send").click()
        wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']")) == 2,
             "the second answer")
        second = scripts[1].prompts[0]
        assert "What is 2+2?" in second and ANSWER in second and "And 3+3?" in second
        assert "The user asks" not in second                     # history keeps only the answer
        shot = tmp_path / "chat-page.png"
        browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")


def wait(condition, what: str, timeout: float = 30, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def test_chat_page_shows_a_tool_call_and_sends_its_result_back(exported, browser):
    import json

    from selenium.webdriver.common.by import By
    m = glmrt.load(exported("tiny"))
    scripts = []
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}

    def reply(prompt):
        if "<|observation|>" not in prompt:
            return 'get_weather\n{"city": "Paris"}<|observation|>'
        return "\nIt is 20C in Paris.<|user|>"

    def steer(body):
        scripts.append(Script(m.tokenizer, reply))
        return scripts[-1]
    with live_server(m, model_name="tiny", logits_processor_for=steer) as url:
        browser.get(url + "/")
        wait(lambda: "tiny" in browser.find_element(By.ID, "model").text, "the model's name")
        browser.find_element(By.ID, "tools").send_keys(json.dumps([weather]))
        browser.find_element(By.ID, "prompt").send_keys("Weather in Paris?")
        browser.find_element(By.ID, "send").click()
        wait(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1'] .call"), "the call")
        call = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .call")
        assert call.text.startswith('tool call get_weather {"city": "Paris"}')
        assert "## get_weather" in scripts[0].prompts[0]            # the tools field went to the model
        call.find_element(By.TAG_NAME, "textarea").send_keys('{"t": 20}')
        browser.find_element(By.XPATH, "//button[text()='Send results']").click()
        wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']")) == 2,
             "the answer after the result")
        answer = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")[-1].text
        assert answer == "It is 20C in Paris."
        assert scripts[1].prompts[0].endswith(
            '<|assistant|>get_weather \n{"city": "Paris"}<|observation|>\n{"t": 20}<|assistant|>')
