"""CI (`.ci/run` -> scripts/test.sh) fails on any failure, treats "no tests" as a failure,
and lints with ruff before testing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "MIXQ_SKIP_INSTALL": "1", "PYTHONPATH": str(ROOT)}


def run(*args):
    return subprocess.run(["bash", "scripts/test.sh", "-p", "no:cacheprovider", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_ci_runs_the_test_script():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci and "bash scripts/test.sh" in ci
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert script.index("set -euo pipefail") < script.index("ruff check mixq tests scripts bench") < script.index(
        "python -m pytest")


def test_pytest_collecting_nothing_fails():
    r = run("-k", "no_test_has_this_name", "tests/test_config.py")
    assert r.returncode == 1 and "pytest collected no tests" in r.stderr, r.stdout[-500:] + r.stderr[-500:]


def test_a_failing_test_fails_the_run(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_fails():\n    assert 1 == 2\n\n\ndef test_passes():\n    pass\n")
    r = run(str(tmp_path / "test_one.py"))
    assert r.returncode == 1 and "1 failed, 1 passed" in r.stdout
