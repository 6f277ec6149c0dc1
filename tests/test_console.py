"""Logging set-ups: a task's log has each line once; a console shows ferpipe's lines without library noise."""

import logging
import subprocess
import sys

TASK = """
import logging, sys
kfp_format = '[KFP Executor %(asctime)s %(levelname)s]: %(message)s'  # what kfp's executor_main sets up
logging.basicConfig(stream=sys.stdout, format=kfp_format, level=logging.INFO)
from ferpipe.console import for_task
for_task()
logging.getLogger('ferpipe.model.training').info('el_nose epoch 1/16')
logging.getLogger('mlflow.store').info('housekeeping')
logging.getLogger('kfp.executor').warning('a warning from a library')
"""


def test_a_task_logs_each_line_once_with_its_logger_and_time():
    out = subprocess.run([sys.executable, "-c", TASK], capture_output=True, text=True, check=True).stdout.splitlines()
    mine = [line for line in out if "el_nose epoch 1/16" in line]
    assert len(mine) == 1 and "INFO ferpipe.model.training: el_nose epoch 1/16" in mine[0]  # KFP's handler gone
    assert not any("housekeeping" in line for line in out)  # libraries' INFO stays out
    assert any("WARNING kfp.executor: a warning from a library" in line for line in out)


def test_a_console_shows_ferpipe_lines_plain_and_keeps_a_hosts_handler(capsys):
    from ferpipe.console import for_console

    root = logging.getLogger()
    host = logging.StreamHandler(sys.stderr)  # an application that embeds ferpipe keeps its own
    root.addHandler(host)
    try:
        for_console()
        logging.getLogger("ferpipe.crossval").info("fold 3 done")
        logging.getLogger("mlflow.store").info("housekeeping")
        out = capsys.readouterr().out
        assert "fold 3 done\n" in out and "housekeeping" not in out
        assert host in root.handlers
    finally:
        root.removeHandler(host)
        for handler in [h for h in root.handlers if getattr(h, "ferpipe", False)]:
            root.removeHandler(handler)
