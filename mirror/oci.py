"""A bundle as an OCI artifact, as ORAS stores files: push, pull, and install from a
registry (docs/bundle-format.md, "In a registry").

- One OCI image manifest, whose ``artifactType`` is ``ARTIFACT_TYPE`` with the
  bundle's format version.
- Its config blob: the bundle's manifest JSON (``CONFIG_TYPE``), so a registry's UI,
  or ``oras manifest fetch-config``, shows what the bundle carries without a download.
- One layer per part file, in order (a whole bundle is one layer), each titled by its
  file name (``org.opencontainers.image.title``), so ``oras pull`` writes the parts; a
  detached signature (``BUNDLE.sig``) is one more layer.
- Annotations: ``org.opencontainers.image.created``; ``.source`` and ``.revision``
  where the bundle carries one snapshot; mirror's own for its id and snapshots.

Nothing in the artifact is trusted. The layers, concatenated, are the bundle, and a
pull or an install verifies every byte as it would a file's; the signature travels
inside the bundle (or as its layer), since CNCF Distribution 2.8 has no referrers API.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import IO, Any, Dict, Iterator, List, Sequence, Tuple

from tqdm import tqdm

from . import bundle, parts
from .atomic import fsync_path, write_atomic
from .config import settings
from .errors import BundleError, InvalidRecordError, MirrorError, OCIReferenceError, RegistryError
from .hashing import CHUNK
from .model import Manifest
from .names import check_component
from .parts import Parts, Remote
from .reference import HTTPS, Connection, Reference
from .registry import OCI_MANIFEST, Registry

ARTIFACT_TYPE = "application/vnd.megengine.mirror.bundle.v{version}"
ARTIFACT_PREFIX = "application/vnd.megengine.mirror.bundle.v"
CONFIG_TYPE = "application/vnd.megengine.mirror.manifest.v1+json"
LAYER_TYPE = "application/vnd.megengine.mirror.bundle.layer.v1.tar+zstd"
SIGNATURE_TYPE = "application/vnd.megengine.mirror.signature.v1+json"
TITLE = "org.opencontainers.image.title"
MAX_LAYERS = 100_000


@dataclass(frozen=True)
class Layer:
    """A blob of the artifact: its digest, size and file name."""

    digest: str
    size: int
    title: str
    media_type: str = LAYER_TYPE

    def to_json(self) -> Dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size,
                "annotations": {TITLE: self.title}}


@dataclass(frozen=True)
class Artifact:
    """A bundle's OCI manifest, parsed and checked: what a pull or install reads."""

    digest: str  # the manifest's
    artifact_type: str
    config: Layer
    layers: Tuple[Layer, ...]  # the bundle's bytes, in order
    signature: Layer | None = None
    annotations: Dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @classmethod
    def from_bytes(cls, where: str, data: bytes, digest: str) -> Artifact:
        """Parse an OCI image manifest; raises BundleError for one that is not a mirror
        bundle's, or that names a blob or a file name it should not."""
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            raise BundleError(where, "its OCI manifest is not JSON") from None
        if not isinstance(obj, dict) or obj.get("schemaVersion") != 2 or \
                obj.get("mediaType", OCI_MANIFEST) != OCI_MANIFEST:
            raise BundleError(where, "not an OCI image manifest (schemaVersion 2)")
        kind = obj.get("artifactType")
        if not isinstance(kind, str) or not kind.startswith(ARTIFACT_PREFIX):
            raise BundleError(where, f"not a mirror bundle: its artifactType is {kind!r}, "
                                     f"not {ARTIFACT_PREFIX}N")
        config = _descriptor(where, obj.get("config"), CONFIG_TYPE)
        layers = obj.get("layers")
        if not isinstance(layers, list) or not 0 < len(layers) <= MAX_LAYERS:
            raise BundleError(where, "its OCI manifest has no layers")
        found = [_descriptor(where, d, LAYER_TYPE, SIGNATURE_TYPE) for d in layers]
        signatures = [d for d in found if d.media_type == SIGNATURE_TYPE]
        body = tuple(d for d in found if d.media_type == LAYER_TYPE)
        if len(signatures) > 1 or not body or (signatures and found[-1] != signatures[0]):
            raise BundleError(where, "its layers are not the bundle's parts, then at most "
                                     "one signature")
        if signatures and signatures[0].size > bundle.MAX_SIGNATURE_BYTES:
            raise BundleError(where, f"its signature layer is {signatures[0].size} bytes, "
                                     f"over the {bundle.MAX_SIGNATURE_BYTES} byte limit")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise BundleError(where, "its annotations are not an object")
        return cls(digest, kind, config, body, signatures[0] if signatures else None,
                   {str(k): str(v) for k, v in annotations.items()})


