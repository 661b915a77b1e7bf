"""Static discovery: every weight URL a snapshot's code downloads, found without running it.

It parses each Python file with :mod:`ast` (so a URL split over adjacent literals
on several lines is one string, as Python sees it) and evaluates the argument of
``pretrained(...)`` and ``load_serialized_obj_from_url(...)`` over module-level
string constants. What it cannot evaluate is reported with its file and line
rather than guessed. Downloading what it finds is :mod:`mirror.download`'s job.

It also lists the entrypoints ``hubconf.py`` has that are known without running it
(:func:`coverage`), following its imports into the repo's own modules. Both read
Python's rules for what a name is bound to where they can, and where only running
the code could tell (a name rebound at run time, a ``*`` whose names are not known),
they say nothing rather than something that may be false.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Protocol, Set, Tuple

from .errors import InvalidRecordError
from .hubconf import HUBCONF, is_entrypoint
from .names import check_url_text

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


@dataclass(frozen=True)
class Star:
    """The names ``from X import *`` binds: ``sure`` ones, and ``maybe`` ones (a
    package's submodules, once imported; what a dynamic ``__all__`` lists)."""

    sure: Tuple[str, ...]
    maybe: Tuple[str, ...]


class _NotConstant(Exception):
    pass


# Keys of a module's names (:meth:`_Modules.callables`), never identifiers: names only
# running it tells may be bound too, by a ``*`` from outside the repo (_ANY), or by one
# of the repo's own modules that was not read (an import cycle, too deep: _UNREAD).
_ANY, _UNREAD = "*", "?"
_DEPTH = 64  # modules deep that a chain of imports is followed
_AUGMENTED = rb"([-+*/%&|^@]|<<|>>|//|\*\*)"  # x OP= y
# Methods that change a list or dict in place.
_MUTATORS = (b"append", b"extend", b"insert", b"update", b"setdefault", b"pop", b"popitem",
             b"remove", b"clear", b"sort", b"reverse", b"__setitem__", b"__delitem__",
             b"__iadd__", b"__ior__")
_MATCH_CAPTURES = tuple(getattr(ast, n) for n in ("MatchAs", "MatchStar") if hasattr(ast, n))


def _evaluate(node: ast.AST, env: Mapping[str, Any]) -> Any:
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


def _fstring(node: ast.JoinedStr, env: Mapping[str, Any]) -> str:
    parts = []
    for v in node.values:
        if isinstance(v, ast.FormattedValue):
            if v.format_spec is not None or v.conversion not in (-1, None):
                raise _NotConstant
            parts.append(str(_evaluate(v.value, env)))
        else:
            parts.append(str(_evaluate(v, env)))
    return "".join(parts)


def _format(node: ast.Call, env: Mapping[str, Any]) -> str:
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
        self._callables: Dict[str, Dict[str, Definition | None]] = {}
        self._exported: Dict[str, Star | None] = {}
        self._mutated: Dict[str, bool] = {}
        self._rebound: Dict[str, Set[str] | None] = {}
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
        """The repo's file that ``from <level dots><module> import ...`` in the file
        ``importer`` imports, or None (outside the repo, or an import Python refuses:
        above the top-level package, or relative in a top-level module, as
        ``hubconf.py`` is)."""
        parts = importer.split("/")[:-1] if level else []
        if len(parts) < level:
            return None
        parts = parts[:len(parts) - (level - 1)] if level else parts
        base = "/".join(parts + (module.split(".") if module else []))
        for candidate in (base + "/__init__.py", base + ".py"):  # a package comes first
            if candidate.lstrip("/") in self.sources:
                return candidate.lstrip("/")
        return None

    def exported(self, path: str) -> Star | None:
        """What ``from <module at path> import *`` binds (:class:`Star`); None where
        only running it tells (a module read while it is being read, in an import
        cycle, or past the depth followed)."""
        if path in self._exported:
            return self._exported[path]
        if (_module_callables, path) in self._busy or len(self._busy) > _DEPTH:
            return None  # not kept: known later, when the cycle is read from elsewhere
        self._exported[path] = self._star(path)
        return self._exported[path]

    def _star(self, path: str) -> Star | None:
        tree, bound = self.tree(path), self.callables(path)
        if tree is None or _UNREAD in bound:
            return None
        names = tuple(k for k in bound if k != _ANY)
        # A package's submodules that anyone imported are its attributes too.
        folder = path[:-len("__init__.py")] if path.rsplit("/", 1)[-1] == "__init__.py" \
            else None
        subs = tuple(sorted({p[len(folder):].split("/")[0].rsplit(".py", 1)[0]
                             for p in self.sources if p.startswith(folder) and p != path}
                            - set(names))) if folder is not None else ()
        mentions = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "__all__"]
        if not mentions:
            return Star(tuple(k for k in names if not k.startswith("_")),
                        tuple(k for k in subs if not k.startswith("_")))
        # Known only if only top-level statements set it (``=``, ``+=``) to constants.
        targets = {id(stmt.target if isinstance(stmt, (ast.AugAssign, ast.AnnAssign))
                      else stmt.targets[0]) for stmt in tree.body
                   if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign))}
        listed = self.env(path).get("__all__")
        if all(id(n) in targets for n in mentions) and isinstance(listed, tuple) and \
                all(isinstance(n, str) for n in listed):
            return Star(listed, ())
        return Star((), names + subs)  # __all__ made as it runs: some of these

    def mutated(self, name: str) -> bool:
        """Whether any file of the repo may change in place a list or dict bound to
        ``name`` (``name[k] = ...``, ``del name[k]``, ``name += ...``,
        ``name.update(...)``, ``mod.name.append(...)``): read as text, in every file,
        as another module may change it."""
        if name not in self._mutated:
            pattern = re.compile(
                rb"(\bdel\s+(\w+\.)*%s\s*\[|\b%s\s*(\[[^\n]*?\]\s*%s?|%s)=(?!=)"
                rb"|\b%s\s*\.\s*(%s)\s*\()" % (
                    re.escape(name.encode()), re.escape(name.encode()), _AUGMENTED,
                    _AUGMENTED, re.escape(name.encode()), b"|".join(_MUTATORS)))
            self._mutated[name] = any(pattern.search(d) for d in self.sources.values()
                                      if name.encode() in d)
        return self._mutated[name]

    def rebound(self, path: str) -> Set[str] | None:
        """:func:`_rebound_by_functions` of the module at ``path``, read once for both
        its constants and its callables."""
        if path not in self._rebound:
            tree = self.tree(path)
            self._rebound[path] = _rebound_by_functions(tree) if tree else set()
        return self._rebound[path]

    def env(self, path: str) -> Dict[str, Any]:
        return self._once(self._envs, path, _module_constants, {})

    def callables(self, path: str) -> Dict[str, Definition | None]:
        """Every name the module at ``path`` binds at top level, to the function or
        class it is known to be without running it, or None (:func:`_module_callables`)."""
        return self._once(self._callables, path, _module_callables,
                          {_ANY: None, _UNREAD: None})

    def _once(self, done: Dict[str, Any], path: str,
              read: Callable[[ast.Module, str, _Modules], Any], unknown: Any) -> Any:
        if path in done:
            return done[path]
        if (read, path) in self._busy:  # an import cycle: what is known so far
            return {}
        if len(self._busy) > _DEPTH:  # deeper than Python's own stack would go
            return unknown
        self._busy.add((read, path))
        tree = self.tree(path)
        try:
            done[path] = read(tree, path, self) if tree else {}
        finally:
            self._busy.discard((read, path))
        return done[path]


