"""The rules table on 8 fake devices (`tests/rules_cases.py`, in a subprocess: the device
count is fixed when jax starts): MLA's activation constraints and the expert dispatch's
shard_map specs follow a changed rule."""

from eight_devices import run_cases


def test_layouts_follow_the_rules_on_eight_devices():
    run_cases("tests/rules_cases.py", expected_passed=1)
