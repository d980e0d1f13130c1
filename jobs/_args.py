"""argparse as the entrypoints use it: a single-valued option given twice is a usage error.

argparse keeps the last value silently, so a flag a launcher (Helm chart, TorchX component, RayJob)
sets and the same flag again in the user's extra arguments would run with the latter, unseen.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def parse_once(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, exiting 2 (``parser.error``) when an option that takes one value
    (or a flag) appears more than once; ``append``/``count`` options may repeat."""
    # argparse would take "--batch 4" for "--batch-size 4" and let a later "--batch-size 8" win unseen:
    # every option is spelled out
    parser.allow_abbrev = False
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" in args:
        args = args[:args.index("--")]
    for action in parser._actions:  # argparse has no public accessor for its actions
        if not action.option_strings or isinstance(action, (argparse._AppendAction, argparse._CountAction,
                                                           argparse._HelpAction, argparse._VersionAction)):
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        # a short option with a value may carry it attached: -b4
        shorts = [o for o in action.option_strings if not o.startswith("--")] if action.nargs != 0 else []
        hits = [a for a in args if a in action.option_strings or any(a.startswith(o + "=") for o in longs)
                or any(a.startswith(o) and len(a) > len(o) and not a.startswith("--") for o in shorts)]
        if len(hits) > 1:
            parser.error(f"{'/'.join(action.option_strings)} given {len(hits)} times: give it once (the last one "
                         f"would win silently)")
    return parser.parse_args(argv)
