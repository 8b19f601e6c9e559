"""velo's configuration layer: the ``velocity.toml`` schema, loader and errors.

Self-contained on purpose (stdlib + pydantic only, nothing else from velo) so the CLI can
validate a config, and tests can build one, without importing the runtime.
"""

from .errors import ConfigError
from .loader import CONFIG_FILENAME, find_config, load_config, parse_config
from .models import (
    STATIC_PROVIDER,
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
    "STATIC_PROVIDER",
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
    "load_config",
    "parse_config",
]
