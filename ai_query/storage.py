"""One seam for the files a job keeps next to its tables: local paths or object storage URIs.

A job's state directory (journal, staged usage rows, run log, batch-API records) may live on
``s3://``, ``gs://``, ``abfss://`` like its tables. ``pathlib`` would mangle those
(``Path('s3://b/x') / 'y'`` is ``s3:/b/x/y``), so every state-path use goes through the string
functions here: a local path (or ``file://``) keeps the plain ``os`` calls (same speed and
atomicity as before), anything else goes to ``pyarrow.fs`` (credentials from the usual
environment: ``AWS_*`` incl. ``AWS_ENDPOINT_URL``, ``AZURE_*``, Google's default credentials, or
from a job spec's ``[storage_options]``, see ``_storage_options``). Delta tables are opened
through :func:`delta_table` / :func:`delta_options`, so delta-rs gets the same options.

Object stores have no append and no rename. So:

- :func:`append_text` on a remote path writes one new object per call under ``<path>.d/``
  (named by time, so :func:`read_appended` reads them in order); locally it appends to the file.
- :func:`write_bytes` is atomic on both: locally a temporary file and ``os.replace``; remotely
  a single PUT (readers see the old object or the new one).
- :func:`create_exclusive` is ``O_EXCL`` locally; remotely it is "exists, else put": two
  writers racing in the same instant may both win (journal task markers, where the loser merely
  skips reading its own earlier attempts' lines; a job's run lock, which reads its object back).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

__all__ = ["append_text", "create_exclusive", "delta_options", "delta_table", "delta_transaction_version", "delta_write_target", "exists", "filesystem", "is_delta_table",
           "is_dir", "is_remote", "join", "reuse_delta_tables", "list_dir", "local_path", "makedirs", "name", "read_appended", "read_bytes", "remove", "remove_tree", "write_bytes"]


def is_remote(path: str) -> bool:
    """Whether ``path`` is an object storage (or other non-local) URI."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    """``path`` without a ``file://`` prefix (local paths only)."""
    return unquote(path[len("file://"):]) if path.startswith("file://") else path


def join(base: str, *parts: str) -> str:
    """``base`` joined with ``parts``: ``/`` for URIs (never collapsing ``s3://``), ``os.path.join`` locally."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def name(path: str) -> str:
    """The last component of ``path``."""
    return path.rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(path.rstrip(os.sep))


@lru_cache(maxsize=32)
def _fs_for(root: str, options: tuple[tuple[str, str], ...] = ()) -> Any:
    import pyarrow.fs as pafs

    from ._storage_options import pyarrow_filesystem

    scheme = root.split("://", 1)[0]
    fs = pyarrow_filesystem(scheme, dict(options)) if options or scheme in AZURE_SCHEMES else None
    if fs is not None:
        return fs
    # S3: ``allow_delayed_open`` makes a small object one PUT (not a three-request multipart upload)
    return pafs.FileSystem.from_uri(root + ("?allow_delayed_open=true" if scheme in S3_SCHEMES else ""))[0]


def delta_options(path: str) -> dict[str, str] | None:
    """The delta-rs ``storage_options`` for ``path`` (secrets resolved), ``None``: the environment's."""
    if not is_remote(path):
        return None
    from ._storage_options import resolved

    return resolved(path)


def filesystem(path: str) -> tuple[Any, str]:
    """A ``pyarrow.fs`` filesystem and ``path`` on it (one filesystem per scheme, bucket and options, reused)."""
    import pyarrow.fs as pafs

    if not is_remote(path):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(path))
    scheme, rest = path.split("://", 1)
    bucket, _, key = rest.partition("/")
    options = delta_options(path)
    if scheme in AZURE_SCHEMES:
        # abfss://container@account.dfs.core.windows.net/key or az://container/key; on pyarrow's
        # AzureFileSystem (the account is its root) that is container/key. Its credentials come
        # from the same AZURE_* names delta-rs reads, from the environment and the job spec.
        container, _, host = bucket.partition("@")
        merged = {k: v for k, v in os.environ.items() if k.startswith("AZURE_")} | (options or {})
        if host and not merged.get("AZURE_STORAGE_ACCOUNT_NAME"):
            merged["AZURE_STORAGE_ACCOUNT_NAME"] = host.split(".", 1)[0]
        fs = _fs_for(f"{scheme}://{container}", tuple(sorted(merged.items())))
        return fs, f"{container}/{key}".rstrip("/")
    fs = _fs_for(f"{scheme}://{bucket}", tuple(sorted(options.items())) if options else ())
    return fs, rest.rstrip("/")


