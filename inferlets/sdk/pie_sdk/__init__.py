"""The inferlet SDK: compiled into every inferlet. A program defines `main(args)` and uses these.

Inferlets run without any filesystem, so a module can only be imported if it was imported
while the component was built (componentize-py snapshots the interpreter then). The
standard-library modules that common code (argparse, json, re, traceback) imports lazily are
imported here for that reason; a program needing more imports them at its top level.
"""
import locale  # noqa: F401  (gettext, used by argparse, imports it lazily)
import shutil  # noqa: F401  (argparse's help formatter)
import textwrap  # noqa: F401  (argparse)
import difflib  # noqa: F401  (argparse suggestions)
import linecache  # noqa: F401  (traceback)
from pie_sdk.context import Context
from pie_sdk.runtime import arguments, instance_id, log, model_info, send
from pie_sdk.samplers import distribution, greedy, logprobs, sample

__all__ = ["Context", "arguments", "instance_id", "log", "model_info", "send",
           "greedy", "sample", "distribution", "logprobs"]
