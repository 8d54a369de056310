"""The ``forensics`` command line: demo, sidecar, incidents, baselines, reports, replay, scenarios.

Example::

    forensics demo                      # the whole product on SmolLM2, one command
    forensics sidecar serve --config configs/sidecar.yaml
    forensics incidents list --filter "tenant = 'acme'"
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

# Sub-command groups contributed by other packages: module -> register(subparsers) function.
_PLUGINS = ("sidecar.cli", "analysis.cli", "analysis.scenarios.cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forensics", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="the product in one command: sidecar + SmolLM2 served "
                                    "under uvicorn, benign and injected traffic, analyses, "
                                    "HTML report")
    d.add_argument("--data-dir", default="forensics-data/demo",
                   help="where the demo keeps its sidecar data, logs and report (emptied "
                        "first if a previous demo made it)")
    d.add_argument("--benign", type=int, default=20,
                   help="benign requests sent (the detector baseline is built from them)")
    d.add_argument("--variants", type=int, default=19,
                   help="injected variants sent for the investigation (0: skip it; the demo "
                        "then takes ~40 s instead of a few minutes)")
    d.set_defaults(func=_cmd_demo)
    for mod in _PLUGINS:
        try:
            m = importlib.import_module(mod)
        except ImportError as e:  # an optional extra is not installed
            if e.name and e.name.split(".")[0] == mod.split(".")[0] and "No module" in str(e):
                continue
            raise
        m.register(sub)
    return p


def _cmd_demo(args: argparse.Namespace) -> int:
    from model_forensics.demo import run_demo

    return run_demo(data_dir=args.data_dir, benign=args.benign, variants=args.variants)


def main(argv: Sequence[str] | None = None) -> int:
    from integrations.errors import ForensicsError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ForensicsError as e:
        print(f"forensics: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`forensics incidents list --json | head`): stop quietly, like
        # other Unix tools; stdout goes to /dev/null so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
