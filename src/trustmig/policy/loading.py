"""Read TOML or YAML policy text into validated models, with errors that point at a line.

Syntax errors carry the parser's own line (``tomllib`` puts it in the message, PyYAML in its
marks). Validation errors name a key path; to turn that into a line:

* YAML: the document is composed into nodes and every key path is mapped to the line of its key,
  which is exact.
* TOML: the standard library parser keeps no positions, so the text is scanned for ``[table]``
  headers and ``key =`` lines and the longest known prefix of the failing path wins. This is best
  effort: a value inside an inline table or a multi-line array is reported at the line of the key
  that holds it, and a missing required key has no line at all (the message then names the file
  only).

Whatever the error, nothing is returned: a policy is applied whole or not at all.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError

from trustmig.policy.errors import PolicyError
from trustmig.policy.models import HostPolicy, VmPolicy

PolicyFormat = Literal["toml", "yaml"]
MAX_POLICY_BYTES = 64 * 1024
"""Policies are small; a cap keeps hostile input (YAML alias bombs, huge files) cheap to refuse."""

M = TypeVar("M", bound=BaseModel)
LinePath = tuple[str | int, ...]
LineFinder = Callable[[LinePath], int | None]

_TOML_LINE_RE = re.compile(r"line (\d+)")
_KEY_PART = r"(?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)"
_DOTTED_KEY = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER_RE = re.compile(rf"^\s*\[\[?\s*({_DOTTED_KEY})\s*\]\]?")
_ASSIGN_RE = re.compile(rf"^\s*({_DOTTED_KEY})\s*=")
_PART_RE = re.compile(_KEY_PART)


def format_for_path(path: Path) -> PolicyFormat:
    """Pick the parser from the file suffix; anything else is refused rather than guessed."""
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return "toml"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise PolicyError(
        f"{path}: unknown policy format {suffix or '(none)'!r}; name it .toml or .yaml"
    )


def as_format(fmt: str, source: str) -> PolicyFormat:
    """Narrow a format name taken from untrusted input (e.g. a signed policy) to a known one."""
    if fmt == "toml":
        return "toml"
    if fmt == "yaml":
        return "yaml"
    raise PolicyError(f"{source}: unknown policy format {fmt!r}; use 'toml' or 'yaml'")


def _split_key(dotted: str) -> tuple[str, ...]:
    return tuple(p.strip("\"'") for p in _PART_RE.findall(dotted))


def _toml_line_map(text: str) -> dict[tuple[str, ...], int]:
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_multiline = False
    for number, raw in enumerate(text.splitlines(), start=1):
        triple = raw.count('"""') + raw.count("'''")
        if in_multiline:
            in_multiline = triple % 2 == 0
            continue
        header = _HEADER_RE.match(raw)
        if header is not None:
            table = _split_key(header.group(1))
            lines.setdefault(table, number)
            continue
        assign = _ASSIGN_RE.match(raw)
        if assign is not None:
            lines.setdefault(table + _split_key(assign.group(1)), number)
        if triple % 2 == 1:
            in_multiline = True
    return lines


def _prefix_finder(lines: dict[tuple[str, ...], int]) -> LineFinder:
    def find(loc: LinePath) -> int | None:
        keys = tuple(str(p) for p in loc if isinstance(p, str))
        for end in range(len(keys), 0, -1):
            if keys[:end] in lines:
                return lines[keys[:end]]
        return None

    return find


