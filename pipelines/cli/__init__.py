"""The ``curate`` command line: ``main`` is the console entry point, ``python -m pipelines.cli`` runs it."""

from pipelines.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
