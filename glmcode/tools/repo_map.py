"""A ranked map of the repository's definitions, fitted to a token budget.

tree-sitter parses each source file (cached by mtime and size) into its definitions (classes,
functions, methods, types...) and the identifiers it uses. Files link to the files defining the
names they use; a small PageRank over those links ranks the files, and each definition scores by
how much (and how highly ranked) code refers to it. The best definitions are shown, grouped by
file, until the budget is spent.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmcode.tools.base import Tool, ToolResult
from glmcode.tools.workspace import ToolError, Workspace

LANGUAGE_BY_SUFFIX = {
    ".py": "python", ".pyi": "python",
    ".js": "javascript", ".jsx": "javascript", ".mjs": "javascript", ".cjs": "javascript",
    ".ts": "typescript", ".mts": "typescript", ".cts": "typescript", ".tsx": "tsx",
    ".go": "go", ".rs": "rust", ".java": "java", ".kt": "kotlin", ".scala": "scala",
    ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp",
    ".cs": "csharp", ".rb": "ruby", ".php": "php", ".swift": "swift", ".lua": "lua",
}
_JS_TYPES = ["class_declaration", "function_declaration", "generator_function_declaration", "method_definition",
             "variable_declarator"]
_TS_TYPES = _JS_TYPES + ["abstract_class_declaration", "interface_declaration", "type_alias_declaration",
                         "enum_declaration", "function_signature", "method_signature"]
_C_TYPES = ["function_definition", "struct_specifier", "union_specifier", "enum_specifier", "type_definition"]
# Node types that define something, per language; types a grammar lacks are skipped.
DEFINITION_TYPES: dict[str, list[str]] = {
    "python": ["class_definition", "function_definition"],
    "javascript": _JS_TYPES,
    "typescript": _TS_TYPES,
    "tsx": _TS_TYPES,
    "go": ["function_declaration", "method_declaration", "type_spec"],
    "rust": ["struct_item", "enum_item", "union_item", "trait_item", "impl_item", "function_item",
             "function_signature_item", "mod_item", "macro_definition", "type_item"],
    "java": ["class_declaration", "interface_declaration", "enum_declaration", "record_declaration",
             "method_declaration", "constructor_declaration"],
    "kotlin": ["class_declaration", "object_declaration", "function_declaration"],
    "scala": ["class_definition", "object_definition", "trait_definition", "function_definition"],
    "c": _C_TYPES,
    "cpp": _C_TYPES + ["class_specifier", "namespace_definition"],
    "csharp": ["class_declaration", "interface_declaration", "struct_declaration", "enum_declaration",
               "record_declaration", "method_declaration", "constructor_declaration"],
    "ruby": ["class", "module", "method", "singleton_method"],
    "php": ["class_declaration", "interface_declaration", "trait_declaration", "function_definition",
            "method_declaration"],
    "swift": ["class_declaration", "protocol_declaration", "function_declaration"],
    "lua": ["function_declaration"],
}
IDENTIFIER_TYPES = ["identifier", "type_identifier", "field_identifier", "property_identifier", "constant",
                    "simple_identifier", "namespace_identifier", "name"]
_NEEDS_BODY = {"struct_specifier", "union_specifier", "enum_specifier", "class_specifier"}  # else a mere use
_FUNCTION_VALUES = {"arrow_function", "function_expression", "function", "generator_function"}

MAX_PARSED_BYTES = 1_000_000
MAX_SIGNATURE_CHARS = 120
DEFAULT_MAX_TOKENS = 1024


@dataclass(frozen=True)
class Definition:
    name: str
    line: int  # 1-based
    signature: str  # the definition's first source line, stripped
    depth: int  # how many definitions enclose it (a method in a class: 1)
    parent: int | None  # index of the enclosing definition in the file's list


@dataclass(frozen=True)
class FileSymbols:
    definitions: list[Definition]
    references: Counter[str]  # identifier -> how often the file uses it


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


class RepoMap:
    """The repository map of one workspace; parses lazily and re-parses only changed files."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self._cache: dict[str, tuple[tuple[int, int], FileSymbols]] = {}
        self._queries: dict[str, Any] = {}

    def render(
        self,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        *,
        focus: Iterable[str] = (),
        under: str = "",
        count_tokens: Callable[[str], int] = estimate_tokens,
    ) -> str:
        """The map, within `max_tokens`; `focus` files (repo-relative) and their neighbours rank first."""
        symbols = self.symbols(under)
        scores = _score_definitions(symbols, set(focus))
        ranked = sorted(scores, key=lambda key: (-scores[key], key))
        chosen: dict[str, set[int]] = defaultdict(set)
        used = 0
        for path, index in ranked:
            wanted = [i for i in _with_parents(symbols[path].definitions, index) if i not in chosen[path]]
            cost = sum(count_tokens(_row(symbols[path].definitions[i])) for i in wanted)
            cost += 0 if chosen[path] else count_tokens(path + ":\n")
            if used + cost > max_tokens:
                continue
            chosen[path].update(wanted)
            used += cost
        return _render(symbols, chosen, scores, total=len(ranked))

    def symbols(self, under: str = "") -> dict[str, FileSymbols]:
        """Definitions and references of every supported source file (under `under`)."""
        directory = self.workspace.resolve(under) if under else None
        found: dict[str, FileSymbols] = {}
        for rel in self.workspace.files(under=directory):
            language = LANGUAGE_BY_SUFFIX.get(Path(rel).suffix.lower())
            if language is None:
                continue
            path = self.workspace.root / rel
            try:
                stat = path.stat()
            except OSError:
                continue
            if stat.st_size > MAX_PARSED_BYTES:
                continue
            stamp = (stat.st_mtime_ns, stat.st_size)
            cached = self._cache.get(rel)
            if cached is None or cached[0] != stamp:
                cached = (stamp, self._parse(language, path.read_bytes()))
                self._cache[rel] = cached
            found[rel] = cached[1]
        return found

    def _parse(self, language: str, source: bytes) -> FileSymbols:
        from tree_sitter import QueryCursor
        from tree_sitter_language_pack import get_parser

        tree = get_parser(language).parse(source)
        captures = QueryCursor(self._query(language)).captures(tree.root_node)
        lines = source.split(b"\n")
        nodes = sorted(
            (n for n in captures.get("def", []) if _is_definition(n)), key=lambda n: (n.start_byte, -n.end_byte)
        )
        index_of: dict[int, int] = {}  # node id -> index in definitions; enclosing nodes come first
        definitions: list[Definition] = []
        for node in nodes:
            name = _name_of(node)
            if not name:
                continue
            parent = _enclosing(node, index_of)
            row = node.start_point[0]
            signature = lines[row].decode("utf-8", "replace").strip()[:MAX_SIGNATURE_CHARS]
            depth = 0 if parent is None else definitions[parent].depth + 1
            index_of[node.id] = len(definitions)
            definitions.append(Definition(name, row + 1, signature, depth, parent))
        references = Counter(n.text.decode("utf-8", "replace") for n in captures.get("ref", []))
        return FileSymbols(definitions, references)

    def _query(self, language: str):
        if language not in self._queries:
            from tree_sitter import Query
            from tree_sitter_language_pack import get_language

            grammar = get_language(language)
            known = lambda kinds: [k for k in kinds if grammar.id_for_node_kind(k, True)]  # noqa: E731
            definitions = " ".join(f"({k})" for k in known(DEFINITION_TYPES[language]))
            identifiers = " ".join(f"({k})" for k in known(IDENTIFIER_TYPES))
            self._queries[language] = Query(grammar, f"[{definitions}] @def [{identifiers}] @ref")
        return self._queries[language]


