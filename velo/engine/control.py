"""The local control socket of a running `velo up`.

`velo status` and `velo down` from another terminal talk to it: one JSON line
in, one JSON line out, over a Unix socket only the user can open.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Callable


def socket_path(project_root: Path) -> Path:
    """Per project folder and user; short enough for AF_UNIX wherever the project lives."""
    digest = hashlib.sha256(str(project_root.resolve()).encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"velo-{os.getuid()}"
    return base / f"{digest}.sock"


def check_private_dir(path: Path) -> None:
    """The socket's directory must be ours and closed to others, or someone else could
    have put a socket there (answering `velo status`, taking `velo down`) before us."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"{path} should be a directory for velo's control socket but is not; remove it")
    if st.st_uid != os.getuid():
        raise RuntimeError(f"{path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
                           "remove it, velo makes its own")
    if st.st_mode & 0o077:
        raise RuntimeError(f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); "
                           f"run `chmod 700 {path}` or remove it")


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Callable[[dict], dict]]):
        self.path = path
        self.handlers = handlers
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private_dir(self.path.parent)
        if self.path.exists():
            if ping(self.path):
                raise RuntimeError(f"another `velo up` is already running for this project ({self.path})")
            self.path.unlink()
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            request = json.loads(line or b"{}")
            handler = self.handlers.get(request.get("op", ""))
            reply = handler(request) if handler else {"error": f"unknown op {request.get('op')!r}"}
        except Exception as exc:  # a bad request must not hurt the running mesh
            reply = {"error": str(exc)}
        writer.write(json.dumps(reply).encode() + b"\n")
        try:
            await writer.drain()
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def request(path: Path, op: str, timeout: float = 5.0, **fields) -> dict:
    """Blocking client used by the CLI; raises ConnectionError when nothing runs."""
    if not path.exists():
        raise ConnectionError("not running")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            raise ConnectionError("not running") from None
        sock.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def ping(path: Path) -> bool:
    try:
        request(path, "status", timeout=1.0)
        return True
    except (ConnectionError, OSError, ValueError):
        return False
