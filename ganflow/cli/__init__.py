"""The ``ganflow`` command line (click). Commands are thin: parse, call one library function, print a summary.

Each command lives in its own module under ``ganflow/cli/`` and is registered in ``_COMMAND_MODULES``.
Errors from bad input (`GanflowError`, and the clear file errors) print one line on stderr and exit 2;
``--debug`` (before the command name) shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import warnings

import click

from .. import __version__
from ..errors import GanflowError

__all__ = ["main", "cli"]

# module name -> command function names defined in it. A module that is not present yet is skipped.
_COMMAND_MODULES = {
    "problems_cmd": ["problems"],
    "data_cmd": ["data"],
    "train_cmd": ["train_prior", "prior_report"],
    "amortized_cmd": ["train_posterior"],
    "simulate_cmd": ["simulate"],
    "solve_cmd": ["solve"],
    "predict_cmd": ["predict", "calibrate"],
    "plot_cmd": ["plot"],
    "export_cmd": ["export"],
    "demo_cmd": ["demo"],
    "bench_cmd": ["bench"],
    "check_cmd": ["check_operator"],
}


@contextlib.contextmanager
def _ganflow_warnings_as_one_line():
    """ganflow's own warnings (messages starting 'ganflow: ', e.g. a deprecated spelling the user typed) print as
    one 'warning:' line on stderr. Python would hide a DeprecationWarning raised outside __main__, or print it
    with a file name and a source line; other warnings keep Python's handling."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if text.startswith("ganflow: "):
                click.echo(f"warning: {text.removeprefix('ganflow: ')}", err=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.filterwarnings("default", message="ganflow: ")
        yield


class GanflowGroup(click.Group):
    """A group that turns user errors into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        try:
            with _ganflow_warnings_as_one_line():
                return super().invoke(ctx)
        except GanflowError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except click.UsageError as e:
            # A subcommand's bad option (missing, wrong type, a file that is a directory): one line naming the
            # command, like every other bad input, instead of click's three-line usage block.
            if debug:
                raise
            where = e.ctx.command_path if e.ctx is not None else ctx.command_path
            message = " ".join(e.format_message().split())
            click.echo(f"error: {where}: {message} (see --help)", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=GanflowGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.version_option(version=__version__, prog_name="ganflow")
def cli(debug: bool) -> None:
    """ganflow: Bayesian inverse problems with GAN priors and normalizing-flow posteriors."""


def _register() -> None:
    for module_name, names in _COMMAND_MODULES.items():
        try:
            module = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{module_name}":
                continue
            raise
        for name in names:
            cmd = getattr(module, name, None)
            if isinstance(cmd, click.Command):
                cli.add_command(cmd)


_register()


def main() -> None:
    # click's standalone mode turns UsageError into exit 2 with a usage message, as we want.
    sys.exit(cli.main(prog_name="ganflow", standalone_mode=True))
