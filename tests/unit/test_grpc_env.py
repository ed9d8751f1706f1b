"""A node applies its gRPC settings before anything imports grpc (see kvstore/server/grpc_env.py)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import os, sys
import kvstore.cli.server
assert "grpc" not in sys.modules, "the CLI imports grpc before serve() can apply its settings"
from kvstore.server import grpc_env
grpc_env.apply()
import grpc
print(os.environ.get("GRPC_EXPERIMENTS"))
"""


def _run(env_value: str | None) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if env_value is not None:
        env["GRPC_EXPERIMENTS"] = env_value
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_node_turns_off_the_event_engine_endpoints_unless_told_otherwise() -> None:
    assert _run(None) == "-event_engine_client,-event_engine_listener"
    assert _run("event_engine_client") == "event_engine_client"
