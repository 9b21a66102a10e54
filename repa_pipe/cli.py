"""The `repa-pipe` command line, built from the config dataclasses: each command's options are its config's
fields (name, default, help and choices in one place), and a command only builds its config and runs its stage.

Every failure a user can cause prints one red line naming the option or path and exits 1; `--debug` shows the
traceback instead. A stage stopped by SIGINT/SIGTERM prints what it kept and exits 128 + the signal number.
Option names never clash with torchrun's own (tests check it), so `torchrun ... -m repa_pipe.cli train ...`
needs no `--`.
"""
from __future__ import annotations

import dataclasses
import errno
import importlib
import inspect
import sys
import typing
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

try:  # typer >= 0.26 vendors click: its exceptions are not the `click` package's
    from typer import _click as click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
    from typer.exceptions import Abort
except ImportError:  # pragma: no cover - typer with click as a dependency
    import click
    from click.exceptions import Abort, NoArgsIsHelpError, UsageError

from repa_pipe.analysis.config import AnalyzeConfig
from repa_pipe.cache.options import CacheInfoConfig, CacheVerifyConfig
from repa_pipe.demo.config import DemoConfig
from repa_pipe.encoding.config import EncodeFeaturesConfig, EncodeLatentsConfig
from repa_pipe.pipeline.errors import RepaError
from repa_pipe.sampling.config import ExportConfig, SampleEvalConfig
from repa_pipe.training.bench_config import BenchConfig
from repa_pipe.training.config import TrainConfig

ORDER = ("encode-latents", "encode-features", "cache", "train", "sample-eval", "analyze", "export", "demo", "bench")
FLOW = ("Typical flow: encode-latents and encode-features fill a cache from an image folder (once per image), "
        "train reads only that cache, sample-eval samples a run and computes FID & co. `repa-pipe demo OUT` runs "
        "it all on a small built-in dataset on a CPU.")

err_console = Console(stderr=True)
_state = {"debug": False}


def _no_placeholder(option: Any) -> Any:
    """--help takes no value: show none (typer would show `<bool>`)."""
    if option is not None:
        option.metavar = ""
    return option


class Command(TyperCommand):
    def get_help_option(self, ctx: click.Context) -> Any:
        return _no_placeholder(super().get_help_option(ctx))


class OrderedGroup(TyperGroup):
    """Lists commands in pipeline order, and prints click's own usage errors (unknown option, missing value)
    as one line with exit 1, like every other error."""

    def get_help_option(self, ctx: click.Context) -> Any:
        return _no_placeholder(super().get_help_option(ctx))

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except NoArgsIsHelpError as e:
            err_console.print(e.format_message(), markup=False, highlight=False)
            code = 0
        except UsageError as e:
            where = e.ctx.command_path if e.ctx else _command_path(self, args, prog_name or "repa-pipe")
            err_console.print(f"[bold red]error:[/] {e.format_message()} (see `{where} --help`)", markup=True,
                              highlight=False, soft_wrap=True)
            code = 1
        except Abort:
            err_console.print("[bold yellow]stopped:[/] interrupted", highlight=False)
            code = 130
        if standalone_mode:
            sys.exit(code)
        return code


def _command_path(group: Any, args: Any, prog: str) -> str:
    """'repa-pipe train' for `repa-pipe train --cache` (click gives a missing option value no context)."""
    path = [prog]
    for word in list(args if args is not None else sys.argv[1:]):
        cmd = getattr(group, "commands", {}).get(word)
        if cmd is not None:
            path.append(word)
            group = cmd
    return " ".join(path)


app = typer.Typer(cls=OrderedGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="rich",
                  help=f"Train diffusion transformers with REPA as a staged, cached pipeline.\n\n{FLOW}")
cache_app = typer.Typer(cls=OrderedGroup, no_args_is_help=True, help="Inspect and check a cache.")
app.add_typer(cache_app, name="cache")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.", metavar="")) -> None:
    _state["debug"] = debug