def _module_constants(tree: ast.Module, path: str, modules: _Modules) -> Dict[str, Any]:
    """Top-level ``NAME = <constant expression>`` assignments, in order, and constants
    imported from other modules of the repo."""
    env: Dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.ImportFrom):
            source = modules.path_of(path, stmt.module, stmt.level)
            other = modules.env(source) if source is not None else {}
            for alias in stmt.names:
                if alias.name == "*":
                    if source is None:
                        # From outside the repo: taken to bind none of the repo's own
                        # constant names (a module's public API is not BASE_URL).
                        continue
                    star = modules.exported(source)
                    if star is None:  # any name may be bound again: none is known
                        env.clear()
                        continue
                    for k in star.sure:
                        if k in other:
                            env[k] = other[k]
                        else:
                            env.pop(k, None)
                    for k in star.maybe:  # known only if it is the same either way
                        if k in env and (k not in other or other[k] != env[k]):
                            del env[k]
                elif alias.name in other:
                    env[alias.asname or alias.name] = other[alias.name]
                else:  # bound to something not known statically
                    env.pop(alias.asname or alias.name, None)
            continue
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                source = modules.path_of(path, alias.name, 0)
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
            if isinstance(env.get(name), (tuple, dict)) and name != "__all__" and \
                    modules.mutated(name):
                del env[name]  # a list or dict that code may change before it is read
            continue
        if isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name) and \
                isinstance(stmt.op, ast.Add) and stmt.target.id == "__all__":
            try:  # __all__ += [...]: read when a * import runs, after all of this
                env["__all__"] = env["__all__"] + _evaluate(stmt.value, env)
            except _EVAL_ERRORS:
                env.pop("__all__", None)
            continue
        # Anything else that binds a name (x += ..., a, b = ..., a name set inside an
        # if, for, try or with, a def or class) makes it unknown: never a stale value.
        for name in _bound_names(stmt):
            env.pop(name, None)
    rebound = modules.rebound(path)
    return {} if rebound is None else {k: v for k, v in env.items() if k not in rebound}


