"""Screenshots of the Ray dashboard during a real run, for the README's "Watching" section.

    python benchmarks/dashboard_screenshot.py [--out docs] [--rounds 40]

Starts `python -m ray_fedat.train --dataset digits --dashboard` (its own local Ray, token
authentication on, a fresh random token), waits until Ray Train's state API says the run
is RUNNING and a few rounds are done, then drives headless Chromium through the Chrome
DevTools protocol (the token goes in as the dashboard's login cookie, as the login page
would set it) and saves:

    <out>/dashboard.png             the Jobs page: the run's job, named after the run
    <out>/dashboard-actors.png      the Actors page: Ray Train's controller and the two workers
    <out>/dashboard-worker-log.png  the rank-0 RayTrainWorker's page: its per-round log lines
    <out>/dashboard-page-*.png      with --all-pages: Overview, Cluster, Metrics, #/train, Logs, the job's page

Two local Rays on one machine share the dashboard agent's default port 52365: the second
one's agent runs without its HTTP service and its dashboard cannot load logs ("Failed to
load"). So the script waits until no other Ray holds that port.

Needs Chromium (Debian: `apt-get install chromium`; or --chromium PATH). It prints what it
saw (run status, workers, rounds done) so the pictures can be checked against it.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ray_fedat.monitoring import TRAIN_RUNS_API  # noqa: E402

TOKEN_COOKIE = "ray-authentication-token"  # what the dashboard's login page sets
AGENT_PORT = 52365  # Ray's default dashboard agent port (ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT)


def get_json(url: str, token: str):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


class CLI:
    """The training run, its console collected in a thread."""

    def __init__(self, args, token: str, storage: str):
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
               "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ray_fedat.train", "--dataset", "digits", "--workers", "2", "--rounds",
             str(args.rounds), "--dashboard", "--storage-path", storage, "--name", args.name],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        self.lines = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            print("  |", line, end="", flush=True)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            for line in self.lines:
                m = re.search(pattern, line)
                if m:
                    return m
            time.sleep(0.3)
        raise SystemExit(f"dashboard_screenshot: the run never printed {pattern!r}")


class Chromium:
    """Headless Chromium with its DevTools port; one page driven over a websocket."""

    def __init__(self, binary: str, width: int, height: int):
        self.profile = tempfile.mkdtemp(prefix="rf-chromium-")
        flags = ["--headless=new", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                 f"--window-size={width},{height}", "--hide-scrollbars", "--no-first-run",
                 "--disable-gpu", "--disable-dev-shm-usage", "about:blank"]
        if os.geteuid() == 0:  # Chromium refuses to run as root with its sandbox
            flags.insert(0, "--no-sandbox")
        self.proc = subprocess.Popen([binary, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.time() + 60
        while not os.path.exists(port_file) or not open(port_file).read().strip():
            if time.time() > deadline or self.proc.poll() is not None:
                raise SystemExit("dashboard_screenshot: Chromium did not start")
            time.sleep(0.2)
        self.port = int(open(port_file).read().split()[0])
        self.next_id = 0

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    async def session(self):
        import aiohttp

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as response:
            page = next(t for t in json.loads(response.read()) if t["type"] == "page")
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self.ws.receive_json(), timeout=60)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def wait_for_text(self, text: str, timeout: float = 60) -> None:
        """The pages fetch their data after the HTML: wait until `text` is on the page."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in (await self.evaluate("document.body.innerText") or ""):
                return
            await asyncio.sleep(0.5)
        print(f"dashboard_screenshot: warning: {text!r} never appeared on the page")

    async def shot(self, url: str, path: str, settle_s: float, wait_for_text: str = "", then: str = "",
                   then_text: str = "", full_height: int = 0) -> None:
        """Open `url`, wait for `wait_for_text`, run the JavaScript `then` (a click, a
        scroll) and wait for `then_text`, then save a PNG (up to `full_height` px tall)."""
        await self.call("Page.navigate", url=url)
        if wait_for_text:
            await self.wait_for_text(wait_for_text)
        if then:
            await self.evaluate(then)
            if then_text:
                await self.wait_for_text(then_text)
        await asyncio.sleep(settle_s)
        params = {"format": "png"}
        if full_height:
            width = await self.evaluate("document.documentElement.clientWidth")
            height = min(full_height, await self.evaluate("document.documentElement.scrollHeight"))
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
        data = await self.call("Page.captureScreenshot", **params)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data["data"]))
        print(f"dashboard_screenshot: wrote {path} ({os.path.getsize(path) // 1024} KiB) from {url}")


