"""s3:// model source: list the prefix, fetch the files serving needs in parallel, verify, then publish.

Cache layout under <cache>/s3/<bucket>/: <prefix>/ is a complete model (its marker file, written last, holds the
listing it was fetched from); <prefix>.kvserve-partial/ is a fetch in progress, resumed or redone by the next
start; <prefix>.kvserve-lock serialises processes sharing the cache.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from fnmatch import fnmatch
import logging
import os
import re
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

import boto3
import botocore.exceptions as bce
from botocore import UNSIGNED
from botocore.config import Config

from kvserve.adapters.model_source import (ModelSourceError, check_listing, pick_model, progress_class, read_json,
                                           serving_files)

log = logging.getLogger(__name__)

MARKER = ".kvserve-complete.json"
WORKERS = 8
CHUNK = 1 << 20
_PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")  # multipart and SSE-C/KMS ETags are not the MD5 of the content
_TRANSIENT = (bce.HTTPClientError, bce.ConnectionError, bce.IncompleteReadError)


@dataclass(frozen=True)
class S3Object:
    key: str
    rel: str  # path below the model's prefix
    size: int
    etag: str


class _Stopped(Exception):
    pass


def _parse(uri: str) -> tuple[str, str, str]:
    """bucket, prefix (no slashes around it) and the s3://bucket/prefix/ that messages name."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise ModelSourceError(f"no bucket in {uri!r}: expected s3://bucket/prefix")
    return bucket, prefix, f"s3://{bucket}/{prefix}/" if prefix else f"s3://{bucket}/"


def fetch_s3(uri: str, model_name: str | None, cache: Path, allow_pickle: bool) -> Path:
    bucket, prefix, where = _parse(uri)
    client = _client()
    endpoint = client.meta.endpoint_url
    with _explained(uri, bucket, endpoint):
        try:
            objects = _list(client, bucket, prefix)
        except (bce.EndpointConnectionError, bce.ConnectTimeoutError) as e:
            # The store is down but a complete copy is here: a restarting pod keeps serving.
            base = cache / bucket / prefix
            for entry in [base] + ([base / model_name] if model_name else []):
                if _cached(entry) is not None:
                    log.warning("cannot reach %s (%s); using the cached copy %s", endpoint, e, entry)
                    return entry
            raise
        if not objects:
            raise ModelSourceError(f"nothing found under {where} at {endpoint} (empty or missing prefix)")
        if not any(o.rel == "config.json" for o in objects):
            rels = [o.rel for o in objects]
            name = pick_model(sorted({r.split("/")[0] for r in rels if r.count("/") == 1
                                      and r.endswith("/config.json")}), model_name, where)
            objects = [replace(o, rel=o.rel[len(name) + 1:]) for o in objects if o.rel.startswith(name + "/")]
            prefix, where = f"{prefix}/{name}".lstrip("/"), f"{where}{name}/"
        wanted = set(serving_files([o.rel for o in objects], allow_pickle))
        files = [o for o in objects if o.rel in wanted]
        entry = cache / bucket / prefix
        with _locked(entry):
            return _download(client, bucket, files, {o.rel for o in objects if "/" not in o.rel}, where, entry,
                             allow_pickle)


def fetch_s3_files(uri: str, cache: Path, patterns: list[str]) -> Path:
    """The files matching `patterns` under s3://bucket/prefix (a LoRA adapter's), verified and cached like a model."""
    bucket, prefix, where = _parse(uri)
    client = _client()
    with _explained(uri, bucket, client.meta.endpoint_url):
        objects = [o for o in _list(client, bucket, prefix) if any(fnmatch(o.rel, p) for p in patterns)]
        if not objects:
            raise ModelSourceError(f"no {' or '.join(patterns)} under {where}")
        entry = cache / bucket / prefix
        with _locked(entry):
            return _download(client, bucket, objects, {o.rel for o in objects}, where, entry, False)


