import os

import pytest

from tests.helpers import TOKEN, Procs

pytest_plugins = ["tests.cluster.conftest_plugin"]


@pytest.fixture
def procs(tmp_path):
    group = Procs(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture(autouse=True)
def _token_env(monkeypatch):
    """velo up reads the tunnel token from this variable in every test config."""
    monkeypatch.setenv("VELO_TEST_TOKEN", TOKEN)
