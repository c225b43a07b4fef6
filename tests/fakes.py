"""Stand-ins for the stores models come from, shared by the loader's tests and the end-to-end ones: a relay in
front of moto's real S3 HTTP server (it can drop every connection mid-transfer, count requests or flip bytes),
and a small HTTP server answering the Hub endpoints huggingface_hub calls."""
import hashlib
import http.server
import json
import re
import socket
import threading
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import boto3
from botocore.config import Config

# ---------------------------------------------------------------------------------------------------------------- S3

# Variables that would point boto3 elsewhere than the test's endpoint, or at real credentials.
S3_ENV_CLEARED = ("AWS_ENDPOINT_URL_S3", "S3_ENDPOINT", "S3_USE_HTTPS", "S3_VERIFY_SSL", "AWS_CA_BUNDLE",
                  "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ANONYMOUS_CREDENTIAL", "KVSERVE_CACHE_DIR")


def s3_env(endpoint: str, nowhere: Path) -> dict[str, str]:
    """The environment a loader needs to talk to a test store (`nowhere`: a missing file, so no AWS config or
    credentials file of the machine is read)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_CONFIG_FILE": str(nowhere), "AWS_SHARED_CREDENTIALS_FILE": str(nowhere),
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_MAX_ATTEMPTS": "1"}


def admin_client(moto_port: int):
    """A client straight to moto for setting buckets up. Without flexible checksums the ETag of a single-part
    upload is the content's MD5: the loader's own check."""
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing",
                        config=Config(request_checksum_calculation="when_required"))


def upload(admin, bucket: str, folder: Path, prefix: str):
    """Every file of `folder` under `prefix`; files over 5 MiB in 5 MiB parts (a multipart ETag is no MD5)."""
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            key = f"{prefix}/{f.relative_to(folder).as_posix()}"
            if f.stat().st_size > 5 << 20:
                mpu = admin.create_multipart_upload(Bucket=bucket, Key=key)
                data, parts = f.read_bytes(), []
                for i, at in enumerate(range(0, len(data), 5 << 20), 1):
                    r = admin.upload_part(Bucket=bucket, Key=key, UploadId=mpu["UploadId"], PartNumber=i,
                                          Body=data[at:at + (5 << 20)])
                    parts.append({"PartNumber": i, "ETag": r["ETag"]})
                admin.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=mpu["UploadId"],
                                                MultipartUpload={"Parts": parts})
            else:
                admin.put_object(Bucket=bucket, Key=key, Body=f.read_bytes())


def iam_key(moto_port: int) -> dict:
    """An access key of a new IAM user allowed everything on S3 (moto checks keys only once `moto_auth('0')`).
    moto keeps one IAM state per process, whatever server is asked: every call makes its own user."""
    iam = boto3.client("iam", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    user = f"reader-{uuid.uuid4().hex[:12]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    return iam.create_access_key(UserName=user)["AccessKey"]


def moto_auth(moto_port: int, count: str):
    """'0': moto checks every request from now on against its IAM users; 'inf': it stops checking."""
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{moto_port}/moto-api/reset-auth",
                                                  data=count.encode(), method="POST",
                                                  headers={"Content-Type": "text/plain"})).read()


class Relay:
    """A TCP relay in front of moto: the S3 endpoint the loader sees. It records what clients send, can cut every
    connection once `kill_after` bytes went back (the store dying mid-download), and can rewrite bytes in flight."""

    def __init__(self, upstream: int, port: int = 0):
        self.upstream, self.kill_after, self.mangle = upstream, None, None
        self.down, self.sent, self.socks, self.lock = 0, [], [], threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            sent = bytearray()
            with self.lock:
                self.socks += [client, server]
                self.sent.append(sent)
            threading.Thread(target=self._pump, args=(client, server, sent), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()

    def _pump(self, src, dst, sent):
        try:
            while data := src.recv(65536):
                if sent is not None:
                    sent += data
                else:
                    if self.mangle:
                        data = data.replace(*self.mangle)
                    with self.lock:
                        self.down += len(data)
                        cut = self.kill_after is not None and self.down > self.kill_after
                    if cut:
                        self.kill()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _close(s)

    def kill(self):
        _close(self.sock)
        with self.lock:
            for s in self.socks:
                _close(s)

    def requests(self) -> list[tuple[str, str, str]]:
        """(method, path, headers) of every request sent through the relay (S3 GETs and HEADs carry no body)."""
        out = []
        with self.lock:
            logs = [bytes(s) for s in self.sent]
        for log in logs:
            for block in log.split(b"\r\n\r\n"):
                m = re.match(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]\r\n(.*)", block, re.S)
                if m:
                    out.append((m[1].decode(), urllib.parse.unquote(m[2].decode()), m[3].decode().lower()))
        return out

    def object_gets(self, bucket: str) -> list[str]:
        return [p.removeprefix(f"/{bucket}/") for meth, p, _ in self.requests()
                if meth == "GET" and p.startswith(f"/{bucket}/")]


def _close(s):
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


# -------------------------------------------------------------------------------------------------------------- Hub

SHA = "0123456789abcdef0123456789abcdef01234567"  # the one commit every fake repository is at


def repo_files(folder: Path) -> dict[str, bytes]:
    """A fake repository's content: every file of `folder` by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeHub(http.server.ThreadingHTTPServer):
    """Answers what huggingface_hub's snapshot_download asks: model info (for the commit; 0.x also lists the files
    from its siblings), the recursive tree (1.x, 2.x), and HEAD/GET on resolve URLs with the X-Repo-Commit, ETag
    and size headers (no X-Xet-Hash, so no Xet transfer). `repos`: repository id -> {path: content}."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos, self.log, self.auth = repos, [], set()
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self):
        self.shutdown()
        self.server_close()


class HubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: a closed server is then really gone

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.do_GET(body=False)

    def do_GET(self, body=True):
        hub: FakeHub = self.server
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        hub.log.append((self.command, path))
        if path.startswith("/api/models/") or "/resolve/" in path:  # the library's side calls carry no token
            hub.auth.add(self.headers.get("authorization"))
        m = (re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?(?:/.*)?", path)
             or re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path))
        if not m or m[1] not in hub.repos:
            return self.reply(404, b"", {"X-Error-Code": "RepoNotFound"})
        files = hub.repos[m[1]]
        if path.startswith("/api/"):
            if (m[3] or "main") not in ("main", SHA):
                return self.reply(404, b"", {"X-Error-Code": "RevisionNotFound"})
            if m[2] == "tree":
                data = [{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for n, b in files.items()]
            else:
                data = {"id": m[1], "sha": SHA, "siblings": [{"rfilename": n} for n in files]}
            return self.reply(200, json.dumps(data).encode(), {"Content-Type": "application/json"})
        if m[2] not in ("main", SHA):
            return self.reply(404, b"", {"X-Error-Code": "RevisionNotFound"})
        if m[3] not in files:
            return self.reply(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": SHA})
        data = files[m[3]]
        self.reply(200, data, {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, body)

    def reply(self, status, data, headers, body=True):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(data)
