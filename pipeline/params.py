"""Presets and checks of params.yaml on the command line (the schema itself: pipeline.core.params).

python -m pipeline.params apply params/tiny.yaml     # overlay presets onto params.yaml
python -m pipeline.params check [FILE]               # validate a params file; silent when it is valid
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from pipeline.core.common import atomic_write_text, run_main
from pipeline.core.params import PARAMS_FILE, load, merge, parse, read_yaml


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.params apply PRESET [PRESET ...]`: overlay presets onto params.yaml.

    `python -m pipeline.params check [FILE]` validates a params file and prints nothing on success.
    """
    ap = argparse.ArgumentParser(prog="python -m pipeline.params", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("apply", help="overlay preset files onto params.yaml (validated before writing)")
    a.add_argument("presets", nargs="+")
    a.add_argument("--params", default=PARAMS_FILE)
    c = sub.add_parser("check", help="validate a params file")
    c.add_argument("file", nargs="?", default=PARAMS_FILE)
    args = ap.parse_args(argv)
    if args.cmd == "check":
        load(args.file)
        return
    data = read_yaml(args.params)
    for preset in args.presets:
        data = merge(data, read_yaml(preset))
    parse(data, f"{args.params} with {', '.join(args.presets)}")
    atomic_write_text(Path(args.params), yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100))
    print(f"applied {', '.join(args.presets)} to {args.params}")


if __name__ == "__main__":
    run_main(main)
