"""Reading a tool's JSON schema as far as typing its arguments needs.

Tool schemas come hand-written or generated (pydantic, as MCP servers send them), so a
parameter's schema may be a `$ref` into `$defs` / `definitions`, a union (`anyOf` / `oneOf`), an
intersection (`allOf`), a nullable type (`"type": ["x", "null"]` or OpenAPI's `"nullable": true`)
or a bare `enum` / `const`. Everything here is shallow: a value's own type and allowed values
are checked, the items and properties inside it are not (they arrive as JSON, already typed).

A `$ref` that does not resolve, or a cycle, counts as "says nothing" rather than an error: the
model should not be refused a call because the tool's schema is broken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

JSON_TYPES = frozenset({"null", "boolean", "integer", "number", "string", "array", "object"})


@dataclass(frozen=True)
class ObjectSchema:
    """The parameters of one tool: each property's schema, with the root to resolve refs in."""

    properties: dict[str, Any]
    required: tuple[str, ...]
    closed: bool  # additionalProperties is false: unknown parameters are refused
    root: Any

    @classmethod
    def of(cls, parameters: Any) -> ObjectSchema:
        properties: dict[str, Any] = {}
        required: list[str] = []
        closed = False
        for node in _conjuncts(parameters, parameters):
            for key, schema in (node.get("properties") or {}).items():
                properties[key] = schema if key not in properties else {"allOf": [properties[key], schema]}
            required.extend(name for name in node.get("required") or () if isinstance(name, str))
            closed = closed or node.get("additionalProperties") is False
        for key, schema in _union_properties(parameters).items():
            properties.setdefault(key, schema)
        return cls(properties, tuple(dict.fromkeys(required)), closed, parameters)

    def allowed_types(self, key: str) -> set[str] | None:
        return allowed_types(self.properties.get(key), self.root)

    def validates(self, key: str, value: Any) -> bool:
        return validates(value, self.properties.get(key), self.root)

    def choices(self, key: str) -> list[Any] | None:
        return choices(self.properties.get(key), self.root)


def allowed_types(schema: Any, root: Any) -> set[str] | None:
    """The JSON types a schema allows ("number" includes integers), or None when it does not say
    (a contradictory schema, which allows nothing, says nothing either)."""
    return _types(schema, root, frozenset()) or None


def validates(value: Any, schema: Any, root: Any) -> bool:
    """Whether value has a type and, where listed, a value the schema allows (one level deep)."""
    return _validates(value, schema, root, frozenset())


def choices(schema: Any, root: Any) -> list[Any] | None:
    """The values an enum-like schema allows (for error messages), or None when it is open."""
    return _choices(schema, root, frozenset())


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def type_matches(value: Any, types: set[str]) -> bool:
    """Integers are numbers; a float with an integral value (5.0) passes for an integer."""
    kind = json_type(value)
    if kind in types:
        return True
    if kind == "integer":
        return "number" in types
    return kind == "number" and "integer" in types and value.is_integer()


def same_json(a: Any, b: Any) -> bool:
    """JSON equality: 1 equals 1.0, but True is not 1."""
    kinds = {json_type(a), json_type(b)}
    if not (len(kinds) == 1 or kinds == {"integer", "number"}):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    return a == b


# A schema node is read as an intersection of "conjuncts": itself, its $ref target and its allOf
# branches (recursively). Each conjunct may restrict the type and list allowed values; a union
# (anyOf / oneOf) in a conjunct allows what any of its branches allows.


def _types(schema: Any, root: Any, seen: frozenset[int]) -> set[str] | None:
    result: set[str] | None = None
    for node in _conjuncts(schema, root, seen):
        for types in (_declared_types(node), _union_types(node, root, seen | {id(node)})):
            if types is not None:
                result = types if result is None else _intersect(result, types)
    return result


def _declared_types(node: dict[str, Any]) -> set[str] | None:
    declared = node.get("type")
    if isinstance(declared, str):
        types = {declared}
    elif isinstance(declared, list):
        types = {t for t in declared if isinstance(t, str)}
    else:
        types = None
    listed = _listed_values(node)
    if listed is not None:
        listed_types = {json_type(value) for value in listed}
        types = listed_types if types is None else _intersect(types, listed_types)
    if types is not None and node.get("nullable") is True:
        types = types | {"null"}
    return (types & JSON_TYPES) or None if types is not None else None


