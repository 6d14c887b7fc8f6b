"""Checking a resource's spec against the OpenAPI schema of its CRD in `conf/crds/`, with
jsonschema, before anything is written.

The CRD schema is what the Kubernetes API server enforces; calicoctl decodes documents
into Go structs, which adds three habits kept here: field names match case-insensitively
(`natOutGoing` is `natOutgoing`), a field the type does not have is refused (where the API
server would silently prune it), and the schema's defaults are filled in, as the API
server fills them. jsonschema costs ~90 ms of import: it is for the CLI only, never the
per-pod path (bench/imports.py).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

from calicoctl.errors import CommandError
from libcalico.model import ValidationError

CRD_DIR = Path("conf") / "crds"
# A Calico Node has no CRD of its own (in Kubernetes it is the Node): its spec's schema.
_NODE_SPEC: dict[str, Any] = {
    "type": "object",
    "properties": {
        "bgp": {
            "type": "object",
            "properties": {
                "ipv4Address": {"type": "string"},
                "ipv6Address": {"type": "string"},
                "ipv4IPIPTunnelAddr": {"type": "string"},
                "asNumber": {"type": "integer"},
                "routeReflectorClusterID": {"type": "string"},
            },
        },
        "ipv4VXLANTunnelAddr": {"type": "string"},
        "vxlanTunnelMACAddr": {"type": "string"},
        "ipv6VXLANTunnelAddr": {"type": "string"},
        "vxlanTunnelMACAddrV6": {"type": "string"},
        "addresses": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"address": {"type": "string"}, "type": {"type": "string"}},
            },
        },
        "interfaces": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "addresses": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
        "orchRefs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"nodeName": {"type": "string"}, "orchestrator": {"type": "string"}},
            },
        },
        "wireguard": {
            "type": "object",
            "properties": {
                "interfaceIPv4Address": {"type": "string"},
                "interfaceIPv6Address": {"type": "string"},
            },
        },
    },
}
_NODE_STATUS: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
_OPENAPI_ONLY = ("x-kubernetes-list-type", "x-kubernetes-map-type", "format", "description")


def crd_dir() -> Path:
    """conf/crds in the source tree, or beside the bundle's code when frozen."""
    base = getattr(sys, "_MEIPASS", None)
    root = Path(base) if base else Path(__file__).resolve().parent.parent
    return root / CRD_DIR


@functools.cache
def crd_schema(plural: str) -> dict[str, Any]:
    """The openAPIV3Schema of `crd.projectcalico.org_<plural>.yaml`."""
    import yaml

    path = crd_dir() / f"crd.projectcalico.org_{plural}.yaml"
    try:
        crd = yaml.safe_load(path.read_text())
        return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as err:
        raise CommandError(f"the schema of {plural} is unusable ({path}): {err}") from err


def node_schema() -> dict[str, Any]:
    return {"type": "object", "properties": {"spec": _NODE_SPEC, "status": _NODE_STATUS}}


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema as JSON Schema: objects refuse fields they do not declare, unless
    they preserve unknown fields; Go's inline `(?i)` moved to the front for Python."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _OPENAPI_ONLY or key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _strict(value)
        elif key == "anyOf":
            out[key] = [_strict(sub) for sub in value]
        elif key == "pattern" and "(?i)" in value:
            out[key] = "(?i)" + value.replace("(?i)", "")
        else:
            out[key] = value
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def _canonical_names(doc: Any, schema: dict[str, Any]) -> Any:
    """`doc` with each field renamed to the schema's spelling when they differ only in
    case, as Go's JSON decoding matches them."""
    if isinstance(doc, list) and isinstance(schema.get("items"), dict):
        return [_canonical_names(item, schema["items"]) for item in doc]
    properties = schema.get("properties")
    if not isinstance(doc, dict) or not properties:
        return doc
    by_lower = {name.lower(): name for name in properties}
    out = {}
    for key, value in doc.items():
        name = key if key in properties else by_lower.get(key.lower(), key)
        out[name] = _canonical_names(value, properties.get(name, {}))
    return out


def _with_defaults(doc: Any, schema: dict[str, Any]) -> Any:
    """`doc` with the schema's defaults filled in for absent fields of present objects."""
    if isinstance(doc, list) and isinstance(schema.get("items"), dict):
        return [_with_defaults(item, schema["items"]) for item in doc]
    properties = schema.get("properties")
    if not isinstance(doc, dict) or not properties:
        return doc
    out = {key: _with_defaults(value, properties.get(key, {})) for key, value in doc.items()}
    for name, sub in properties.items():
        if name not in out and "default" in sub:
            out[name] = sub["default"]
    return out


def _field_path(path: Any) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _reason(error: Any) -> str:
    """jsonschema's complaint in calicoctl's words."""
    validator, expected = error.validator, error.validator_value
    if validator == "type":
        kinds = expected if isinstance(expected, list) else [expected]
        return "must be " + " or ".join(f"{'an' if k == 'integer' else 'a'} {k}" for k in kinds)
    if validator == "enum":
        return "must be one of " + ", ".join(str(v) for v in expected)
    if validator == "pattern":
        return f"does not match {expected}"
    if validator in ("minimum", "maximum"):
        return f"must be {'at least' if validator == 'minimum' else 'at most'} {expected}"
    if validator == "anyOf":
        return "must be an integer or a string"
    if validator == "required":
        return error.message.replace("'", "")
    return error.message


def _describe(error: Any) -> ValidationError:
    parts = list(error.absolute_path)
    if error.validator == "additionalProperties":
        known = set(error.schema.get("properties") or {})
        extra = sorted(set(error.instance) - known)
        name = _field_path([*parts, extra[0]]) if extra else _field_path(parts)
        return ValidationError(
            name, "field in document is not recognized or is in the wrong location"
        )
    where = _field_path(parts) or "document"
    value = error.instance
    shown = value if isinstance(value, str | int | float | bool) else type(value).__name__
    return ValidationError(where, _reason(error), shown)


def checked(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """`doc` (its spec and status) with names canonical and defaults filled, or the first
    schema violation as a ValidationError naming the field."""
    import jsonschema

    properties = schema.get("properties") or {}
    body = {k: doc[k] for k in ("spec", "status") if k in doc and k in properties}
    if doc.get("spec") is None and "spec" in properties:
        body["spec"] = {}
    shape = {"type": "object", "properties": {k: properties[k] for k in body}}
    body = _with_defaults(_canonical_names(body, shape), shape)
    validator = jsonschema.Draft7Validator(_strict(shape))
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
    if errors:
        raise _describe(errors[0])
    return {**doc, **body}
