"""The background launches of tests/conftest.py: output, exit codes and timeouts."""

import sys
from pathlib import Path

import pytest

from tests.conftest import Launch


def test_a_launch_gives_its_output_and_its_own_directory():
    launch = Launch(
        [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write('x'); print('done')", "{out}/f"], {}, 60
    )
    assert launch.output() == "done\n"
    assert (Path(launch.out_dir) / "f").read_text() == "x"
    assert launch.output() == "done\n"  # read again, not run again


def test_a_failing_launch_fails_the_test_with_its_output():
    launch = Launch([sys.executable, "-c", "print('what went wrong'); raise SystemExit(2)"], {}, 60)
    with pytest.raises(AssertionError, match="what went wrong"):
        launch.output()


def test_a_hung_launch_is_killed_after_its_timeout():
    launch = Launch([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"], {}, 1)
    with pytest.raises(pytest.fail.Exception, match=r"still running after 1 s:\nstarted"):
        launch.output()
