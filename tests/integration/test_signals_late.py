"""SIGTERM, once or twice in a row, to the run's process group during evaluation's label-budget fine-tunes and
during registration (which hangs on a store that never answers) ends `gptpipe run` within 10 s and leaves nothing
running: the cases of test_signals.py for the later stages, in a module of their own so they run in parallel.
They use the test run's Prefect server; test_signals.py's pre-training cases cover the run's temporary one."""

import pytest

from tests.integration.signals import sigterm_the_run_group

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("times", [1, 2], ids=["sigterm", "sigterm-twice"])
@pytest.mark.parametrize("stage", ["evaluate", "register"])
def test_sigterm_to_the_run_group_ends_it_within_10_s_leaving_nothing(stage, times, stages_done, silent_store,
                                                                      tmp_path, prefect_api):
    sigterm_the_run_group(stage, times, stages_done, silent_store, tmp_path, prefect_api)
