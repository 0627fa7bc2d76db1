"""Plaintext credentials in the serving state file, sealed with a key kept outside the state dir.

An endpoint created through the management API may carry its provider key in plain text
(``openai_api_key_plaintext``). The server must send that very key, so a hash would not do: it is
encrypted (Fernet from ``cryptography``: AES-128-CBC with an HMAC-SHA256, so a changed value is
refused, not decrypted into garbage) before it is written to ``<state_dir>/endpoints.json``, as
``"aiq-sealed:v1:<token>"``, and decrypted in memory when the file is read. The state file is what
gets copied, backed up, attached to a bug report or read by whoever can read the state dir; the
key file is not in it: ``$AIQ_SERVING_STATE_KEY``, else ``$XDG_CONFIG_HOME/ai-query/serving-state.key``
(``~/.config/...``), created on first need with mode 0600 in a 0700 directory. A key file others
can read is refused (as ssh refuses such a private key). Secret references (``{{secrets/...}}``)
are names, not values, and stay as they are.

A state file written before sealing existed holds clear keys: it still loads, and is rewritten
sealed at once (``EndpointStore`` does so on start).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Mapping

from .._errors import ConfigError

SEALED_PREFIX = "aiq-sealed:v1:"
KEY_FILE_ENV = "AIQ_SERVING_STATE_KEY"


def default_key_file() -> Path:
    explicit = os.environ.get(KEY_FILE_ENV)
    if explicit:
        return Path(explicit)
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config_home) / "ai-query" / "serving-state.key"


def _is_credential(key: Any, value: Any) -> bool:
    return isinstance(key, str) and key.endswith("_plaintext") and isinstance(value, str)


class CredentialSealer:
    """Seals and unseals the ``*_plaintext`` values of a state file's endpoint specs."""

    def __init__(self, key_file: str | os.PathLike[str] | None = None) -> None:
        self.key_file = Path(key_file) if key_file is not None else default_key_file()
        self._fernet: Any = None

    def seal(self, data: Any) -> Any:
        """A copy of ``data`` with every clear ``*_plaintext`` value encrypted."""
        if isinstance(data, Mapping):
            return {k: (self._close(v) if _is_credential(k, v) and not v.startswith(SEALED_PREFIX) else self.seal(v))
                    for k, v in data.items()}
        if isinstance(data, list):
            return [self.seal(v) for v in data]
        return data

    def unseal(self, data: Any, where: str) -> tuple[Any, bool]:
        """A copy of ``data`` with sealed values decrypted, and whether a clear one was found (to migrate)."""
        clear = False

        def walk(value: Any) -> Any:
            nonlocal clear
            if isinstance(value, Mapping):
                out = {}
                for k, v in value.items():
                    if _is_credential(k, v) and v.startswith(SEALED_PREFIX):
                        out[k] = self._open(v[len(SEALED_PREFIX):], where)
                    else:
                        clear = clear or _is_credential(k, v)
                        out[k] = walk(v)
                return out
            if isinstance(value, list):
                return [walk(v) for v in value]
            return value

        return walk(data), clear

    def _close(self, value: str) -> str:
        return SEALED_PREFIX + self._cipher(create=True).encrypt(value.encode()).decode()

    def _open(self, token: str, where: str) -> str:
        from cryptography.fernet import InvalidToken

        try:
            return self._cipher(create=False).decrypt(token.encode()).decode()
        except InvalidToken:
            raise ConfigError(
                f"cannot decrypt the credentials in {where}: the key file {self.key_file} is not the one they were "
                f"sealed with; restore that key file (${KEY_FILE_ENV} names it), or delete those endpoints from the "
                "state file and create them again"
            ) from None

    def _cipher(self, *, create: bool) -> Any:
        if self._fernet is None:
            from cryptography.fernet import Fernet

            self._fernet = Fernet(self._read_key(create))
        return self._fernet

    def _read_key(self, create: bool) -> bytes:
        path = self.key_file
        hint = f"(${KEY_FILE_ENV} names another file)"
        if not path.exists():
            if not create:
                raise ConfigError(f"the serving state holds sealed credentials but the key file {path} does not exist: "
                                  f"restore it {hint}, or delete those endpoints from the state file and create them again")
            self._create_key(path)
        try:
            mode = path.stat().st_mode
            if mode & 0o077:
                raise ConfigError(f"the serving state key file {path} can be read by others (mode {stat.S_IMODE(mode):04o}): "
                                  f"run chmod 600 {path}")
            return path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the serving state key file {path}: {exc.strerror or exc}; fix its permissions {hint}") from None

    @staticmethod
    def _create_key(path: Path) -> None:
        """A new key, written 0600 and linked into place, so that of several workers starting at once
        exactly one key wins and all use it."""
        from cryptography.fernet import Fernet

        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(Fernet.generate_key() + b"\n")
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another worker made it first: use theirs
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the serving state key file {path}: {exc.strerror or exc}; "
                              f"make its directory writable or set ${KEY_FILE_ENV} to a file you can write") from None
