#!/usr/bin/env python
"""Generate configs/README.md, the reference of every training-configuration key, from the
dataclasses in inrank_megatron/config.py (type, default and meaning of each key, per section)
and the rules of inrank_megatron/rules.py (inrank_megatron/config_reference.py renders it).

    python tools/config_doc.py > configs/README.md     # regenerate after changing config.py
    python tools/config_doc.py --check                  # exit 1 if configs/README.md is stale
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys

from inrank_megatron.config_reference import render_reference

DEFAULT_README = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "README.md"
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check",
        nargs="?",
        const=DEFAULT_README,
        metavar="PATH",
        help="Compare PATH (default: configs/README.md of this checkout) with the generated text "
        "instead of printing it; exit 1 with a diff on stderr if they differ.",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    text = render_reference()
    if args.check is None:
        sys.stdout.write(text)
        return 0
    try:
        with open(args.check, encoding="utf-8") as f:
            current = f.read()
    except FileNotFoundError:
        current = ""
    if current == text:
        return 0
    sys.stderr.writelines(
        difflib.unified_diff(
            current.splitlines(keepends=True),
            text.splitlines(keepends=True),
            fromfile=args.check,
            tofile="generated",
        )
    )
    print(
        f"config_doc.py: {args.check} is out of date; run "
        "python tools/config_doc.py > configs/README.md",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
