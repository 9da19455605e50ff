"""No test can stall the suite: every test has a time limit (setup.cfg, pytest-timeout), and the
limit ends even a test blocked outside Python (the thread method)."""

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_has_a_time_limit_that_a_blocked_wait_cannot_escape(request):
    assert float(request.config.getini("timeout")) == 300
    assert request.config.getini("timeout_method") == "thread"


def test_a_test_blocked_in_a_lock_is_ended_at_its_limit(tmp_path):
    # A lock acquired twice blocks inside C with no Python frame to run a signal handler in: the
    # case a deadlocked XLA collective or LAPACK call presents.
    (tmp_path / "test_blocked.py").write_text(
        "import threading\n\n\ndef test_blocked():\n"
        "    lock = threading.Lock()\n    lock.acquire()\n    lock.acquire()\n")
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "setup.cfg"), "--rootdir",
         str(tmp_path), "-o", "timeout=2", "-o", "addopts=", "-p", "no:cacheprovider",
         str(tmp_path / "test_blocked.py")],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert "Timeout" in done.stdout + done.stderr, (done.stdout + done.stderr)[-2000:]
    assert time.monotonic() - began < 60
