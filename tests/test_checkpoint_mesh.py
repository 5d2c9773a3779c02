"""The published weights' structure at full depth on a mesh (issue 13 point 7): a
V2-Lite-structured checkpoint (27 layers, 64 + 2 experts, top-6, 16 heads, narrow widths,
several shards) loaded on 8 fake devices with expert=8 matches transformers' logits; greedy
tokens sharded equal unsharded (a batch of 3 padded to the mesh); saved from the mesh it
reloads in transformers with its tokenizer files; two SFT steps start from it through
train.init_from; convert streams it both ways on the mesh. Run in a subprocess: tests/weights_cases.py."""

from eight_devices import run_cases


def test_lite_structure_on_eight_devices():
    run_cases("tests/weights_cases.py", expected_passed=6)