def _descriptor(where: str, obj: Any, *media_types: str) -> Layer:
    if not isinstance(obj, dict) or obj.get("mediaType") not in media_types:
        raise BundleError(where, f"a descriptor is not one of {', '.join(media_types)}")
    digest, size = obj.get("digest"), obj.get("size")
    annotations = obj.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise BundleError(where, f"blob {digest!r}'s annotations are not an object")
    title = annotations.get(TITLE, "config")
    if not isinstance(digest, str) or not digest.startswith("sha256:") or \
            len(digest) != 71 or not all(c in "0123456789abcdef" for c in digest[7:]):
        raise BundleError(where, f"a descriptor's digest {digest!r} is not sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BundleError(where, f"blob {digest} has no size")
    try:  # a title names a file (oras pull writes it; a store's records keep it)
        check_component(title if isinstance(title, str) else "", f"blob {digest}'s title")
    except InvalidRecordError as e:
        raise BundleError(where, str(e)) from None
    return Layer(digest, size, title, obj["mediaType"])


# --- push ------------------------------------------------------------------------


@dataclass(frozen=True)
class PushReport:
    reference: str  # oci://HOST/REPO:TAG@sha256:...
    digest: str
    layers: int
    uploaded: int  # blobs sent
    uploaded_bytes: int
    present: int  # blobs the repository had already
    mounted: int  # blobs mounted from another repository

    def to_json(self) -> Dict[str, Any]:
        return {"reference": self.reference, "digest": self.digest, "layers": self.layers,
                "uploaded": self.uploaded, "uploaded_bytes": self.uploaded_bytes,
                "present": self.present, "mounted": self.mounted}


def push(paths: Sequence[str], target: str, connection: Connection = HTTPS,
         mount_from: str | None = None, progress: bool = False) -> PushReport:
    """Push the bundle at ``paths`` (one file, or all its parts in any order) to
    ``target`` (``oci://HOST[:PORT]/REPOSITORY[:TAG]``, tag ``latest`` by default).

    A blob the repository has is not sent again: a file pushed before is known by its
    digest, kept in a memo keyed by the file's identity and times (as git's index
    does), and asked for with HEAD, then mounted from ``mount_from`` where given. A
    new file is hashed as it is sent, in one read. Raises :class:`RegistryError`,
    :class:`BundleError` for what is not a bundle."""
    ref = Reference.parse(target)
    if ref.digest:
        raise OCIReferenceError(target, "push stores a tag; name one, not a digest")
    given = _bundle_files(paths)
    files = given.paths if isinstance(given, Parts) else [given]
    manifest_bytes = bundle.read_manifest_bytes(given)
    manifest = bundle.manifest_from_bytes(str(given), manifest_bytes)  # read once
    signature = files[0] + ".sig" if not isinstance(given, Parts) and \
        os.path.isfile(files[0] + ".sig") else None

    registry = Registry(ref, connection)
    memo = _Memo(settings().digest_memo)
    counts = {"uploaded": 0, "bytes": 0, "present": 0, "mounted": 0}
    bar = tqdm(total=sum(os.path.getsize(p) for p in files), unit="B", unit_scale=True,
               unit_divisor=1024, desc="push", disable=not progress or None, leave=False)
    layers = []
    try:
        with bar:
            for path in files + ([signature] if signature else []):
                digest, size = _push_file(registry, path, memo, mount_from, counts, bar)
                layers.append(Layer(digest, size, os.path.basename(path),
                                    SIGNATURE_TYPE if path == signature else LAYER_TYPE))
        config = Layer(registry.put_blob(manifest_bytes), len(manifest_bytes), "config",
                       CONFIG_TYPE)
        document = _manifest_json(manifest, manifest_bytes, config, layers)
        digest = registry.put_manifest(ref.tag or "latest", document)
    finally:
        registry.close()
    return PushReport(str(Reference(ref.host, ref.repository, ref.tag or "latest", digest)),
                      digest, len(layers), counts["uploaded"], counts["bytes"],
                      counts["present"], counts["mounted"])


def _push_file(registry: Registry, path: str, memo: _Memo, mount_from: str | None,
               counts: Dict[str, int], bar: Any) -> Tuple[str, int]:
    st = os.stat(path)
    known = memo.get(path, st)
    if known and registry.blob_size(known) == st.st_size:
        counts["present"] += 1
        bar.update(st.st_size)
        return known, st.st_size
    location = registry.start_upload(known, mount_from)
    if location is None:
        counts["mounted"] += 1
        bar.update(st.st_size)
        return known, st.st_size
    hashed = hashlib.sha256()
    with open(path, "rb") as fh:
        digest = registry.upload(location, _Hashing(fh, hashed, bar), st.st_size,
                                 lambda: "sha256:" + hashed.hexdigest())
    memo.put(path, st, digest)
    counts["uploaded"] += 1
    counts["bytes"] += st.st_size
    return digest, st.st_size


def _bundle_files(paths: Sequence[str]) -> parts.BundleInput:
    if not paths or bundle.STREAM in paths:
        raise MirrorError("push reads bundle files: name a bundle, or all of its parts")
    for path in paths:
        if not os.path.isfile(path):
            raise BundleError(path, "no such file")
    grouped = parts.group(list(paths))
    if len(grouped) != 1:
        raise MirrorError(f"push takes one bundle (or all of its parts); "
                          f"{len(grouped)} were given: {', '.join(map(str, grouped))}")
    given = grouped[0]
    if isinstance(given, Parts):
        problem = given.problem() or (
            f"{given.others[0]} is not one of its parts" if given.others else None)
        if problem:
            raise BundleError(str(given), problem)
    return given


def _manifest_json(manifest: Manifest, manifest_bytes: bytes, config: Layer,
                   layers: List[Layer]) -> bytes:
    created = datetime.datetime.fromtimestamp(manifest.created, datetime.timezone.utc)
    annotations = {"org.opencontainers.image.created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "org.megengine.mirror.bundle-id": bundle.bundle_id(manifest_bytes)}
    snapshots = [(repo, snap) for repo in manifest.repos for snap in repo.snapshots]
    if len(snapshots) == 1:
        annotations["org.opencontainers.image.source"] = snapshots[0][0].id.url
        annotations["org.opencontainers.image.revision"] = snapshots[0][1].commit
    annotations["org.megengine.mirror.snapshots"] = " ".join(
        f"{repo.id}@{snap.commit}" for repo, snap in snapshots)
    annotations["org.megengine.mirror.refs"] = " ".join(
        f"{repo.id}:{r.name}={r.commit}" for repo in manifest.repos for r in repo.refs)
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE.format(version=manifest.format_version),
        "config": {"mediaType": config.media_type, "digest": config.digest,
                   "size": config.size},
        "layers": [layer.to_json() for layer in layers],
        "annotations": annotations}, indent=1).encode()


