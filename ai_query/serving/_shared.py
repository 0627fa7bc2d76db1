"""State shared by the worker processes of ``ai-query serve --workers N``: one small mapped file.

The supervisor creates the file (in memory, nameless: ``memfd_create``) and passes it to every
worker, which maps it::

    offset 0    b"AIQSRV01"                 magic
    offset 8    generation (u64)            bumped after every change to the endpoints' state file
    offset 16   slots (u64)                 size of the rate-limit table
    offset 64   slots + 31 cells (key u64, endpoint u64, tat f64)    GCRA cells

- **Endpoints**: a management request changes ``endpoints.json`` under the file's lock and bumps
  the generation; every request in every worker compares the generation with the one it last
  loaded (one read of shared memory) and reloads the state file when it moved. So an endpoint
  created through one worker is served by all of them from the next request on.
- **Rate limits**: the GCRA cells of ``RateLimiter`` live in the table, read and written under
  the lock (``flock``: two system calls per limited request), so a burst spread over the workers
  is limited as one. ``time.monotonic`` is the same clock in every process.

A key's cell is in the 32 slots from its hash on. A cell whose theoretical arrival time has
passed is the same as no cell, so its slot is reused; 32 live cells in a row (far from happening
below tens of thousands of keys limited at once) admit what they cannot count and say so in the
log, once.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import tempfile
from typing import Any, Iterable

from .._logging import get_logger

log = get_logger("ai_query.serving")

MAGIC = b"AIQSRV01"
HEADER_BYTES = 64
DEFAULT_SLOTS = 65536
PROBES = 32
"""A key's cell is one of the ``PROBES`` slots from its hash on (read with one unpack)."""
_SLOT = struct.Struct("<QQd")
_WINDOW = struct.Struct("<" + "QQd" * PROBES)
_U64 = struct.Struct("<Q")
_EMPTY = 0


def _hash64(text: str) -> int:
    """A 64-bit digest of ``text`` that is never the empty-slot marker 0."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") or 1


class SharedControl:
    """The mapped control file: a generation counter, a cross-process lock, the rate-limit table."""

    def __init__(self, fd: int) -> None:
        """Map the control file open at ``fd`` (the object owns and closes ``fd``)."""
        self._fd = fd
        try:
            self._map = mmap.mmap(fd, 0)
        except (OSError, ValueError):
            os.close(fd)
            raise
        if self._map[:8] != MAGIC:
            self.close()
            raise ValueError(f"file descriptor {fd} is not an ai-query serving control file")
        self.slots = _U64.unpack_from(self._map, 16)[0]
        self._full_warned = False

    @property
    def fd(self) -> int:
        """The descriptor to pass to a worker (``subprocess.Popen(pass_fds=...)``)."""
        return self._fd

    @classmethod
    def create(cls, slots: int = DEFAULT_SLOTS) -> "SharedControl":
        """A new control file in memory, with no name: nothing is left behind however the server ends."""
        try:
            fd = os.memfd_create("ai-query-serving")
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            handle, name = tempfile.mkstemp(prefix="ai-query-serving-")
            os.unlink(name)
            fd = handle
        try:
            os.ftruncate(fd, HEADER_BYTES + (slots + PROBES - 1) * _SLOT.size)  # windows never wrap
            os.pwrite(fd, MAGIC + _U64.pack(0) + _U64.pack(slots), 0)
        except OSError:
            os.close(fd)
            raise
        return cls(fd)

    @classmethod
    def inherited(cls, fd: int) -> "SharedControl":
        """The supervisor's control file, passed as ``fd``: opened anew, because ``flock`` only
        excludes between separate opens of a file (an inherited descriptor shares its lock)."""
        own = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        os.close(fd)
        return cls(own)

    # -- the lock and the generation --------------------------------------------------------
    def __enter__(self) -> "SharedControl":
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def generation(self) -> int:
        """How many changes the endpoints' state has seen (read without the lock)."""
        return _U64.unpack_from(self._map, 8)[0]

    def bump(self) -> int:
        """Announce a change (call with the lock held, after the state file is written)."""
        value = self.generation() + 1
        _U64.pack_into(self._map, 8, value)
        return value

    # -- rate-limit cells (call with the lock held) -----------------------------------------
    def _window(self, key: int) -> tuple[int, tuple[Any, ...]]:
        offset = HEADER_BYTES + (key % self.slots) * _SLOT.size
        return offset, _WINDOW.unpack_from(self._map, offset)

    def tat(self, key: int) -> float | None:
        """The theoretical arrival time stored for ``key`` (``None``: no cell)."""
        _, cells = self._window(key)
        try:
            return cells[cells[0::3].index(key) * 3 + 2]
        except ValueError:
            return None

    def set_tat(self, key: int, endpoint: int, tat: float, now: float) -> None:
        """Store ``tat`` for ``key`` in its window: its own slot, else an empty or expired one."""
        offset, cells = self._window(key)
        keys = cells[0::3]
        if key in keys:
            slot = keys.index(key)
        else:
            slot = next((i for i in range(PROBES) if keys[i] == _EMPTY or cells[i * 3 + 2] <= now), None)
            if slot is None:
                if not self._full_warned:
                    self._full_warned = True
                    log.warning("the shared rate-limit table is full around one key (%d live cells in a row): "
                                "requests over such keys are admitted uncounted", PROBES)
                return
        _SLOT.pack_into(self._map, offset + slot * _SLOT.size, key, endpoint, tat)

    def forget(self, endpoint: int) -> None:
        """Delete every cell of ``endpoint``."""
        for i in range(self.slots + PROBES - 1):
            offset = HEADER_BYTES + i * _SLOT.size
            found, owner, _ = _SLOT.unpack_from(self._map, offset)
            if found != _EMPTY and owner == endpoint:
                _SLOT.pack_into(self._map, offset, _EMPTY, 0, 0.0)

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1



class LocalCells:
    """GCRA cells of one process: a dict (the default of ``RateLimiter``)."""

    def __init__(self) -> None:
        self._tat: dict[tuple[str, ...], float] = {}

    def __enter__(self) -> "LocalCells":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def get(self, key: tuple[str, ...], now: float) -> float:
        return self._tat.get(key, now)

    def update(self, cells: Iterable[tuple[tuple[str, ...], float]], now: float) -> None:
        self._tat.update(cells)

    def forget(self, endpoint: str) -> None:
        for key in [k for k in self._tat if k[0] == endpoint]:
            del self._tat[key]


class SharedCells:
    """GCRA cells in a ``SharedControl``: the same limits for every worker process."""

    def __init__(self, control: SharedControl) -> None:
        self.control = control
        self._hashes: dict[str, int] = {}

    def __enter__(self) -> "SharedCells":
        self.control.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.control.__exit__()

    def _hash(self, text: str) -> int:
        value = self._hashes.get(text)
        if value is None:
            if len(self._hashes) >= 100_000:  # bounded: keys come from users
                self._hashes.clear()
            value = self._hashes[text] = _hash64(text)
        return value

    def get(self, key: tuple[str, ...], now: float) -> float:
        tat = self.control.tat(self._hash("\x00".join(key)))
        return now if tat is None else tat

    def update(self, cells: Iterable[tuple[tuple[str, ...], float]], now: float) -> None:
        for key, tat in cells:
            self.control.set_tat(self._hash("\x00".join(key)), self._hash(key[0]), tat, now)

    def forget(self, endpoint: str) -> None:
        with self.control:
            self.control.forget(self._hash(endpoint))
