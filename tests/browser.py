"""Headless Chromium (the Debian `chromium` package) driven over the DevTools protocol, through
aiohttp's websocket (which Ray installs): what the page tests and bench/pictures.py use to open a page,
run JavaScript in it, wait for what it draws and take a screenshot."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("no headless Chromium found: apt-get install -y chromium")


def free_port() -> int:
    """A free TCP port on 127.0.0.1: the browser's DevTools, the suite's servers (Ray, moto, MLflow, Serve), the benches'."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    """One page of a headless Chromium started for it; `with Page(width, height) as page: ...`."""

    def __init__(self, width: int = 1000, height: int = 800) -> None:
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="oneforce-chromium-")
        self.port = free_port()
        self.process = subprocess.Popen(
            # No background networking: the machines this runs on reach no outside host, and each refused
            # connection (updates, sync, QUIC) is noise at best.
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage",
             "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={self.profile}", f"--remote-debugging-port={self.port}", f"--window-size={width},{height}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.loop = asyncio.new_event_loop()
        self.http = self.ws = None
        self.counter = 0

    def __enter__(self) -> Page:
        self.loop.run_until_complete(self._connect())
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1, mobile=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.ws is not None:
            self.loop.run_until_complete(self.ws.close())
        if self.http is not None:
            self.loop.run_until_complete(self.http.close())
        self.loop.close()
        os.killpg(self.process.pid, signal.SIGTERM)  # the browser and its helper processes
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def _connect(self) -> None:
        import aiohttp

        self.http = aiohttp.ClientSession()
        deadline = time.time() + 60
        while True:
            try:
                async with self.http.get(f"http://127.0.0.1:{self.port}/json/list") as reply:
                    pages = [t for t in await reply.json() if t["type"] == "page"]
                if pages:
                    break
            except aiohttp.ClientError:
                pass
            if time.time() > deadline or self.process.poll() is not None:
                raise RuntimeError("headless Chromium did not open a page")
            await asyncio.sleep(0.5)
        self.ws = await self.http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.counter += 1
        await self.ws.send_json({"id": self.counter, "method": method, "params": params})
        async for message in self.ws:
            reply = message.json()
            if reply.get("id") == self.counter:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
        raise RuntimeError(f"{method}: the browser closed the connection")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.loop.run_until_complete(self._call(method, params))

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, poll: float = 0.25) -> Any:
        """Evaluate until the value is truthy; returns it."""
        deadline = time.time() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.time() > deadline:
                return value
            time.sleep(poll)

    def screenshot(self, out: Path) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return out
