"""The candidate's environment, as its container would get it in its pod.

`velo env` / `velo up` run one service locally in place of its pods, so it must see
the variables the kubelet would have given its container.  This module reproduces
the kubelet's ``makeEnvironmentVariables`` (pkg/kubelet/kubelet_pods.go, checked
against v1.36) for a pod template that has no pod yet:

1. ``envFrom`` sources in order (ConfigMap ``data`` / Secret ``data``, with
   ``prefix``); a later source overrides an earlier one.  ``binaryData`` is ignored,
   like the kubelet does.
2. ``env`` entries in order; each overrides whatever came before under its name
   (envFrom or an earlier duplicate), so the last definition wins.
   * ``value`` is ``$(VAR)``-expanded against everything defined *before* it
     (envFrom plus earlier entries, including an earlier definition of the same
     name), then the optional ``service_env`` fallback.  ``$$`` is an escaped ``$``;
     an unresolvable reference stays as written.
   * ``valueFrom`` references are never expanded.
   * an ``optional`` reference to a missing object or key skips the entry: the
     name keeps whatever an earlier source gave it, or stays absent.
3. A required ConfigMap/Secret/key that is missing stops here (`EnvError`): in the
   cluster the pod would be stuck in CreateContainerConfigError.

What only exists on a real pod is approximated, with a warning where the value can
differ: ``metadata.name`` is ``pod_name``, ``spec.nodeName`` is ``node_name``, the pod
and host IPs are ``pod_ip``, ``metadata.uid`` is empty, and a ``resourceFieldRef``
to a limit the container does not set (the kubelet substitutes the node's
allocatable) is left out.

Order of the result: the kubelet hands the runtime a Go map (no order at all), so
velo picks a stable one -- dict semantics: a name sits where it was *first*
defined (envFrom keys in source order, each source's keys sorted, then new names
from ``env`` in order) and holds its *last* value.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Callable, Iterable, Mapping

from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.utils import parse_quantity

from velo.provider import ProviderError

__all__ = ["CandidateEnv", "EnvError", "expand", "pick_container", "resolve_env"]

_RBAC_HINT = "`velo rbac` prints a Role that grants what velo needs"
_CONFIG_ERROR = "the pod would not start (CreateContainerConfigError)"

# Kubernetes before RelaxedEnvironmentVariableValidation (alpha 1.30, on by default
# from 1.32, GA 1.34): apimachinery IsEnvVarName.
_STRICT_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


class EnvError(ProviderError):
    """The candidate's environment cannot be built: one line, naming what is missing."""


@dataclass(frozen=True)
class CandidateEnv:
    """The resolved variables.

    env:          (name, value) in velo's stable order (see the module docstring).
    secret_keys:  names whose value came, even partly through ``$(VAR)``, from a Secret,
                  so callers can mask them when printing.
    warnings:     where the local value may differ from the pod's, or a source was skipped.
    """

    env: tuple[tuple[str, str], ...]
    secret_keys: frozenset[str]
    warnings: tuple[str, ...]

    def as_dict(self) -> dict[str, str]:
        return dict(self.env)


# -- choosing the container -----------------------------------------------------------


def pick_container(pod_spec: client.V1PodSpec, target_ports: Iterable[int | str] = (),
                   name: str | None = None) -> client.V1Container:
    """The container that stands for the Service's backend.

    An explicit ``name`` wins.  Otherwise the container that declares the most of the
    Service's targetPorts (a number matches ``containerPort``, a string matches the
    port ``name`` the way the Service resolves a named targetPort; a digit-only string
    counts as a number), earlier containers winning ties; with no match, the first
    container -- containerPort declarations are informational, so a pod may declare none.
    Only regular containers are candidates: init containers never serve the Service.
    """
    containers = list(pod_spec.containers or [])
    if not containers:
        raise EnvError("the pod template has no containers")
    if name is not None:
        for c in containers:
            if c.name == name:
                return c
        raise EnvError(f'no container "{name}" in the pod template; containers: '
                       + ", ".join(c.name for c in containers))
    numbers: set[int] = set()
    names: set[str] = set()
    for tp in target_ports:
        if isinstance(tp, int) or (isinstance(tp, str) and tp.isdigit()):
            numbers.add(int(tp))
        elif tp:
            names.add(str(tp))
    best, best_score = containers[0], 0
    for c in containers:
        score = sum(1 for p in c.ports or []
                    if p.container_port in numbers or (p.name and p.name in names))
        if score > best_score:
            best, best_score = c, score
    return best


# -- $(VAR) expansion ---------------------------------------------------------------------


