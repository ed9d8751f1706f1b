"""The audit log: one MAC-chained JSON line per administrative operation, authentication event
and (optionally) data write; the chain's head is kept in the node's store so that truncation is
detected too.

    chain.py    the line format and the MAC chain (standard library only, no I/O)
    files.py    which files make up a log (`PATH`, `PATH.1`, ...), their first and last lines
    writer.py   `AuditLog`: the writer thread, rotation, the head in the store, durability
    verify.py   `verify`: checks a log across its rotated files against the recorded head
    keyfile.py  the node's MAC key (`<data-dir>/audit.key`, 0600)
"""

from .chain import GENESIS, LineError, open_line, seal
from .keyfile import KEY_FILE, KeyFileError, load_or_create_key, read_key
from .verify import Report, verify
from .writer import AuditLog, AuditOpenError, AuditSettings

__all__ = [
    "GENESIS", "KEY_FILE", "AuditLog", "AuditOpenError", "AuditSettings", "KeyFileError", "LineError", "Report",
    "load_or_create_key", "open_line", "read_key", "seal", "verify",
]
