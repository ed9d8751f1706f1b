"""Backup and restore of a whole cluster (`kvctl snapshot save/status`, `kvstore restore`).

`format` is the file (stdlib only, total decoder), `save` writes one from a running cluster at
one revision through the client library, `restore` turns one into a new member's data directory.
"""
