"""The KV offload tiers, each with a byte cap and LRU eviction: host memory, a local folder, and an S3-compatible
bucket shared by replicas; and the chunk file format the folder and the bucket share.

A chunk file is a fixed prefix (magic, format version, header length), a JSON header (model identity, chunk key,
shape, dtype, payload size and CRC-32) and the raw payload. Whatever is wrong with a chunk (missing, truncated,
corrupt, written by another model or format) makes it a miss: the engine recomputes those tokens.
"""
import errno
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

log = logging.getLogger("kvserve.kv_offload")

MAGIC = b"KVSCHUNK"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sHI")  # magic, format version, header length
_MAX_HEADER = 1 << 16
_HEADER_TYPES = {"model": str, "key": str, "shape": list, "dtype": str, "nbytes": int, "crc32": int}
SUFFIX = ".kvc"

Alloc = Callable[[int], torch.Tensor]  # nbytes -> a uint8 host tensor (pinned on CUDA)


@dataclass(frozen=True)
class ChunkSpec:
    """What every chunk of one engine holds: [2, layers, chunk_blocks, block_size, kv_heads, head_dim]."""
    identity: str  # the model identity (hex), part of every chunk key
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


class ChunkError(Exception):
    def __init__(self, cause: str, detail: str):
        super().__init__(detail)
        self.cause = cause  # truncated | corrupt | mismatch: one log line per cause per tier


class Notices:
    """The first warning of each (tier, cause) is logged; repeats go to debug, so a failing tier logs one clear
    line instead of one per chunk."""

    def __init__(self):
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def warn(self, tier: str, cause: str, msg: str, *args) -> None:
        with self._lock:
            first = (tier, cause) not in self._seen
            self._seen.add((tier, cause))
        log.log(logging.WARNING if first else logging.DEBUG, f"KV offload, {tier} tier: {msg}", *args)


