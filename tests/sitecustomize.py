"""Imported by the test suite's child processes only (tests/ is on their PYTHONPATH, see tiny.subprocess_env).

A child still running after DETOXRL_TEST_STACKS_AFTER seconds writes every thread's stack to its stderr,
and a fatal signal writes the stack that caused it, so a multi-process test that stalls or aborts shows
where (tiny.run_child puts that stderr in the failure).
"""

import faulthandler
import os

faulthandler.enable()
if os.environ.get("DETOXRL_TEST_STACKS_AFTER"):
    faulthandler.dump_traceback_later(float(os.environ["DETOXRL_TEST_STACKS_AFTER"]), exit=False)
