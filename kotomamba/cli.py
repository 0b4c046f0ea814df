"""How the entry points report a user's error: one line, once, and where the launcher shows it last.

Under torchrun every rank's one-line error would otherwise be followed by torchrun's own
``ChildFailedError`` traceback; torchelastic's convention is an error file per rank
(``TORCHELASTIC_ERROR_FILE``), whose ``py_callstack`` torchrun prints as the root cause at the very
end of its report. We write that file with the one-line message instead of a Python traceback.
mpirun passes the failing rank's exit status through. Nothing here imports torch, so argument
errors are reported before anything heavy loads.
"""
from __future__ import annotations

import json
import os
import sys
import time

from kotomamba.launcher import launcher_rank

USAGE_ERROR = 2  # argparse's status for a bad command line
INPUT_ERROR = 1  # the command line was fine; a file, value or the machine it names is not
OTHER_RANKS_EXIT_DELAY_S = 2.0


def report_error(program: str, error: BaseException | str, exit_code: int) -> int:
    """Print ``PROGRAM: error: MESSAGE`` on rank 0 only, leave it in torchelastic's error file; return exit_code."""
    message = f"{program}: error: {error}"
    if launcher_rank() == 0:
        print(message, file=sys.stderr, flush=True)
    else:
        # mpirun ends the job at the first non-zero exit, output in flight included: let rank 0's line out.
        time.sleep(OTHER_RANKS_EXIT_DELAY_S)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        record = {"message": {"message": message, "errorCode": exit_code,
                              "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
        try:
            with open(error_file, "w") as file:
                json.dump(record, file)
        except OSError:
            pass  # the message is on stderr already; torchrun then reports the exit code alone
    return exit_code
