"""Selector swap and restore, and the session's footprint in the cluster.

Everything velo changes on a user's object records how to undo it on the object
itself (annotations), so the undo needs nothing from the laptop: `velo down`, the
next `velo up`, and the traffic-proxy after the lease lapses all run this same
code.  Every write is a JSON patch guarded by a resourceVersion test, so a
concurrent edit is retried against fresh state, never overwritten; and a patch
touches only the selector and velo's own annotations, so whatever else someone
changed on the Service meanwhile survives the restore.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import re
import socket
import time

from kubernetes.client.rest import ApiException

from velo.provider import ProviderError

from .api import Connection, call_sync

log = logging.getLogger("velo.kubernetes")

DOMAIN = "velo.dev"
ANN_SESSION = f"{DOMAIN}/session"
ANN_HOLDER = f"{DOMAIN}/holder"
ANN_SINCE = f"{DOMAIN}/since"
ANN_ORIGINAL = f"{DOMAIN}/original-selector"
OUR_ANNOTATIONS = (ANN_SESSION, ANN_HOLDER, ANN_SINCE, ANN_ORIGINAL)
LABEL_SESSION = f"{DOMAIN}/session"
LABEL_USER = f"{DOMAIN}/user"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
COMPONENT = "velo-traffic-proxy"
CONFLICT_RETRIES = 10


def holder_name() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def user_label() -> str:
    """A label-safe form of the local user name (label values allow [A-Za-z0-9._-])."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", getpass.getuser())[:63].strip("-._") or "user"


def proxy_labels(session: str) -> dict[str, str]:
    """What the traffic-proxy pod carries, and what an intercepted Service selects."""
    return {LABEL_SESSION: session, LABEL_COMPONENT: COMPONENT}


def lease_name(session: str) -> str:
    return f"velo-session-{session}"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


class InterceptRefused(ProviderError):
    """The Service is held by another live session."""


def _patch(conn: Connection, name: str, ops: list[dict], doing: str):
    return call_sync(conn, doing, conn.core.patch_namespaced_service, name, conn.namespace, ops)


def _is_conflict(exc: ProviderError) -> bool:
    text = str(exc)
    return "HTTP 409" in text or "HTTP 422" in text or "testing value" in text or "the object has been modified" in text


def refuse_if_held(svc, session: str, lease_alive) -> str | None:
    """Raise InterceptRefused if another live session holds ``svc``; return a lapsed holder's id."""
    annotations = svc.metadata.annotations or {}
    holder = annotations.get(ANN_SESSION)
    if not holder or holder == session:
        return None
    if lease_alive(holder):
        raise InterceptRefused(
            f"Service {svc.metadata.name} is already intercepted by {annotations.get(ANN_HOLDER, '?')} "
            f"(session {holder}) since {annotations.get(ANN_SINCE, '?')}; "
            "ask them to run `velo down`, or wait until their session lapses"
        )
    return holder


def intercept(conn: Connection, name: str, session: str, lease_alive) -> dict:
    """Point Service ``name`` at this session's traffic-proxy; return the Service as it was.

    ``lease_alive(session_id) -> bool`` decides whether another holder is still there.
    """
    for _ in range(CONFLICT_RETRIES):
        svc = call_sync(conn, f"reading Service {name}", conn.core.read_namespaced_service, name, conn.namespace)
        if (svc.metadata.annotations or {}).get(ANN_SESSION) == session:
            return svc
        lapsed = refuse_if_held(svc, session, lease_alive)
        if lapsed:
            log.info("Service %s was left intercepted by lapsed session %s; restoring it first", name, lapsed)
            restore(conn, name, lapsed)
            continue
        if not svc.spec.selector:
            raise ProviderError(f"Service {name} has no selector, so velo cannot redirect it (is it backed by manual Endpoints?)")
        ops = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": svc.metadata.resource_version},
            {"op": "replace", "path": "/spec/selector", "value": proxy_labels(session)},
        ]
        ours = {
            ANN_SESSION: session,
            ANN_HOLDER: holder_name(),
            ANN_SINCE: now_iso(),
            ANN_ORIGINAL: json.dumps(svc.spec.selector, sort_keys=True),
        }
        if svc.metadata.annotations is None:
            ops.append({"op": "add", "path": "/metadata/annotations", "value": ours})
        else:
            ops += [{"op": "add", "path": f"/metadata/annotations/{_pointer(k)}", "value": v} for k, v in ours.items()]
        try:
            _patch(conn, name, ops, f"intercepting Service {name}")
            return svc
        except ProviderError as exc:
            if not _is_conflict(exc):
                raise
            log.info("Service %s changed while intercepting it; retrying", name)
    raise ProviderError(f"Service {name} keeps changing; could not intercept it after {CONFLICT_RETRIES} attempts")


