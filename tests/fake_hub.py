"""A fake Hugging Face Hub: a test double of the Hub's HTTP API, served on 127.0.0.1 for the real `huggingface_hub`
client (point it here with HF_ENDPOINT). It is not a mock of hf_fam: hf_fam runs unchanged, in a subprocess.

Endpoints (just what `HfApi.create_repo` and the legacy, non-Xet path of `HfApi.upload_folder` call):

    POST /api/repos/create                                   {"name", "organization", "type", "visibility"|"private"}
    GET  /api/{type}s/{namespace}/{name}[/revision/{rev}]    repo_info (create_repo's fallback after a 401/403)
    POST /api/validate-yaml                                  README.md metadata check: always valid
    POST /api/{type}s/{namespace}/{name}/preupload/{rev}     "regular" or "lfs" upload mode per file
    POST /[{type}s/]{namespace}/{name}.git/info/lfs/objects/batch   LFS batch API, "basic" transfer only
    PUT  /lfs/{oid}                                          the LFS object itself (the href the batch answer gives)
    POST /lfs/{oid}/verify                                   LFS verify step
    POST /api/{type}s/{namespace}/{name}/commit/{rev}        NDJSON commit: header, file (base64), lfsFile, deleted*

The server never advertises Xet (no X-Xet-* headers, LFS transfer "basic"); run the client with HF_HUB_DISABLE_XET=1
so that `upload_folder` takes the preupload + LFS + commit path. Anything else is answered 404 and kept in
`unhandled`.

It records `repos` (repo id -> name, organization, private, type), `commits` (repo, revision, summary, description
and every file of the commit as bytes, LFS files reassembled from their uploaded objects by sha256) and `requests`
(method, path). Set `fail_auth = True`, or put tokens in `rejected_tokens`, to answer HTTP 401 like the Hub does for
a bad token; requests without a token are refused the same way, except the token-less LFS object PUT.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npy", ".zip")
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files of 10 MiB and more in LFS whatever their name
_REPO = r"(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)"


class FakeHub:
    """`with FakeHub() as hub:` serves on `hub.url` in a background thread until the block ends."""

    def __init__(self, fail_auth: bool = False, rejected_tokens=()):
        self.fail_auth = fail_auth
        self.rejected_tokens = set(rejected_tokens)
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.lfs_objects: dict[str, bytes] = {}  # sha256 hex -> bytes
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------------------------------ endpoints
    def create_repo(self, body: dict) -> tuple[int, dict]:
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else f"user/{body['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        private = body.get("visibility") == "private" if "visibility" in body else bool(body.get("private"))
        self.repos[repo_id] = {
            "name": body["name"], "organization": body.get("organization"), "private": private,
            "type": body.get("type") or "model", "files": {},
        }
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def repo_info(self, repo_id: str) -> tuple[int, dict]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}
        sha = self.commits[-1]["oid"] if self.commits else "0" * 40
        return 200, {"id": repo_id, "private": repo["private"], "sha": sha, "siblings": [{"rfilename": f} for f in repo["files"]]}

    def preupload(self, body: dict) -> tuple[int, dict]:
        files = []
        for entry in body["files"]:
            sample = base64.b64decode(entry["sample"])
            lfs = entry["path"].endswith(LFS_SUFFIXES) or entry["size"] >= LFS_THRESHOLD or b"\x00" in sample
            files.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": None})
        return 200, {"files": files, "commitOid": "0" * 40}

    def lfs_batch(self, body: dict) -> tuple[int, dict]:
        objects = []
        for obj in body["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:  # no "actions": already stored, the client skips it
                href = f"{self.url}/lfs/{obj['oid']}"
                answer["actions"] = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
            objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_put(self, oid: str, data: bytes) -> tuple[int, dict]:
        if hashlib.sha256(data).hexdigest() != oid:
            return 400, {"error": f"content does not match sha256 {oid}"}
        self.lfs_objects[oid] = data
        return 200, {}

    def lfs_verify(self, body: dict) -> tuple[int, dict]:
        data = self.lfs_objects.get(body["oid"])
        if data is None or len(data) != body["size"]:
            return 404, {"error": f"LFS object {body['oid']} was not uploaded"}
        return 200, {"message": "Object verified"}

    def commit(self, repo_type: str, repo_id: str, revision: str, ndjson: bytes) -> tuple[int, dict]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}
        record = {"repo_id": repo_id, "repo_type": repo_type, "revision": revision, "files": {}, "deleted": []}
        for line in ndjson.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                record.update(summary=value["summary"], description=value.get("description", ""))
            elif key == "file":
                record["files"][value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    return 422, {"error": f"LFS object {value['oid']} of {value['path']} was never uploaded"}
                record["files"][value["path"]] = self.lfs_objects[value["oid"]]
            elif key in ("deletedFile", "deletedFolder"):
                record["deleted"].append(value["path"])
            else:
                return 400, {"error": f"unknown commit operation {key!r}"}
        record["oid"] = hashlib.sha1(f"{len(self.commits)}:{repo_id}".encode()).hexdigest()
        for path in record["deleted"]:
            repo["files"].pop(path, None)
        repo["files"].update(record["files"])
        self.commits.append(record)
        url = f"{self.url}/{repo_id}/commit/{record['oid']}"
        return 200, {"commitUrl": url, "commitOid": record["oid"], "pullRequestUrl": None, "success": True}

    def route(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict]:
        auth = headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        if method == "PUT" and path.startswith("/lfs/"):  # presigned-URL style: the client sends no token
            return self.lfs_put(path[len("/lfs/"):], body)
        if self.fail_auth or token is None or token in self.rejected_tokens:
            return 401, {"error": "Invalid credentials in Authorization header"}
        if method == "POST" and path == "/api/repos/create":
            return self.create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if method == "POST" and re.fullmatch(r"/lfs/[0-9a-f]{64}/verify", path):
            return self.lfs_verify(json.loads(body))
        if method == "POST" and re.fullmatch(r"/(?:(?:dataset|space)s/)?[^/]+/[^/]+\.git/info/lfs/objects/batch", path):
            return self.lfs_batch(json.loads(body))
        if method == "POST" and re.fullmatch(rf"/api/{_REPO}/preupload/[^/]+", path):
            return self.preupload(json.loads(body))
        if method == "POST" and (m := re.fullmatch(rf"/api/{_REPO}/commit/(?P<rev>[^/]+)", path)):
            return self.commit(m["type"], m["repo"], unquote(m["rev"]), body)
        if method == "GET" and (m := re.fullmatch(rf"/api/{_REPO}(?:/revision/[^/]+)?", path)):
            return self.repo_info(m["repo"])
        self.unhandled.append((method, path))
        return 404, {"error": f"the fake Hub does not implement {method} {path}"}


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer has a Content-Length

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self) -> None:
            body = self._read_body()  # always read it all, so the connection can be reused
            path = urlsplit(self.path).path
            with hub.lock:
                hub.requests.append((self.command, path))
                status, answer = hub.route(self.command, path, self.headers, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("X-Error-Message", answer["error"])
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _handle

        def log_message(self, format, *args) -> None:  # keep pytest's output clean
            pass

    return Handler
