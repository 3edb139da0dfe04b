"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol: open a page, run JavaScript in it,
wait for a condition, take a screenshot."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
from PIL import Image

CHROMIUM = "chromium"


def chromium_missing() -> str | None:
    """Why headless Chromium cannot run here (``make system-deps`` installs it as root), or None."""
    return None if shutil.which(CHROMIUM) else "Chromium not installed: apt-get install chromium"


class Browser:
    """One headless Chromium with its own profile in ``folder``; a context manager that stops it on exit."""

    def __init__(self, folder: Path, width: int = 1280, height: int = 800) -> None:
        profile = folder / "chromium-profile"
        (profile / "DevToolsActivePort").unlink(missing_ok=True)  # Chromium writes its port there once it listens
        cmd = [
            CHROMIUM, "--headless=new", "--no-sandbox", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--disable-dev-shm-usage",
            "--use-angle=swiftshader", "--enable-unsafe-swiftshader",  # WebGL without a GPU
            f"--window-size={width},{height}", f"--user-data-dir={profile}", "--remote-debugging-port=0",
            "about:blank",
        ]  # fmt: skip
        self.log = folder / "chromium.log"
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.loop = asyncio.new_event_loop()
        self._ids = itertools.count(1)
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            self.endpoint = f"http://127.0.0.1:{self._port(profile / 'DevToolsActivePort')}"
            self._run(self._connect())
        except BaseException:
            self.close()
            raise

    def _port(self, port_file: Path, timeout: float = 60) -> int:
        end = time.time() + timeout
        while time.time() < end and self.process.poll() is None:
            if port_file.is_file() and port_file.read_text().strip():
                return int(port_file.read_text().split()[0])
            time.sleep(0.2)
        raise RuntimeError(f"Chromium did not start:\n{self.log.read_text()[-3000:]}")

    def _run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    async def _connect(self) -> None:
        page = next(t for t in httpx.get(f"{self.endpoint}/json/list").json() if t["type"] == "page")
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def _call(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        call_id = next(self._ids)
        await self.ws.send_json({"id": call_id, "method": method, "params": params or {}})
        while True:
            message = await self.ws.receive_json(timeout=timeout)
            if message.get("id") == call_id:  # events (of the domains enabled) go unread
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def call(self, method: str, **params: Any) -> dict:
        """One DevTools protocol command on the page; its result."""
        return self._run(self._call(method, params))

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, poll: float = 0.5) -> Any:
        """Poll a JavaScript expression until it is truthy; its value, or :class:`TimeoutError`."""
        end = time.time() + timeout
        while time.time() < end:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"not true after {timeout} s: {expression}")

    def screenshot(self) -> np.ndarray:
        """The page as an RGB array (rows, columns, 3)."""
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def close(self) -> None:
        if self.ws is not None:
            self._run(self.ws.close())
        if self.session is not None:
            self._run(self.session.close())
        self.loop.close()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the browser and its renderer, GPU and zygote processes
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
