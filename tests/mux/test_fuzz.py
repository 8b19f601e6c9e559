"""The fuzz targets (fuzz/targets.py): the kept corpus replays clean, and a short
coverage-guided run (atheris) finds nothing.  A longer run: see fuzz/README.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.targets import header_input, mux_input
from velo import protocol

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "fuzz" / "corpus"
TARGETS = {"mux": mux_input, "header": header_input}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_corpus_replays_clean(name):
    files = sorted((CORPUS / name).iterdir())
    assert files, f"empty corpus {CORPUS / name}"
    for path in files:
        TARGETS[name](path.read_bytes())


def test_deeply_nested_header_is_a_protocol_error_not_a_crash():
    """Found by the fuzzer: json.loads raised RecursionError, which the edge did not catch."""
    body = b"[" * 4000
    with pytest.raises(protocol.MessageError):
        protocol.MessageReader(protocol.MAX_HEADER).first(len(body).to_bytes(2, "big") + body)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_short_fuzz_run_finds_nothing(name, tmp_path):
    try:
        import atheris  # noqa: F401  (only: is it installed?)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("atheris is not installed (it is in the test extras: make install)")
        pytest.skip("atheris is not installed")
    # New inputs go to tmp_path (first folder); the kept corpus is only read.
    result = subprocess.run(
        [sys.executable, "-m", "fuzz.run", name, str(tmp_path), str(CORPUS / name),
         "-max_total_time=8", "-timeout=10", "-rss_limit_mb=1024"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Done" in output and not list(tmp_path.glob("crash-*")), output[-3000:]