S3_SCHEMES = ("s3", "s3a", "s3n")
AZURE_SCHEMES = ("az", "azure", "abfs", "abfss", "adl")

# Delta table handles kept by ``reuse_delta_tables`` (per thread: a ContextVar; None: not reusing),
# and the app transactions read from them: (path, app_id) -> (table version read up to, txn version)
_TABLES: ContextVar[dict[str, Any] | None] = ContextVar("aiq_delta_tables", default=None)
_TXNS: ContextVar[dict[tuple[str, str], tuple[int, int | None]] | None] = ContextVar("aiq_delta_txns", default=None)


@contextmanager
def reuse_delta_tables() -> Iterator[None]:
    """Inside the block (in this thread), :func:`delta_table` keeps one handle per table.

    Opening a Delta table reads its whole log: one GET per commit since the last checkpoint, so a
    job committing every chunk read each earlier commit again at every chunk (on an object store,
    a request each). Inside the block a handle is opened once and brought up to date with the
    commits made since (``update_incremental``: a LIST, and a GET per new commit) each time it is
    asked for, so what it answers is as current as a fresh open. Only for code that does not
    delete and re-create a table inside the block (a job run; nothing of a job's tables is
    removed while it runs). Nested blocks share the outer block's handles.
    """
    if _TABLES.get() is not None:
        yield
        return
    token, txn_token = _TABLES.set({}), _TXNS.set({})
    try:
        yield
    finally:
        _TABLES.reset(token)
        _TXNS.reset(txn_token)


def delta_write_target(path: str) -> Any:
    """What to give ``write_deltalake`` or to merge into: inside :func:`reuse_delta_tables` the
    table's kept handle (opened and kept here when none is yet; the write reads no log again),
    else ``path`` (also for a table not created yet: the write creates it).

    The handle is not brought up to date first: its last write (or the check before it) did
    that, and a commit made meanwhile by another writer is what delta-rs's commit handles
    anyway (it finds the version taken, checks the winner for conflicts, an app transaction of
    the same id included, and commits after it)."""
    tables = _TABLES.get()
    if tables is None:
        return path
    table = tables.get(path)
    if table is None and is_delta_table(path):
        from deltalake import DeltaTable

        table = tables[path] = DeltaTable(path, storage_options=delta_options(path))
    return path if table is None else table


def delta_table(path: str, **kwargs: Any) -> Any:
    """``deltalake.DeltaTable(path)`` with the storage options of ``path`` (see :func:`reuse_delta_tables`)."""
    from deltalake import DeltaTable

    tables = _TABLES.get()
    if tables is None or kwargs:  # a version or other options: a handle of its own
        return DeltaTable(path, storage_options=delta_options(path), **kwargs)
    table = tables.get(path)
    if table is None:
        table = tables[path] = DeltaTable(path, storage_options=delta_options(path))
    else:
        table.update_incremental()
    return table


def delta_transaction_version(path: str, app_id: str) -> int | None:
    """The highest version of app transaction ``app_id`` in the Delta table at ``path`` (``None``: none).

    ``DeltaTable.transaction_version`` replays the whole log at every call. Inside
    :func:`reuse_delta_tables` the answer is kept with the table version it was read at, and the
    next call reads only the commits made since (their ``txn`` actions, from the commit files of
    the Delta protocol), so a job's check before each commit costs the new commits, not the log.
    """
    table = delta_table(path)
    txns = _TXNS.get()
    if txns is None:
        return table.transaction_version(app_id)
    current = table.version()
    known = txns.get((path, app_id))
    if known is None:
        found = table.transaction_version(app_id)
    else:
        read_to, found = known
        for version in range(read_to + 1, current + 1):
            found = _txn_in_commit(join(path, "_delta_log", f"{version:020d}.json"), app_id, found)
    txns[(path, app_id)] = (current, found)
    return found


def _txn_in_commit(commit: str, app_id: str, found: int | None) -> int | None:
    """``found`` raised to the version of any ``txn`` action of ``app_id`` in the commit file ``commit``."""
    import json

    for line in read_bytes(commit).splitlines():
        if b'"txn"' not in line:
            continue
        txn = json.loads(line).get("txn") or {}
        if txn.get("appId") == app_id and isinstance(txn.get("version"), int):
            found = txn["version"] if found is None else max(found, txn["version"])
    return found


