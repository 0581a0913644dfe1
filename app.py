"""vlmlens dashboard: ``python app.py [--model tiny-shapes] [--no-model] [--runs cached_runs] ...``

The same as ``python -m vlmlens serve ...`` (its options: ``python app.py --help``). Serves on
127.0.0.1 without a share link and without remote model code unless asked.
"""
from __future__ import annotations

import argparse
import sys


def _serve_parser() -> argparse.ArgumentParser:
    from vlmlens.cli import build_parser

    return build_parser()


def parse_args(argv=None) -> argparse.Namespace:
    return _serve_parser().parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])


def main(argv=None) -> int:
    from vlmlens.cli import main as cli_main

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
