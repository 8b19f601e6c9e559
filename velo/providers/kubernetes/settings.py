"""The kubernetes provider's keys of ``[cluster]`` (validated through ``velo_config_tables``)."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import StringConstraints

from velo.config.tables import LeaseSeconds, NonEmpty, ProviderTable, Seconds, Text


Quantity = Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")]
"""A Kubernetes resource quantity such as ``50m``, ``0.5``, ``64Mi``."""


class KubernetesTable(ProviderTable):
    """``[cluster]`` with ``provider = "kubernetes"``."""

    default_prefer: ClassVar[tuple[str, ...]] = ("port-forward",)
    """No Ingress needed: with no backend table written, the tunnel goes through the apiserver."""

    context: Text = ""
    namespace: Text = ""
    lease_seconds: LeaseSeconds = 30
    proxy_image: NonEmpty = "ghcr.io/velo-dev/velo-proxy:0.1.0"
    ready_timeout: Seconds = 120.0
    # The traffic-proxy container's requests and limits, so a namespace with a ResourceQuota admits it.
    proxy_cpu_request: Quantity = "50m"
    proxy_memory_request: Quantity = "64Mi"
    proxy_cpu_limit: Quantity = "500m"
    proxy_memory_limit: Quantity = "256Mi"