class _Hashing:
    """A file read forward, hashed (and counted on ``bar``) as it is read."""

    def __init__(self, fh: IO[bytes], hashed: Any, bar: Any):
        self.fh, self.hashed, self.bar = fh, hashed, bar

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.hashed.update(data)
        self.bar.update(len(data))
        return data


RACY_NS = 100_000_000  # changed more lately than this: a change could hide in its tick


class _Memo:
    """Digests of files pushed before, keyed by what changes when a file does (its
    path, device, inode, size, mtime and ctime, in nanoseconds): a second push of the
    same file needs no read to know the registry has it. A lost or unwritable memo
    only costs that read."""

    def __init__(self, folder: str):
        self.folder = folder

    def _key(self, path: str, st: os.stat_result) -> str:
        text = (f"{os.path.realpath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0"
                f"{st.st_mtime_ns}\0{st.st_ctime_ns}")
        return os.path.join(self.folder, hashlib.sha256(text.encode()).hexdigest())

    def get(self, path: str, st: os.stat_result) -> str | None:
        try:
            with open(self._key(path, st), encoding="ascii") as fh:
                digest = fh.read(80).strip()
        except (OSError, ValueError):
            return None
        return digest if len(digest) == 71 and digest.startswith("sha256:") else None

    def put(self, path: str, st: os.stat_result, digest: str) -> None:
        """Remember ``digest`` for the file ``st`` described before it was read: not if
        it changed meanwhile, nor if it changed so lately that another change within
        the same timestamp tick (Linux stamps files from a clock that moves a tick at
        a time) would not show: git's "racily clean" files."""
        try:
            now = os.stat(path)
        except OSError:
            return
        if (now.st_mtime_ns, now.st_ctime_ns, now.st_size) != \
                (st.st_mtime_ns, st.st_ctime_ns, st.st_size) or \
                time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS:
            return
        try:
            os.makedirs(self.folder, exist_ok=True)
            write_atomic(self._key(path, st), digest.encode())
        except OSError:
            pass  # the next push reads the file again, that is all


