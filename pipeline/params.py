"""Presets and checks of params.yaml on the command line (the schema itself: pipeline.core.params).

python -m pipeline.params apply params/tiny.yaml     # overlay presets onto params.yaml
python -m pipeline.params check [FILE]               # validate a params file; silent when it is valid

`apply` edits params.yaml round-trip (ruamel.yaml, as DVC's own `dvc exp run -S` does): every
comment, the order of the keys and the flow style of a line stay as they were; only the values a
preset sets change (a list, such as collect.sources, is replaced whole, with its comments).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import yaml

from pipeline.core.common import PipelineError, atomic_write_text, first_line, run_main
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
    text = round_trip(Path(args.params), [Path(p) for p in args.presets])
    if yaml.safe_load(text) != data:  # the edit must say exactly what was validated (read as read_yaml reads)
        raise PipelineError(f"{args.params}: the presets could not be applied in place; edit it by hand")
    atomic_write_text(Path(args.params), text)
    print(f"applied {', '.join(args.presets)} to {args.params}")


def round_trip(params: Path, presets: list[Path]) -> str:
    """params.yaml's text with the presets laid over it in place (merge's rules), comments kept."""
    from ruamel.yaml import YAML  # DVC's own YAML library (a dependency of dvc)

    editor = YAML()
    editor.preserve_quotes = True
    editor.width = 4096  # never re-wrap a line
    editor.indent(mapping=2, sequence=4, offset=2)  # params.yaml's own layout: "  sources:\n    - name: ..."
    try:
        doc = editor.load(params.read_text(encoding="utf-8"))
        for preset in presets:
            doc = merge(doc, editor.load(preset.read_text(encoding="utf-8")))
    except Exception as e:  # read_yaml has read both already: this is ruamel's own trouble
        raise PipelineError(f"{params}: cannot edit it in place ({first_line(e)})") from None
    out = io.StringIO()
    editor.dump(doc, out)
    return out.getvalue()


if __name__ == "__main__":
    run_main(main)
