"""velo's configuration layer: the ``velocity.toml`` schema, loader and errors.

Plugins describe their own tables with the base classes in ``velo.config.tables``.

Self-contained on purpose (stdlib + pydantic; the plugin tables come in through the
``velo_config_tables`` hook, never by importing a plugin) so the CLI can validate a config,
and tests can build one, without importing the runtime.
"""

from .errors import ConfigError
from .loader import CONFIG_FILENAME, find_config, installed_tables, load_config, parse_config
from .models import (
    DEFAULT_PROVIDER,
    ClusterConfig,
    EnvConfig,
    LocalService,
    ProjectConfig,
    RemoteConfig,
    RemoteService,
    TunnelConfig,
    VelocityConfig,
)

__all__ = [
    "CONFIG_FILENAME",
    "DEFAULT_PROVIDER",
    "ClusterConfig",
    "ConfigError",
    "EnvConfig",
    "LocalService",
    "ProjectConfig",
    "RemoteConfig",
    "RemoteService",
    "TunnelConfig",
    "VelocityConfig",
    "find_config",
    "installed_tables",
    "load_config",
    "parse_config",
]
