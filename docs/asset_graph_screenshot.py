"""Screenshot of the Dagster UI's global asset lineage: ``docs/asset-graph.png``.

    .venv/bin/python docs/asset_graph_screenshot.py [--dagster-home DIR] [--out PNG]

Starts ``dagster_webserver`` on a free 127.0.0.1 port against an instance (default
``<repo>/.dagster_home``, where ``make demo`` leaves its run), waits until the code location has
loaded, has headless Chromium render the lineage view with every asset group expanded, and stops
the server. Needs a ``chromium`` binary (Debian: ``apt-get install chromium``).
:func:`webserver` is also how ``tests/dagster/test_webserver.py`` starts the UI.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
# The page is opened as ui.localhost (Chromium resolves *.localhost to loopback itself): the UI
# shows its "join the community" dialog only on http://127.0.0.1 and http://localhost origins.
BROWSER_HOST = "ui.localhost"
# Wide enough that the graph is drawn above the UI's minimal-zoom threshold (0.6): full asset
# nodes with latest materialisation, checks and partitions instead of bare names.
WINDOW = (2400, 1000)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")

WORKSPACE_QUERY = """{ workspaceOrError { __typename ... on PythonError { message }
  ... on Workspace { locationEntries { name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def graphql(base_url: str, query: str, timeout: float = 60.0) -> dict:
    """POST ``query`` to the webserver's GraphQL endpoint; its ``data``, or an error with the messages."""
    request = urllib.request.Request(
        f"{base_url}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = json.load(response)
    if body.get("errors"):
        raise RuntimeError(f"GraphQL errors: {[error['message'] for error in body['errors']]}")
    return body["data"]


def _tail(log: IO[bytes], chars: int = 4000) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-chars:]


def _wait_until_loaded(process: subprocess.Popen, base_url: str, log: IO[bytes], deadline: float) -> None:
    """Until ``/server_info`` answers and every code location has loaded; raise with the server's log
    tail when the process dies, a location fails to load, or ``deadline`` passes."""

    def fail(why: str) -> NoReturn:
        raise RuntimeError(f"dagster-webserver {why}; its log ends with:\n{_tail(log)}")

    while True:
        if process.poll() is not None:
            fail(f"exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{base_url}/server_info", timeout=5):
                pass
            workspace = graphql(base_url, WORKSPACE_QUERY)["workspaceOrError"]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            workspace = None  # not listening yet
        if workspace is not None:
            if workspace["__typename"] == "PythonError":
                fail(f"could not load the workspace: {workspace['message']}")
            entries = workspace["locationEntries"]
            for entry in entries:
                if (entry["locationOrLoadError"] or {}).get("__typename") == "PythonError":
                    fail(f"could not load code location {entry['name']}: {entry['locationOrLoadError']['message']}")
            if entries and all(entry["loadStatus"] == "LOADED" for entry in entries):
                return
        if time.monotonic() > deadline:
            fail("did not come up in time")
        time.sleep(1.0)


@dataclass
class Server:
    """A running webserver: its process (the leader of its own process group) and address."""

    process: subprocess.Popen
    url: str


def _stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM to the server's process group (webserver and code server); SIGKILL to whatever of
    the group is still alive after ``grace`` seconds."""

    def group_alive() -> bool:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (process.poll() is None or group_alive()) and time.monotonic() < deadline:
        time.sleep(0.2)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextmanager
def webserver(dagster_home: Path, env: dict[str, str] | None = None, timeout: float = 120.0) -> Iterator[Server]:
    """``python -m dagster_webserver -h 127.0.0.1 -p <free port> -w workspace.yaml`` in the repo root
    against ``dagster_home``, in its own process group; yields once every code location has loaded,
    terminates the whole group on exit."""
    port = free_port()
    command = [sys.executable, "-m", "dagster_webserver", "-h", HOST, "-p", str(port), "-w", "workspace.yaml"]
    environment = {**os.environ, **(env or {}), "DAGSTER_HOME": str(dagster_home)}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        server = Server(process, f"http://{HOST}:{port}")
        try:
            _wait_until_loaded(process, server.url, log, time.monotonic() + timeout)
            yield server
        finally:
            _stop(process)


def lineage_path(base_url: str) -> str:
    """The global asset lineage page with every asset group expanded (the UI collapses groups
    when there are several; ``expanded`` takes its ``global@global:<group>`` ids)."""
    nodes = graphql(base_url, "{ assetNodes { groupName } }")["assetNodes"]
    groups = sorted({node["groupName"] for node in nodes})
    return "/asset-groups?expanded=" + ",".join(f"global@global:{group}" for group in groups)


def find_chromium() -> str:
    """The path of a Chromium/Chrome binary, or a clear error saying how to get one."""
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    raise SystemExit(
        "no Chromium found (looked for " + ", ".join(CHROMIUM_NAMES) + "): on Debian `apt-get install chromium`"
    )


def screenshot(chromium: str, url: str, out: Path, window: tuple[int, int] = WINDOW) -> None:
    """Headless Chromium renders ``url`` (20 s of virtual time for the UI's queries and layout) into ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--window-size={window[0]},{window[1]}",
            "--hide-scrollbars",
            "--virtual-time-budget=20000",
            f"--screenshot={out}",
            url,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if not out.is_file() or out.stat().st_size == 0:
        raise SystemExit(f"chromium wrote no screenshot (exit {done.returncode}):\n{done.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dagster-home",
        type=Path,
        default=REPO_ROOT / ".dagster_home",
        help="the Dagster instance to show (default: <repo>/.dagster_home, where `make demo` runs)",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "asset-graph.png")
    parser.add_argument(
        "--chromium",
        default=None,
        help="Chromium binary (default: the first of {} on PATH)".format(", ".join(CHROMIUM_NAMES)),
    )
    args = parser.parse_args(argv)
    home = args.dagster_home.resolve()
    if not (home / "dagster.yaml").is_file():
        raise SystemExit(f"no Dagster instance at {home} (no dagster.yaml): run `make demo` first")
    chromium = args.chromium or find_chromium()
    with webserver(home) as server:
        path = lineage_path(server.url)
        screenshot(chromium, server.url.replace(HOST, BROWSER_HOST) + path, args.out.resolve())
    print(f"{args.out}: {path} of the UI on DAGSTER_HOME={home}")


if __name__ == "__main__":
    main()
