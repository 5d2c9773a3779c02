"""Exports for TPU and GPU from the CPU (tests/export_cases.py), on 16 fake devices."""

import os

from eight_devices import run_cases


def test_v2_lite_steps_export_for_tpu_and_cuda_with_the_kernels():
    run_cases(os.path.join("tests", "export_cases.py"), expected_passed=2, devices=16)