def _module_callables(tree: ast.Module, path: str, modules: _Modules
                      ) -> Dict[str, Definition | None]:
    """Every name a module binds at top level, in order, to what it is known to be
    without running it: a function or class it defines (undecorated, or decorated only
    by MegEngine's ``pretrained``, which returns a function), or one that ``from X
    import name`` or ``*`` takes from the repo's own modules, followed there. Any other
    binding is None: what it is, only running the code tells (``pack --trace``); so
    is every name a function rebinds (``global``), and a package's name that is also
    one of its submodules (importing the submodule rebinds it). The keys ``_ANY`` and
    ``_UNREAD`` say that names only running it tells may be bound too."""
    out: Dict[str, Definition | None] = {}
    taken: Dict[str, str | None] = {}  # name -> the module a from-import took it from
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            plain = all(isinstance(d, ast.Call) and _callee_name(d) == "pretrained"
                        for d in stmt.decorator_list)
            out[stmt.name] = Definition(path, stmt) if plain else None
            taken[stmt.name] = None
        elif isinstance(stmt, ast.ImportFrom):
            source = modules.path_of(path, stmt.module, stmt.level)
            found = modules.callables(source) if source is not None else {}
            for alias in stmt.names:
                if alias.name != "*":
                    out[alias.asname or alias.name] = found.get(alias.name)
                    taken[alias.asname or alias.name] = source
                    continue
                star = modules.exported(source) if source is not None else None
                if star is None or _ANY in found:  # any name may be bound again
                    out = dict.fromkeys(out)
                    out[_ANY] = None
                if star is None and source is not None:
                    out[_UNREAD] = None
                if star is not None:
                    out.update({k: found.get(k) for k in star.sure})
                    taken.update(dict.fromkeys(star.sure, source))
                    out.update({k: None for k in star.maybe
                                if out.get(k) is None or out[k] is not found.get(k)})
        else:
            bound = _bound_names(stmt)
            out.update(dict.fromkeys(bound))
            taken.update(dict.fromkeys(bound))
    rebound = modules.rebound(path)
    if rebound is None:
        return {**dict.fromkeys(out), _ANY: None, _UNREAD: None}  # it may bind any name
    out.update(dict.fromkeys(rebound))
    if path.rsplit("/", 1)[-1] == "__init__.py":
        # A package's name that is also its submodule is that module once the submodule
        # is imported (by anyone, at any time), unless bound after it by a from-import
        # of the submodule itself (``from .resnet import resnet``), which imports it first.
        for k in out:
            sub = modules.path_of(path, k, 1)
            if sub is not None and taken.get(k) != sub:
                out[k] = None
    return out


def _rebound_by_functions(tree: ast.Module) -> Set[str] | None:
    """The module-level names its code may bind beyond its top-level statements: those
    a ``global`` statement names; None for any name at all (it calls ``exec``, or uses
    ``globals()``, ``vars()`` or ``locals()`` other than to read one name)."""
    names: Set[str] = set()
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            names.update(node.names)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and (
                node.func.id == "exec" and len(node.args) < 2  # else its own namespace
                or node.func.id in _NAMESPACES and not node.args
                and not _read_only(node, parents) and not _local(node, parents)):
            return None
    return names


_NAMESPACES = ("globals", "vars", "locals")
_READS = ("get", "keys", "values", "items", "copy")
_PURE = ("list", "sorted", "dict", "set", "tuple", "len", "iter", "print", "repr", "str")
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp,
           ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _read_only(namespace: ast.Call, parents: Dict[ast.AST, ast.AST]) -> bool:
    """Whether ``globals()`` (say) is only read where it is called: ``globals()[name]``,
    ``globals().get(name)``, ``name in globals()``, ``for name in globals()``,
    ``sorted(globals())``."""
    parent = parents.get(namespace)
    if isinstance(parent, ast.Subscript):
        return parent.value is namespace and isinstance(parent.ctx, ast.Load)
    if isinstance(parent, ast.Attribute):
        return parent.attr in _READS and isinstance(parents.get(parent), ast.Call)
    if isinstance(parent, (ast.For, ast.comprehension)):
        return parent.iter is namespace
    if isinstance(parent, ast.Call):
        return isinstance(parent.func, ast.Name) and parent.func.id in _PURE
    return isinstance(parent, ast.Compare) and parent.left is not namespace


