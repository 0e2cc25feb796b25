"""Helpers of the TorchServe tests: a TorchServe process on loopback and its HTTP answers."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from serving_helpers import free_port

VENV_BIN = Path(sys.executable).parent
TORCHSERVE = VENV_BIN / "torchserve"
REPO = Path(__file__).resolve().parents[2]
MODELS = ("default-embedding", "default-classifier")
ARCHIVES: tuple[tuple[str, str], ...] = tuple(
    (name, variant) for variant in ("torch", "onnx") for name in MODELS
)
"""``(model, variant)`` pairs the module's server loads; ONNX ones are served as ``<name>-onnx``."""
BATCH_DELAY_MS = 200
STARTUP_TIMEOUT_S = 90.0


def torchserve_missing() -> str | None:
    """Why TorchServe cannot run here, or ``None``."""
    if shutil.which("java") is None:
        return "TorchServe needs Java 17+: no `java` on PATH"
    if not TORCHSERVE.is_file():
        return f"torchserve is not installed in {VENV_BIN} (pip install 'torchserve==0.12.*')"
    try:
        import model_archiver  # noqa: F401
    except ImportError:
        return "torch-model-archiver is not installed (pip install 'torch-model-archiver==0.12.*')"
    return None


class Server:
    """A TorchServe process with its addresses."""

    def __init__(
        self,
        root: Path,
        archives: tuple[tuple[str, str], ...] = ARCHIVES,
        *,
        extra: tuple[dict, ...] = (),
        batch_size: int = 4,
        max_batch_delay_ms: int = BATCH_DELAY_MS,
        never_ready: tuple[str, ...] = (),
    ) -> None:
        """Serve ``archives`` plus ``extra`` ones (``build_archive`` keyword arguments);
        :meth:`wait_ready` does not wait for the models in ``never_ready``."""
        from fam_core.commands.archive import build_archive

        self.root = root
        self.never_ready = never_ready
        store, tmp, logs = root / "store", root / "tmp", root / "logs"
        for folder in (store, tmp, logs):
            folder.mkdir()
        builds = [{"name_or_config": name, "variant": variant} for name, variant in archives]
        self.models: list[str] = [
            build_archive(
                out=store, batch_size=batch_size, max_batch_delay_ms=max_batch_delay_ms, **build
            ).stem
            for build in (*builds, *extra)
        ]
        self.ports = {k: free_port() for k in ("inference", "management", "metrics", "g1", "g2")}
        self.inference = f"http://127.0.0.1:{self.ports['inference']}"
        self.management = f"http://127.0.0.1:{self.ports['management']}"
        self.metrics = f"http://127.0.0.1:{self.ports['metrics']}"
        config = root / "config.properties"
        config.write_text(
            "\n".join(
                [
                    f"inference_address={self.inference}",
                    f"management_address={self.management}",
                    f"metrics_address={self.metrics}",
                    "grpc_inference_address=127.0.0.1",
                    "grpc_management_address=127.0.0.1",
                    f"grpc_inference_port={self.ports['g1']}",
                    f"grpc_management_port={self.ports['g2']}",
                    f"model_store={store}",
                    "load_models=" + ",".join(f"{name}.mar" for name in self.models),
                    "default_workers_per_model=1",
                    "disable_token_authorization=true",
                    "metrics_mode=prometheus",
                    f"metrics_config={REPO / 'model-store' / 'metrics.yaml'}",
                    "install_py_dep_per_model=false",
                    "",
                ]
            )
        )
        env = {
            **os.environ,
            "TMPDIR": str(tmp),
            "TEMP": str(tmp),
            "LOG_LOCATION": str(logs),
            "METRICS_LOCATION": str(logs),
        }
        command = [str(TORCHSERVE), "--start", "--foreground", "--ncs", "--ts-config", str(config)]
        command += ["--model-store", str(store)]
        self.console = (root / "console.log").open("wb")
        self.process = subprocess.Popen(
            command, cwd=root, env=env, stdout=self.console, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"torchserve exited with {self.process.returncode}: {self.tail()}"
                )
            if all(self._ready(name) for name in self.models if name not in self.never_ready):
                return
            time.sleep(0.5)
        raise TimeoutError(f"torchserve not READY after {timeout:.0f} s: {self.tail()}")

    def _ready(self, name: str) -> bool:
        workers = self.workers(name)
        return bool(workers) and all(status == "READY" for status in workers)

    def workers(self, name: str) -> list[str]:
        """The status of each worker of ``name`` (empty while TorchServe does not answer)."""
        try:
            status, body, _ = http("GET", f"{self.management}/models/{name}")
        except OSError:
            return []
        workers = json.loads(body)[0].get("workers", []) if status == 200 else []
        return [str(worker.get("status")) for worker in workers]

    def log(self, name: str) -> str:
        """TorchServe's log file ``name`` (``ts_log.log``, ``model_log.log``)."""
        path = self.root / "logs" / name
        return path.read_text(errors="replace") if path.is_file() else ""

    def tail(self) -> str:
        self.console.flush()
        return (self.root / "console.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        """SIGTERM the process group (the launcher and its Java server); SIGKILL after 30 s."""
        group = self.process.pid  # the launcher leads its own session
        if self.process.poll() is None:
            os.killpg(group, signal.SIGTERM)
        end = time.monotonic() + 30.0
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)  # reaped, so only the Java server can keep the group alive
        while _group_alive(group) and time.monotonic() < end:
            time.sleep(0.2)
        if _group_alive(group):
            os.killpg(group, signal.SIGKILL)
        self.process.wait(10)
        self.console.close()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """``(status, body, headers)``; 4xx/5xx are returned, not raised.

    A bare body goes as ``image/png`` (urllib would say it is a form, which TorchServe parses).
    """
    if body is not None and headers is None:
        headers = {"Content-Type": "image/png"}
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def decode_heatmap(heatmap: dict) -> torch.Tensor:
    assert heatmap["dtype"] == "float16"
    data = np.frombuffer(base64.b64decode(heatmap["data"]), dtype="<f2")
    return torch.from_numpy(data.astype(np.float32).reshape(heatmap["shape"]))
