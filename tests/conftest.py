"""The tests' deterministic fixture: without --model, core.run, core.serve and LLM load the generated embedded
default (core.default_model: random weights, byte-level ids, decisive routing), the model the tests were written
against; subprocesses inherit it. Tests of the trained default (tests/test_default_checkpoint.py) name it."""

import os

os.environ["DSV3_EMBEDDED"] = "generated"
