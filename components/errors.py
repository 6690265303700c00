"""Bad input ends a step with exit status 2 and one line that says what is wrong and how to fix it."""

import sys
from collections.abc import Callable

ERROR_PREFIX = "gptpipe: error:"


class InputError(Exception):
    """Input the user can fix: a missing file or column, a bad param. The message names it and the fix."""


def exit_on_input_error(main: Callable[[], None]) -> None:
    """Run an entry point; turn an InputError into one stderr line and exit status 2."""
    try:
        main()
    except InputError as error:
        message = " ".join(str(error).split())
        print(f"{ERROR_PREFIX} {message}", file=sys.stderr)
        raise SystemExit(2) from None
