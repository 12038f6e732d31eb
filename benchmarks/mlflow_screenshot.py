"""A screenshot of the MLflow UI showing a tracked run, for the README's "Experiment tracking".

    python -m ray_fedat.train --dataset digits --track mlflow      # writes ./mlruns
    python benchmarks/mlflow_screenshot.py [--store mlruns] [--out docs]

Starts `mlflow ui --backend-store-uri sqlite:///<store>/mlflow.db` on a free port (as the
README says to, but not on 5000), finds the newest finished run of the experiment (default
ray_fedat), prints what the store holds for it (params, the headline, the metric histories),
and saves with headless Chromium (benchmarks/dashboard_screenshot.py's DevTools driver):

    <out>/mlflow-run.png          the run's page: its params and metrics
    <out>/mlflow-run-charts.png   the run's model-metrics tab: the per-round curves

Needs Chromium (Debian: `apt-get install chromium`; or --chromium PATH).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from dashboard_screenshot import Chromium  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Closes the MLflow Assistant side panel (MLflow 3.x opens it beside a run): the last button of its header.
CLOSE_ASSISTANT = """(() => {
  const title = [...document.querySelectorAll('*')].find(e => e.childElementCount === 0 &&
                                                             e.textContent.trim() === 'MLflow Assistant');
  for (let p = title; p; p = p.parentElement) {
    const buttons = p.querySelectorAll('button');
    if (buttons.length >= 3) { buttons[buttons.length - 1].click(); return true; }
  }
  return false;
})()"""


async def take(chromium: Chromium, url: str, run, out: str) -> None:
    await chromium.session()
    try:
        await chromium.call("Page.enable")
        page = f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        await chromium.shot(page, os.path.join(out, "mlflow-run.png"), 4, wait_for_text="robust_apgd_ce_t",
                            then=CLOSE_ASSISTANT, then_text="Parameters")
        # The charts draw a while after their titles appear.
        await chromium.shot(f"{page}/model-metrics", os.path.join(out, "mlflow-run-charts.png"), 30,
                            wait_for_text="yardstick_acc", then=CLOSE_ASSISTANT)
    finally:
        await chromium.ws.close()
        await chromium.http.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="mlruns", help="the --track-uri directory of the run (default ./mlruns)")
    p.add_argument("--experiment", default="ray_fedat")
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs"), help="folder for the PNG files")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser")
                   or shutil.which("google-chrome"), help="Chromium binary")
    p.add_argument("--size", default="1500x2300", help="browser window WIDTHxHEIGHT")
    args = p.parse_args()
    if not args.chromium:
        raise SystemExit("mlflow_screenshot: no Chromium found (apt-get install chromium, or --chromium PATH)")
    import mlflow
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{os.path.abspath(os.path.join(args.store, 'mlflow.db'))}"
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=[args.experiment], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], output_format="list", max_results=1)
    if not runs:
        raise SystemExit(f"mlflow_screenshot: no finished run in experiment {args.experiment} of {store}")
    run = runs[0]
    client = MlflowClient(store)
    print(f"mlflow_screenshot: run {run.info.run_name} ({run.info.run_id}), {len(run.data.params)} params, "
          f"headline {run.data.tags.get('headline')}")
    for key in ("val/natural_acc", "val/yardstick_acc", "test/natural_acc", "test/yardstick_acc"):
        print(f"  {key}: " + ", ".join(f"{m.step}:{m.value:.3f}" for m in client.get_metric_history(run.info.run_id, key)))
    os.makedirs(args.out, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
                           "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    chromium = None
    try:
        deadline = time.time() + 900
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                if ui.poll() is not None or time.time() > deadline:
                    raise SystemExit("mlflow_screenshot: mlflow ui did not start")
                time.sleep(1)
        width, height = map(int, args.size.split("x"))
        chromium = Chromium(args.chromium, width, height)
        asyncio.run(take(chromium, url, run, args.out))
    finally:
        if chromium is not None:
            chromium.close()
        os.killpg(ui.pid, 15)
        ui.wait(timeout=60)


if __name__ == "__main__":
    main()
