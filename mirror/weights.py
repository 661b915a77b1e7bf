"""Weights: find every URL a repo's code downloads, and download them verified.

Discovery is static: it parses each Python file with :mod:`ast` (so a URL split
over adjacent literals on several lines is one string, as Python sees it) and
evaluates the argument of ``pretrained(...)`` and ``load_serialized_obj_from_url(...)``
over module-level string constants. What it cannot evaluate is reported with
its file and line rather than guessed.
"""

from __future__ import annotations

import ast
import hashlib
import http.client
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

from tqdm import tqdm

from .errors import DownloadError
from .git import TreeFile

# Names whose first argument is a URL the code will download (megengine/hub/hub.py).
_DOWNLOADERS = {"pretrained", "load_serialized_obj_from_url"}
CHUNK = 1 << 20
SCHEMES = ("http", "https", "file")


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


# --- discovery ---------------------------------------------------------------


class _NotConstant(Exception):
    pass


def _evaluate(node: ast.AST, env: Dict[str, Any]) -> Any:
    """Evaluate an expression made of string constants, ``+``, ``%``, ``.format``,
    f-strings, dict literals and subscripts, names looked up in ``env``."""
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
        parts = []
        for v in node.values:
            if isinstance(v, ast.FormattedValue):
                if v.format_spec is not None or v.conversion not in (-1, None):
                    raise _NotConstant
                parts.append(str(_evaluate(v.value, env)))
            else:
                parts.append(str(_evaluate(v, env)))
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        left, right = _evaluate(node.left, env), _evaluate(node.right, env)
        try:
            return left + right if isinstance(node.op, ast.Add) else left % right
        except (TypeError, ValueError, KeyError):
            raise _NotConstant from None
    if isinstance(node, ast.Tuple):
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
        template = _evaluate(node.func.value, env)
        args = [_evaluate(a, env) for a in node.args]
        kwargs = {k.arg: _evaluate(k.value, env) for k in node.keywords if k.arg}
        if not isinstance(template, str) or len(kwargs) != len(node.keywords):
            raise _NotConstant
        try:
            return template.format(*args, **kwargs)
        except (IndexError, KeyError, ValueError):
            raise _NotConstant from None
    raise _NotConstant


class _Namespace(dict):
    """The constants of another module of the repo, bound by ``import pkg.mod as m``."""


_EVAL_ERRORS = (_NotConstant, ArithmeticError, AttributeError, LookupError, TypeError,
                ValueError, RecursionError)


class _Modules:
    """The repo's Python files, parsed once, and their module-level constants,
    following ``from .const import BASE`` and ``import pkg.const as c`` between them."""

    def __init__(self, files: Iterable[TreeFile]):
        # Parsed only when needed: a repo of thousands of files mentions a downloader
        # in a few, and parsing is most of the cost.
        self.sources: Dict[str, bytes] = {f.path: f.data for f in files
                                          if f.path.endswith(".py")}
        self._trees: Dict[str, ast.Module | None] = {}
        self._envs: Dict[str, Dict[str, Any]] = {}
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
        if path in self._envs:
            return self._envs[path]
        if path in self._busy:  # an import cycle: what is known so far
            return {}
        self._busy.add(path)
        tree = self.tree(path)
        try:
            self._envs[path] = _module_constants(tree, path, self) if tree else {}
        finally:
            self._busy.discard(path)
        return self._envs[path]


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


def discover(files: Iterable[TreeFile]) -> Tuple[List[WeightRef], List[Unresolved]]:
    """Every weight URL that the Python files of a snapshot pass to MegEngine's downloaders."""
    found: Dict[str, List[Location]] = {}
    unresolved: List[Unresolved] = []
    modules = _Modules(files)
    for path in modules.mentioning(_DOWNLOADERS):
        tree = modules.tree(path)
        if tree is None:
            continue
        module_env = modules.env(path)
        for node, local in _download_calls(tree, frozenset()):
            # A name a function binds itself (a parameter, say) is not the module's.
            env = {k: v for k, v in module_env.items() if k not in local}
            arg = node.args[0] if node.args else next(
                (k.value for k in node.keywords if k.arg == "url"), None)
            if arg is None:
                continue
            loc = Location(path, node.lineno)
            try:
                url = _evaluate(arg, env)
            except _EVAL_ERRORS:
                url = None  # not a plain constant: reported below, never guessed
            if isinstance(url, str):
                found.setdefault(url, []).append(loc)
            else:
                unresolved.append(Unresolved(loc, ast.unparse(arg) if hasattr(ast, "unparse")
                                             else ast.dump(arg)))
    weights = [WeightRef(u, tuple(sorted(set(locs), key=lambda x: (x.path, x.line))))
               for u, locs in sorted(found.items())]
    return weights, unresolved