def expand(value: str, lookup: Callable[[str], str | None]) -> tuple[str, list[str], list[str]]:
    """Kubernetes' ``$(VAR)`` expansion (third_party/forked/golang/expansion).

    Returns (result, names substituted, names left unresolved).  ``$$`` yields ``$``,
    ``$(`` without a closing ``)`` and ``$`` before any other character stay literal,
    a lone trailing ``$`` stays.  ``lookup`` returns None for an undefined name.
    """
    out: list[str] = []
    used: list[str] = []
    missing: list[str] = []
    i, n = 0, len(value)
    checkpoint = 0
    while i < n:
        if value[i] == "$" and i + 1 < n:
            out.append(value[checkpoint:i])
            nxt = value[i + 1]
            if nxt == "$":
                out.append("$")
                i += 1
            elif nxt == "(":
                close = value.find(")", i + 2)
                if close < 0:
                    out.append("$(")
                    i += 1
                else:
                    ref = value[i + 2:close]
                    got = lookup(ref)
                    if got is None:
                        out.append(f"$({ref})")
                        missing.append(ref)
                    else:
                        out.append(got)
                        used.append(ref)
                    i = close
            else:
                out.append("$" + nxt)
                i += 1
            checkpoint = i + 1
        i += 1
    out.append(value[checkpoint:])
    return "".join(out), used, missing


# -- resolving ----------------------------------------------------------------------------


def resolve_env(core: client.CoreV1Api, namespace: str, pod_template: client.V1PodTemplateSpec,
                container: client.V1Container, *, pod_name: str, node_name: str = "localhost",
                pod_ip: str = "127.0.0.1", service_env: Mapping[str, str] | None = None,
                strict_env_names: bool = False) -> CandidateEnv:
    """The environment ``container`` of ``pod_template`` would get in ``namespace``.

    ``service_env``: Kubernetes also resolves ``$(VAR)`` against the service-link
    variables (after the container's own); velo computes those itself (pointing at its
    local listeners), so they are only a lookup fallback here, never part of the result.
    ``strict_env_names``: reproduce kubelets without RelaxedEnvironmentVariableValidation
    (off by default before 1.32), which skip envFrom keys that are not C-identifier-like
    (``[-._a-zA-Z][-._a-zA-Z0-9]*``) with a warning event; v1.34+ kubelets pass every key
    on (ConfigMap/Secret keys are always printable ASCII, so none is ever skipped).
    Each ConfigMap/Secret is read once.  403 -> `EnvError`; other API errors propagate.
    """
    return _Resolver(core, namespace, pod_template, container, pod_name, node_name, pod_ip,
                     service_env or {}, strict_env_names).run()