def _is_definition(node) -> bool:
    if node.type in _NEEDS_BODY:
        return node.child_by_field_name("body") is not None
    if node.type == "variable_declarator":  # `const f = () => ...` defines a function
        value = node.child_by_field_name("value")
        return value is not None and value.type in _FUNCTION_VALUES
    return True


def _name_of(node) -> str:
    named = node.child_by_field_name("name")
    if named is None and node.type == "impl_item":  # rust `impl Type` names the type it extends
        named = node.child_by_field_name("type")
    if named is None:  # C-family: the name hides in a chain of declarators
        declarator = node.child_by_field_name("declarator")
        while declarator is not None and declarator.child_by_field_name("declarator") is not None:
            declarator = declarator.child_by_field_name("declarator")
        named = declarator
    if named is None:
        named = next((c for c in node.named_children if c.type in IDENTIFIER_TYPES), None)
    if named is None:
        return ""
    text = named.text.decode("utf-8", "replace")
    return text.replace("::", ".").rsplit(".", 1)[-1].split("<", 1)[0].strip()


def _enclosing(node, index_of: dict[int, int]) -> int | None:
    parent = node.parent
    while parent is not None:
        if parent.id in index_of:
            return index_of[parent.id]
        parent = parent.parent
    return None


def _with_parents(definitions: list[Definition], index: int) -> list[int]:
    chain = []
    current: int | None = index
    while current is not None:
        chain.append(current)
        current = definitions[current].parent
    return chain


