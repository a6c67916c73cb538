"""repo_map: tree-sitter definitions across languages, ranked, within a budget, cached."""

from __future__ import annotations

from pathlib import Path

from glmcode.tools.repo_map import RepoMap, estimate_tokens, repo_map_for
from glmcode.tools.workspace import Workspace
from tests.tools.conftest import call, write

SOURCES = {
    "py/store.py": "class Store:\n    def get(self, key):\n        return key\n\ndef helper():\n    pass\n",
    "js/app.js": "class Widget {\n  render() {}\n}\nfunction mount() {}\nconst hydrate = () => 1;\n",
    "ts/types.ts": (
        "interface Shape { area(): number }\ntype Id = string;\nenum Color { Red }\nfunction draw(s: Shape) {}\n"
    ),
    "go/main.go": "package main\ntype Server struct{}\nfunc (s Server) Serve() {}\nfunc Start() {}\n",
    "rs/lib.rs": (
        "pub struct Engine;\nimpl Engine { pub fn run(&self) {} }\ntrait Drive { fn go(&self); }\nfn boot() {}\n"
    ),
    "java/App.java": "class App {\n  App() {}\n  void launch() {}\n}\ninterface Plugin {}\n",
    "c/util.c": "struct point { int x; };\nstatic int clamp(int v) { return v; }\nstruct point origin;\n",
    "cpp/geo.cpp": "namespace geo {\nclass Vec { public: double len(); };\n}\ndouble geo::Vec::len() { return 0; }\n",
}


def _names(symbols, path: str) -> list[str]:
    return [d.name for d in symbols[path].definitions]


def test_definitions_in_each_language(repo: Path) -> None:
    for name, source in SOURCES.items():
        write(repo, name, source)
    symbols = RepoMap(Workspace(repo)).symbols()
    assert _names(symbols, "py/store.py") == ["Store", "get", "helper"]
    assert _names(symbols, "js/app.js") == ["Widget", "render", "mount", "hydrate"]
    assert _names(symbols, "ts/types.ts") == ["Shape", "area", "Id", "Color", "draw"]
    assert _names(symbols, "go/main.go") == ["Server", "Serve", "Start"]
    assert _names(symbols, "rs/lib.rs") == ["Engine", "Engine", "run", "Drive", "go", "boot"]
    assert _names(symbols, "java/App.java") == ["App", "App", "launch", "Plugin"]
    assert _names(symbols, "c/util.c") == ["point", "clamp"]  # `struct point origin;` only uses it
    assert _names(symbols, "cpp/geo.cpp") == ["geo", "Vec", "len"]
    method = symbols["py/store.py"].definitions[1]
    assert (method.line, method.depth, method.signature) == (2, 1, "def get(self, key):")


def test_much_referenced_definitions_rank_first(repo: Path) -> None:
    write(repo, "core.py", "def central():\n    pass\n\ndef lonely():\n    pass\n")
    for i in range(4):
        write(repo, f"user{i}.py", f"from core import central\n\ndef use{i}():\n    return central()\n")
    rendered = RepoMap(Workspace(repo)).render(max_tokens=4000)
    assert rendered.startswith("core.py:\n")
    assert rendered.index("def central():") < rendered.index("def use0():")
    small = RepoMap(Workspace(repo)).render(max_tokens=10)
    assert "def central():" in small and "def lonely():" not in small
    assert "more definitions not shown" in small


def test_the_map_fits_the_token_budget(repo: Path) -> None:
    for i in range(40):
        write(repo, f"mod{i}.py", "".join(f"def function_{i}_{j}(argument):\n    pass\n" for j in range(10)))
    for budget in (100, 400, 1500):
        rendered = RepoMap(Workspace(repo)).render(max_tokens=budget)
        body = rendered.rsplit("[...", 1)[0]
        assert 0 < estimate_tokens(body) <= budget * 1.05
    words = RepoMap(Workspace(repo)).render(max_tokens=50, count_tokens=lambda text: len(text.split()))
    assert "def function_" in words


def test_methods_come_with_their_class(repo: Path) -> None:
    write(repo, "shapes.py", "class Circle:\n    def area(self):\n        pass\n")
    write(repo, "use.py", "def f(c):\n    return c.area() + c.area()\n")
    rendered = RepoMap(Workspace(repo)).render(max_tokens=4000)
    assert "class Circle:" in rendered
    assert rendered.index("class Circle:") < rendered.index("def area(self):")


def test_only_changed_files_are_parsed_again(repo: Path) -> None:
    write(repo, "a.py", "def alpha():\n    pass\n")
    write(repo, "b.py", "def beta():\n    pass\n")
    ws = Workspace(repo)
    first = repo_map_for(ws).symbols()
    write(repo, "b.py", "def beta():\n    pass\n\ndef gamma():\n    pass\n")
    second = repo_map_for(Workspace(repo)).symbols()
    assert second["a.py"] is first["a.py"]  # the cached parse, not a new one
    assert _names(second, "b.py") == ["beta", "gamma"]


def test_repo_map_tool_zooms_into_a_path(repo: Path) -> None:
    for name, source in SOURCES.items():
        write(repo, name, source)
    ws = Workspace(repo)
    everything = call(ws, "repo_map").output
    assert "go/main.go:" in everything and "py/store.py:" in everything
    zoomed = call(ws, "repo_map", path="go").output
    assert zoomed.startswith("go/main.go:") and "py/store.py" not in zoomed
    assert call(ws, "repo_map", path="README.md").is_error