def coverage(files: Iterable[TreeFile]) -> Dict[str, List[str]]:
    """Each function ``hubconf.py`` defines at top level, with the weight URLs that its
    own ``@pretrained(...)`` decorators name, found without running it.

    ``megengine.hub.list`` also counts callables hubconf imports (classes, say); these
    are the entrypoints a reader of the manifest can check without executing code.
    """
    modules = _Modules(files)
    tree = modules.tree("hubconf.py")
    if tree is None:
        return {}
    env = modules.env("hubconf.py")
    out: Dict[str, List[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                not node.name.startswith("_"):
            urls = []
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and _callee_name(deco) in _DOWNLOADERS \
                        and deco.args:
                    try:
                        url = _evaluate(deco.args[0], env)
                    except _EVAL_ERRORS:
                        continue
                    if isinstance(url, str):
                        urls.append(url)
            out[node.name] = urls
    return dict(sorted(out.items()))


# --- download ----------------------------------------------------------------


@dataclass(frozen=True)
class Downloaded:
    """A weight file on local disk with its verified size and digest."""

    url: str
    path: str
    size: int
    sha256: str


def url_basename(url: str) -> str:
    """The file name MegEngine gives a URL's download (the last path segment)."""
    return os.path.basename(urllib.parse.urlparse(url).path) or "weights"


def download(url: str, dest: str, *, retries: int = 4, timeout: float = 30.0,
             progress: bool = True) -> Downloaded:
    """Download ``url`` to ``dest``, resuming after dropped connections, hashing as it goes.

    ``dest`` appears only when the whole file has arrived; a partial download is
    kept at ``dest + ".part"`` so that a retry asks only for the rest (HTTP Range).
    """
    scheme = urllib.parse.urlparse(url).scheme
    part = dest + ".part"
    if scheme == "" and os.path.isabs(url):
        _copy_local(url, part)  # a path on this host, as megfile (and MegEngine) allow
    elif scheme == "s3":
        _copy_s3(url, part)
    elif scheme not in SCHEMES:
        raise DownloadError(url, f"unsupported URL scheme {scheme or '(none)'!r}; mirror "
                                 f"downloads {', '.join(SCHEMES)} and s3 URLs and absolute "
                                 f"paths")
    hashed = _Hashed()
    if scheme in SCHEMES:
        _fetch_with_retries(url, part, retries, timeout, progress, hashed)
    hashed.catch_up(part)  # a no-op after an HTTP download, which hashed as it wrote
    os.replace(part, dest)
    return Downloaded(url, dest, hashed.size, hashed.digest.hexdigest())


class _Hashed:
    """The sha256 of a partial download, kept up to date as blocks arrive."""

    def __init__(self) -> None:
        self.digest, self.size = hashlib.sha256(), 0
        self.validator: str | None = None  # ETag or Last-Modified of the bytes so far

    def update(self, block: bytes) -> None:
        self.digest.update(block)
        self.size += len(block)

    def catch_up(self, path: str) -> None:
        """Make the digest cover exactly the file at ``path`` (it already does unless a
        download started over, or was resumed from an earlier process's part file)."""
        have = os.path.getsize(path) if os.path.exists(path) else 0
        if have != self.size:
            self.__init__()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(CHUNK), b""):
                    self.update(block)


def _fetch_with_retries(url: str, part: str, retries: int, timeout: float,
                        progress: bool, hashed: _Hashed) -> None:
    last_error = "no attempt made"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.25 * 2 ** attempt, 4.0))
        try:
            return _fetch_into(url, part, timeout, progress, hashed)
        except _Retryable as e:
            last_error = str(e)
    raise DownloadError(url, f"{last_error} (gave up after {retries + 1} attempts)")


def _copy_local(path: str, part: str) -> None:
    try:
        shutil.copyfile(path, part)
    except OSError as e:
        raise DownloadError(path, e.strerror or str(e)) from None


def _copy_s3(url: str, part: str) -> None:
    try:
        import megfile  # MegEngine's own file layer, which its hub uses for s3://
    except ImportError:
        raise DownloadError(url, "s3:// needs megfile (pip install megfile), which "
                                 "MegEngine installs") from None
    try:
        with megfile.smart_open(url, "rb") as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
    except Exception as e:  # noqa: BLE001  (megfile raises its own and botocore's errors)
        raise DownloadError(url, f"{type(e).__name__}: {e}") from None


class _Retryable(Exception):
    pass