def is_delta_table(path: str) -> bool:
    """Whether a Delta table is at ``path`` (read with the storage options of ``path``)."""
    from deltalake import DeltaTable

    tables = _TABLES.get()
    if tables is not None and path in tables:  # a handle is kept: the table is there
        return True
    return DeltaTable.is_deltatable(path, storage_options=delta_options(path))


def _info(path: str) -> Any:
    fs, p = filesystem(path)
    return fs.get_file_info(p)


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(local_path(path))
    import pyarrow.fs as pafs

    return _info(path).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    """A directory (remotely: a prefix holding at least one object)."""
    if not is_remote(path):
        return os.path.isdir(local_path(path))
    import pyarrow.fs as pafs

    return _info(path).type == pafs.FileType.Directory


def list_dir(path: str, suffix: str = "", prefix: str = "", dirs: bool | None = None) -> list[str]:
    """The entries directly under ``path`` (full paths, sorted) whose names match; ``[]`` when it is missing.

    ``dirs``: ``True`` directories only, ``False`` files only, ``None`` both."""
    if not is_remote(path):
        root = local_path(path)
        try:
            names = os.listdir(root)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for n in names:
            full = os.path.join(root, n)
            if n.startswith(prefix) and n.endswith(suffix) and (dirs is None or os.path.isdir(full) == dirs):
                out.append(full)
        return sorted(out)
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return []
    out = []
    for info in infos:
        n = info.base_name
        is_directory = info.type == pafs.FileType.Directory
        if n.startswith(prefix) and n.endswith(suffix) and (dirs is None or is_directory == dirs):
            out.append(join(path, n))
    return sorted(out)


def makedirs(path: str) -> None:
    """Make a local directory (object stores have no directories: nothing to do)."""
    if not is_remote(path):
        os.makedirs(local_path(path), exist_ok=True)


def read_bytes(path: str, start: int = 0) -> bytes:
    """The bytes of the file at ``path`` from offset ``start``."""
    if not is_remote(path):
        with open(local_path(path), "rb") as fh:
            fh.seek(start)
            return fh.read()
    fs, p = filesystem(path)
    with fs.open_input_file(p) as fh:
        if start:
            fh.seek(start)
        return fh.read()


def write_bytes(path: str, data: bytes) -> None:
    """Write ``path`` atomically (a kill leaves the old content or the new, never a part)."""
    if not is_remote(path):
        local = local_path(path)
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        tmp = f"{local}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, local)
        return
    fs, p = filesystem(path)
    with fs.open_output_stream(p) as fh:  # one PUT when the stream closes
        fh.write(data)


def create_exclusive(path: str, data: bytes = b"") -> bool:
    """Create ``path`` holding ``data``; ``False`` if it existed (remote: not atomic, see the module notes)."""
    if not is_remote(path):
        local = local_path(path)
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        try:
            fd = os.open(local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True
    if file_exists(path):
        return False
    write_bytes(path, data)
    return True


def file_exists(path: str) -> bool:
    """Whether a file (an object) is at ``path``: remotely one request (S3: a HEAD), where
    :func:`exists` also asks whether ``path`` is a directory (a LIST after the HEAD misses)."""
    if not is_remote(path):
        return os.path.isfile(local_path(path))
    fs, p = filesystem(path)
    try:
        fs.open_input_stream(p).close()
    except FileNotFoundError:
        return False
    return True


def remove(path: str) -> None:
    """Delete the file at ``path`` (missing is fine)."""
    if not is_remote(path):
        try:
            os.unlink(local_path(path))
        except FileNotFoundError:
            pass
        return
    fs, p = filesystem(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        pass


def remove_tree(path: str) -> None:
    """Delete ``path`` and everything under it (missing is fine)."""
    if not is_remote(path):
        shutil.rmtree(local_path(path), ignore_errors=True)
        return
    fs, p = filesystem(path)
    try:
        fs.delete_dir(p)
    except (FileNotFoundError, OSError):
        pass


def append_text(path: str, text: str) -> None:
    """Append ``text`` to ``path`` (remote: one new object under ``<path>.d/``; see the module notes)."""
    if not is_remote(path):
        local = local_path(path)
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        with open(local, "a", encoding="utf-8") as fh:
            fh.write(text)
        return
    write_bytes(join(f"{path}.d", f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"), text.encode())


def read_appended(path: str) -> str:
    """Everything :func:`append_text` added to ``path``, in order (``""`` when nothing)."""
    if not is_remote(path):
        local = local_path(path)
        if not os.path.exists(local):
            return ""
        with open(local, encoding="utf-8") as fh:
            return fh.read()
    return "".join(read_bytes(p).decode() for p in list_dir(f"{path}.d", dirs=False))
