"""`python -m conformance.render DIR`: draw report.md and errors.png again from DIR/report.json, without running
anything (e.g. after `pip install 'deepseek-v3-portable[plot]'`, or after a change to the report's layout)."""

from __future__ import annotations

import sys
from pathlib import Path

from conformance import report, report_diff, report_plot
from core.errors import UserError
from core.run import OneLineParser, run_cli


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m conformance.render", description=__doc__.splitlines()[0])
    p.add_argument("directory", type=Path, help="a directory written by python -m conformance --report")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    data = report_diff.read_other(args.directory / "report.json").copy()
    for key in ("operators", "dispatch", "wall_seconds"):
        if key not in data:
            raise UserError(f"{args.directory / 'report.json'}: written by an older conformance (no {key}); run it "
                            f"again instead")
    report.write(data, args.directory)
    print(f"report: {args.directory / 'report.md'}" + ("" if (args.directory / report.PLOT_FILE).exists() else
                                                        f" (no plot: {report_plot.unavailable()})"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
