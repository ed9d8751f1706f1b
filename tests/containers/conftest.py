"""The container tests' shared toolchain: one podman (with its Docker API service) and one
build of the kvstore image for the whole session (test_compose.py, test_chaos_containers.py).

Root only (podman as root, apt-get for what is missing); skipped otherwise, never in CI (CI=true
fails instead). The image (podmanenv.IMAGE) is removed at the end of the session.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from podmanenv import Podman, ensure_debian_packages, unavailable


@pytest.fixture(scope="session")
def pm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("container tests need root in CI")
        pytest.skip("container tests need root (podman as root, apt-get)")
    ensure_debian_packages()
    p = Podman(tmp_path_factory.mktemp("podman"))
    try:
        p.build_images()
        p.start_service()
    except subprocess.TimeoutExpired as err:
        p.stop_service()
        p.remove_image()
        unavailable(f"timed out: {err}")
    try:
        yield p
    finally:
        p.stop_service()
        p.remove_image()
