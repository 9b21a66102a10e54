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
import inspect
import sys
import typing
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

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


def _no_placeholder(option: Any) -> Any:
    """--help takes no value: show none (typer would show `<bool>`)."""
    if option is not None:
        option.metavar = ""
    return option


def _usage_error(e: Exception) -> bool:
    """Click's usage errors (unknown option, missing value, bad choice), told by their interface: typer's public
    API names no UsageError, and typer vendors click's classes since 0.26 while older typers use the click
    package's (https://github.com/fastapi/typer, release notes)."""
    return callable(getattr(e, "format_message", None)) and getattr(e, "exit_code", None) == 2 and hasattr(e, "ctx")


def _no_args_help(e: Exception) -> bool:
    """click >= 8.2 raises this for `no_args_is_help` (the message is the help text; exit 0)."""
    return type(e).__name__ == "NoArgsIsHelpError"


class Command(TyperCommand):
    def get_help_option(self, ctx: typer.Context) -> Any:
        return _no_placeholder(super().get_help_option(ctx))


class OrderedGroup(TyperGroup):
    """Lists commands in pipeline order, and prints click's own usage errors (unknown option, missing value)
    as one line with exit 1, like every other error."""

    def get_help_option(self, ctx: typer.Context) -> Any:
        return _no_placeholder(super().get_help_option(ctx))

    def list_commands(self, ctx: typer.Context) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except typer.Abort:
            err_console.print("[bold yellow]stopped:[/] interrupted", highlight=False)
            code = 130
        except Exception as e:
            if _no_args_help(e):
                err_console.print(e.format_message(), markup=False, highlight=False)
                code = 0
            elif _usage_error(e):
                where = e.ctx.command_path if e.ctx else _command_path(self, args, prog_name or "repa-pipe")
                err_console.print(f"[bold red]error:[/] {e.format_message()} (see `{where} --help`)", markup=True,
                                  highlight=False, soft_wrap=True)
                code = 1
            else:
                raise
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
def _main(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.", metavar="")) -> None:
    ctx.obj = {"debug": debug}  # read by the command (its context's parent), no module state


def _debug(ctx: typer.Context) -> bool:
    """--debug given before the command (`repa-pipe --debug train ...`)."""
    root = ctx.find_root()
    return bool(root.obj and root.obj.get("debug"))


def fail(message: str, code: int = 1) -> None:
    """One red line on stderr, then exit `code`."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


def _call(fn: Callable[[], Any], debug: bool) -> None:
    """Run a command; a RepaError (config checks included) becomes one line and exit 1, a stop on a signal one
    line and 128 + the signal. With `debug` the traceback shows instead."""
    from repa_pipe.pipeline.signals import Stopped

    try:
        fn()
    except Stopped as e:
        if debug:
            raise
        err_console.print(f"[bold yellow]stopped:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code)
    except RepaError as e:
        if debug:
            raise
        fail(str(e).replace("[", r"\["))
    except OSError as e:  # the file system said no: a path we cannot create or write, a full disk
        if debug:
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
def _parameter(f: dataclasses.Field, hint: Any) -> inspect.Parameter:
    meta = f.metadata
    help_text = meta["help"] + (f" Choices: {meta['choices_text']}." if meta.get("choices") else "")
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


def command(group: typer.Typer, name: str, cfg_cls: type, stage: Callable[[Any], None], help: str,
            prepare: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None) -> None:
    """Register `name`: options from `cfg_cls`'s fields; running it builds the config and calls `stage(cfg)`, a
    function below that imports its stage module only when the command runs (so --help stays instant)."""
    hints = typing.get_type_hints(cfg_cls)
    params = [_parameter(f, hints[f.name]) for f in dataclasses.fields(cfg_cls)]
    # --debug after the command too (`repa-pipe train ... --debug`), as users type it
    params.append(inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--debug", help="Show the full traceback of an error instead of one line.", metavar="")))
    params.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

    def run(**kwargs: Any) -> None:
        ctx = kwargs.pop("ctx")
        debug = kwargs.pop("debug") or _debug(ctx)

        def go() -> None:
            values = prepare(kwargs) if prepare else kwargs
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            stage(cfg_cls(**values))
            _leave_process_group()
        _call(go, debug)

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


# ------------------------------------------------------------------------------------------------ stages
# Each imports its stage when its command runs: `import repa_pipe.cli` loads no torch (tests/test_layout.py).
def _encode_latents(cfg: EncodeLatentsConfig) -> None:
    from repa_pipe.stages import encode_latents
    encode_latents.run(cfg)


def _encode_features(cfg: EncodeFeaturesConfig) -> None:
    from repa_pipe.stages import encode_features
    encode_features.run(cfg)


def _cache_info(cfg: CacheInfoConfig) -> None:
    from repa_pipe.stages import cache
    cache.info(cfg)


def _cache_verify(cfg: CacheVerifyConfig) -> None:
    from repa_pipe.stages import cache
    cache.verify(cfg)


def _train(cfg: TrainConfig) -> None:
    from repa_pipe.stages import train
    train.run(cfg)


def _sample_eval(cfg: SampleEvalConfig) -> None:
    from repa_pipe.stages import sample_eval
    sample_eval.run(cfg)


def _analyze(cfg: AnalyzeConfig) -> None:
    from repa_pipe.stages import analyze
    analyze.run(cfg)


def _export(cfg: ExportConfig) -> None:
    from repa_pipe.stages import export
    export.run(cfg)


def _demo(cfg: DemoConfig) -> None:
    from repa_pipe.stages import demo
    demo.run(cfg)


def _bench(cfg: BenchConfig) -> None:
    from repa_pipe.stages import bench
    bench.run(cfg)


command(app, "encode-latents", EncodeLatentsConfig, _encode_latents,
        "Encode images into VAE posterior moments (mean, std) in the cache.")
command(app, "encode-features", EncodeFeaturesConfig, _encode_features,
        "Encode images into pretrained-encoder patch tokens in the cache.")
command(cache_app, "info", CacheInfoConfig, _cache_info,
        "Show a cache's arrays, shapes, dtypes, bytes, progress and provenance.")
command(cache_app, "verify", CacheVerifyConfig, _cache_verify,
        "Check that the cache is exactly what was written: index hashes, array metadata, every done shard, every "
        "valid row's checksum, no NaN or Inf.")
command(app, "train", TrainConfig, _train,
        "Train SiT with REPA from the cache alone (never runs an encoder or the VAE encoder).", prepare=_encoders)
command(app, "sample-eval", SampleEvalConfig, _sample_eval,
        "Sample from a trained model (SDE/ODE, guidance interval) and evaluate under the ADM protocol.")
command(app, "analyze", AnalyzeConfig, _analyze,
        "The paper's representation analysis of a run: CKNNA with the cached encoder features and linear-probe "
        "accuracy, per block and noise level.")
command(app, "export", ExportConfig, _export,
        "Write a run's EMA weights as safetensors (with the model config in its metadata).")
command(app, "demo", DemoConfig, _demo,
        "Run the whole pipeline on scikit-learn's digits on a CPU.")
command(app, "bench", BenchConfig, _bench,
        "Training and sampling throughput on this device (images/s, MFU, data wait, peak memory, projected times).")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
