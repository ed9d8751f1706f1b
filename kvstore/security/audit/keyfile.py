"""The audit log's MAC key: 32 random bytes, hex, in a file only the node's user can read.

Generated once (`load_or_create_key`), kept in the node's data directory (`audit.key`, mode
0600), never written to the audit log. Whoever has it can forge a chain, so it is refused if other
users may read it, as ssh refuses a private key.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from .chain import KEY_BYTES

KEY_FILE = "audit.key"


class KeyFileError(Exception):
    """The key file is missing, unreadable, malformed or readable by other users."""


def read_key(path: Path) -> bytes:
    try:
        st = path.stat()
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise KeyFileError(f"no audit key at {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise KeyFileError(f"cannot read the audit key {path}: {err}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"the audit key {path} is accessible by other users (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"the audit key {path} is not {KEY_BYTES} bytes of hex")
    return key


def load_or_create_key(path: Path) -> bytes:
    """The key in `path`, made (0600, fsynced with its directory) if the file does not exist."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_key(path)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        os.write(fd, key.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return key