def restore(conn: Connection, name: str, session: str) -> bool:
    """Put Service ``name``'s original selector back if ``session`` holds it.  True if restored."""
    for _ in range(CONFLICT_RETRIES):
        try:
            svc = conn.core.read_namespaced_service(name, conn.namespace, _request_timeout=15)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        annotations = svc.metadata.annotations or {}
        if annotations.get(ANN_SESSION) != session:
            return False
        try:
            original = json.loads(annotations[ANN_ORIGINAL])
        except (KeyError, ValueError):
            raise ProviderError(f"Service {name}: annotation {ANN_ORIGINAL} is missing or not JSON; restore its selector by hand")
        ops = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": svc.metadata.resource_version},
            {"op": "replace", "path": "/spec/selector", "value": original},
        ]
        ops += [{"op": "remove", "path": f"/metadata/annotations/{_pointer(k)}"} for k in OUR_ANNOTATIONS if k in annotations]
        try:
            _patch(conn, name, ops, f"restoring Service {name}")
            log.info("Service %s: original selector restored", name)
            return True
        except ProviderError as exc:
            if not _is_conflict(exc):
                raise
    raise ProviderError(f"Service {name} keeps changing; could not restore it after {CONFLICT_RETRIES} attempts")


def intercepted_by(conn: Connection, session: str) -> list[str]:
    services = call_sync(conn, "listing Services", conn.core.list_namespaced_service, conn.namespace)
    return [s.metadata.name for s in services.items if (s.metadata.annotations or {}).get(ANN_SESSION) == session]


# ---- the lease: proof that the laptop is alive -------------------------------------


def lease_expired(lease, now: float | None = None) -> bool:
    spec = lease.spec
    renewed = spec.renew_time or spec.acquire_time
    if renewed is None or not spec.lease_duration_seconds:
        return True
    now = time.time() if now is None else now
    return renewed.timestamp() + spec.lease_duration_seconds < now


def lease_alive(conn: Connection, session: str) -> bool:
    try:
        lease = conn.coordination.read_namespaced_lease(lease_name(session), conn.namespace, _request_timeout=15)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return not lease_expired(lease)


def sessions(conn: Connection, user: str | None = None) -> dict[str, object]:
    """Session id -> its Lease (or None when only objects/annotations remain)."""
    selector = f"{LABEL_MANAGED}=velo" + (f",{LABEL_USER}={user}" if user else "")
    found: dict[str, object] = {}
    leases = call_sync(conn, "listing Leases", conn.coordination.list_namespaced_lease, conn.namespace, label_selector=selector)
    for lease in leases.items:
        found[lease.metadata.labels.get(LABEL_SESSION, "")] = lease
    deployments = call_sync(conn, "listing Deployments", conn.apps.list_namespaced_deployment, conn.namespace, label_selector=selector)
    for deployment in deployments.items:
        found.setdefault(deployment.metadata.labels.get(LABEL_SESSION, ""), None)
    if user is None:
        services = call_sync(conn, "listing Services", conn.core.list_namespaced_service, conn.namespace)
        for svc in services.items:
            held = (svc.metadata.annotations or {}).get(ANN_SESSION)
            if held:
                found.setdefault(held, None)
    found.pop("", None)
    return found


def clean_session(conn: Connection, session: str, *, everything: bool = True) -> list[str]:
    """Restore every Service the session holds, then delete its objects.  Idempotent.

    The session's objects are owned by its Deployment, so deleting that lets the
    garbage collector remove the rest; the traffic-proxy cleaning up after itself
    (``everything=False``) must not delete its own RoleBinding before it is done.
    """
    restored = [name for name in intercepted_by(conn, session) if restore(conn, name, session)]
    selector = f"{LABEL_SESSION}={session}"
    kinds = [(conn.coordination.list_namespaced_lease, conn.coordination.delete_namespaced_lease)]
    if everything:
        kinds += [
            (conn.core.list_namespaced_secret, conn.core.delete_namespaced_secret),
            (conn.rbac.list_namespaced_role_binding, conn.rbac.delete_namespaced_role_binding),
            (conn.rbac.list_namespaced_role, conn.rbac.delete_namespaced_role),
            (conn.core.list_namespaced_service_account, conn.core.delete_namespaced_service_account),
        ]
    kinds.append((conn.apps.list_namespaced_deployment, conn.apps.delete_namespaced_deployment))
    for lister, deleter in kinds:
        for item in call_sync(conn, "listing session objects", lister, conn.namespace, label_selector=selector).items:
            try:
                deleter(item.metadata.name, conn.namespace, propagation_policy="Background", _request_timeout=15)
            except ApiException as exc:
                if exc.status != 404:
                    raise
    return restored