def _client(**config):
    """A client for the endpoint and credentials the environment names. `config`: botocore Config fields over
    the model fetcher's (the KV offload tier wants short timeouts and no retries)."""
    env = os.environ.get
    endpoint = env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL")
    if not endpoint and env("S3_ENDPOINT"):
        # KServe's s3-endpoint annotation: a host[:port], the scheme chosen by s3-usehttps.
        host = env("S3_ENDPOINT")
        endpoint = host if "://" in host else ("http://" if _off(env("S3_USE_HTTPS")) else "https://") + host
    verify = False if _off(env("S3_VERIFY_SSL")) else (env("AWS_CA_BUNDLE") or True)
    region = env("AWS_DEFAULT_REGION") or env("AWS_REGION") or ("us-east-1" if endpoint else None)
    config = Config(**{
        "connect_timeout": 10, "read_timeout": 60, "max_pool_connections": 2 * WORKERS,
        # MinIO, Ceph and most S3-compatible stores serve buckets by path, not as subdomains.
        "s3": {"addressing_style": "virtual" if _on(env("S3_USER_VIRTUAL_BUCKET")) else "path"} if endpoint else None,
        "signature_version": UNSIGNED if _on(env("AWS_ANONYMOUS_CREDENTIAL")) else None,
        **config,
    })
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, verify=verify,
                                          config=config)


def _on(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def _off(value: str | None) -> bool:
    return (value or "").strip().lower() in ("0", "false", "no")


def _list(client, bucket: str, prefix: str) -> list[S3Object]:
    # The prefix is a folder: s3://b/models/tiny must not take in models/tiny-lora/.
    folder = f"{prefix}/" if prefix else ""
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
        for o in page.get("Contents", []):
            if not o["Key"].endswith("/"):  # folder placeholders made by consoles
                objects.append(S3Object(o["Key"], o["Key"][len(folder):], o["Size"], o["ETag"].strip('"')))
    return objects


def _download(client, bucket: str, files: list[S3Object], top: set[str], where: str, entry: Path,
              allow_pickle: bool) -> Path:
    for o in files:
        if any(part in ("", ".", "..") for part in o.rel.split("/")):
            raise ModelSourceError(f"refusing object {o.key!r} of {where}: not a plain relative path")
    listing = {o.rel: [o.size, o.etag] for o in files}
    if _cached(entry) == listing:
        log.info("%s is cached in %s", where, entry)
        return entry
    partial = entry.with_name(entry.name + ".kvserve-partial")
    plan = partial / ".kvserve-listing.json"
    if plan.is_file() and _read(plan) != listing:
        shutil.rmtree(partial)  # an older version of the model was being fetched
    partial.mkdir(parents=True, exist_ok=True)
    plan.write_text(json.dumps(listing))

    todo = [o for o in files if not _done(partial / o.rel, o.size)]
    bar = progress_class()(total=sum(o.size for o in todo), unit="B", unit_scale=True, unit_divisor=1024,
                           desc=f"fetching {where}")
    lock, stop = threading.Lock(), threading.Event()

    def advance(n: int) -> None:
        with lock:
            bar.update(n)

    try:
        # config.json first: an unsupported model fails before gigabytes of weights move.
        for o in todo:
            if o.rel == "config.json":
                _fetch(client, bucket, o, partial / o.rel, advance, stop)
        if "config.json" in top:  # a model (adapters have none; fetch_s3 made sure models do)
            check_listing(top, read_json(partial / "config.json"), allow_pickle, where)
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="s3-fetch") as pool:
            futures = [pool.submit(_fetch, client, bucket, o, partial / o.rel, advance, stop)
                       for o in todo if o.rel != "config.json"]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() and not isinstance(f.exception(), _Stopped)]
            if failed:
                stop.set()
                pool.shutdown(cancel_futures=True)
                raise failed[0].exception()
    finally:
        stop.set()
        bar.close()
    for o in files:
        if not _done(partial / o.rel, o.size):
            raise ModelSourceError(f"{o.key} is incomplete after download")
    plan.rename(partial / MARKER)  # the marker is the last thing written
    if entry.exists():
        stale = entry.with_name(entry.name + ".kvserve-stale")
        shutil.rmtree(stale, ignore_errors=True)
        entry.rename(stale)
        partial.rename(entry)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        partial.rename(entry)
    log.info("fetched %s into %s", where, entry)
    return entry


def _fetch(client, bucket: str, o: S3Object, dest: Path, advance, stop: threading.Event) -> None:
    if stop.is_set():
        raise _Stopped()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(3):
        try:
            digest = _stream(client, bucket, o, part, advance, stop)
            break
        except _TRANSIENT as e:
            if attempt == 2 or stop.is_set():
                raise
            log.warning("retrying %s after: %s", o.key, e)
            time.sleep(attempt + 1)
    size = part.stat().st_size
    if size != o.size:
        part.unlink()
        raise ModelSourceError(f"{o.key}: received {size} bytes, the store lists {o.size}")
    if digest is not None and digest != o.etag:
        part.unlink()
        raise ModelSourceError(f"checksum mismatch for {o.key}: MD5 {digest}, ETag {o.etag}")
    part.rename(dest)


