"""A local stand-in for the Hugging Face Hub's far end, for the rehearsed journey (``make journey``).

    python -m qlora_pipeline.course.hub_standin --user student --port-file runs/journey/hub.port

No Hub can be reached here, so the journey keeps the real client (huggingface_hub's ``HfApi``,
``snapshot_download``, ``hf_hub_download``, as the notebooks and the Space call them) and replaces
only the server: each process is pointed at it by ``HF_ENDPOINT``. It answers the routes those calls
use, as huggingface_hub 2.4 sends them (read from its source: ``hf_api.py``, ``_commit_api.py``,
``file_download.py``, ``_snapshot_download.py``): whoami, create a repo, preupload and commit
(every file "regular": its bytes inline in the commit, so no LFS or Xet storage is needed), repo
info, the file tree, resolve (HEAD and GET), paths-info, and a Space's variables and secrets.
Nothing here is a Hub of its own (no auth beyond "a token was sent", no LFS): it keeps what the
notebooks push in memory and serves it back, and ``GET /_standin/state`` shows what it holds.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_sha1(data: bytes) -> str:
    """Git's id of a file's content (what the Hub reports as a file's ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    """One repo: its commits (each the whole file set), and for a Space its variables and secrets."""

    def __init__(self, kind: str, repo_id: str, private: bool, sdk: str | None):
        self.kind, self.id, self.private, self.sdk = kind, repo_id, private, sdk
        first = hashlib.sha1(f"init {kind} {repo_id}".encode()).hexdigest()
        self.commits: list[tuple[str, dict[str, bytes]]] = [(first, {".gitattributes": b""})]
        self.variables: dict[str, dict] = {}
        self.secrets: dict[str, str] = {}

    def commit(self, revision: str | None) -> tuple[str, dict[str, bytes]] | None:
        if revision in (None, "main"):
            return self.commits[-1]
        return next((c for c in self.commits if c[0] == revision), None)

    def info(self, revision: str | None = None) -> dict | None:
        found = self.commit(revision)
        if found is None:
            return None
        sha, files = found
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        info = {"id": self.id, "author": self.id.split("/")[0], "sha": sha, "private": self.private}
        info.update(lastModified=stamp, disabled=False, gated=False, tags=[], likes=0)
        info["siblings"] = [{"rfilename": name, "size": len(data)} for name, data in sorted(files.items())]
        return {**info, "sdk": self.sdk} if self.kind == "space" else info


class Hub:
    """What the stand-in holds, shared by the request threads."""

    def __init__(self, user: str):
        self.user = user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.Lock()

    def state(self) -> dict:
        with self.lock:
            return {
                f"{PREFIX[kind]}{repo_id}": {
                    "private": repo.private,
                    "files": {name: len(data) for name, data in repo.commits[-1][1].items()},
                    "commits": len(repo.commits) - 1,
                    "variables": {k: v["value"] for k, v in repo.variables.items()},
                    "secrets": sorted(repo.secrets),
                }
                for (kind, repo_id), repo in self.repos.items()
            }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's shared connection pool expects
    hub: Hub
    base = ""

    def log_message(self, *args) -> None:  # quiet: the journey prints its own story
        pass

    def do_HEAD(self):
        self._dispatch()

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD

    # -- plumbing
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body=b"", headers: dict | None = None, ctype: str = "application/json") -> None:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        # huggingface_hub tells "no such repo" from "no such file" by X-Error-Code (utils/_http.py)
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})})

    def _dispatch(self) -> None:
        body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        try:
            self._route(parts, parse_qs(url.query), body)
        except Exception as exc:  # a bug here must show in the client as a server error, not a hang
            self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

    def _authorised(self) -> bool:
        return self.headers.get("authorization", "").startswith("Bearer ")

    # -- routes
    def _route(self, parts: list[str], query: dict, body: bytes) -> None:
        if parts[:2] == ["api", "agent-harnesses"]:  # asked once per process by the client
            return self._send(200, {"standardEnvVars": [], "harnesses": {}})
        if parts[:2] == ["_standin", "state"]:
            return self._send(200, self.hub.state())
        if parts[:2] == ["api", "whoami-v2"]:
            if not self._authorised():
                return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return self._send(200, {"type": "user", "name": self.hub.user, "orgs": [], "auth": {}})
        if parts[:2] == ["api", "validate-yaml"]:
            return self._send(200, {"errors": [], "warnings": []})
        if parts[:3] == ["api", "repos", "create"] and self.command == "POST":
            return self._create(json.loads(body))
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in PLURAL:
            repo = self.hub.repos.get((PLURAL[parts[1]], f"{parts[2]}/{parts[3]}"))
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            return self._repo_api(repo, parts[4:], query, body)
        kind, rest = (PLURAL[parts[0]], parts[1:]) if parts[0] in ("spaces", "datasets") else ("model", parts)
        if len(rest) >= 5 and rest[2] == "resolve":
            return self._resolve(kind, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]))
        return self._error(404, "NotFound", f"the stand-in has no route {self.command} {self.path}")

    def _create(self, request: dict) -> None:
        if not self._authorised():
            return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        kind = request.get("type") or "model"
        repo_id = f"{request.get('organization') or self.hub.user}/{request['name']}"
        url = f"{self.base}/{PREFIX[kind]}{repo_id}"
        with self.hub.lock:
            if (kind, repo_id) in self.hub.repos:
                return self._send(409, {"error": "You already created this repo", "url": url})
            private = request.get("visibility") == "private"
            self.hub.repos[(kind, repo_id)] = Repo(kind, repo_id, private, request.get("sdk"))
        self._send(200, {"url": url, "name": repo_id})

    def _repo_api(self, repo: Repo, rest: list[str], query: dict, body: bytes) -> None:
        verb = rest[0] if rest else ""
        if verb in ("", "revision") and self.command == "GET":
            info = repo.info(rest[1] if verb else None)
            return self._send(200, info) if info else self._error(404, "RevisionNotFound", "Invalid rev id")
        if verb == "preupload":
            files = json.loads(body)["files"]
            answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return self._send(200, {"files": answer})
        if verb == "commit":
            return self._commit(repo, body)
        if verb == "tree":
            return self._tree(repo, rest[1], "/".join(rest[2:]))
        if verb == "paths-info":
            found = repo.commit(rest[1])
            wanted = parse_qs(body.decode()).get("paths", [])
            files = found[1] if found else {}
            return self._send(200, [_entry(p, files[p]) for p in wanted if p in files])
        if repo.kind == "space" and verb in ("variables", "secrets"):
            return self._space_settings(repo, verb, body)
        return self._error(404, "NotFound", f"the stand-in has no route {self.command} {self.path}")

    def _commit(self, repo: Repo, body: bytes) -> None:
        if not self._authorised():
            return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        with self.hub.lock:
            files = dict(repo.commits[-1][1])
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(prefix)}
                elif key == "lfsFile":  # never asked for: preupload answers "regular" for every file
                    raise ValueError("LFS upload is not supported by the stand-in")
            sha = hashlib.sha1(f"{repo.id} {len(repo.commits)} {time.time()}".encode()).hexdigest()
            repo.commits.append((sha, files))
        url = f"{self.base}/{PREFIX[repo.kind]}{repo.id}/commit/{sha}"
        self._send(200, {"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

    def _tree(self, repo: Repo, revision: str, under: str) -> None:
        found = repo.commit(revision)
        if found is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        prefix = f"{under}/" if under else ""
        entries, folders = [], set()
        for path, data in sorted(found[1].items()):
            if path.startswith(prefix):
                parts = path.split("/")[:-1]
                folders.update("/".join(parts[: i + 1]) for i in range(len(parts)))
                entries.append(_entry(path, data))
        folders = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        self._send(200, folders + entries)

    def _resolve(self, kind: str, repo_id: str, revision: str, filename: str) -> None:
        repo = self.hub.repos.get((kind, repo_id))
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        found = repo.commit(revision)
        if found is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        sha, files = found
        if filename not in files:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        data = files[filename]
        # X-Repo-Commit and ETag are what hf_hub_download needs to place the file in its cache
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
        self._send(200, data, headers, ctype="application/octet-stream")

    def _space_settings(self, repo: Repo, verb: str, body: bytes) -> None:
        request = json.loads(body) if body else {}
        if self.command != "GET" and not self._authorised():
            return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        with self.hub.lock:
            store = repo.variables if verb == "variables" else repo.secrets
            if self.command == "POST":
                entry = {"value": request["value"], "description": request.get("description"), "updatedAt": stamp}
                store[request["key"]] = entry if verb == "variables" else request["value"]
            elif self.command == "DELETE":
                store.pop(request["key"], None)
        if verb == "variables":
            return self._send(200, repo.variables)
        self._send(200, {key: {"description": None, "updatedAt": stamp} for key in repo.secrets})


def _entry(path: str, data: bytes) -> dict:
    return {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}


def serve(user: str, port: int = 0) -> ThreadingHTTPServer:
    """Start the stand-in on 127.0.0.1 (a free port by default) in a background thread."""
    handler = type("StandinHandler", (Handler,), {"hub": Hub(user)})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    handler.base = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--user", default="student", help="the user name whoami answers")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, help="write the chosen port here once listening")
    args = parser.parse_args(argv)
    server = serve(args.user, args.port)
    if args.port_file:
        from qlora_pipeline.paths import write_text_atomic

        write_text_atomic(args.port_file, str(server.server_address[1]))
    print(f"Hub stand-in on http://127.0.0.1:{server.server_address[1]} (user {args.user})", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
