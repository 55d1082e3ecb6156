"""The command line every job shares: --config FILE, dotted overrides, --dry-run, one-line errors.

`run_main` runs a job under `pipeline.failures.run_guarded`: errors (on the driver or inside Ray) print
one line and exit 2 (bad input) or 1, with the traceback in a log file; Ctrl-C/SIGTERM exit with one
line; MLflow runs end FAILED or KILLED accordingly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from pipeline.config import Config, ConfigError, load_config
from pipeline.failures import EXIT_BAD_INPUT, VERBOSE_ENV, run_guarded


def yaml_error_line(err: yaml.YAMLError, overrides: list[str]) -> str:
    """A YAML syntax error as `file:line:column: problem` (or the override it is in) instead of
    PyYAML's multi-line report."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is not None and mark.name != "<unicode string>":  # read from the --config file
        return f"{mark.name}:{mark.line + 1}:{mark.column + 1}: {problem} (not valid YAML)"
    for item in overrides:
        try:
            yaml.safe_load(item.partition("=")[2])
        except yaml.YAMLError:
            return f"override '{item}': {problem} (not valid YAML)"
    return f"{problem} (not valid YAML)"


def parse(
    description: str,
    argv: list[str] | None = None,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    plan: Callable[[Config], dict] | None = None,
    check: Callable[[Config, argparse.Namespace], None] | None = None,
    report: Callable[[Config], tuple[str, list[str]]] | None = None,
):
    """(config, args). Overrides are `section.key=value`; `--dry-run` prints the resolved config (and,
    for jobs that pass `plan`, where each role would run), runs the job's `check` of its weight paths
    (layouts and shapes from headers only), prints the job's `report` (a table, and one line per
    problem: exit 2 when there is one) and exits without starting anything."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="experiment YAML (configs/*.yaml); defaults otherwise")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved config, exit")
    parser.add_argument("--verbose", action="store_true",
                        help="print Ray's own records and the workers' tracebacks as Ray prints them (else they go to the job's log)")
    if extra:
        extra(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-6")
    args = parser.parse_intermixed_args(argv)  # overrides may sit before, between or after options
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    try:
        cfg = load_config(args.config, args.overrides)
    except yaml.YAMLError as err:  # in the file, or in an override's value
        _exit_bad_input(yaml_error_line(err, args.overrides))
    except (ConfigError, OSError) as err:
        _exit_bad_input(str(err))
    if args.dry_run:
        print(cfg.to_yaml())
        if plan is not None:
            print(yaml.safe_dump({"plan": plan(cfg)}, sort_keys=False))
        if check is not None:
            try:
                check(cfg, args)
            except (OSError, ValueError, KeyError) as err:
                _exit_bad_input(str(err))
            print("weights: every path's layout and shapes check out")
        if report is not None:
            table, problems = report(cfg)
            print(table)
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT if problems else 0)
        sys.exit(0)
    return cfg, args


def _exit_bad_input(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def run_main(
    main: Callable[[Config, argparse.Namespace], None],
    description: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    plan: Callable[[Config], dict] | None = None,
    check: Callable[[Config, argparse.Namespace], None] | None = None,
    report: Callable[[Config], tuple[str, list[str]]] | None = None,
) -> None:
    """Parse, then run `main` under the shared failure handling (pipeline/failures.py)."""
    cfg, args = parse(description, extra=extra, plan=plan, check=check, report=report)
    run_guarded(lambda: main(cfg, args), job=Path(sys.argv[0]).stem or "job")
