"""`make test` cannot hang: every test runs under pytest-timeout's suite-wide bound
(pyproject.toml, [tool.pytest.ini_options] timeout), so a wait that never ends fails its
test instead of stopping the suite."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time


def test_the_suite_has_a_per_test_timeout(pytestconfig):
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert 0 < float(pytestconfig.getini("timeout")) <= 600


def test_a_test_that_waits_forever_fails_and_the_run_goes_on(tmp_path, pytestconfig):
    (tmp_path / "test_hang.py").write_text(textwrap.dedent("""
        import threading

        def test_waits_forever():
            threading.Event().wait()

        def test_after_it():
            pass
    """))
    # The project's own settings (its pyproject.toml), with the bound shortened to 2 s.
    config = pytestconfig.rootpath / "pyproject.toml"
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", str(config), "--rootdir", str(tmp_path),
                          "-o", "timeout=2", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout[-2000:]
    assert "Timeout" in run.stdout and "1 failed, 1 passed" in run.stdout, run.stdout[-2000:]
    assert time.monotonic() - t0 < 60
