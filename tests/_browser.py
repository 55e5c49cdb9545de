"""The web demo in a real headless browser (Debian's chromium, driven by selenium): start
`python -m blspkd_jax.serve` on a free port, upload a WAV, press Answer and read the answer and
the timing from the page. Also a command, for README's screenshot:

    .venv/bin/python tests/_browser.py --workdir DIR --wav FILE --out docs/images/web_demo.png
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(workdir, *args: str, timeout: float = 600):
    """A running `python -m blspkd_jax.serve --workdir workdir *args`; yields its URL."""
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", JAX_PLATFORMS="cpu")
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "blspkd_jax.serve", "--workdir", str(workdir),
           "--port", str(port), *args]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        start = time.monotonic()
        while True:  # the server compiles everything before it listens
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() - start > timeout:
                    msg = f"serve did not start in {timeout} s:\n{log.read_text()}"
                    raise TimeoutError(msg) from None
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1250",
    ):
        options.add_argument(a)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def answer(driver, url: str, wav, *, timeout: float = 300, screenshot=None) -> tuple[str, str]:
    """Upload `wav` on the page at `url`, press Answer; (the response, the timing line) once the
    timing line is there (or, for audio it cannot use, the message in the response box)."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    start = time.monotonic()
    while not driver.find_elements(By.CSS_SELECTOR, "input[type=file]"):
        if time.monotonic() - start > 60:
            raise TimeoutError("the page has no upload field")
        time.sleep(0.2)
    driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(wav))
    time.sleep(1.5)  # the upload reaches the server
    driver.find_element(By.ID, "answer").click()
    box = lambda: driver.find_element(By.CSS_SELECTOR, "#response textarea").get_attribute("value")  # noqa: E731
    while True:
        timing = driver.find_element(By.ID, "timing").text
        if "after the end of speech" in timing or box().startswith(("Could not", "The audio")):
            break
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"no answer in {timeout} s; the page says {box()!r}")
        time.sleep(0.3)
    time.sleep(0.5)
    if screenshot:
        driver.save_screenshot(str(screenshot))
    return box(), timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--wav", required=True)
    ap.add_argument("--out", required=True, help="PNG screenshot")
    ap.add_argument("--instruction", action="append", default=None)
    args = ap.parse_args()
    extra = [a for i in args.instruction or () for a in ("--instruction", i)]
    with serve(args.workdir, *extra) as url, browser() as driver:
        print(answer(driver, url, Path(args.wav).resolve(), screenshot=args.out))


if __name__ == "__main__":
    main()