def _union_types(node: dict[str, Any], root: Any, seen: frozenset[int]) -> set[str] | None:
    result: set[str] | None = None
    for keyword in ("anyOf", "oneOf"):
        branches = node.get(keyword)
        if not isinstance(branches, list) or not branches:
            continue
        union: set[str] = set()
        for branch in branches:
            types = _types(branch, root, seen)
            if types is None:  # one open branch leaves the whole union open
                union = set()
                break
            union |= types
        if union:
            result = union if result is None else _intersect(result, union)
    return result


def _intersect(a: set[str], b: set[str]) -> set[str]:
    both = a & b
    if "number" in a and "integer" in b or "integer" in a and "number" in b:
        both.add("integer")
    return both


def _validates(value: Any, schema: Any, root: Any, seen: frozenset[int]) -> bool:
    for node in _conjuncts(schema, root, seen):
        types = _declared_types(node)
        if types is not None and not type_matches(value, types):
            return False
        listed = _listed_values(node)
        if listed is not None and not any(same_json(value, allowed) for allowed in listed):
            return False
        inner = seen | {id(node)}
        for keyword in ("anyOf", "oneOf"):
            branches = node.get(keyword)
            if isinstance(branches, list) and branches:
                if not any(_validates(value, branch, root, inner) for branch in branches):
                    return False
    return True


def _choices(schema: Any, root: Any, seen: frozenset[int]) -> list[Any] | None:
    for node in _conjuncts(schema, root, seen):
        listed = _listed_values(node)
        if listed is not None:
            return listed
        for keyword in ("anyOf", "oneOf"):
            branches = node.get(keyword)
            if isinstance(branches, list) and branches:
                found = [_branch_choices(branch, root, seen | {id(node)}) for branch in branches]
                if all(values is not None for values in found):
                    return [value for values in found for value in values]  # type: ignore[union-attr]
    return None


def _branch_choices(branch: Any, root: Any, seen: frozenset[int]) -> list[Any] | None:
    listed = _choices(branch, root, seen)
    if listed is None and _types(branch, root, seen) == {"null"}:  # Optional[Enum]
        return [None]
    return listed


def _listed_values(node: dict[str, Any]) -> list[Any] | None:
    if "const" in node:
        return [node["const"]]
    listed = node.get("enum")
    return listed if isinstance(listed, list) and listed else None


def _conjuncts(schema: Any, root: Any, seen: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    """The node, its $ref target and its allOf branches, each once, cycles cut."""
    found: list[dict[str, Any]] = []
    pending = [schema]
    while pending:
        node = pending.pop(0)
        if not isinstance(node, dict) or id(node) in seen:
            continue
        seen = seen | {id(node)}
        found.append(node)
        reference = node.get("$ref")
        if isinstance(reference, str):
            pending.append(_resolve(reference, root))
        branches = node.get("allOf")
        if isinstance(branches, list):
            pending.extend(branches)
    return found


def _resolve(reference: str, root: Any) -> Any:
    """A local JSON pointer ("#", "#/$defs/Mode", "#/definitions/a~1b"); None if it does not resolve."""
    if reference != "#" and not reference.startswith("#/"):
        return None
    target = root
    for part in reference[2:].split("/") if reference != "#" else ():
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            return None
    return target


def _union_properties(parameters: Any) -> dict[str, Any]:
    """Properties declared only inside root-level anyOf/oneOf branches (a union of object shapes)."""
    collected: dict[str, list[Any]] = {}
    for node in _conjuncts(parameters, parameters):
        for keyword in ("anyOf", "oneOf"):
            for branch in node.get(keyword) or ():
                for inner in _conjuncts(branch, parameters):
                    for key, schema in (inner.get("properties") or {}).items():
                        collected.setdefault(key, []).append(schema)
    return {key: schemas[0] if len(schemas) == 1 else {"anyOf": schemas} for key, schemas in collected.items()}