def fail(message: str, code: int = 1) -> None:
    """One red line on stderr, then exit `code`."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


def _call(fn: Callable[[], Any]) -> None:
    """Run a command; a RepaError (config checks included) becomes one line and exit 1, a stop on a signal one
    line and 128 + the signal."""
    from repa_pipe.pipeline.signals import Stopped

    try:
        fn()
    except Stopped as e:
        if _state["debug"]:
            raise
        err_console.print(f"[bold yellow]stopped:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code)
    except RepaError as e:
        if _state["debug"]:
            raise
        fail(str(e).replace("[", r"\["))
    except OSError as e:  # the file system said no: a path we cannot create or write, a full disk
        if _state["debug"]:
            raise
        fail(_os_error_line(e).replace("[", r"\["))


def _os_error_line(e: OSError) -> str:
    """'PATH: No space left on device; free space and run the same command again (finished work is kept)'."""
    where = ": ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    what = e.strerror or str(e)
    line = f"{where}: {what}" if where else what
    if e.errno == errno.ENOSPC:
        line += "; free space and run the same command again (finished work is kept)"
    return line


# ------------------------------------------------------------------------------------------------ generation
def _choices_text(choices: tuple) -> str:
    if all(isinstance(c, str) and c.startswith("SiT-") for c in choices):  # 20 presets: the pattern reads better
        sizes = list(dict.fromkeys(c[4:].split("/")[0] for c in choices))
        patches = list(dict.fromkeys(c.split("/")[1] for c in choices))
        return f"SiT-{{{','.join(sizes)}}}/{{{','.join(patches)}}}"
    return ", ".join(map(str, choices))


def _parameter(f: dataclasses.Field, hint: Any) -> inspect.Parameter:
    meta = f.metadata
    help_text = meta["help"] + (f" Choices: {_choices_text(meta['choices'])}." if meta.get("choices") else "")
    default = f.default if f.default is not dataclasses.MISSING else ...
    is_bool = hint is bool
    annotation = list[str] if typing.get_origin(hint) is tuple else hint
    if isinstance(default, tuple):
        default = list(default)
    if meta["argument"]:
        info = typer.Argument(default, help=help_text, metavar=meta["metavar"], show_default=False)
    else:
        name = "--" + f.name.replace("_", "-")
        decls = [f"{name}/--no-{name[2:]}"] if is_bool and default is True else [name]
        info = typer.Option(default, *decls, help=help_text, metavar="" if is_bool else meta["metavar"],
                            show_default=default not in (None, ...) and not is_bool or default is True)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def command(group: typer.Typer, name: str, cfg_cls: type, stage: str, help: str,
            prepare: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None) -> None:
    """Register `name`: options from `cfg_cls`'s fields; running it builds the config and calls `stage`
    ("module:function", imported only when the command runs, so --help stays instant)."""
    hints = typing.get_type_hints(cfg_cls)
    params = [_parameter(f, hints[f.name]) for f in dataclasses.fields(cfg_cls)]
    # --debug after the command too (`repa-pipe train ... --debug`), as users type it
    params.append(inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--debug", help="Show the full traceback of an error instead of one line.", metavar="")))

    def run(**kwargs: Any) -> None:
        if kwargs.pop("debug"):
            _state["debug"] = True

        def go() -> None:
            values = prepare(kwargs) if prepare else kwargs
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            cfg = cfg_cls(**values)
            module, fn = stage.split(":")
            getattr(importlib.import_module(module), fn)(cfg)
            _leave_process_group()
        _call(go)

    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.__doc__ = help
    group.command(name, help=help, cls=Command)(run)


def _leave_process_group() -> None:
    """After a clean finish under torchrun, leave the process group before the interpreter exits: a gloo rank
    that exits holding it can abort in teardown ("terminate called without an active exception") while another
    rank is still writing files. Not after an error: another rank may still be inside a collective."""
    if "torch.distributed" in sys.modules:
        from repa_pipe.pipeline import dist

        dist.shutdown()


def _encoders(kwargs: dict[str, Any]) -> dict[str, Any]:
    """--encoder may repeat and/or hold comma-separated names; 'none' trains without alignment."""
    names = tuple(n.strip() for v in kwargs["encoder"] for n in v.split(",") if n.strip())
    return {**kwargs, "encoder": () if names == ("none",) else names}


command(app, "encode-latents", EncodeLatentsConfig, "repa_pipe.stages.encode_latents:run",
        "Encode images into VAE posterior moments (mean, std) in the cache.")
command(app, "encode-features", EncodeFeaturesConfig, "repa_pipe.stages.encode_features:run",
        "Encode images into pretrained-encoder patch tokens in the cache.")
command(cache_app, "info", CacheInfoConfig, "repa_pipe.stages.cache:info",
        "Show a cache's arrays, shapes, dtypes, bytes, progress and provenance.")
command(cache_app, "verify", CacheVerifyConfig, "repa_pipe.stages.cache:verify",
        "Check that the cache is exactly what was written: index hashes, array metadata, every done shard, every "
        "valid row's checksum, no NaN or Inf.")
command(app, "train", TrainConfig, "repa_pipe.stages.train:run",
        "Train SiT with REPA from the cache alone (never runs an encoder or the VAE encoder).", prepare=_encoders)
command(app, "sample-eval", SampleEvalConfig, "repa_pipe.stages.sample_eval:run",
        "Sample from a trained model (SDE/ODE, guidance interval) and evaluate under the ADM protocol.")
command(app, "analyze", AnalyzeConfig, "repa_pipe.stages.analyze:run",
        "The paper's representation analysis of a run: CKNNA with the cached encoder features and linear-probe "
        "accuracy, per block and noise level.")
command(app, "export", ExportConfig, "repa_pipe.stages.export:run",
        "Write a run's EMA weights as safetensors (with the model config in its metadata).")
command(app, "demo", DemoConfig, "repa_pipe.stages.demo:run",
        "Run the whole pipeline on scikit-learn's digits on a CPU.")
command(app, "bench", BenchConfig, "repa_pipe.stages.bench:run",
        "Training and sampling throughput on this device (images/s, MFU, data wait, peak memory, projected times).")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
