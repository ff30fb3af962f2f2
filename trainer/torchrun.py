"""torchrun, ending without the interpreter's teardown: `python -m trainer.torchrun ARGS` is
`torchrun ARGS` (torch.distributed.run's own main, same flags, same rendezvous, same failure
handling), except that once every worker has exited the agent leaves at once with their status.

The agent imports torch, so a plain exit spends about 0.8 s here freeing modules one by one after
the workers are done; the pipeline's local launcher pays that once per block
(components/launchers/local.py). A failure still raises out of main with torchrun's error report
and traceback, and so exits the ordinary way.
"""

from __future__ import annotations

import sys

from trainer.runlog import exit_now


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except SystemExit as e:  # argparse's --help and usage errors
        return e.code if isinstance(e.code, int) else 1
    return 0


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
