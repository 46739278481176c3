"""`make lab` opens JupyterLab on the notebooks: it starts headless, serves them, and stops cleanly."""
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", token: str | None = None):
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"token {token}"} if token else {})
    return urllib.request.urlopen(req, timeout=5)


def test_jupyterlab_serves_the_notebooks_and_shuts_down(tmp_path):
    pytest.importorskip("jupyterlab")
    port, token = _free_port(), secrets.token_hex(16)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={REPO}",
         "--ServerApp.open_browser=False"] + (["--allow-root"] if os.geteuid() == 0 else []),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path)})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with _request(f"{base}/api/status", token=token) as r:
                    assert r.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("JupyterLab did not start within 60 s")
                time.sleep(0.5)
        # Without the token the API refuses; with it, the first notebook is served.
        with pytest.raises(urllib.error.HTTPError) as err:
            _request(f"{base}/api/contents/notebooks/00_setup.ipynb")
        assert err.value.code == 403
        with _request(f"{base}/api/contents/notebooks/00_setup.ipynb", token=token) as r:
            assert r.status == 200
            model = json.load(r)
        assert model["type"] == "notebook" and model["content"]["cells"]
        with _request(f"{base}/lab", token=token) as r:
            assert r.status == 200
        with _request(f"{base}/api/shutdown", method="POST", token=token) as r:
            assert r.status in (200, 204)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