def _fetch_into(url: str, part: str, timeout: float, progress: bool, hashed: _Hashed) -> None:
    hashed.catch_up(part)
    have = hashed.size
    request = urllib.request.Request(url, headers={"User-Agent": "mge-mirror"})
    if have:
        request.add_header("Range", f"bytes={have}-")
        if hashed.validator:  # the rest only if it is still the same file, else all of it
            request.add_header("If-Range", hashed.validator)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # asked past the end: the file is already whole
            return
        if e.code >= 500 or e.code == 429:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(url, f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise _Retryable(str(getattr(e, "reason", e))) from None
    except (ValueError, http.client.HTTPException) as e:  # e.g. InvalidURL: a bad port
        raise DownloadError(url, f"invalid URL: {e}") from None

    with response:
        content_range = response.headers.get("Content-Range", "")
        if have and (response.status != 206 or not content_range.startswith(
                f"bytes {have}-")):
            have = 0  # the server ignored Range, or the file changed: start over
            hashed.__init__()
        if not have:
            hashed.validator = response.headers.get("ETag") or \
                response.headers.get("Last-Modified")
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        mode = "ab" if have else "wb"
        received = 0
        with open(part, mode) as out, tqdm(
            total=(expected + have) if expected is not None else None, initial=have,
            unit="B", unit_scale=True, unit_divisor=1024, desc=url_basename(url),
            disable=not progress, leave=False,
        ) as bar:
            buffer = bytearray(CHUNK)  # reused: read() would allocate and copy each block
            try:
                while True:
                    n = response.readinto(buffer)
                    if not n:
                        break
                    block = memoryview(buffer)[:n]
                    out.write(block)
                    hashed.update(block)  # sha256 on the fly: the file is read once
                    received += n
                    bar.update(n)
            except (OSError, http.client.HTTPException) as e:  # e.g. IncompleteRead
                raise _Retryable(f"connection lost after {have + received} bytes: {e}") from None
        if expected is not None and received != expected:
            raise _Retryable(f"connection closed after {have + received} of "
                             f"{have + expected} bytes")


# --- the packing host's download cache ----------------------------------------


def default_cache_dir() -> str:
    """``$MGE_MIRROR_DOWNLOADS``, else ``$XDG_CACHE_HOME/megengine/mirror-downloads``."""
    if os.environ.get("MGE_MIRROR_DOWNLOADS"):
        return os.path.expanduser(os.environ["MGE_MIRROR_DOWNLOADS"])
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return os.path.join(os.path.expanduser(cache), "megengine", "mirror-downloads")


class DownloadCache:
    """Weights downloaded before, by URL, so packing again downloads nothing.

    A cached file is never trusted because it exists: it is re-hashed against the
    sha256 recorded when it was downloaded (and against ``expect``, a lock's pin).
    """

    def __init__(self, root: str | None = None, refresh: bool = False):
        self.root = root or default_cache_dir()
        self.refresh = refresh  # download again, whatever is cached

    def _paths(self, url: str) -> Tuple[str, str]:
        key = hashlib.sha256(url.encode()).hexdigest()
        return os.path.join(self.root, key + ".data"), os.path.join(self.root, key + ".json")

    def fetch(self, url: str, source: str, progress: bool = True,
              expect: str | None = None) -> Downloaded:
        """The file for ``url`` (downloaded from ``source``), from the cache when its
        bytes still match what was recorded."""
        data, record = self._paths(url)
        cached = None if self.refresh else self._check(url, data, record, expect)
        if cached:
            return cached
        tmp = f"{data}.{os.getpid()}.{threading.get_ident()}"
        try:
            os.makedirs(self.root, exist_ok=True)
            for stale in (tmp, tmp + ".part"):  # never resume into bytes of another day
                if os.path.exists(stale):
                    os.unlink(stale)
            got = download(source, tmp, progress=progress)
            os.replace(tmp, data)
            with open(f"{tmp}.json", "w") as fh:
                json.dump({"url": url, "sha256": got.sha256, "size": got.size}, fh)
            os.replace(f"{tmp}.json", record)
        except OSError as e:
            raise DownloadError(url, f"download cache {self.root}: {e.strerror or e}") \
                from None
        finally:
            if os.path.exists(tmp + ".part"):  # a failed download leaves nothing behind
                os.unlink(tmp + ".part")
        return Downloaded(url, data, got.size, got.sha256)

    @staticmethod
    def _check(url: str, data: str, record: str, expect: str | None) -> Downloaded | None:
        try:
            with open(record) as fh:
                rec = json.load(fh)
        except (OSError, ValueError):
            return None
        if rec.get("url") != url or (expect and rec.get("sha256") != expect):
            return None
        digest, size = hashlib.sha256(), 0
        try:
            with open(data, "rb") as fh:
                for block in iter(lambda: fh.read(CHUNK), b""):
                    digest.update(block)
                    size += len(block)
        except OSError:
            return None
        if digest.hexdigest() != rec["sha256"]:
            return None  # changed on disk since: download again
        return Downloaded(url, data, size, rec["sha256"])


def fetch_all(urls: Sequence[str], cache: DownloadCache, source: Callable[[str], str],
              jobs: int = 4, progress: bool = True,
              expect: Dict[str, str] | None = None) -> Dict[str, Downloaded]:
    """Download ``urls`` (each from ``source(url)``), ``jobs`` at a time, through ``cache``."""
    expect = expect or {}
    results: Dict[str, Downloaded] = {}
    with tqdm(total=len(urls), unit="file", desc="weights", disable=not progress or None) \
            as bar, ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(cache.fetch, u, source(u), progress and jobs == 1,
                               expect.get(u)): u for u in urls}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
        except BaseException:
            for future in futures:  # the first failure is the answer: stop the queue
                future.cancel()
            raise
    return results
