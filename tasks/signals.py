"""A stop signal must not be lost.

Python runs a signal's handler between two bytecodes of the main thread, wherever it is; when that is inside a
garbage collector's callback (a weakref finaliser: SQLAlchemy's, for one), the KeyboardInterrupt or SystemExit
the handler raises is swallowed there: Python prints "Exception ignored in ..." with a traceback and goes on, and
the Ctrl-C or SIGTERM never reaches the code that was running. `resend_lost` sends such a signal again, quietly,
so it lands a moment later where it was meant to."""
from __future__ import annotations

import os
import sys
from typing import Callable


def resend_lost(signal_of: Callable[[BaseException], int | None]) -> None:
    """From now on an exception lost in a callback that `signal_of` maps to a signal number is sent again as
    that signal to this process; anything else goes to the hook that was there."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        signum = signal_of(unraisable.exc_value) if unraisable.exc_value is not None else None
        if signum is None:
            previous(unraisable)
        else:
            os.kill(os.getpid(), signum)

    sys.unraisablehook = hook
