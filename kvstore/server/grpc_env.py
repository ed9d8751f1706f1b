"""Process-wide gRPC settings of a node, applied before `grpc` is first imported.

grpcio's EventEngine client and listener endpoints (its default in recent releases) cost more
per message than its older iomgr endpoints on a node's traffic of many small stream messages.
Measured on a 2-core machine, grpcio 1.85 on uvloop, a grpc.aio echo
server with nothing behind it: bidi-stream round trips at 1 in flight 3,709/s with the defaults
vs 5,695/s without those two experiments; stream messages at 64 in flight 21,168/s vs 31,092/s;
unary calls at 1 in flight 1,698/s vs 2,153/s. A node turns them off unless the environment
already sets GRPC_EXPERIMENTS (an operator's choice wins).
"""

from __future__ import annotations

import logging
import os
import sys

GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"

log = logging.getLogger("kvstore.node")


def apply() -> None:
    if "grpc" in sys.modules:
        log.warning("gRPC was imported before its settings could be applied; running with its defaults")
        return
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
