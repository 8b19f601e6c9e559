"""File watching that costs only what it was asked for.

A recursive watch (inotify) walks and watches every directory under its root, so
watching a project folder means watching ``node_modules`` and ``.venv`` too: on a tree
of 100,000 files that is tens of thousands of watches and a busy first second.  Here a
glob list is turned into the few roots it can match below (``src/**/*.py`` watches
``src``; ``*.py`` watches the folder itself without recursing into ignored folders), and
events are filtered by the globs and the ignore list.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import AsyncIterator, Iterable

DEFAULT_IGNORE = (".git", "node_modules", "__pycache__", ".venv")
_MAGIC = re.compile(r"[*?\[]")


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over relative paths with ``/``: ``*`` and ``?`` stay in one segment, ``**`` spans.

    A pattern without ``/`` matches the file name at any depth, as in .gitignore.
    """
    pattern = pattern.strip("/")
    if "/" not in pattern:
        pattern = "**/" + pattern
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"(?:/.*)?\Z")  # a matched folder matches what is inside


class PathFilter:
    """Which changed paths matter: under ``base``, matching a watch glob, in no ignored part."""

    def __init__(self, base: Path, globs: Iterable[str], ignore: Iterable[str] = DEFAULT_IGNORE):
        self.base = base.resolve()
        self.globs = [glob_regex(g) for g in globs]
        self.ignore = [glob_regex(g) for g in ignore]

    def relative(self, path: str | Path) -> str | None:
        try:
            return Path(path).resolve().relative_to(self.base).as_posix()
        except ValueError:
            return None

    def ignored(self, rel: str) -> bool:
        return any(rx.match(rel) for rx in self.ignore)

    def __call__(self, path: str | Path) -> bool:
        rel = self.relative(path)
        return rel is not None and not self.ignored(rel) and any(rx.match(rel) for rx in self.globs)


def watch_roots(base: Path, globs: Iterable[str], ignore: Iterable[str] = DEFAULT_IGNORE) -> list[tuple[Path, bool]]:
    """The (folder, recursive) watches that see every path ``globs`` can match.

    The fixed leading folders of a glob are its root.  A recursive root is split one level
    into its children so that an ignored child (``node_modules``) is never walked; the
    root itself is watched without recursion, to see new files and folders appear in it.
    """
    path_filter = PathFilter(base, (), ignore)
    roots: dict[Path, bool] = {}
    for pattern in globs:
        parts = pattern.strip("/").split("/")
        fixed = []
        for part in parts[:-1]:
            if _MAGIC.search(part):
                break
            fixed.append(part)
        root = base.joinpath(*fixed) if fixed else base
        recursive = len(fixed) < len(parts) - 1 or "**" in parts[-1] or len(parts) == 1
        roots[root] = roots.get(root, False) or recursive
    watches: dict[Path, bool] = {}
    for root, recursive in roots.items():
        if not recursive or not root.is_dir():
            watches[root if root.is_dir() else root.parent] = watches.get(root, False)
            continue
        watches.setdefault(root, False)
        try:
            children = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError:
            continue
        for entry in children:
            rel = path_filter.relative(entry.path)
            if entry.is_dir(follow_symlinks=False) and rel is not None and not path_filter.ignored(rel):
                watches[Path(entry.path)] = True
    # A folder watched recursively covers its subfolders.
    recursive_roots = [p for p, r in watches.items() if r]
    return [(p, r) for p, r in sorted(watches.items())
            if not any(p != q and q in p.parents for q in recursive_roots)]


async def watch_changes(base: Path, globs: Iterable[str], ignore: Iterable[str] = DEFAULT_IGNORE,
                        stop_event=None) -> AsyncIterator[set[str]]:
    """Yield the set of changed relative paths, batched (a burst of saves is one batch).

    A folder created under a non-recursive root after the start is picked up by the next
    call (the candidate restarts on that change anyway, and the watcher is rebuilt).
    """
    import asyncio

    from watchfiles import awatch

    globs = list(globs)
    ignore = list(ignore)
    path_filter = PathFilter(base, globs, ignore)
    watches = watch_roots(base, globs, ignore)
    if not watches:
        return
    streams = [awatch(*paths, watch_filter=lambda _c, p: path_filter(p), recursive=recursive,
                      debounce=1600, step=50, stop_event=stop_event)
               for recursive in (True, False)
               if (paths := [path for path, r in watches if r == recursive])]
    queue: asyncio.Queue[set[str] | Exception] = asyncio.Queue()

    async def pump(stream):
        try:
            async for changes in stream:
                queue.put_nowait({path_filter.relative(p) or p for _c, p in changes})
        except Exception as exc:  # e.g. out of inotify watches: the caller must hear of it
            queue.put_nowait(exc)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        while True:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
