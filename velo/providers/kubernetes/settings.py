"""The kubernetes provider's keys of ``[cluster]`` (validated through ``velo_config_tables``)."""

from __future__ import annotations

from typing import ClassVar

from velo.config.tables import LeaseSeconds, NonEmpty, ProviderTable, Seconds, Text


class KubernetesTable(ProviderTable):
    """``[cluster]`` with ``provider = "kubernetes"``."""

    default_prefer: ClassVar[tuple[str, ...]] = ("port-forward",)
    """No Ingress needed: with no backend table written, the tunnel goes through the apiserver."""

    context: Text = ""
    namespace: Text = ""
    lease_seconds: LeaseSeconds = 30
    proxy_image: NonEmpty = "ghcr.io/velo-dev/velo-proxy:0.1.0"
    ready_timeout: Seconds = 120.0
