"""Make docs/serve.png: the serve page in headless chromium after a text query.

Usage (from the repository root, with the ``serve`` extra and Debian's chromium + chromium-driver),
with the arguments of ``python main.py serve``::

    PYTHONPATH=. python docs/serve_screenshot.py --config configs/demo.yaml \\
        --ckpt_path runs/demo/lightning_logs/version_0/checkpoints/last.ckpt \\
        --embeddings runs/demo/lightning_logs/version_1/embeddings.safetensors
"""

from __future__ import annotations

import argparse

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from lightning_modules.tools.serve import app_from_args
from tests.browser import chromium, running_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--query", default="A rising whistle repeated twice", help="text typed into the page")
    parser.add_argument("--output", default="docs/serve.png", help="PNG to write")
    options, serve_args = parser.parse_known_args()
    app, _ = app_from_args(serve_args)
    with running_server(app) as url, chromium() as browser:
        browser.get(url)
        WebDriverWait(browser, 30).until(lambda b: "clips" in b.find_element(By.ID, "info").text)
        browser.find_element(By.ID, "q").send_keys(options.query + "\n")
        WebDriverWait(browser, 30).until(lambda b: b.execute_script(
            "const a = [...document.querySelectorAll('tr.result audio')];"
            "return a.length > 0 && a.every(x => x.readyState >= 1);"))
        browser.find_element(By.ID, "q").click()  # close the caption suggestions
        browser.execute_script("document.activeElement.blur()")
        browser.save_screenshot(options.output)
    print(f"wrote {options.output}")


if __name__ == "__main__":
    main()