class _Resolver:
    def __init__(self, core, namespace, template, container, pod_name, node_name, pod_ip,
                 service_env, strict_env_names):
        self.core = core
        self.ns = namespace
        self.meta = template.metadata or client.V1ObjectMeta()
        self.spec = template.spec or client.V1PodSpec(containers=[])
        self.container = container
        self.pod_name, self.node_name, self.pod_ip = pod_name, node_name, pod_ip
        self.service_env = service_env
        self.strict = strict_env_names
        self.values: dict[str, str] = {}
        self.secret: set[str] = set()
        self.warnings: list[str] = []
        self.objects: dict[tuple[str, str], dict[str, str] | None] = {}

    def run(self) -> CandidateEnv:
        for source in self.container.env_from or []:
            self._env_from(source)
        for var in self.container.env or []:
            self._env_var(var)
        env = tuple(self.values.items())
        seen: set[str] = set()
        warnings = tuple(w for w in self.warnings if not (w in seen or seen.add(w)))
        return CandidateEnv(env, frozenset(self.secret & self.values.keys()), warnings)

    # -- helpers ------------------------------------------------------------------------

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)

    def _set(self, name: str, value: str, secret: bool) -> None:
        if "\0" in value:
            self._warn(f"{name}: the value contains a NUL byte, which a process environment "
                       "cannot hold; cut at the NUL (the container runtime would refuse it)")
            value = value.split("\0", 1)[0]
        self.values[name] = value
        if secret:
            self.secret.add(name)
        else:
            self.secret.discard(name)

    def _get(self, kind: str, name: str) -> dict[str, str] | None:
        """The ConfigMap's ``data`` / the Secret's decoded ``data``, or None when the object
        does not exist.  Read once per call, as the kubelet does per pod sync."""
        key = (kind, name)
        if key in self.objects:
            return self.objects[key]
        read = self.core.read_namespaced_secret if kind == "Secret" else self.core.read_namespaced_config_map
        try:
            obj = read(name, self.ns)
        except ApiException as exc:
            if exc.status == 404:
                self.objects[key] = None
                return None
            if exc.status == 403:
                resource = "secrets" if kind == "Secret" else "configmaps"
                raise EnvError(f"cannot get {resource} in namespace {self.ns}: forbidden "
                               f'({kind} "{name}", for container "{self.container.name}"); {_RBAC_HINT}') from None
            raise
        data: dict[str, str] = {}
        for k, v in (obj.data or {}).items():  # ConfigMap binaryData never reaches env
            if kind == "ConfigMap":
                data[k] = v
                continue
            raw = base64.b64decode(v or "")
            try:
                data[k] = raw.decode("utf-8")
            except UnicodeDecodeError:
                # surrogateescape: the bytes survive into a child process's environment
                data[k] = raw.decode("utf-8", "surrogateescape")
                self._warn(f'Secret "{name}" key "{k}" is not UTF-8 text; passed on byte for byte')
        self.objects[key] = data
        return data

    def _missing(self, var: str, kind: str, name: str, key: str | None, object_missing: bool) -> EnvError:
        where = f'container "{self.container.name}": ' + (f"env {var}" if var else "envFrom")
        if object_missing:
            what = f'{kind} "{name}" not found in namespace {self.ns}'
            if key is not None:
                what += f' (wanted key "{key}")'
        else:
            what = f'key "{key}" not found in {kind} "{name}" (namespace {self.ns})'
        return EnvError(f"{where}: {what}; {_CONFIG_ERROR}")

    # -- envFrom --------------------------------------------------------------------------

    def _env_from(self, source: client.V1EnvFromSource) -> None:
        if source.config_map_ref is not None:
            kind, ref = "ConfigMap", source.config_map_ref
        elif source.secret_ref is not None:
            kind, ref = "Secret", source.secret_ref
        else:
            return
        data = self._get(kind, ref.name)
        if data is None:
            if ref.optional:
                return
            raise self._missing("", kind, ref.name, None, True)
        prefix = source.prefix or ""
        skipped = []
        for key in sorted(data):
            name = prefix + key
            if not _valid_name(name, self.strict):
                skipped.append(name)
                continue
            self._set(name, data[key], kind == "Secret")
        if skipped:
            self._warn(f'envFrom {kind} "{ref.name}": keys {", ".join(skipped)} skipped: '
                       "not valid environment variable names")

    # -- env ------------------------------------------------------------------------------

    def _env_var(self, var: client.V1EnvVar) -> None:
        name = var.name
        if var.value:  # the kubelet expands only a non-empty literal
            value, used, missing = expand(var.value, self._lookup)
            for ref in missing:
                self._warn(f"{name}: $({ref}) is not defined before {name}; kept as written")
            self._set(name, value, any(ref in self.secret and ref in self.values for ref in used))
            return
        source = var.value_from
        if source is None:
            self._set(name, "", False)
            return
        if source.config_map_key_ref is not None or source.secret_key_ref is not None:
            self._key_ref(name, source)
        elif source.field_ref is not None:
            value = self._field(name, source.field_ref)
            if value is not None:
                self._set(name, value, False)
        elif source.resource_field_ref is not None:
            value = self._resource(name, source.resource_field_ref)
            if value is not None:
                self._set(name, value, False)
        elif getattr(source, "file_key_ref", None) is not None:
            ref = source.file_key_ref
            self._warn(f'{name}: fileKeyRef ({ref.path} in volume "{ref.volume_name}") is only '
                       "readable inside the pod; left out")
        else:
            self._warn(f"{name}: unsupported valueFrom; left out")

    def _lookup(self, ref: str) -> str | None:
        if ref in self.values:
            return self.values[ref]
        return self.service_env.get(ref)

    def _key_ref(self, name: str, source: client.V1EnvVarSource) -> None:
        if source.config_map_key_ref is not None:
            kind, ref = "ConfigMap", source.config_map_key_ref
        else:
            kind, ref = "Secret", source.secret_key_ref
        data = self._get(kind, ref.name)
        if data is None:
            if ref.optional:
                return
            raise self._missing(name, kind, ref.name, ref.key, True)
        if ref.key not in data:
            if ref.optional:
                return
            raise self._missing(name, kind, ref.name, ref.key, False)
        self._set(name, data[ref.key], kind == "Secret")

    def _field(self, name: str, ref: client.V1ObjectFieldSelector) -> str | None:
        """Downward API fieldRef, from the pod template and the local stand-ins."""
        path = ref.field_path or ""
        if (ref.api_version or "v1") != "v1":
            self._warn(f"{name}: fieldRef apiVersion {ref.api_version} is not supported; left out")
            return None
        sub = _subscript(path)
        if sub is not None:
            field, key = sub
            if field in ("metadata.labels", "metadata.annotations"):
                values = (self.meta.labels if field == "metadata.labels" else self.meta.annotations) or {}
                if key not in values:
                    self._warn(f"{name}: {path} is not set on the pod template (a controller or admission "
                               "webhook may add it to real pods); using an empty value")
                return values.get(key, "")
        elif path == "metadata.name":
            return self.pod_name
        elif path == "metadata.namespace":
            return self.ns
        elif path == "metadata.uid":
            self._warn(f"{name}: metadata.uid exists only on a real pod; using an empty value")
            return ""
        elif path in ("spec.nodeName", "spec.host"):
            return self.node_name
        elif path == "spec.serviceAccountName":
            # the ServiceAccount admission plugin fills in "default" when unset
            return self.spec.service_account_name or self.spec.service_account or "default"
        elif path in ("status.podIP", "status.podIPs", "status.hostIP", "status.hostIPs"):
            return self.pod_ip
        self._warn(f"{name}: fieldRef {path} is not supported; left out")
        return None

    def _resource(self, name: str, ref: client.V1ResourceFieldSelector) -> str | None:
        """Downward API resourceFieldRef: Kubernetes' rounding (ceil) and defaulting."""
        resource = ref.resource or ""
        kind, _, res = resource.partition(".")
        if kind not in ("limits", "requests") or not res or not (
                res in ("cpu", "memory", "ephemeral-storage") or res.startswith("hugepages-")):
            self._warn(f"{name}: resourceFieldRef {resource} is not supported; left out")
            return None
        target, regular = self.container, True
        if ref.container_name and ref.container_name != self.container.name:
            target = next((c for c in self.spec.containers or [] if c.name == ref.container_name), None)
            if target is None:
                target, regular = next((c for c in self.spec.init_containers or []
                                        if c.name == ref.container_name), None), False
            if target is None:
                self._warn(f'{name}: resourceFieldRef names container "{ref.container_name}", '
                           "which is not in the pod; left out")
                return None
        resources = target.resources or client.V1ResourceRequirements()
        limits = {k: parse_quantity(v) for k, v in (resources.limits or {}).items()}
        # SetDefaults_Pod: a request left out defaults to the limit (pods only, not templates)
        requests = {**limits, **{k: parse_quantity(v) for k, v in (resources.requests or {}).items()}}
        if kind == "requests":
            quantity = requests.get(res, Decimal(0))
        else:
            quantity = limits.get(res, Decimal(0))
            if quantity == 0 and regular and res in ("cpu", "memory", "ephemeral-storage"):
                # defaultPodLimitsForDownwardAPI: pod-level limit (cpu, memory), else node allocatable
                pod_limits = (self.spec.resources.limits if getattr(self.spec, "resources", None) else None) or {}
                if res in ("cpu", "memory") and parse_quantity(pod_limits.get(res, "0")) != 0:
                    quantity = parse_quantity(pod_limits[res])
                else:
                    self._warn(f"{name}: {resource} is not set on container {target.name}; Kubernetes "
                               "would use the node's allocatable amount, unknown here; left out")
                    return None
        divisor = parse_quantity(ref.divisor) if ref.divisor not in (None, "") else Decimal(0)
        if divisor == 0:
            divisor = Decimal(1)
        if res == "cpu":  # Quantity.MilliValue() rounds up
            num, den = _ceil(quantity * 1000), _ceil(divisor * 1000)
        else:             # Quantity.Value() rounds up
            num, den = _ceil(quantity), _ceil(divisor)
        # float64 division and math.Ceil exactly as in pkg/api/v1/resource/helpers.go
        return str(int(math.ceil(float(num) / float(den))))


def _ceil(d: Decimal) -> int:
    return int(d.to_integral_value(rounding=ROUND_CEILING))


def _subscript(path: str) -> tuple[str, str] | None:
    """fieldpath.SplitMaybeSubscriptedPath: ``metadata.labels['k']`` -> (metadata.labels, k)."""
    if not path.endswith("']"):
        return None
    head, sep, key = path[:-2].partition("['")
    if not sep or not head:
        return None
    return head, key


def _valid_name(name: str, strict: bool) -> bool:
    if strict:
        return bool(_STRICT_NAME.fullmatch(name)) and name not in (".", "..") and not name.startswith("..")
    return bool(name) and all(" " <= ch <= "~" and ch != "=" for ch in name)

