"""Tables of ``velocity.toml`` that belong to plugins, not to the core schema.

A backend owns ``[tunnel.<name>]`` (``[tunnel.websocket] url``, ``[tunnel.port-forward]``),
the selected provider owns the keys of ``[cluster]`` besides ``provider`` (kubernetes:
``context``, ``namespace``...). Each plugin hands the loader a pydantic model through the
``velo_config_tables`` hook, so a third-party plugin adds keys without the core knowing
them, and they get the same checks and messages as core keys.

Provider keys stay flat under ``[cluster]`` because exactly one provider is active: users
write ``[cluster] namespace = "shop"`` as before, and the provider's model validates it.
Backends get a table each because several are configured at once (``[tunnel] prefer``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Strict
from pydantic_core import PydanticCustomError

from .errors import show_value
from .models import (  # re-exported for plugin authors: same checks, same messages
    EnvName,
    Host,
    LeaseSeconds,
    NonEmpty,
    Port,
    Problem,
    Seconds,
    SecondsOrZero,
    Text,
    _fail,
    _url,
)

if TYPE_CHECKING:
    from .models import VelocityConfig

__all__ = [
    "PluginTable",
    "BackendTable",
    "ProviderTable",
    "Problem",
    "url_for",
    "Flag",
    "EnvName",
    "Host",
    "LeaseSeconds",
    "NonEmpty",
    "Port",
    "Seconds",
    "SecondsOrZero",
    "Text",
]


Flag = Annotated[bool, Strict()]
"""true or false only (pydantic alone would take "yes" and 1)."""


class PluginTable(BaseModel):
    """Base of every plugin-owned table: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def check(self, config: VelocityConfig) -> list[Problem]:
        """Rules that look beyond this table, given the whole validated config.

        Return ``(key path from the file's root, message)`` pairs; called for the selected
        provider and for every backend in the preference order.
        """
        return []


class BackendTable(PluginTable):
    """``[tunnel.<backend>]``. A ``url`` field, when the backend has one, is where it dials."""

    no_gateway: ClassVar[str] = "has no url; the static provider reaches a gateway only by URL"
    """What a provider with nothing to discover says when this table names no gateway."""

    def gateway(self) -> str:
        """Where this table alone says the gateway is, as status shows it (a URL, a pod...),
        or "" when it names no place and the provider must find one (a provider with
        nothing to discover, such as static, needs it non-empty)."""
        return getattr(self, "url", None) or ""


class TLSBackendTable(BackendTable):
    """A backend table whose URL may use TLS: the two client-side TLS settings
    `velo.tls.for_endpoint` reads (the same keys for every TLS backend)."""

    ca_file: str | None = None
    """TLS URLs: trust only this CA bundle (PEM) instead of the system's trust store."""
    server_name: str | None = None
    """TLS URLs: the name the gateway's certificate must carry, if not the URL's host."""


class ProviderTable(PluginTable):
    """The provider's keys under ``[cluster]``."""

    default_prefer: ClassVar[tuple[str, ...]] = ()
    """Backends tried when neither ``[tunnel] prefer`` nor any backend table is written."""


def url_for(*schemes: str) -> Any:
    """A URL type that only accepts these schemes, e.g. ``url: url_for("ws", "wss")``.

    ``velo config check`` then rejects ``url = "ftp://x"`` at the key, instead of the
    backend failing on every reconnect.
    """
    shown = " or ".join(f"{s}://" for s in schemes)

    def check(value: object) -> str:
        text = _url(value)
        scheme = urlsplit(text).scheme.lower()
        if scheme not in schemes:
            raise _fail(f"expected a {shown} URL (this backend serves no {scheme}://), got {show_value(value)}")
        return text

    return Annotated[str, BeforeValidator(check)]


def _is_table_model(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def check_table_models(tables: dict[str, Any]) -> None:
    """A plugin that registers something that is not a model fails loudly at load time."""
    for key, model in tables.items():
        if not _is_table_model(model):
            raise TypeError(f"velo_config_tables: {key!r} must map to a pydantic model, got {model!r}")


def problem(message: str) -> PydanticCustomError:
    """A user-facing value error for validators in plugin tables (shown verbatim)."""
    return _fail(message)
