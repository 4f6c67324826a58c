"""The one exception type for errors a user can cause, with the CLI exit code it maps to."""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_BUDGET_NOT_MET = 4


class CompressorError(Exception):
    """An error caused by the user's input: the message says what is wrong and what to do.

    :param message: one line, shown as-is by the CLI (no traceback).
    :param exit_code: the process exit code the CLI uses for it.
    """

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class BudgetNotMetError(CompressorError):
    """No sparsity level met the budget (the run still writes its report)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_BUDGET_NOT_MET)