# -- the chunk file format -----------------------------------------------------------------------------------
def payload_view(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous host tensor, without a copy (numpy has no bfloat16, so as uint8)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def encode_header(spec: ChunkSpec, key: str, payload: np.ndarray) -> bytes:
    header = json.dumps({"model": spec.identity, "key": key, "shape": list(spec.shape), "dtype": spec.dtype_name,
                         "nbytes": payload.nbytes, "crc32": zlib.crc32(payload)}).encode()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header


def parse_header(prefix: bytes, read: Callable[[int], bytes]) -> tuple[dict, int]:
    """prefix: the first _PREFIX.size bytes; read(n): the next n bytes. Returns the header and the payload's
    offset."""
    if len(prefix) < _PREFIX.size:
        raise ChunkError("truncated", f"{len(prefix)} bytes, shorter than a chunk header")
    magic, version, n = _PREFIX.unpack(prefix[:_PREFIX.size])
    if magic != MAGIC:
        raise ChunkError("corrupt", "not a kvserve KV chunk (bad magic)")
    if version != FORMAT_VERSION:
        raise ChunkError("mismatch", f"chunk format version {version}, this build reads {FORMAT_VERSION}")
    if n > _MAX_HEADER:
        raise ChunkError("corrupt", f"header length {n} is implausible")
    raw = bytes(read(n))
    if len(raw) < n:
        raise ChunkError("truncated", "the header is cut short")
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise ChunkError("corrupt", f"unreadable header ({e})") from None
    if not isinstance(header, dict) or not all(isinstance(header.get(k), t) for k, t in _HEADER_TYPES.items()):
        raise ChunkError("corrupt", "the header lacks the fields of a chunk")
    return header, _PREFIX.size + n


def check_header(header: dict, spec: ChunkSpec, key: str) -> None:
    if header["model"] != spec.identity:
        raise ChunkError("mismatch", f"written by another model or layout (identity {header['model'][:12]}…, "
                                     f"this engine's {spec.identity[:12]}…)")
    if header["key"] != key:
        raise ChunkError("mismatch", f"holds chunk {header['key'][:12]}…, not {key[:12]}…")
    if header["shape"] != list(spec.shape) or header["dtype"] != spec.dtype_name or header["nbytes"] != spec.nbytes:
        raise ChunkError("mismatch", f"shape {header['shape']} {header['dtype']}, this engine's "
                                     f"{list(spec.shape)} {spec.dtype_name}")


def check_payload(header: dict, payload: np.ndarray, got: int) -> None:
    if got < header["nbytes"]:
        raise ChunkError("truncated", f"payload of {got} bytes, the header promises {header['nbytes']}")
    if got > header["nbytes"]:
        raise ChunkError("corrupt", f"payload of {got} bytes, the header promises {header['nbytes']}")
    if zlib.crc32(payload) != header["crc32"]:
        raise ChunkError("corrupt", "payload checksum mismatch")


# -- host memory ---------------------------------------------------------------------------------------------
class CpuTier:
    """Chunks as host tensors (pinned on CUDA, ready for an async copy up). Touched by the engine thread only."""
    name = "cpu"

    def __init__(self, cap_bytes: int):
        self.cap = cap_bytes
        self.used = 0
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def contains(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> torch.Tensor | None:
        t = self.entries.get(key)
        if t is not None:
            self.entries.move_to_end(key)
        return t

    def put(self, key: str, t: torch.Tensor) -> bool:
        size = t.numel() * t.element_size()
        if key in self.entries or size > self.cap:
            return False
        while self.entries and self.used + size > self.cap:
            _, old = self.entries.popitem(last=False)
            self.used -= old.numel() * old.element_size()
        self.entries[key] = t
        self.used += size
        return True


# -- a local folder ------------------------------------------------------------------------------------------
class DiskTier:
    """One file per chunk, <key>.kvc, written under a temporary name and renamed, so a file that exists is
    whole unless the disk corrupted it. The index (LRU by last use; file mtimes carry it across restarts) is
    shared by the engine thread (reads) and the writer thread (writes)."""
    name = "disk"

    def __init__(self, folder: str, cap_bytes: int, notices: Notices):
        self.folder = Path(folder).expanduser()
        self.limit = cap_bytes  # as configured
        self.cap = cap_bytes  # what the tier keeps to: lowered when the filesystem turns out smaller
        self.notices = notices
        self.lock = threading.Lock()
        self.index: OrderedDict[str, int] = OrderedDict()  # key -> file size, least recently used first
        self.used = 0
        self.folder.mkdir(parents=True, exist_ok=True)  # OSError: the caller runs without this tier
        found = []
        with os.scandir(self.folder) as it:
            for e in it:
                try:
                    if e.name.endswith(SUFFIX) and e.is_file():
                        st = e.stat()
                        found.append((st.st_mtime, e.name[:-len(SUFFIX)], st.st_size))
                    elif e.name.endswith(".tmp") and time.time() - e.stat().st_mtime > 3600:
                        os.unlink(e.path)  # left by a process that died mid-write
                except FileNotFoundError:  # another process sharing the folder evicted it
                    pass
        for _, key, size in sorted(found):
            self.index[key] = size
            self.used += size
        with self.lock:
            self._evict(0)
        if self.index:
            log.info("KV offload disk tier %s: %d chunks (%.1f MiB) from earlier runs", self.folder,
                     len(self.index), self.used / 2**20)

    def _path(self, key: str) -> Path:
        return self.folder / (key + SUFFIX)

    def contains(self, key: str) -> bool:
        with self.lock:
            return key in self.index

    def get(self, key: str, spec: ChunkSpec, alloc: Alloc) -> torch.Tensor | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                header, _ = parse_header(f.read(_PREFIX.size), f.read)
                check_header(header, spec, key)
                buf = alloc(spec.nbytes)
                data = buf.numpy()
                got = f.readinto(data)
                check_payload(header, data, got + len(f.read(1)))
        except FileNotFoundError:
            with self.lock:
                self._drop(key)
            return None
        except ChunkError as e:
            self.notices.warn(self.name, e.cause, "chunk %s is %s: %s; recomputing its tokens (the file is removed)",
                              path, "unusable" if e.cause == "mismatch" else e.cause, e)
            self.remove(key)
            return None
        except OSError as e:
            self.notices.warn(self.name, "read", "cannot read %s (%s); recomputing its tokens", path, e)
            return None
        with self.lock:
            if key in self.index:
                self.index.move_to_end(key)
        try:
            os.utime(path)  # recency survives a restart
        except OSError:
            pass
        return buf

    def put(self, key: str, header: bytes, payload: np.ndarray) -> bool:
        size = len(header) + payload.nbytes
        if size > self.limit:
            self.notices.warn(self.name, "too large", "a chunk of %d bytes exceeds the disk tier's cap of %d bytes "
                              "(--kv-offload-disk-gb); nothing is saved to disk", size, self.limit)
            return False
        with self.lock:
            if key in self.index:
                return False
            self._evict(size)
        path = self._path(key)
        tmp = self.folder / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(payload)
            os.replace(tmp, path)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            cause = errno.errorcode.get(e.errno, "write") if e.errno else "write"
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                # the filesystem is smaller than the cap: hold what is there and evict to make room from now on
                with self.lock:
                    self.cap = min(self.cap, self.used)
                self.notices.warn(self.name, cause, "cannot write %s (%s); the disk tier now keeps to the %d bytes "
                                  "it holds, evicting its oldest chunks; serving goes on", self.folder, e, self.cap)
            else:
                self.notices.warn(self.name, cause, "cannot write %s (%s); chunks are not saved to disk while this "
                                  "lasts, serving goes on", self.folder, e)
            return False
        with self.lock:
            self.index[key] = size
            self.used += size
        return True

    def remove(self, key: str) -> None:
        with self.lock:
            self._drop(key)
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError:
            pass

    def _drop(self, key: str) -> None:
        size = self.index.pop(key, None)
        if size is not None:
            self.used -= size

    def _evict(self, room: int) -> None:
        """Under self.lock: delete least recently used chunks until `room` more bytes fit."""
        while self.index and self.used + room > self.cap:
            key, size = self.index.popitem(last=False)
            self.used -= size
            try:
                self._path(key).unlink(missing_ok=True)
            except OSError:
                pass


# -- an S3-compatible bucket ---------------------------------------------------------------------------------
class RemoteTier:
    """s3://bucket/prefix on any S3-compatible endpoint (the same environment variables as s3:// models).
    Requests have short timeouts and no retries; a failure opens a circuit breaker: the tier is skipped for
    `retry_after_s`, then tried again, so a store that is down costs one failed request per interval."""
    name = "remote"

    def __init__(self, uri: str, cap_bytes: int, notices: Notices, retry_after_s: float = 30.0):
        import botocore.exceptions as bce

        from kvserve.adapters.s3_source import _client

        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not uri.startswith("s3://") or not bucket:
            raise ValueError(f"kv_offload_remote must be s3://bucket[/prefix], got {uri!r}")
        self.uri, self.bucket, self.prefix = uri, bucket, prefix.strip("/")
        self.cap = cap_bytes  # 0: uncapped (a lifecycle rule on the bucket bounds it)
        self.notices = notices
        self.retry_after_s = retry_after_s
        self.bce = bce
        # short timeouts: a lookup runs at admission, on the engine thread
        self.client = _client(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1, "mode": "standard"},
                              max_pool_connections=4)
        self.endpoint = self.client.meta.endpoint_url
        self.down_until = 0.0
        self.failing = False
        self.lock = threading.Lock()
        self.known: OrderedDict[str, int] = OrderedDict()  # keys this process saw in the bucket -> size (LRU)
        self.used = 0

    def _object(self, key: str) -> str:
        return f"{self.prefix}/{key}{SUFFIX}" if self.prefix else key + SUFFIX

    def up(self) -> bool:
        return time.monotonic() >= self.down_until

    def contains(self, key: str) -> bool:
        with self.lock:
            return key in self.known

    def _fail(self, e: Exception) -> None:
        self.down_until = time.monotonic() + self.retry_after_s
        self.failing = True
        cause = "unreachable"
        if isinstance(e, self.bce.ClientError):
            cause = e.response.get("Error", {}).get("Code") or str(e.response.get("ResponseMetadata", {})
                                                                   .get("HTTPStatusCode", "error"))
        self.notices.warn(self.name, cause, "%s at %s failed (%s); skipping the remote tier for %.0f s, serving "
                          "goes on with recompute", self.uri, self.endpoint, e, self.retry_after_s)

    def _ok(self) -> None:
        if self.failing:
            self.failing = False
            log.info("KV offload, remote tier: %s at %s answers again", self.uri, self.endpoint)

    def _not_found(self, e: Exception) -> bool:
        return isinstance(e, self.bce.ClientError) and e.response.get("Error", {}).get("Code") in (
            "NoSuchKey", "404", "NotFound")

    def _remember(self, key: str, size: int) -> None:
        with self.lock:
            if key in self.known:
                self.known.move_to_end(key)
                return
            self.known[key] = size
            self.used += size
            evict = []
            while self.cap and self.used > self.cap and len(self.known) > 1:
                old, old_size = self.known.popitem(last=False)
                self.used -= old_size
                evict.append(old)
        for old in evict:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self._object(old))
            except (self.bce.BotoCoreError, self.bce.ClientError) as e:
                self._fail(e)
                break

    def get(self, key: str, spec: ChunkSpec, alloc: Alloc) -> torch.Tensor | None:
        if not self.up():
            return None
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"].read()
        except (self.bce.BotoCoreError, self.bce.ClientError, OSError) as e:
            if self._not_found(e):
                self._ok()
                return None
            self._fail(e)
            return None
        self._ok()
        try:
            view = memoryview(body)
            header, start = parse_header(view[:_PREFIX.size], lambda n: view[_PREFIX.size:_PREFIX.size + n])
            check_header(header, spec, key)
            data = np.frombuffer(view[start:], dtype=np.uint8)
            check_payload(header, data, data.nbytes)
        except ChunkError as e:
            self.notices.warn(self.name, e.cause, "object %s is %s: %s; recomputing its tokens", self._object(key),
                              "unusable" if e.cause == "mismatch" else e.cause, e)
            return None
        buf = alloc(spec.nbytes)
        buf.numpy()[:] = data
        self._remember(key, len(body))
        return buf

    def put(self, key: str, header: bytes, payload: np.ndarray) -> bool:
        if not self.up() or self.contains(key):
            return False
        name = self._object(key)
        try:
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=name)
                self._remember(key, head.get("ContentLength", 0))  # another replica saved it already
                return False
            except self.bce.ClientError as e:
                if not self._not_found(e):
                    raise
            self.client.put_object(Bucket=self.bucket, Key=name, Body=b"".join((header, payload)))
        except (self.bce.BotoCoreError, self.bce.ClientError, OSError) as e:
            self._fail(e)
            return False
        self._ok()
        self._remember(key, len(header) + payload.nbytes)
        return True
