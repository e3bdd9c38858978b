"""Runs the user's main() inside the component; turns any exception into the run's error."""
import io
import sys
import traceback

from componentize_py_types import Err

from pie_sdk.runtime import arguments


def run_main(program) -> None:
    main = getattr(program, "main", None)
    if main is None:
        raise Err(f"the inferlet {program.__name__} defines no main(args) function")
    sys.stderr = captured = io.StringIO()  # there is no stderr: keep what the program writes (argparse errors)
    try:
        main(arguments())
    except BaseException as e:  # the inferlet's own failure, reported with its traceback
        written = captured.getvalue().strip()
        trace = "".join(traceback.format_exception(e)).rstrip()
        raise Err(f"{written}\n{trace}" if written else trace) from None
