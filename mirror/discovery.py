"""Static discovery: every weight URL a snapshot's code downloads, found without running it.

It parses each Python file with :mod:`ast` (so a URL split over adjacent literals
on several lines is one string, as Python sees it) and evaluates the argument of
``pretrained(...)`` and ``load_serialized_obj_from_url(...)`` over module-level
string constants. What it cannot evaluate is reported with its file and line
rather than guessed. Downloading what it finds is :mod:`mirror.download`'s job.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Protocol, Tuple

from .hubconf import HUBCONF, is_entrypoint

# Names whose first argument is a URL the code will download (megengine/hub/hub.py).
_DOWNLOADERS = {"pretrained", "load_serialized_obj_from_url"}


class SourceFile(Protocol):
    """A file of a snapshot as discovery reads it: a git tree entry
    (:class:`mirror.git.TreeFile`) or a file of an installed snapshot."""

    path: str  # relative POSIX path in the snapshot
    data: bytes


@dataclass(frozen=True)
class Location:
    """Where in a snapshot a weight URL is referenced."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class WeightRef:
    """A weight URL and every code location that references it."""

    url: str
    locations: Tuple[Location, ...]


@dataclass(frozen=True)
class Unresolved:
    """A download call whose URL could not be evaluated statically."""

    location: Location
    expr: str

    def __str__(self) -> str:
        return f"{self.location}: {self.expr}"


@dataclass(frozen=True)
class Definition:
    """A function or class as a module binds it: the file that defines it, and its node."""

    path: str
    node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


@dataclass(frozen=True)
class Entrypoint:
    """An entrypoint found without running hubconf: the file that defines it, and the
    weight URLs its own ``@pretrained`` decorators and its body name."""

    path: str
    urls: Tuple[str, ...]


class _NotConstant(Exception):
    pass


