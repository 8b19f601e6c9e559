"""Sample app: answers every GET with its name and pod; with ?fetch=URL it fetches URL first
(so a test can make a request from inside a pod) and returns that body."""
import http.server
import os
import sys
import urllib.parse
import urllib.request

NAME = os.environ.get("APP_NAME", "app")
POD = os.environ.get("HOSTNAME", "?")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/blob/"):  # N bytes, streamed (for bench/portforward.py)
            size = int(self.path[len("/blob/"):])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"x" * 65536
            while size > 0:
                self.wfile.write(chunk[:size])
                size -= len(chunk)
            return
        if self.path.startswith("/fetch?url="):
            url = urllib.parse.unquote(self.path.split("=", 1)[1])
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    body = r.read()
                code = 200
            except Exception as exc:  # noqa: BLE001
                body, code = f"fetch {url} failed: {exc}".encode(), 502
        else:
            body, code = f"{NAME} from {POD}\n".encode(), 200
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
