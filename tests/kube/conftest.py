# Makes the cluster fixtures available when tests/conftest.py does not (yet) load the plugin with
# `pytest_plugins = ["tests.cluster.conftest_plugin"]` (mirrors tests/cluster/conftest.py).
import sys

if "tests.cluster.conftest_plugin" not in sys.modules:
    from tests.cluster.conftest_plugin import *  # noqa: F401,F403
    from tests.cluster.conftest_plugin import pytest_configure  # noqa: F401
