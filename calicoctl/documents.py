"""Reading and writing the YAML/JSON documents that `ctl` consumes and prints."""

from __future__ import annotations

import json
import sys
from typing import Any

from calicoctl.errors import CommandError


def read_source(path: str) -> str:
    """The text of FILE, or of stdin for `-`."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as err:
        raise CommandError(f"cannot read {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise CommandError(f"cannot read {path}: not UTF-8 text") from err


def _parse_json(text: str) -> list[Any] | None:
    """JSON first: it is exact about types and allows tabs, which YAML does not."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, list) else [doc]


def _parse_yaml(text: str, source: str) -> list[Any]:
    import yaml

    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise CommandError(f"cannot parse {source}: {problem}{where}") from err


def source_name(path: str) -> str:
    """How messages name FILE (`-` is stdin)."""
    return "stdin" if path == "-" else path


def load_documents(path: str) -> list[dict[str, Any]]:
    """Every document in FILE, or in stdin for `-`."""
    return parse_documents(read_source(path), source_name(path))


def parse_documents(text: str, source: str) -> list[dict[str, Any]]:
    """Every non-empty document: JSON (an object or an array of them) or YAML (`---`)."""
    docs = _parse_json(text)
    if docs is None:
        docs = _parse_yaml(text, source)
    docs = [doc for doc in docs if doc is not None]
    for index, doc in enumerate(docs, 1):
        if not isinstance(doc, dict):
            raise CommandError(f"cannot parse {source}: document {index} is not a mapping")
    return docs


def _go_yaml_dumper() -> type:
    """PyYAML's safe dumper printing strings as go-yaml (which calicoctl uses) does: a
    string that YAML would read as another type (`"true"`, `"7"`, a timestamp, `""`) in
    double quotes, other strings plain where YAML allows."""
    import yaml

    class GoDumper(yaml.SafeDumper):
        def ignore_aliases(self, data: object) -> bool:
            return True  # go-yaml repeats shared values; it has no anchors

        def represent_str(self, data: str) -> yaml.ScalarNode:
            tag = "tag:yaml.org,2002:str"
            implicit = self.resolve(yaml.ScalarNode, data, (True, False))
            if data == "" or implicit != tag:
                return self.represent_scalar(tag, data, style='"')
            return self.represent_scalar(tag, data)

    GoDumper.add_representer(str, GoDumper.represent_str)
    return GoDumper


def dump_yaml(doc: Any) -> str:
    """Keys sorted, as calicoctl prints them (it converts Go's JSON to YAML)."""
    import yaml

    return yaml.dump(doc, Dumper=_go_yaml_dumper(), default_flow_style=False, sort_keys=True)


def dump_json(doc: Any) -> str:
    """Indented by two, keys in the order the resource lists them (Go's struct order)."""
    return json.dumps(doc, indent=2) + "\n"
