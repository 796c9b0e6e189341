"""The registry client: push, pull, watch, compat, resolve and ports over gRPC."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import grpc

from . import errors
from ._files import LocalFile, check_base_files, check_patch_files, hash_file, scan_dir
from .errors import PatchportError, from_rpc_error
from .v1 import (
    blobs_pb2,
    blobs_pb2_grpc,
    common_pb2,
    events_pb2,
    events_pb2_grpc,
    ports_pb2,
    ports_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    signing_pb2,
    signing_pb2_grpc,
)

__all__ = ["Client", "Event", "Resolution", "PushStats", "DEFAULT_REGISTRY", "port_state", "compat_kind"]

log = logging.getLogger("patchport")

#: The registry a client talks to when neither ``target`` nor ``PATCHPORT_REGISTRY`` says.
DEFAULT_REGISTRY = "http://127.0.0.1:50051"
#: Largest upload chunk the client sends (the registry may ask for less).
CHUNK = 4 << 20
#: Largest gRPC message the client sends or accepts.
MAX_MESSAGE = 64 << 20
#: Attempts per blob before an upload gives up (as the CLI).
UPLOAD_ATTEMPTS = 5
#: Codes after which a cut upload or event stream is resumed rather than raised.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}

PathLike = Union[str, "os.PathLike[str]"]
T = TypeVar("T")


def port_state(port: ports_pb2.Port) -> str:
    """A port's state as a word: ``queued``, ``running``, ``succeeded``, ``incompatible``,
    ``failed`` or ``cancelled``."""
    return ports_pb2.PortState.Name(port.state).removeprefix("PORT_STATE_").lower()


def compat_kind(kind: int) -> str:
    """A compat kind as a word: ``native``, ``ported``, ``queued``, ``running``,
    ``incompatible``, ``failed`` or ``cancelled``."""
    return ports_pb2.CompatKind.Name(kind).removeprefix("COMPAT_KIND_").lower()


def _is_loopback(host: str) -> bool:
    import ipaddress

    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_port_reference(reference: str) -> bool:
    """``patch@base`` (a port) rather than ``name:version`` or ``name@sha256:...``: an
    ``@`` not followed by ``sha256:``, as the CLI decides."""
    return any(
        not reference[i + 1 :].startswith("sha256:")
        for i, c in enumerate(reference)
        if c == "@"
    )


@dataclass
class Event:
    """One registry event (from the transactional outbox, at least once, in order).

    Attributes:
        type: ``base.published``, ``patch.pushed``, ``port.queued``, ``port.started``,
            ``port.completed``, ``port.failed``, ``port.cancelled``, ``port.evaluated``.
        cursor: Pass it to :meth:`Client.watch` to resume right after this event.
        id: Stable id, for dedupe.
        subject: The reference the event is about (a base, patch or port reference).
        payload: The event's details as the registry wrote them.
        patch: The patch reference, for patch and port events.
        base: The base reference, for base events, patch pushes (the patch's base) and
            port events (the target base).
        state: The port's state, for port events.
        time: Seconds since the epoch when the event was written.
    """

    type: str
    cursor: str
    id: str = ""
    subject: str = ""
    payload: Dict[str, Any] = field(default_factory=dict)
    patch: Optional[str] = None
    base: Optional[str] = None
    state: Optional[str] = None
    time: float = 0.0

    @classmethod
    def from_proto(cls, e: events_pb2.Event) -> "Event":
        """Builds the event from its wire form."""
        try:
            payload = json.loads(e.payload_json) if e.payload_json else {}
        except ValueError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        patch = payload.get("patch")
        base = payload.get("base")
        if e.type.startswith("patch.") and not patch:
            patch = e.subject
        if e.type.startswith("base.") and not base:
            base = e.subject
        state = payload.get("state")
        return cls(
            type=e.type,
            cursor=e.cursor,
            id=e.id,
            subject=e.subject,
            payload=payload,
            patch=patch if isinstance(patch, str) else None,
            base=base if isinstance(base, str) else None,
            state=state if isinstance(state, str) else None,
            time=e.time.seconds + e.time.nanos / 1e9,
        )


@dataclass
class Resolution:
    """The adapter a serving engine should load for the base it has.

    Attributes:
        kind: ``native`` (the patch's own base) or ``ported``.
        patch: The patch reference (``namespace/name:version``).
        base: The base version the adapter is for (``namespace/name:version``).
        files: The adapter's files (pull them with :meth:`Client.download`).
    """

    kind: str
    patch: str
    base: str
    files: List[common_pb2.FileEntry]


@dataclass
class PushStats:
    """What the last push sent.

    Attributes:
        created: False when an identical version already existed (a no-op push).
        uploaded_blobs: Blobs sent.
        uploaded_bytes: Bytes sent (after resuming, only the bytes the registry lacked).
        skipped_blobs: Blobs the registry already held.
    """

    created: bool = False
    uploaded_blobs: int = 0
    uploaded_bytes: int = 0
    skipped_blobs: int = 0


class _Bar:
    """A tqdm progress bar when stderr is a terminal, else nothing."""

    def __init__(self, label: str, total: int) -> None:
        self._bar: Any = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                return
            self._bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, leave=False)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set(self, n: int) -> None:
        if self._bar is not None:
            self._bar.n = n
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Client:
    """A connection to a patchport registry.

    Args:
        target: ``http://host:port`` or ``https://host:port``; default
            ``$PATCHPORT_REGISTRY``, else ``http://127.0.0.1:50051``.
        token: Bearer token sent as ``authorization: Bearer <token>``; default
            ``$PATCHPORT_TOKEN``. Never sent over plain ``http://`` to a non-loopback host
            unless ``PATCHPORT_ALLOW_PLAINTEXT_TOKEN=1`` (as the CLI).
        ca_cert: PEM file (path) or PEM bytes of the CA to trust for ``https://``;
            default ``$PATCHPORT_CA_CERT``. Without it the system's roots are trusted.

    Every method raises a :class:`patchport.PatchportError` subclass on failure, with the
    registry's message. The client is cheap to keep and safe to share between threads;
    :meth:`close` (or ``with Client() as c:``) releases the connection.
    """

    def __init__(
        self,
        target: Optional[str] = None,
        token: Optional[str] = None,
        ca_cert: Union[None, PathLike, bytes] = None,
    ) -> None:
        url = target or os.environ.get("PATCHPORT_REGISTRY") or DEFAULT_REGISTRY
        if token is None:
            token = (os.environ.get("PATCHPORT_TOKEN") or "").strip() or None
        if ca_cert is None:
            ca_cert = os.environ.get("PATCHPORT_CA_CERT") or None
        allow_plaintext = os.environ.get("PATCHPORT_ALLOW_PLAINTEXT_TOKEN", "") in ("1", "true", "yes")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise errors.InvalidArgument(
                f"invalid registry URL {url!r}: expected http://host:port or https://host:port"
            )
        host = parts.hostname
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if parts.scheme == "https":
            pem: Optional[bytes] = None
            if isinstance(ca_cert, bytes):
                pem = ca_cert
            elif ca_cert is not None:
                try:
                    pem = Path(ca_cert).read_bytes()
                except OSError as e:
                    raise errors.InvalidArgument(f"reading the CA certificate {ca_cert}: {e}") from e
            self._channel = grpc.secure_channel(
                address, grpc.ssl_channel_credentials(root_certificates=pem), options=options
            )
        else:
            if token and not allow_plaintext and not _is_loopback(host):
                raise errors.InvalidArgument(
                    f"refusing to send a token over plain text to {url}: use https:// (with "
                    "PATCHPORT_CA_CERT for a private CA), or set PATCHPORT_ALLOW_PLAINTEXT_TOKEN=1 "
                    "to force it"
                )
            self._channel = grpc.insecure_channel(address, options=options)
        self.url = url
        self._metadata: Tuple[Tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self.blobs = blobs_pb2_grpc.BlobServiceStub(self._channel)
        """The raw BlobService stub (pass ``metadata=client.metadata``)."""
        self.registry = registry_pb2_grpc.RegistryServiceStub(self._channel)
        """The raw RegistryService stub."""
        self.ports = ports_pb2_grpc.PortServiceStub(self._channel)
        """The raw PortService stub."""
        self.events = events_pb2_grpc.EventServiceStub(self._channel)
        """The raw EventService stub."""
        self.signing = signing_pb2_grpc.SigningServiceStub(self._channel)
        """The raw SigningService stub."""
        #: What the last :meth:`push_base` / :meth:`push_patch` sent.
        self.last_push = PushStats()

    @property
    def metadata(self) -> Tuple[Tuple[str, str], ...]:
        """The call metadata (the bearer token) for the raw stubs."""
        return self._metadata

    def close(self) -> None:
        """Closes the connection."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., T], request: Any, **kwargs: Any) -> T:
        try:
            return method(request, metadata=self._metadata, **kwargs)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    # ---------------------------------------------------------------------------------
    # Versions

    def get_base(self, reference: str) -> common_pb2.BaseVersion:
        """A base version (``namespace/name:version`` or ``namespace/name@sha256:...``)."""
        return self._call(self.registry.GetBaseVersion, registry_pb2.GetVersionRequest(reference=reference))

    def get_patch(self, reference: str) -> common_pb2.PatchVersion:
        """A patch version (``namespace/name:version`` or ``namespace/name@sha256:...``)."""
        return self._call(self.registry.GetPatchVersion, registry_pb2.GetVersionRequest(reference=reference))

    def push_base(
        self, path: PathLike, name: str, version: str, parent: Optional[str] = None
    ) -> common_pb2.BaseVersion:
        """Pushes a Hugging Face model directory as a base version.

        The directory must hold ``config.json`` and its weights as ``.safetensors``
        (checked before anything is sent). Only the files the registry lacks are
        uploaded; a cut upload resumes from the registry's committed offset; the registry
        verifies every blob's digest. Publishing a version with ``parent`` (a version of
        the same base name) queues a port of every patch of the parent onto it.

        Args:
            path: The model directory.
            name: ``namespace/name``.
            version: The new version (immutable once pushed).
            parent: The version this one evolved from, if any.

        Returns:
            The stored version (``.digest``, ``.files``, ``.config``, ...). Pushing the same
            content again is a no-op that returns the stored version
            (``client.last_push.created`` is then False).
        """
        root = Path(path)
        files = scan_dir(root)
        check_base_files(root, files)
        stats = self._upload_missing(files)
        resp = self._call(
            self.registry.PushBaseVersion,
            registry_pb2.PushBaseVersionRequest(
                name=name, version=version, parent=parent or "", files=_entries(files)
            ),
        )
        stats.created = resp.created
        self.last_push = stats
        return resp.version

    def push_patch(
        self,
        path: PathLike,
        name: str,
        version: str,
        base: str,
        eval: Optional[PathLike] = None,
    ) -> common_pb2.PatchVersion:
        """Pushes a PEFT adapter directory as a patch version, pinned to its base.

        The directory must hold ``adapter_config.json`` and ``adapter_model.safetensors``
        (checked before anything is sent). Uploads as :meth:`push_base`.

        Args:
            path: The adapter directory (PEFT ``save_pretrained`` output).
            name: ``namespace/name``.
            version: The new version.
            base: The base version it was trained on (``namespace/name:version``).
            eval: An eval set (JSONL) to store with the patch (the quality gate).

        Returns:
            The stored patch version.
        """
        root = Path(path)
        files = scan_dir(root)
        check_patch_files(root, files)
        upload = list(files)
        eval_digest = ""
        if eval is not None:
            digest, size = hash_file(eval)
            upload.append(LocalFile("eval.jsonl", Path(eval), digest, size))
            eval_digest = digest
        stats = self._upload_missing(upload)
        resp = self._call(
            self.registry.PushPatchVersion,
            registry_pb2.PushPatchVersionRequest(
                name=name, version=version, base=base, files=_entries(files), eval_digest=eval_digest
            ),
        )
        stats.created = resp.created
        self.last_push = stats
        return resp.version

    # ---------------------------------------------------------------------------------
    # Uploads

    def _upload_missing(self, files: Sequence[LocalFile]) -> PushStats:
        digests = sorted({f.digest for f in files})
        missing = set(
            self._call(self.blobs.FindMissingBlobs, blobs_pb2.FindMissingBlobsRequest(digests=digests)).missing
        )
        stats = PushStats()
        done = set()
        for f in files:
            if f.digest not in missing or f.digest in done:
                continue
            done.add(f.digest)
            stats.uploaded_bytes += self.upload_file(f.local, f.digest, f.size, label=f.path)
            stats.uploaded_blobs += 1
        stats.skipped_blobs = len(digests) - stats.uploaded_blobs
        return stats

    def upload_file(self, local: PathLike, digest: str, size: int, label: str = "") -> int:
        """Uploads one file as a blob, resuming from the registry's committed offset after
        any cut (an earlier interrupted upload of the same digest included); returns the
        bytes sent. The registry verifies the digest when the upload is committed."""
        start = self._call(self.blobs.StartUpload, blobs_pb2.StartUploadRequest(digest=digest, size=size))
        if start.already_exists:
            return 0
        chunk = min(start.max_chunk_size or CHUNK, CHUNK)
        committed = start.committed_offset
        bar = _Bar(label or str(local), size)
        bar.set(committed)
        sent = 0
        last_error: Optional[PatchportError] = None
        try:
            for attempt in range(UPLOAD_ATTEMPTS):
                if committed < size:
                    before = committed
                    try:
                        resp = self.blobs.UploadChunks(
                            _chunks(start.upload_id, Path(local), committed, size, chunk, bar),
                            metadata=self._metadata,
                        )
                        committed = resp.committed_offset
                    except grpc.RpcError as e:
                        last_error = from_rpc_error(e)
                        if e.code() not in _TRANSIENT:
                            raise last_error from None
                        log.warning("upload of %s interrupted (%s), resuming", label, last_error)
                        time.sleep(0.2 * (1 << attempt))
                        try:
                            status = self.blobs.GetUpload(
                                blobs_pb2.GetUploadRequest(upload_id=start.upload_id), metadata=self._metadata
                            )
                            committed = status.committed_offset
                        except grpc.RpcError as e2:
                            last_error = from_rpc_error(e2)
                        bar.set(committed)
                    sent += max(0, committed - before)
                if committed == size:
                    self._call(self.blobs.CommitUpload, blobs_pb2.CommitUploadRequest(upload_id=start.upload_id))
                    return sent
        finally:
            bar.close()
        raise last_error or PatchportError(f"{label}: upload did not complete")

    # ---------------------------------------------------------------------------------
    # Downloads

    def pull(self, reference: str, dest: PathLike, merged: bool = False) -> Path:
        """Pulls a base, patch or port into ``dest`` (created), every byte verified.

        Args:
            reference: ``namespace/name:version`` (or ``@sha256:...``) of a base or patch,
                or ``patch@base`` for a port.
            dest: The output directory.
            merged: For a port, the merged model instead of the ported adapter.

        Returns:
            ``dest`` as a :class:`pathlib.Path`.

        Raises:
            Refused: a port that is incompatible (``.kinds`` says why).
            FailedPrecondition: a port that has no artifact yet (queued, running, failed).
            DigestMismatch: downloaded bytes that do not match their digest (nothing is
                left under the file's name).
        """
        if _is_port_reference(reference):
            port = self.get_port(reference)
            files = list(port.merged_files if merged else port.adapter_files)
            if not files:
                state = port_state(port)
                what = "merged" if merged else "adapter"
                if state == "incompatible":
                    raise _refused(port, f"port {reference} is incompatible")
                raise errors.FailedPrecondition(f"port {reference} has no {what} artifact (state {state})")
        else:
            if merged:
                raise errors.InvalidArgument("merged applies to port references (patch@base)")
            files = self._lookup(reference)
        out = self.download(files, dest, reference=reference, merged=merged)
        self._write_signature(reference, merged, out)
        return out

    def _write_signature(self, reference: str, merged: bool, out: Path) -> None:
        """Writes the registry's OpenSSF Model Signing bundle as ``model.sig`` (and a
        port's signed provenance as ``provenance.json``) beside the pulled files, as
        ``patchport pull`` does; an unsigned registry leaves them out with a warning."""
        req = signing_pb2.GetSignatureRequest(reference=reference, merged=merged)
        try:
            sig = self.signing.GetSignature(req, metadata=self._metadata)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
                warnings.warn(f"{reference} is not signed: {e.details()}", stacklevel=3)
                return
            raise from_rpc_error(e) from None
        if sig.provenance:
            (out / "provenance.json").write_text(sig.provenance)
        (out / "model.sig").write_text(sig.model_signature)

    def _lookup(self, reference: str) -> List[common_pb2.FileEntry]:
        req = registry_pb2.GetVersionRequest(reference=reference)
        try:
            return list(self.registry.GetBaseVersion(req, metadata=self._metadata).files)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise from_rpc_error(e) from None
        try:
            return list(self.registry.GetPatchVersion(req, metadata=self._metadata).files)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise errors.NotFound(f"no base or patch version {reference}", e.code()) from None
            raise from_rpc_error(e) from None

    def download(
        self,
        files: Iterable[common_pb2.FileEntry],
        dest: PathLike,
        reference: Optional[str] = None,
        merged: bool = False,
    ) -> Path:
        """Downloads files (of a version, a port or a :class:`Resolution`) into ``dest``.

        Each file is one ``ReadFile`` stream: by ``reference`` and path when given (the
        version or port the files belong to; ``merged`` for a port's merged model, whose
        composed files the registry puts together), else by the file's blob digest.
        Each file is written to a temporary name, its sha256 and size checked against the
        entry (and the stream's announced digest and size), and only then renamed into
        place.

        Raises:
            InvalidArgument: a composed file (a merged model's safetensors file) without
                ``reference``: it is no single blob.
            DigestMismatch: downloaded bytes that do not match the entry (nothing is left
                under the file's name).
        """
        out = Path(dest)
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            self._download_file(f, out, reference, merged)
        return out

    def _download_file(self, f: common_pb2.FileEntry, out: Path, reference: Optional[str], merged: bool) -> Path:
        import hashlib

        parts = f.path.split("/")
        if (
            not f.path
            or f.path.startswith("/")
            or "\\" in f.path
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise errors.InvalidArgument(f"the registry sent a bad path: {f.path!r}")
        if reference:
            req = blobs_pb2.ReadFileRequest(reference=reference, path=f.path, merged=merged)
        elif f.segments:
            raise errors.InvalidArgument(
                f"{f.path} is composed from segments (a merged model's file): download it with "
                "reference= the port it belongs to"
            )
        else:
            req = blobs_pb2.ReadFileRequest(digest=f.digest)
        dest = out.joinpath(*parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.partial")
        h = hashlib.sha256()
        size = 0
        announced: Optional[common_pb2.FileEntry] = None
        bar = _Bar(f.path, f.size)
        try:
            with open(tmp, "wb") as w:
                try:
                    for chunk in self.blobs.ReadFile(req, metadata=self._metadata):
                        if chunk.HasField("file"):
                            announced = chunk.file
                        h.update(chunk.data)
                        w.write(chunk.data)
                        size += len(chunk.data)
                        bar.advance(len(chunk.data))
                except grpc.RpcError as e:
                    raise from_rpc_error(e) from None
            actual = "sha256:" + h.hexdigest()
            as_announced = announced is not None and announced.digest == f.digest and announced.size == f.size
            if not as_announced or actual != f.digest or size != f.size:
                raise errors.DigestMismatch(
                    f"{f.path}: downloaded bytes hash to {actual} ({size} bytes), expected "
                    f"{f.digest} ({f.size} bytes)"
                )
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            bar.close()
        return dest

    # ---------------------------------------------------------------------------------
    # Events

    def watch(
        self,
        types: Optional[Sequence[str]] = None,
        cursor: Optional[str] = None,
        subject: Optional[str] = None,
    ) -> Iterator[Event]:
        """Iterates over registry events as they happen, forever.

        The stream reconnects by itself when the registry goes away (a restart, a cut
        connection, another replica) and resumes right after the last event it yielded,
        so no event is lost and none repeats; it retries for as long as you iterate.
        Stop by leaving the loop (``break``) or closing the iterator.

        Args:
            types: Event types to receive (``port.completed``, ...); None for all.
            cursor: Where to start: None for new events only, ``"0"`` to replay every
                event from the first, or an event's ``cursor`` to resume after it.
                (Until the first event arrives, a reconnect starts again at the head.)
            subject: Only events about this base or patch name (``namespace/name``).
        """
        last = cursor or ""
        delay = 0.2
        request_types = list(types or [])
        while True:
            stream = self.events.Subscribe(
                events_pb2.SubscribeRequest(cursor=last, types=request_types, subject=subject or ""),
                metadata=self._metadata,
            )
            try:
                for e in stream:
                    delay = 0.2
                    last = e.cursor
                    yield Event.from_proto(e)
                log.info("event stream ended; reconnecting after cursor %r", last)
            except grpc.RpcError as e:
                if e.code() not in _TRANSIENT:
                    raise from_rpc_error(e) from None
                log.info("event stream cut (%s); reconnecting after cursor %r", e.code().name, last)
            finally:
                stream.cancel()
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    # ---------------------------------------------------------------------------------
    # Ports, compat, resolve

    def get_port(self, reference: str) -> ports_pb2.Port:
        """One port: ``namespace/patch:version@namespace/base:version``."""
        return self._call(self.ports.GetPort, ports_pb2.GetPortRequest(reference=reference))

    def compat(self, patch: Optional[str] = None, base: Optional[str] = None) -> List[ports_pb2.CompatEntry]:
        """Every base a patch works on (``patch=``), or every patch that works on a base
        (``base=``): native, ported, queued/running, incompatible (with the port's
        ``refusals``), failed. Give exactly one. ``compat_kind(entry.kind)`` names each."""
        if (patch is None) == (base is None):
            raise errors.InvalidArgument("compat needs exactly one of patch or base")
        req = ports_pb2.QueryCompatRequest(patch=patch) if patch is not None else ports_pb2.QueryCompatRequest(base=base)
        req.page_size = 1000
        entries: List[ports_pb2.CompatEntry] = []
        while True:
            page = self._call(self.ports.QueryCompat, req)
            entries.extend(page.entries)
            if not page.next_page_token:
                return entries
            req.page_token = page.next_page_token

    def resolve(self, patch: str, base_digest: str, require_pass: bool = False) -> Resolution:
        """The exact adapter for the base a serving engine has loaded.

        Args:
            patch: The patch reference (``namespace/name:version``).
            base_digest: The digest of the loaded base: :func:`patchport.base_digest` of
                its directory.
            require_pass: Only a port whose evaluation passed the quality gate.

        Raises:
            NotFound: no port of the patch for that base (not a descendant of its base).
            Refused: the port was refused (``.kinds``: dora, architecture, ...).
            FailedPrecondition: the port is not done, failed, or did not pass the gate.
        """
        try:
            r = self.ports.Resolve(
                ports_pb2.ResolveRequest(patch=patch, base_digest=base_digest, require_pass=require_pass),
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            err = from_rpc_error(e)
            if isinstance(err, errors.FailedPrecondition):
                refused = self._refusal_for(patch, base_digest, err.message)
                if refused is not None:
                    raise refused from None
            raise err from None
        return Resolution(kind=compat_kind(r.kind), patch=r.patch, base=r.base, files=list(r.adapter_files))

    def _refusal_for(self, patch: str, base_digest: str, message: str) -> Optional[errors.Refused]:
        """The Refused error for an incompatible port of ``patch`` onto the base with that
        digest, or None when the port is not incompatible."""
        try:
            entries = self.compat(patch=patch)
        except PatchportError:
            return None
        for e in entries:
            if e.base_digest == base_digest and e.kind == ports_pb2.COMPAT_KIND_INCOMPATIBLE:
                return _refused(e.port, message)
        return None

    def request_port(self, patch: str, base: str, priority: int = 0) -> ports_pb2.Port:
        """Queues the port of ``patch`` onto ``base`` (or finds it) and answers at once;
        a worker does the port. ``priority`` 0..999, higher first."""
        return self._call(
            self.ports.RequestPort, ports_pb2.RequestPortRequest(patch=patch, base=base, priority=priority)
        )

    def cancel_port(self, reference: str) -> ports_pb2.Port:
        """Cancels a queued or running port (``patch@base``)."""
        return self._call(self.ports.CancelPort, ports_pb2.GetPortRequest(reference=reference))

    def wait_port(self, patch: str, base: str, timeout: float = 600.0) -> ports_pb2.Port:
        """Waits until the port of ``patch`` onto ``base`` has finished and returns it
        when it succeeded.

        Raises:
            Refused: the port is incompatible (``.kinds`` says why).
            PortFailed: it failed or was cancelled (``.state``).
            Timeout: it had not finished after ``timeout`` seconds.
        """
        reference = f"{patch}@{base}"
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            port = self.get_port(reference)
            state = port_state(port)
            if state == "succeeded":
                return port
            if state == "incompatible":
                raise _refused(port, f"the port of {patch} onto {base} is incompatible")
            if state in ("failed", "cancelled"):
                detail = f": {port.error}" if port.error else ""
                raise errors.PortFailed(f"the port of {patch} onto {base} is {state}{detail}", state)
            if time.monotonic() >= deadline:
                raise errors.Timeout(f"the port of {patch} onto {base} is still {state} after {timeout:g} s")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)


def _refused(port: ports_pb2.Port, message: str) -> errors.Refused:
    kinds = [r.kind for r in port.refusals]
    reasons = [r.message for r in port.refusals]
    if reasons and not any(r in message for r in reasons):
        message = f"{message}: {'; '.join(reasons)}"
    return errors.Refused(message, kinds=kinds, reasons=reasons)


def _entries(files: Sequence[LocalFile]) -> List[common_pb2.FileEntry]:
    return [common_pb2.FileEntry(path=f.path, digest=f.digest, size=f.size) for f in files]


def _chunks(
    upload_id: str, local: Path, start: int, size: int, chunk: int, bar: _Bar
) -> Iterator[blobs_pb2.UploadChunk]:
    with open(local, "rb") as f:
        f.seek(start)
        offset = start
        while offset < size:
            n = min(chunk, size - offset)
            data = f.read(n)
            if len(data) != n:
                raise errors.PatchportError(f"{local}: the file changed while it was uploaded")
            yield blobs_pb2.UploadChunk(upload_id=upload_id, offset=offset, data=data)
            bar.advance(n)
            offset += n
