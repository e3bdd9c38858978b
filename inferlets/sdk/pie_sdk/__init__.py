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
import json  # noqa: F401  (messages are often JSON; json.decoder imports lazily)
from pie_sdk.context import Context
from pie_sdk.drafters import JacobiDrafter, ngram_drafter, runs_attending
from pie_sdk.together import generate_together, wait_all
from pie_sdk.grammar import Grammar
from pie_sdk.runtime import HostError, arguments, instance_id, log, model_info, now_ms, receive, send, sleep
from pie_sdk.samplers import distribution, greedy, logprobs, sample
from pie_sdk import http, messaging  # noqa: F401  (pie_sdk.http.get(...), pie_sdk.messaging.push(...))

__all__ = ["Context", "Grammar", "HostError", "generate_together", "JacobiDrafter", "ngram_drafter", "runs_attending", "wait_all", "arguments", "instance_id", "log", "model_info",
           "now_ms", "receive", "send", "sleep", "greedy", "sample", "distribution", "logprobs",
           "http", "messaging"]