def _stream(client, bucket: str, o: S3Object, part: Path, advance, stop: threading.Event) -> str | None:
    """Appends the rest of the object to `part` (a previous attempt's bytes are kept); returns its MD5 when the
    ETag is one."""
    have = part.stat().st_size if part.exists() else 0
    if have > o.size:
        part.unlink()
        have = 0
    md5 = hashlib.md5(usedforsecurity=False) if _PLAIN_MD5.fullmatch(o.etag) else None
    if have and md5:
        with open(part, "rb") as f:
            while chunk := f.read(CHUNK):
                md5.update(chunk)
    if have < o.size:
        # IfMatch: bytes resumed from one version must not be completed from another.
        extra = {"Range": f"bytes={have}-"} if have else {}
        resp = client.get_object(Bucket=bucket, Key=o.key, IfMatch=f'"{o.etag}"', **extra)
        if resp.get("ServerSideEncryption") == "aws:kms" or resp.get("SSECustomerAlgorithm"):
            md5 = None
        with open(part, "ab") as f:
            for chunk in resp["Body"].iter_chunks(CHUNK):
                if stop.is_set():
                    raise _Stopped()
                f.write(chunk)
                if md5:
                    md5.update(chunk)
                advance(len(chunk))
    return md5.hexdigest() if md5 else None


def _done(file: Path, size: int) -> bool:
    return file.is_file() and file.stat().st_size == size


def _read(file: Path) -> dict | None:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def _cached(entry: Path) -> dict | None:
    """The listing a complete cache entry was fetched from, or None."""
    listing = _read(entry / MARKER)
    if not isinstance(listing, dict) or not all(_done(entry / rel, s) for rel, (s, _) in listing.items()):
        return None
    return listing


@contextlib.contextmanager
def _locked(entry: Path):
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(entry.name + ".kvserve-lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process fetching into %s", entry)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _explained(uri: str, bucket: str, endpoint: str):
    """botocore's exceptions -> one line naming the cause."""
    try:
        yield
    except bce.ClientError as e:
        err, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
        code, status = err.get("Code", ""), meta.get("HTTPStatusCode")
        if code == "InvalidAccessKeyId":
            msg = f"S3 at {endpoint} rejected the access key (InvalidAccessKeyId): check AWS_ACCESS_KEY_ID"
        elif code == "SignatureDoesNotMatch":
            msg = (f"S3 at {endpoint} rejected the credentials (SignatureDoesNotMatch): "
                   "check AWS_SECRET_ACCESS_KEY")
        elif code == "NoSuchBucket":
            msg = f"bucket {bucket!r} does not exist at {endpoint} (NoSuchBucket)"
        elif code in ("AccessDenied", "403") or status == 403:
            msg = f"access denied to {uri} at {endpoint} ({code or 403}): the credentials may not list or read it"
        elif code in ("PreconditionFailed", "412") or status == 412:
            msg = f"an object under {uri} changed during the download; start again to fetch the new version"
        else:
            msg = f"S3 error on {uri} at {endpoint}: {code} ({status}) {err.get('Message', '')}"
        raise ModelSourceError(msg) from e
    except bce.NoCredentialsError as e:
        raise ModelSourceError(f"no AWS credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                               "or AWS_ANONYMOUS_CREDENTIAL=true for a public bucket") from e
    except bce.SSLError as e:
        raise ModelSourceError(f"TLS verification failed for {endpoint}: set AWS_CA_BUNDLE to the store's CA, "
                               f"or S3_VERIFY_SSL=0 ({e})") from e
    except (bce.EndpointConnectionError, bce.ConnectTimeoutError) as e:
        raise ModelSourceError(f"cannot reach the S3 endpoint {endpoint}: {e}") from e
    except bce.FlexibleChecksumError as e:  # the object's own CRC/SHA checksum, checked by botocore
        raise ModelSourceError(f"checksum mismatch fetching {uri} from {endpoint}: {e}") from e
    except bce.BotoCoreError as e:
        raise ModelSourceError(f"fetching {uri} from {endpoint} failed: {e}") from e
    except OSError as e:  # disk full, or a read-only cache folder
        raise ModelSourceError(f"cannot write the model cache: {e}") from e