def _local(namespace: ast.Call, parents: Dict[ast.AST, ast.AST]) -> bool:
    """Whether ``locals()`` or ``vars()`` is a function's or class's own namespace."""
    if namespace.func.id == "globals":  # type: ignore[attr-defined]
        return False
    node = parents.get(namespace)
    while node is not None and not isinstance(node, _SCOPES):
        node = parents.get(node)
    return node is not None


def _bound_names(node: ast.AST) -> List[str]:
    """Every name a statement binds or unbinds in its scope (more, never fewer: the
    bodies of defs nested below an ``if``, say, count too)."""
    names = []
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    for child in ast.walk(node):
        if isinstance(child, ast.Name) and isinstance(child.ctx, (ast.Store, ast.Del)):
            names.append(child.id)
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(child.name)
        elif isinstance(child, (ast.Import, ast.ImportFrom)):
            names += [a.asname or a.name.split(".")[0] for a in child.names]
        elif isinstance(child, ast.ExceptHandler) and child.name:  # except E as name
            names.append(child.name)
        # match captures: case name, case [*rest], case {**rest}
        for capture in (getattr(child, "name", None) if isinstance(child, _MATCH_CAPTURES)
                        else None, getattr(child, "rest", None)):
            if isinstance(capture, str):
                names.append(capture)
    return names


def _download_calls(node: ast.AST, local: frozenset, around: frozenset | None = None):
    """Each call of a downloader below ``node``, with the names bound locally around it.

    A function's decorators and defaults belong to the enclosing scope; its body
    adds the function's parameters and the names it binds. A class body is a scope
    of its own, which its methods' bodies do not see (``around``: the names bound
    around the class).
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
            seen = local if around is None else around
            yield from _download_calls(body, seen | params | _bound_in(body))
            continue
        if isinstance(child, ast.ClassDef):
            for expr in child.decorator_list + child.bases + [k.value for k in
                                                               child.keywords]:
                yield from _download_calls(ast.Expression(expr), local)
            body = ast.Module(body=child.body, type_ignores=[])
            yield from _download_calls(body, local | _bound_in(body), local)
            continue
        if isinstance(child, ast.Call) and _callee_name(child) in _DOWNLOADERS:
            yield child, local
        yield from _download_calls(child, local, around)


def _bound_in(scope: ast.AST) -> Set[str]:
    """The names the statements of a function's or class's body bind (:func:`_bound_names`)."""
    body = scope.body  # a lambda's is one expression
    return {n for stmt in (body if isinstance(body, list) else [body])
            for n in _bound_names(stmt)}


def _callee_name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


class _Outside(Mapping):
    """A module's constants but the names a function binds itself: a view, as a copy
    for every call made a file of many constants and calls slow."""

    def __init__(self, env: Dict[str, Any], local: frozenset):
        self.env, self.local = env, local

    def __getitem__(self, name: str) -> Any:
        if name in self.local:
            raise KeyError(name)
        return self.env[name]

    def __iter__(self) -> Iterator[str]:
        return (k for k in self.env if k not in self.local)

    def __len__(self) -> int:
        return sum(1 for _ in self)


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
        env = _Outside(module_env, local)
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
        try:
            calls = list(_urls(modules, path, tree))
        except RecursionError:  # nested too deeply to read here: said, never skipped
            unresolved.append(Unresolved(Location(path, 1), "(nested too deeply to read)"))
            continue
        for call, arg, url in calls:
            loc = Location(path, call.lineno)
            if url is not None:
                found.setdefault(url, []).append(loc)
            else:
                unresolved.append(Unresolved(loc, _shown(arg)))
    weights = [WeightRef(u, tuple(sorted(set(locs), key=lambda x: (x.path, x.line))))
               for u, locs in sorted(found.items())]
    return weights, unresolved


def _url_text(url: str) -> bool:
    """Whether a manifest may record ``url`` (:func:`mirror.names.check_url_text`)."""
    try:
        check_url_text(url, "URL")
    except InvalidRecordError:
        return False
    return True


def _shown(expr: ast.expr) -> str:
    try:
        return ast.unparse(expr)
    except RecursionError:
        return "(an expression nested too deeply to show)"


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
        if found is None or not is_entrypoint(name):
            continue
        try:
            urls = [u for _, _, u in _urls(modules, found.path, ast.Module(
                body=[found.node], type_ignores=[])) if u is not None and _url_text(u)]
        except RecursionError:  # nested deeper than Python itself would compile
            urls = []
        out[name] = Entrypoint(found.path, tuple(dict.fromkeys(urls)))
    return out
