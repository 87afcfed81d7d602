"""A headless Chromium driven over the DevTools protocol, for the browser check of TensorBoard
(``tests/test_browser.py``): load a page, read its text and images through the shadow roots of
TensorBoard's web components, take a screenshot."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

# the page's text (shadow roots included), its loaded images' sizes, and its chart lines
READ_PAGE = """(() => {
  const text = [], images = [], lines = [];
  const walk = (node) => {
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.childNodes) {
      if (child.nodeType === Node.TEXT_NODE) { text.push(child.textContent); continue; }
      if (child.nodeType !== Node.ELEMENT_NODE) continue;
      if (child.tagName === 'IMG' && child.complete && child.naturalWidth > 0)
        images.push([child.naturalWidth, child.getBoundingClientRect().width]);
      if (child.tagName === 'path' && (child.getAttribute('class') || '').includes('line')) lines.push(1);
      walk(child);
    }
  };
  walk(document.body);
  return JSON.stringify({text: text.join(' ').replace(/\\s+/g, ' '), images, lines: lines.length});
})()"""


def chromium() -> str | None:
    return next((found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))),
                None)


class Browser:
    """``with Browser(profile_dir) as browser: browser.open(url); browser.read()``."""

    def __init__(self, profile: Path, size: tuple[int, int] = (1400, 1000)):
        import websocket

        self.process = subprocess.Popen(
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = self.process.stderr.readline()
            found = re.search(r"DevTools listening on ws://[\d.]+:(\d+)/", line)
            port = int(found.group(1)) if found else None
        if port is None:
            self.close()
            raise RuntimeError("chromium did not open its DevTools port")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.loads(response.read()) if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.calls = 0

    def call(self, method: str, **params) -> dict:
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.calls:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def read(self) -> dict:
        result = self.call("Runtime.evaluate", expression=READ_PAGE, returnByValue=True)
        if "value" not in result.get("result", {}):  # the page is still loading (no body yet)
            return {"text": "", "images": [], "lines": 0, "error": result}
        return json.loads(result["result"]["value"])

    def wait_for(self, ready, timeout: float = 60) -> dict:
        """Read the page until ``ready(page)`` holds (or the time is up); the last reading."""
        deadline = time.monotonic() + timeout
        while True:
            page = self.read()
            if ready(page) or time.monotonic() > deadline:
                return page
            time.sleep(0.5)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