# --- pull and install ----------------------------------------------------------------


def fetch_artifact(registry: Registry) -> Artifact:
    """The artifact ``registry.ref`` names, checked (a digest reference proves it)."""
    data, digest = registry.get_manifest(registry.ref.reference)
    return Artifact.from_bytes(str(registry.ref), data, digest)


class RegistrySource(Remote):
    """A bundle in a registry, read once as the concatenation of its layers, each
    checked against its digest as it ends: what ``install oci://...`` reads, with no
    copy of the bundle on disk."""

    def __init__(self, reference: str, connection: Connection = HTTPS):
        self.ref = Reference.parse(reference)
        self.connection = connection
        self.artifact: Artifact | None = None
        self._layers: _Layers | None = None

    def open(self) -> IO[bytes]:
        registry = Registry(self.ref, self.connection)
        try:
            self.artifact = fetch_artifact(registry)
            if self.artifact.signature is not None:
                self.signature = registry.small_blob(
                    self.artifact.signature.digest, self.artifact.signature.size,
                    bundle.MAX_SIGNATURE_BYTES, f"the signature {self.artifact.signature.title}")
        except BaseException:
            registry.close()
            raise
        self.size = self.artifact.size
        first = self.artifact.layers[0].title
        self.file_name = first.rsplit(".", 1)[0] if len(self.artifact.layers) > 1 else first
        self._layers = _Layers(registry, self.artifact.layers)
        return io.BufferedReader(self._layers, CHUNK)

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` of a bundle in one layer, by a range request:
        format 4's manifest frame, at its end, read before the stream. Not checked
        against the layer's digest here: the stream, read on, ends with the same
        manifest (and signature), or is refused, and the layer's digest is checked
        at its end."""
        assert self.artifact is not None and self._layers is not None
        if len(self.artifact.layers) != 1:
            raise BundleError(str(self), f"its first layer opens as a bundle packed with "
                                         f"--stream, which is pushed as one layer; it has "
                                         f"{len(self.artifact.layers)}")
        layer = self.artifact.layers[0]
        return self._layers.registry.blob_range(layer.digest, offset, length,
                                                f"the manifest of layer {layer.title}")

    def explain(self) -> None:
        """Bytes that did not read as a bundle: where the layer they came in does not
        match its digest, that is the cause to name (the registry damaged it)."""
        if self._layers is not None and not self._layers.closed:
            self._layers.finish_layer()

    def __str__(self) -> str:
        return str(self.ref)


class _Layers(io.RawIOBase):
    """The layers' bytes, one after the other, each hashed and its digest checked at
    its end: a registry can serve what it stored damaged."""

    def __init__(self, registry: Registry, layers: Sequence[Layer]):
        super().__init__()
        self.registry = registry
        self.chunks = self._chunks(layers)
        self.left = memoryview(b"")
        self.layer = 0  # the index of the layer being read

    def _chunks(self, layers: Sequence[Layer]) -> Iterator[bytes]:
        for self.layer, layer in enumerate(layers):
            yield from self.registry.verified_blob(layer.digest, layer.size,
                                                   f"layer {layer.title}")

    def finish_layer(self) -> None:
        """Read the rest of the layer being read, so that its digest is checked (and a
        mismatch raised); at most one layer's bytes."""
        layer = self.layer
        for _ in self.chunks:
            if self.layer != layer:
                return

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.left:
            self.left = memoryview(next(self.chunks, b""))  # sliced below with no copy
        n = min(len(buffer), len(self.left))
        buffer[:n] = self.left[:n]
        self.left = self.left[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self.chunks.close()
            self.registry.close()
        super().close()


@dataclass(frozen=True)
class PullReport:
    reference: str  # with the manifest's digest
    digest: str
    files: Tuple[str, ...]
    bytes: int
    resumed_from: int  # bytes already on disk from an earlier pull that broke off

    def to_json(self) -> Dict[str, Any]:
        return {"reference": self.reference, "digest": self.digest,
                "files": list(self.files), "bytes": self.bytes,
                "resumed_from": self.resumed_from}


def pull(reference: str, output: str, keep_parts: bool = False,
         connection: Connection = HTTPS, progress: bool = False) -> PullReport:
    """Write the bundle ``reference`` names to ``output`` (its layers concatenated: one
    bundle), or with ``keep_parts`` to ``output.001``, ... as it was pushed; a
    detached signature to ``output.sig``. Every layer is checked against its digest,
    and the bundle's manifest against the artifact's config, before any file takes
    its name. A pull that broke off resumes from the ``.partial`` files it left, with
    Range (what they hold is hashed again, not trusted)."""
    ref = Reference.parse(reference)
    registry = Registry(ref, connection)
    try:
        artifact = fetch_artifact(registry)
        config = registry.small_blob(artifact.config.digest, artifact.config.size,
                                     bundle.MAX_MANIFEST_BYTES,
                                     "the config (the bundle's manifest)")
        count = len(artifact.layers)
        if keep_parts and count > 1:
            targets = [(parts.part_name(output, i, count), [layer])
                       for i, layer in enumerate(artifact.layers, 1)]
        else:
            targets = [(output, list(artifact.layers))]
        if artifact.signature is not None:
            targets.append((output + ".sig", [artifact.signature]))
        bar = tqdm(total=artifact.size, unit="B", unit_scale=True, unit_divisor=1024,
                   desc="pull", disable=not progress or None, leave=False)
        resumed = 0
        with bar:
            for path, layers in targets:
                with _writing(path + PARTIAL):
                    resumed += _pull_file(registry, path + PARTIAL, layers, bar)
    finally:
        registry.close()
    partials = [p + PARTIAL for p, _ in targets]
    pulled = Parts(tuple((p, parts.header_of(p)) for p in partials[:count])) \
        if keep_parts and count > 1 else partials[0]
    if bundle.read_manifest_bytes(pulled) != config:
        raise BundleError(str(ref), "its config is not the manifest of the bundle its "
                                    "layers hold")
    for path, _ in targets:
        with _writing(path):
            os.replace(path + PARTIAL, path)
    return PullReport(str(ref.with_digest(artifact.digest)), artifact.digest,
                      tuple(p for p, _ in targets), artifact.size, resumed)


PARTIAL = ".partial"


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    """An OSError said as the file that could not be written (a missing folder, a full
    disk), not as a traceback."""
    try:
        yield
    except OSError as e:
        raise MirrorError(f"cannot write {e.filename or path}: {e.strerror or e}") from None


def _pull_file(registry: Registry, partial: str, layers: Sequence[Layer], bar: Any) -> int:
    """``layers`` into the file ``partial`` (opened never through a symlink), made
    durable; returns how many bytes of an earlier pull were reused."""
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with open(fd, "r+b") as fh:
        reused = _pull_into(registry, fh, os.fstat(fd).st_size, layers, bar)
    fsync_path(partial)
    return reused


def _pull_into(registry: Registry, fh: IO[bytes], have: int, layers: Sequence[Layer],
               bar: Any) -> int:
    """Write ``layers`` one after another into ``fh``, which holds ``have`` bytes from
    an earlier pull: those are hashed again, and the rest asked for with Range. Bytes
    of an earlier pull that do not verify are dropped and the layer fetched whole once
    more, before the registry is blamed. Returns how many bytes were reused."""
    reused, offset = 0, 0
    for layer in layers:
        start = min(layer.size, max(0, have - offset))
        for attempt in (start, 0) if start else (0,):
            hashed = hashlib.sha256()
            fh.seek(offset)
            left = attempt
            while left:  # what the last pull wrote
                block = fh.read(min(CHUNK, left))
                hashed.update(block)
                left -= len(block)
            fh.seek(offset + attempt)
            try:
                for chunk in registry.verified_blob(layer.digest, layer.size,
                                                    f"layer {layer.title}", attempt, hashed):
                    fh.write(chunk)
                    bar.update(len(chunk))
            except RegistryError as e:
                fh.truncate(offset)  # the bytes that did not verify are not kept
                have = offset
                if e.kind == "damaged" and attempt:
                    continue  # the earlier pull's bytes, perhaps of another artifact
                raise
            reused += attempt
            bar.update(attempt)
            break
        offset += layer.size
    fh.truncate(offset)
    return reused
