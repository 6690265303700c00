"""Run a command so that it never outlives the process that started it:

    python -m flows.guard dvc repro pretrain

The guard asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG: kill -9 of the flow, the OOM
killer, a crashed worker) and on SIGTERM or SIGINT stops its whole process group, SIGKILL after a grace period.
Started as the leader of a session of its own, that group is the command and everything the command started
(`dvc repro` and the stage's training process), so no stage is left running, holding DVC's lock.
"""

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
STOP_GRACE_SECONDS = 20.0


def stop_group(signum: int, _frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal below reaches the guard too
    group = os.getpgid(0)
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.2)
        except ChildProcessError:  # no child left
            break
    os.killpg(group, signal.SIGKILL)


def main() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    parent = os.getppid()
    signal.signal(signal.SIGTERM, stop_group)
    signal.signal(signal.SIGINT, stop_group)
    if parent == 1:  # the parent died before the death signal was armed
        return
    child = subprocess.Popen(sys.argv[1:])
    sys.exit(child.wait())


if __name__ == "__main__":
    main()