async def take_screenshots(chromium: Chromium, dashboard: str, token: str, run: dict, out: str, name: str,
                           all_pages: bool):
    await chromium.session()
    try:
        await chromium.call("Network.enable")
        await chromium.call("Page.enable")
        await chromium.call("Network.setCookie", name=TOKEN_COOKIE, value=token, url=dashboard)
        rank0 = next(w for w in run["attempts"][-1]["workers"] if w["world_rank"] == 0)
        await chromium.shot(f"{dashboard}/#/jobs", os.path.join(out, "dashboard.png"), 3, wait_for_text=name)
        await chromium.shot(f"{dashboard}/#/actors", os.path.join(out, "dashboard-actors.png"), 3,
                            wait_for_text="RayTrainWorker")
        # The actor's page opens its STDERR tab (Ray Train's own messages); our lines are on STDOUT.
        show_stdout = ("[...document.querySelectorAll('button,[role=tab]')].find(e => e.innerText.trim() === 'STDOUT')"
                       ".click()")
        await chromium.shot(f"{dashboard}/#/actors/{rank0['actor_id']}", os.path.join(out, "dashboard-worker-log.png"),
                            3, wait_for_text="RayTrainWorker", then=show_stdout, then_text="[rank 0 @", full_height=1300)
        if all_pages:  # the other pages, to check what the README says about them
            pages = (("overview", "Cluster"), ("cluster", "Node"), ("metrics", "Metrics"), ("train", ""), ("logs", "Node"),
                     (f"jobs/{run['job_id']}", "RUNNING"))
            for page, text in pages:
                await chromium.shot(f"{dashboard}/#/{page}", os.path.join(out, f"dashboard-page-{page.split('/')[0]}.png"), 5,
                                    wait_for_text=text, full_height=1600)
    finally:
        await chromium.ws.close()
        await chromium.http.close()


def wait_for_free_agent_port(timeout: float) -> None:
    """Wait until no other Ray's dashboard agent holds AGENT_PORT (see the docstring)."""
    import socket

    deadline = time.time() + timeout
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", AGENT_PORT))
                return
            except OSError:
                pass
        if time.time() > deadline:
            raise SystemExit(f"dashboard_screenshot: another Ray holds port {AGENT_PORT} (its dashboard agent); "
                             "the run's dashboard could not show logs. Stop it and try again")
        time.sleep(2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "docs"), help="folder for the PNG files")
    p.add_argument("--rounds", type=int, default=40, help="rounds of the digits run (enough to outlast the pictures)")
    p.add_argument("--after-rounds", type=int, default=4, help="take the pictures once this many rounds are done")
    p.add_argument("--name", default="digits-watch-demo", help="run name")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser")
                   or shutil.which("google-chrome"), help="Chromium binary")
    p.add_argument("--size", default="1400x900", help="browser window WIDTHxHEIGHT")
    p.add_argument("--wait-s", type=float, default=600, help="how long to wait for another Ray to free port 52365")
    p.add_argument("--all-pages", action="store_true",
                   help="also save the Overview, Cluster, Metrics, #/train, Logs and job pages (dashboard-page-*.png)")
    args = p.parse_args()
    if not args.chromium:
        raise SystemExit("dashboard_screenshot: no Chromium found (apt-get install chromium, or --chromium PATH)")
    os.makedirs(args.out, exist_ok=True)
    width, height = map(int, args.size.split("x"))
    wait_for_free_agent_port(args.wait_s)
    token = secrets.token_hex(32)
    storage = tempfile.mkdtemp(prefix="rf-watch-")
    cli = CLI(args, token, storage)
    chromium = None
    try:
        dashboard = cli.wait_for(r"ray_fedat: dashboard (http://\S+)", 300).group(1)
        run, deadline = None, time.time() + 300
        while time.time() < deadline and cli.proc.poll() is None:
            try:
                runs = [r for r in get_json(dashboard + TRAIN_RUNS_API, token)["train_runs"] if r["name"] == args.name]
            except OSError:
                runs = []
            done = sum(ln.startswith("round ") for ln in cli.lines)
            if runs and runs[0]["status"] == "RUNNING" and done >= args.after_rounds:
                run = runs[0]
                break
            time.sleep(1)
        if run is None:
            raise SystemExit("dashboard_screenshot: the run did not reach the wanted round while running")
        print(f"dashboard_screenshot: Train API says {run['name']} is {run['status']}, job {run['job_id']}, workers "
              + ", ".join(f"rank {w['world_rank']} on {w['node_ip']} (pid {w['pid']})"
                          for w in run["attempts"][-1]["workers"])
              + f"; {sum(ln.startswith('round ') for ln in cli.lines)} rounds done")
        chromium = Chromium(args.chromium, width, height)
        asyncio.run(take_screenshots(chromium, dashboard, token, run, args.out, args.name, args.all_pages))
    finally:
        if chromium is not None:
            chromium.close()
        if cli.proc.poll() is None:
            cli.proc.send_signal(signal.SIGINT)  # Ctrl-C: the run stops cleanly, its Ray with it
            try:
                cli.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                cli.proc.kill()
        shutil.rmtree(storage, ignore_errors=True)


if __name__ == "__main__":
    main()
