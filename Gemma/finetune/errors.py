"""The errors a user can act on, and the exit codes every tool of this project uses."""

from __future__ import annotations

import argparse

EXIT_USER_ERROR = 2  # a problem in the config, data or flags: the message says how to fix it
EXIT_DIVERGED = 3  # the loss or gradient norm became NaN or infinite
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_PREEMPTED = 143  # 128 + SIGTERM: what schedulers expect from a job that stopped on their signal
# How long a rank other than 0 waits, after a UserError, before exiting: rank 0 prints the message, and the launcher
# stops every rank once one has exited (rank 0 finds the same problem within a second; its exit ends the wait).
MESSAGE_GRACE_S = 10.0


class UserError(Exception):
    """A problem the user can fix (config, data, flags, run directories). Tools print it as a message, never as a
    traceback; `problems` holds one line per problem (every problem found, not just the first)."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class TrainingStopped(UserError):
    """Training ended early on purpose (preemption, divergence); the message says how to continue."""

    def __init__(self, problems: str | list[str], exit_code: int):
        super().__init__(problems)
        self.exit_code = exit_code


def positive_int(text: str) -> int:
    """argparse type of the tools' count flags: a whole number of at least 1, else a usage error naming the value."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)
