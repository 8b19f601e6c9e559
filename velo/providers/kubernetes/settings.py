"""The kubernetes provider's keys of ``[cluster]`` (validated through ``velo_config_tables``)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, StringConstraints

from velo.config.tables import LeaseSeconds, NonEmpty, ProviderTable, Seconds, Text


Quantity = Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")]
"""A Kubernetes resource quantity such as ``50m``, ``0.5``, ``64Mi``."""


PROXY_IMAGE_REPOSITORY = "ghcr.io/velo-dev/velo-proxy"


def default_proxy_image() -> str:
    """The traffic-proxy image .github/workflows/release.yml publishes for this exact velo
    version, so the client and the gateway always match."""
    from velo import __version__

    return f"{PROXY_IMAGE_REPOSITORY}:{__version__}"


class KubernetesTable(ProviderTable):
    """``[cluster]`` with ``provider = "kubernetes"``."""

    default_prefer: ClassVar[tuple[str, ...]] = ("port-forward",)
    """No Ingress needed: with no backend table written, the tunnel goes through the apiserver."""

    context: Text = ""
    namespace: Text = ""
    lease_seconds: LeaseSeconds = 30
    proxy_image: NonEmpty = Field(default_factory=default_proxy_image)
    # docker-registry Secrets in the session's namespace, for a proxy_image in a private registry
    image_pull_secrets: list[NonEmpty] = Field(default_factory=list)
    ready_timeout: Seconds = 120.0
    # The traffic-proxy container's requests and limits, so a namespace with a ResourceQuota admits it.
    proxy_cpu_request: Quantity = "50m"
    proxy_memory_request: Quantity = "64Mi"
    proxy_cpu_limit: Quantity = "500m"
    proxy_memory_limit: Quantity = "256Mi"
    # When something else puts an intercepted Service back: intercept it again, or only say so.
    on_drift: Literal["reapply", "warn"] = "reapply"