def _score_definitions(symbols: dict[str, FileSymbols], focus: set[str]) -> dict[tuple[str, int], float]:
    """Score each (file, definition index) by the ranked references other files make to its name."""
    definers: dict[str, set[str]] = defaultdict(set)
    for path, file in symbols.items():
        for definition in file.definitions:
            definers[definition.name].add(path)
    # links[source][(target, name)] = weight of source's uses of a name target defines
    links: dict[str, dict[tuple[str, str], float]] = defaultdict(dict)
    for source, file in symbols.items():
        for name, count in file.references.items():
            targets = definers.get(name, ())
            for target in targets:
                if target != source and len(name) > 1:
                    private = 0.1 if name.startswith("_") else 1.0
                    links[source][(target, name)] = private * math.sqrt(count) / len(targets)
    rank = _pagerank(list(symbols), links, focus)
    received: dict[tuple[str, str], float] = defaultdict(float)
    for source, edges in links.items():
        total = sum(edges.values())
        for key, weight in edges.items():
            received[key] += rank[source] * weight / total
    scores = {}
    for path, file in symbols.items():
        boost = 10.0 if path in focus else 1.0
        for i, definition in enumerate(file.definitions):
            scores[(path, i)] = boost * (received.get((path, definition.name), 0.0) + 0.01 * rank[path])
    return scores


def _pagerank(
    nodes: list[str], links: dict[str, dict[tuple[str, str], float]], focus: set[str], damping: float = 0.85
) -> dict[str, float]:
    if not nodes:
        return {}
    start = {n: (1.0 if n in focus else 0.0) for n in nodes} if focus & set(nodes) else dict.fromkeys(nodes, 1.0)
    total = sum(start.values())
    personal = {n: v / total for n, v in start.items()}
    rank = dict(personal)
    for _ in range(30):
        following = {n: (1 - damping) * personal[n] for n in nodes}
        dangling = 0.0
        for source in nodes:
            edges = links.get(source)
            if not edges:
                dangling += rank[source]
                continue
            weight_sum = sum(edges.values())
            for (target, _name), weight in edges.items():
                following[target] += damping * rank[source] * weight / weight_sum
        for n in nodes:
            following[n] += damping * dangling * personal[n]
        rank = following
    return rank


def _row(definition: Definition) -> str:
    return f"{definition.line:6}  {'    ' * definition.depth}{definition.signature}\n"


def _render(
    symbols: dict[str, FileSymbols], chosen: dict[str, set[int]], scores: dict[tuple[str, int], float], total: int
) -> str:
    shown_files = [path for path in chosen if chosen[path]]
    shown_files.sort(key=lambda path: -max(scores[(path, i)] for i in chosen[path]))
    parts = []
    for path in shown_files:
        rows = "".join(_row(symbols[path].definitions[i]) for i in sorted(chosen[path]))
        parts.append(f"{path}:\n{rows}")
    shown = sum(len(c) for c in chosen.values())
    if shown < total:
        parts.append(f"[... {total - shown} more definitions not shown; repo_map with a path zooms in]\n")
    return "".join(parts) if parts else "(no source files with definitions found)\n"


_MAPS: dict[Path, RepoMap] = {}


def repo_map_for(workspace: Workspace) -> RepoMap:
    """The shared, cached RepoMap for a workspace's root."""
    shared = _MAPS.get(workspace.root) or _MAPS.setdefault(workspace.root, RepoMap(workspace))
    shared.workspace = workspace
    return shared


def repo_map(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    max_tokens = int(arguments.get("max_tokens") or DEFAULT_MAX_TOKENS)
    if max_tokens < 64:
        raise ToolError("max_tokens must be at least 64")
    under = arguments.get("path") or ""
    if under and not workspace.resolve(under).is_dir():
        raise ToolError(f"{under} is not a directory")
    return ToolResult(repo_map_for(workspace).render(min(max_tokens, 16_384), under=under).rstrip("\n"))


REPO_MAP = Tool(
    name="repo_map",
    description=(
        "An outline of the repository's code: the most referenced classes, functions, methods and types "
        "of each source file with their line numbers and first line, most important first, within a "
        "token budget. Use it to find where things are defined before reading files."
    ),
    parameters={
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "Only map this directory (default: the whole repository)."},
            "max_tokens": {"type": "integer", "description": f"Size budget in tokens (default {DEFAULT_MAX_TOKENS})."},
        },
        "required": [],
    },
    kind="read",
    run=repo_map,
)
