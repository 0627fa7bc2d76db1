"""A real Azure Blob Storage endpoint for the object storage tests: Azurite (Microsoft's emulator,
from npm) on 127.0.0.1.

``npm`` installs it once into ``.venv/azurite`` (the first test that needs it; ``make test``'s
set-up does not have to). It speaks the Blob REST protocol: delta-rs (``az://`` with
``AZURE_STORAGE_USE_EMULATOR``) and pyarrow's ``AzureFileSystem`` talk to it as to Azure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

AZURITE = "azurite@3.35.0"
ROOT = Path(__file__).resolve().parent.parent / ".venv" / "azurite"
ACCOUNT = "devstoreaccount1"


def azurite_binary() -> Path:
    """``azurite-blob``, installed with npm the first time (a clear error without node/npm)."""
    binary = ROOT / "node_modules" / ".bin" / "azurite-blob"
    if binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("the Azure tests need Node.js and npm (apt install nodejs npm) to install the Azurite emulator")
    ROOT.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([npm, "install", "--prefix", str(ROOT), "--no-audit", "--no-fund", "--silent", AZURITE],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not binary.exists():
        raise RuntimeError(f"npm install {AZURITE} failed: {done.stderr[-2000:]}")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AzuriteServer:
    """``azurite-blob`` on a free port of 127.0.0.1; ``container()`` makes a fresh container.

    ``url`` is what ``AZURITE_BLOB_STORAGE_URL`` must say for delta-rs's emulator mode (and
    ``ai_query``'s pyarrow filesystem) to find it."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = tempfile.mkdtemp(prefix="aiq-azurite-")
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "AzuriteServer":
        self._proc = subprocess.Popen(
            [str(azurite_binary()), "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", self._dir,
             "--skipApiVersionCheck", "--loose", "--silent"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{self.url}/{ACCOUNT}?comp=list", timeout=2).close()
            except urllib.error.HTTPError:  # 403 without a signature: it answers
                return self
            except OSError:
                assert self._proc.poll() is None, f"azurite exited with {self._proc.returncode}"
                time.sleep(0.1)
            else:
                return self
        raise RuntimeError(f"azurite did not answer on {self.url}")

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self._proc.terminate()
        self._proc.wait(timeout=30)
        shutil.rmtree(self._dir, ignore_errors=True)

    def options(self) -> dict[str, str]:
        """delta-rs / ``[storage_options]`` names for this server (the emulator's published key)."""
        from ai_query._storage_options import AZURITE_KEY

        return {"AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": AZURITE_KEY,
                "AZURE_STORAGE_USE_EMULATOR": "true"}

    def filesystem(self):
        from ai_query._storage_options import pyarrow_filesystem

        old = os.environ.get("AZURITE_BLOB_STORAGE_URL")
        os.environ["AZURITE_BLOB_STORAGE_URL"] = self.url
        try:
            return pyarrow_filesystem("az", self.options())
        finally:
            if old is None:
                os.environ.pop("AZURITE_BLOB_STORAGE_URL")
            else:
                os.environ["AZURITE_BLOB_STORAGE_URL"] = old

    def container(self) -> str:
        name = f"aiq-{uuid.uuid4().hex[:12]}"
        self.filesystem().create_dir(name)
        return name

    def blobs(self, container: str, prefix: str = "") -> list[str]:
        import pyarrow.fs as pafs

        infos = self.filesystem().get_file_info(pafs.FileSelector(f"{container}/{prefix}".rstrip("/"), recursive=True,
                                                                  allow_not_found=True))
        return sorted(i.path.split("/", 1)[1] for i in infos if i.type == pafs.FileType.File)
