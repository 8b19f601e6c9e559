# Makes the cluster fixtures available when tests/conftest.py does not (yet) load the plugin with
# `pytest_plugins = ["tests.cluster.conftest_plugin"]`. Once the root conftest does, this file
# becomes a no-op (the plugin module is then already imported) and may be deleted.
import sys

if "tests.cluster.conftest_plugin" not in sys.modules:
    from tests.cluster.conftest_plugin import *  # noqa: F401,F403
    from tests.cluster.conftest_plugin import pytest_configure  # noqa: F401