def _yaml_line_map(node: yaml.Node, source: str) -> dict[LinePath, int]:
    lines: dict[LinePath, int] = {}

    def walk(current: yaml.Node, path: LinePath) -> None:
        if isinstance(current, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in current.value:
                key = str(key_node.value)
                if key in seen:
                    raise PolicyError(
                        f"{source} line {key_node.start_mark.line + 1}: duplicate key {key!r}; "
                        "keep only one"
                    )
                seen.add(key)
                lines[(*path, key)] = key_node.start_mark.line + 1
                walk(value_node, (*path, key))
        elif isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                lines[(*path, index)] = item.start_mark.line + 1
                walk(item, (*path, index))

    walk(node, ())
    return lines


def _exact_or_prefix(lines: dict[LinePath, int]) -> LineFinder:
    def find(loc: LinePath) -> int | None:
        for end in range(len(loc), 0, -1):
            if loc[:end] in lines:
                return lines[loc[:end]]
        return None

    return find


def _parse_toml(text: str, source: str) -> tuple[Any, LineFinder]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_LINE_RE.search(str(exc))
        where = f" line {match.group(1)}" if match else ""
        raise PolicyError(f"{source}{where}: invalid TOML: {exc}") from None
    return data, _prefix_finder(_toml_line_map(text))


def _parse_yaml(text: str, source: str) -> tuple[Any, LineFinder]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "syntax error"
        raise PolicyError(f"{source}{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: invalid YAML: {exc}") from None
    if node is None:
        return data, lambda loc: None
    return data, _exact_or_prefix(_yaml_line_map(node, source))


def _allowed_keys(model: type[BaseModel], parent: Sequence[str | int]) -> list[str]:
    current: type[BaseModel] = model
    for part in parent:
        if not isinstance(part, str) or part not in current.model_fields:
            return []
        annotation = current.model_fields[part].annotation
        candidates = [annotation, *get_args(annotation)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        current = nested[0]
    return list(current.model_fields)


def _describe_path(loc: LinePath) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(document)"


def _describe_error(model: type[BaseModel], error: Any) -> str:
    kind = error["type"]
    loc = tuple(error["loc"])
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"unknown key{hint}"
    if kind == "missing":
        return "required key is missing; add it"
    message = str(error["msg"])
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    return f"{message[0].lower()}{message[1:]} (got {error.get('input')!r})"


def _validate(model: type[M], data: Any, source: str, find_line: LineFinder, kind: str) -> M:
    if data is None:
        raise PolicyError(f"{source}: the policy is empty; write a {kind} policy document")
    if not isinstance(data, dict):
        raise PolicyError(
            f"{source}: expected a {kind} policy as a table of keys, got {type(data).__name__}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        loc = tuple(first["loc"])
        line = find_line(loc)
        where = f" line {line}" if line is not None else ""
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise PolicyError(
            f"{source}{where}: {_describe_path(loc)}: {_describe_error(model, first)}{more}"
        ) from None


def _parse(model: type[M], text: str, source: str, fmt: str, kind: str) -> M:
    if fmt not in ("toml", "yaml"):
        raise PolicyError(f"{source}: unknown policy format {fmt!r}; use 'toml' or 'yaml'")
    if not isinstance(text, str):
        raise PolicyError(f"{source}: policy text must be str, got {type(text).__name__}")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
        raise PolicyError(
            f"{source}: policy is larger than {MAX_POLICY_BYTES} bytes; policies are short, "
            "check the file"
        )
    data, find_line = _parse_toml(text, source) if fmt == "toml" else _parse_yaml(text, source)
    return _validate(model, data, source, find_line, kind)


def parse_vm_policy(text: str, *, source: str = "<policy>", fmt: PolicyFormat = "toml") -> VmPolicy:
    """Parse and validate a VM policy; raises ``PolicyError`` naming source, line and reason."""
    return _parse(VmPolicy, text, source, fmt, "VM")


def parse_host_policy(
    text: str, *, source: str = "<policy>", fmt: PolicyFormat = "toml"
) -> HostPolicy:
    """Parse and validate a host policy; raises ``PolicyError`` naming source, line and reason."""
    return _parse(HostPolicy, text, source, fmt, "host")


def read_policy_text(path: Path) -> tuple[str, PolicyFormat]:
    """Read a policy file as UTF-8 and pick its format from the suffix."""
    fmt = format_for_path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(
            f"{path}: cannot read policy file ({exc.strerror}); check the path"
        ) from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(f"{path}: policy is larger than {MAX_POLICY_BYTES} bytes; check the file")
    try:
        return raw.decode("utf-8"), fmt
    except UnicodeDecodeError as exc:
        raise PolicyError(
            f"{path}: policy is not UTF-8 text (byte {exc.start}); re-save it as UTF-8"
        ) from None


def load_vm_policy(path: Path) -> VmPolicy:
    """Load a VM policy file (``.toml``, ``.yaml`` or ``.yml``)."""
    path = Path(path)
    text, fmt = read_policy_text(path)
    return parse_vm_policy(text, source=str(path), fmt=fmt)


def load_host_policy(path: Path) -> HostPolicy:
    """Load a host policy file (``.toml``, ``.yaml`` or ``.yml``)."""
    path = Path(path)
    text, fmt = read_policy_text(path)
    return parse_host_policy(text, source=str(path), fmt=fmt)