def _evaluate(node: ast.AST, env: Dict[str, Any]) -> Any:
    """Evaluate an expression made of string constants, ``+``, ``%``, ``.format``,
    f-strings, tuple, list and dict literals and subscripts, names looked up in ``env``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float)):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        raise _NotConstant
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
            isinstance(env.get(node.value.id), _Namespace):
        namespace = env[node.value.id]
        if node.attr in namespace:
            return namespace[node.attr]
        raise _NotConstant
    if isinstance(node, ast.JoinedStr):
        return _fstring(node, env)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        left, right = _evaluate(node.left, env), _evaluate(node.right, env)
        try:
            return left + right if isinstance(node.op, ast.Add) else left % right
        except (TypeError, ValueError, KeyError):
            raise _NotConstant from None
    if isinstance(node, (ast.Tuple, ast.List)):  # a list as a tuple: never changed here
        return tuple(_evaluate(e, env) for e in node.elts)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _NotConstant
        return {_evaluate(k, env): _evaluate(v, env) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Subscript):
        container = _evaluate(node.value, env)
        key_node = node.slice.value if isinstance(node.slice, ast.Index) else node.slice  # py<3.9
        try:
            return container[_evaluate(key_node, env)]
        except (KeyError, IndexError, TypeError):
            raise _NotConstant from None
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"):
        return _format(node, env)
    raise _NotConstant


def _fstring(node: ast.JoinedStr, env: Dict[str, Any]) -> str:
    parts = []
    for v in node.values:
        if isinstance(v, ast.FormattedValue):
            if v.format_spec is not None or v.conversion not in (-1, None):
                raise _NotConstant
            parts.append(str(_evaluate(v.value, env)))
        else:
            parts.append(str(_evaluate(v, env)))
    return "".join(parts)


def _format(node: ast.Call, env: Dict[str, Any]) -> str:
    """``"...".format(...)`` of constants."""
    template = _evaluate(node.func.value, env)
    args = [_evaluate(a, env) for a in node.args]
    kwargs = {k.arg: _evaluate(k.value, env) for k in node.keywords if k.arg}
    if not isinstance(template, str) or len(kwargs) != len(node.keywords):
        raise _NotConstant
    try:
        return template.format(*args, **kwargs)
    except (IndexError, KeyError, ValueError):
        raise _NotConstant from None


class _Namespace(dict):
    """The constants of another module of the repo, bound by ``import pkg.mod as m``."""


_EVAL_ERRORS = (_NotConstant, ArithmeticError, AttributeError, LookupError, TypeError,
                ValueError, RecursionError)


class _Modules:
    """The repo's Python files, parsed once, and their module-level constants,
    following ``from .const import BASE`` and ``import pkg.const as c`` between them."""

    def __init__(self, files: Iterable[SourceFile]):
        # Parsed only when needed: a repo of thousands of files mentions a downloader
        # in a few, and parsing is most of the cost.
        self.sources: Dict[str, bytes] = {f.path: f.data for f in files
                                          if f.path.endswith(".py")}
        self._trees: Dict[str, ast.Module | None] = {}
        self._envs: Dict[str, Dict[str, Any]] = {}
        self._callables: Dict[str, Dict[str, Definition]] = {}
        self._busy: set = set()

    def tree(self, path: str) -> ast.Module | None:
        if path not in self._trees:
            try:
                self._trees[path] = ast.parse(self.sources[path], filename=path)
            except (SyntaxError, ValueError, KeyError):
                self._trees[path] = None  # Python would fail to import it as well
        return self._trees[path]

    def mentioning(self, names: Iterable[str]) -> List[str]:
        """The files whose text names one of ``names`` (a call must name its callee)."""
        wanted = [n.encode() for n in names]
        return sorted(p for p, data in self.sources.items() if any(w in data for w in wanted))

    def path_of(self, importer: str, module: str | None, level: int) -> str | None:
        parts = importer.split("/")[:-1] if level else []
        if level > 1:
            parts = parts[:len(parts) - (level - 1)] if len(parts) >= level - 1 else None
        if parts is None:
            return None
        base = "/".join(parts + (module.split(".") if module else []))
        for candidate in (base + ".py", base + "/__init__.py"):
            if candidate.lstrip("/") in self.sources:
                return candidate.lstrip("/")
        return None

    def env(self, path: str) -> Dict[str, Any]:
        return self._once(self._envs, path, _module_constants)

    def callables(self, path: str) -> Dict[str, Definition]:
        """The functions and classes the module at ``path`` binds at top level, known
        without running it (:func:`_module_callables`)."""
        return self._once(self._callables, path, _module_callables)

    def _once(self, done: Dict[str, Any], path: str,
              read: Callable[[ast.Module, str, _Modules], Any]) -> Any:
        if path in done:
            return done[path]
        if (read, path) in self._busy:  # an import cycle: what is known so far
            return {}
        self._busy.add((read, path))
        tree = self.tree(path)
        try:
            done[path] = read(tree, path, self) if tree else {}
        finally:
            self._busy.discard((read, path))
        return done[path]


def _module_constants(tree: ast.Module, path: str = "", modules: _Modules | None = None) \
        -> Dict[str, Any]:
    """Top-level ``NAME = <constant expression>`` assignments, in order, and constants
    imported from other modules of the repo."""
    env: Dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.ImportFrom):
            source = modules.path_of(path, stmt.module, stmt.level) if modules else None
            other = modules.env(source) if source is not None else {}
            for alias in stmt.names:
                if alias.name == "*":
                    env.update({k: v for k, v in other.items() if not k.startswith("_")})
                elif alias.name in other:
                    env[alias.asname or alias.name] = other[alias.name]
                else:  # bound to something not known statically
                    env.pop(alias.asname or alias.name, None)
            continue
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                source = modules.path_of(path, alias.name, 0) if modules else None
                name = alias.asname or alias.name.split(".")[0]
                if source is not None and alias.asname:
                    env[name] = _Namespace(modules.env(source))
                else:
                    env.pop(name, None)
            continue
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and isinstance(
                stmt.targets[0] if isinstance(stmt, ast.Assign) else stmt.target, ast.Name) \
                and (isinstance(stmt, ast.AnnAssign) or len(stmt.targets) == 1) \
                and stmt.value is not None:
            name = (stmt.targets[0] if isinstance(stmt, ast.Assign) else stmt.target).id
            try:
                env[name] = _evaluate(stmt.value, env)
            except _EVAL_ERRORS:
                env.pop(name, None)
            continue
        # Anything else that binds a name (x += ..., a, b = ..., a name set inside an
        # if, for, try or with, a def or class) makes it unknown: never a stale value.
        for name in _bound_names(stmt):
            env.pop(name, None)
    return env


def _module_callables(tree: ast.Module, path: str, modules: _Modules) -> Dict[str, Definition]:
    """The functions and classes a module binds at top level, in order: those it
    defines, and those ``from X import name`` takes from the repo's own modules
    (following them there, through any module that imports them in turn; ``*``
    takes the names ``__all__`` lists, else those not starting with ``_``). Any other
    statement that binds a name makes it unknown: what it is is known only by
    running the code (``pack --trace``)."""
    out: Dict[str, Definition] = {}
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[stmt.name] = Definition(path, stmt)
            continue
        if isinstance(stmt, ast.ImportFrom):
            source = modules.path_of(path, stmt.module, stmt.level)
            found = modules.callables(source) if source is not None else {}
            for alias in stmt.names:
                if alias.name == "*":
                    listed = modules.env(source).get("__all__") if source else None
                    listed = listed if isinstance(listed, tuple) else None
                    out.update({k: v for k, v in found.items()
                                if (k in listed if listed is not None else k[:1] != "_")})
                elif alias.name in found:
                    out[alias.asname or alias.name] = found[alias.name]
                else:  # a submodule, a constant, or from outside the repo
                    out.pop(alias.asname or alias.name, None)
            continue
        for name in _bound_names(stmt):
            out.pop(name, None)
    return out


def _bound_names(node: ast.AST) -> List[str]:
    """Every name a statement binds at module level (its nested defs' bodies excluded)."""
    names = []
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    for child in ast.walk(node):
        if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
            names.append(child.id)
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(child.name)
        elif isinstance(child, (ast.Import, ast.ImportFrom)):
            names += [a.asname or a.name.split(".")[0] for a in child.names]
    return names


def _download_calls(node: ast.AST, local: frozenset):
    """Each call of a downloader below ``node``, with the names bound locally around it.

    A function's decorators and defaults belong to the enclosing scope; its body
    adds the function's parameters and the names it assigns.
    """
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = child.args
            outer = list(getattr(child, "decorator_list", [])) + args.defaults + [
                d for d in args.kw_defaults if d is not None]
            for expr in outer:
                yield from _download_calls(ast.Expression(expr), local)
            params = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
            params |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
            body = ast.Module(body=child.body, type_ignores=[]) if isinstance(
                child.body, list) else ast.Expression(child.body)
            assigned = {n.id for n in ast.walk(body)
                        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            yield from _download_calls(body, local | params | assigned)
            continue
        if isinstance(child, ast.Call) and _callee_name(child) in _DOWNLOADERS:
            yield child, local
        yield from _download_calls(child, local)


def _callee_name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _urls(modules: _Modules, path: str, node: ast.AST
          ) -> Iterator[Tuple[ast.Call, ast.expr, str | None]]:
    """Each downloader call below ``node`` (in the file at ``path``), its URL argument,
    and that argument's value: None where it is not a constant known without running
    the code (never guessed)."""
    module_env = modules.env(path)
    for call, local in _download_calls(node, frozenset()):
        arg = call.args[0] if call.args else next(
            (k.value for k in call.keywords if k.arg == "url"), None)
        if arg is None:
            continue
        # A name a function binds itself (a parameter, say) is not the module's.
        env = {k: v for k, v in module_env.items() if k not in local}
        try:
            url = _evaluate(arg, env)
        except _EVAL_ERRORS:
            url = None
        yield call, arg, url if isinstance(url, str) else None


def discover(files: Iterable[SourceFile]) -> Tuple[List[WeightRef], List[Unresolved]]:
    """Every weight URL that the Python files of a snapshot pass to MegEngine's downloaders."""
    found: Dict[str, List[Location]] = {}
    unresolved: List[Unresolved] = []
    modules = _Modules(files)
    for path in modules.mentioning(_DOWNLOADERS):
        tree = modules.tree(path)
        if tree is None:
            continue
        for call, arg, url in _urls(modules, path, tree):
            loc = Location(path, call.lineno)
            if url is not None:
                found.setdefault(url, []).append(loc)
            else:
                unresolved.append(Unresolved(loc, ast.unparse(arg) if hasattr(ast, "unparse")
                                             else ast.dump(arg)))
    weights = [WeightRef(u, tuple(sorted(set(locs), key=lambda x: (x.path, x.line))))
               for u, locs in sorted(found.items())]
    return weights, unresolved


def coverage(files: Iterable[SourceFile]) -> Dict[str, Entrypoint]:
    """The entrypoints ``hubconf.py`` binds that are known without running it, by
    MegEngine's rule (:func:`mirror.hubconf.is_entrypoint`): each function or class it
    defines or imports from the repo's own modules (:func:`_module_callables`; a
    repo's hubconf often only imports them from a package tree), with the weight URLs
    that its own ``@pretrained(...)`` decorators name, and then those its body
    downloads with a URL known without running it (``hub.load_serialized_obj_from_url
    (URL)``, say), each evaluated in the module that defines it.

    ``megengine.hub.list`` also counts callables hubconf takes from elsewhere
    (``functools.partial``, say) or makes by assignment; these are known only by
    running it (``pack --trace``). What is here a reader of the manifest can check
    without executing code.
    """
    modules = _Modules(files)
    if modules.tree(HUBCONF) is None:
        return {}
    out: Dict[str, Entrypoint] = {}
    for name, found in sorted(modules.callables(HUBCONF).items()):
        if is_entrypoint(name):
            urls = [u for _, _, u in _urls(modules, found.path,
                                           ast.Module(body=[found.node], type_ignores=[]))
                    if u is not None]
            out[name] = Entrypoint(found.path, tuple(dict.fromkeys(urls)))
    return out
