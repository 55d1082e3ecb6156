"""The command line every job shares: --config FILE, dotted overrides, --dry-run, one-line errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pipeline.config import Config, ConfigError, load_config


def parse(description: str, argv: list[str] | None = None, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """(config, args). Overrides are `section.key=value`; `--dry-run` prints the resolved config and exits."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="experiment YAML (configs/*.yaml); defaults otherwise")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved config, exit")
    if extra:
        extra(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-6")
    args = parser.parse_intermixed_args(argv)  # overrides may sit before, between or after options
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as err:
        sys.exit(f"error: {err}")
    if args.dry_run:
        print(cfg.to_yaml())
        sys.exit(0)
    return cfg, args


def run_main(
    main: Callable[[Config, argparse.Namespace], None],
    description: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """Parse, run, and turn expected failures (bad input) into one line on stderr and exit code 2."""
    cfg, args = parse(description, extra=extra)
    try:
        main(cfg, args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
