"""The ragged expert-parallel dispatch on 8 fake devices (tests/ragged_cases.py)."""

import os

from eight_devices import run_cases


def test_ragged_dispatch_on_eight_devices():
    run_cases(os.path.join("tests", "ragged_cases.py"), expected_passed=7)
