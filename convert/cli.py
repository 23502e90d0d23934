"""convert-cpu-weights: the command line (kt-compatible flags plus our own)."""
from __future__ import annotations

import json
import signal
import sys
import threading
import traceback
from pathlib import Path

import click

from kt_runtime.format.errors import UnsafePathError
from kt_runtime.format.fsio import atomic_write_text
from kt_runtime.format.methods import METHODS
from quant.source_formats import INPUT_TYPES

from . import __version__
from .errors import UserError
from .pipeline import ConvertOptions, convert, max_cpu_threads
from .plan import parse_layer_spec

EXIT_OK, EXIT_INTERNAL, EXIT_USER = 0, 1, 2


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--input-path", "-i", required=True,
              help="Checkpoint: a directory, a .safetensors file, or a hub id ORG/NAME[@REV] from the Hugging Face cache.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--input-type", default="auto", show_default=True,
              type=click.Choice(["auto", *INPUT_TYPES]),
              help="Source expert format; auto detects it from config.json and the tensor dtypes.")
@click.option("--quant-method", default="int4", show_default=True, type=click.Choice(list(METHODS)),
              help=", ".join(f"{m.name} = {'SGLang-KT --kt-method ' if i == 0 else ''}{m.kt_method}"
                             for i, m in enumerate(METHODS.values())) + ".")
@click.option("--threadpool-count", default=2, show_default=True, type=int,
              help="NUMA thread pools the output is split for; must equal --kt-threadpool-count when serving.")
@click.option("--cpuinfer-threads", default=0, show_default=True, type=int,
              help=f"CPU threads for packing (0: all cores; at most {max_cpu_threads()} here).")
@click.option("--no-merge-safetensor", "no_merge", is_flag=True,
              help="Write kt's _layer_L/_numa_t/*.kt folders instead of one safetensors shard per layer.")
@click.option("--resume-layer", type=int, default=None,
              help="Accepted for kt compatibility; completed layers are resumed automatically.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where to dequantize and pack.")
@click.option("--gpu", "legacy_gpu", is_flag=True, hidden=True, help="kt compatibility: same as --device auto.")
@click.option("--include-non-expert", is_flag=True, help="Also copy the non-expert tensors into a last shard (as kt does).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output made with other settings.")
@click.option("--layers", "layers_spec", default=None, metavar="SPEC",
              help="Convert only these MoE layers, e.g. 0-3,7; the output is marked partial (default: every MoE layer).")
@click.option("--allow-nonfinite", is_flag=True, help="Pack NaN/Inf source weights as 0 instead of stopping (listed in the report).")
@click.option("--json", "json_path", type=click.Path(path_type=Path, allow_dash=True), default=None,
              help="Write the final report as JSON here (-: standard output).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal only).")
@click.version_option(__version__, prog_name="convert-cpu-weights")
def cli(input_path, output, input_type, quant_method, threadpool_count, cpuinfer_threads, no_merge, resume_layer,
        device, legacy_gpu, include_non_expert, overwrite, layers_spec, allow_nonfinite, json_path, progress):
    """Convert the routed experts of a MoE checkpoint into kt-kernel AMXINT4/AMXINT8 CPU weights.

    The output loads unchanged in SGLang-KT (--kt-method AMXINT4|AMXINT8 --kt-weight-path OUTPUT
    --kt-threadpool-count T) and in kt_runtime.load_experts. Re-running the same command resumes.
    """
    layers = None
    if layers_spec is not None:
        try:
            layers = parse_layer_spec(layers_spec)
        except ValueError as e:
            raise click.BadParameter(f"{e} (write layer numbers and ranges, e.g. 0-3,7)", param_hint="--layers")
    opts = ConvertOptions(input_path=input_path, output=output, input_type=input_type, quant_method=quant_method,
                          threadpool_count=threadpool_count, cpuinfer_threads=cpuinfer_threads, merge=not no_merge,
                          device=device, include_non_expert=include_non_expert, overwrite=overwrite,
                          allow_nonfinite=allow_nonfinite, progress=progress, resume_layer=resume_layer, layers=layers)
    report = convert(opts)
    click.echo(report.summary(), err=True)
    if report.nonfinite:
        click.echo(f"warning: {sum(report.nonfinite.values())} NaN/Inf source values packed as 0 "
                   f"in {len(report.nonfinite)} tensors (see the JSON report)", err=True)
    if json_path is not None:
        text = json.dumps(report.to_dict(), indent=2) + "\n"
        if str(json_path) == "-":
            click.echo(text, nl=False)
        else:  # a new file renamed into place: never written through a link
            atomic_write_text(Path(json_path), text)


INTERRUPTED = "interrupted; completed layers are kept; re-run the same command to resume"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: unwinds like Ctrl-C (the layer in progress is aborted, the lock released)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _SignalsUnwind:
    """Until restore(), SIGINT and SIGTERM raise Interrupted in the main thread, once: a second
    signal does not cut the clean-up short (it takes one batch write at most)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.previous = {}
        self.fired = False
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if not self.fired:
            self.fired = True
            raise Interrupted(signum)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _interrupted(e: BaseException) -> int:
    signum = getattr(e, "signum", signal.SIGINT)
    click.echo(INTERRUPTED, err=True)
    return 128 + signum


def main(argv: list[str] | None = None) -> int:
    signals = _SignalsUnwind()  # also covers the messages below: a second signal never prints a trace
    try:
        return _main(argv)
    finally:
        signals.restore()


def _main(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="convert-cpu-weights", standalone_mode=False)
        return EXIT_OK
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:
        e.show()
        return EXIT_USER
    except click.Abort as e:  # click turns KeyboardInterrupt into Abort
        if isinstance(e.__cause__, KeyboardInterrupt):
            return _interrupted(e.__cause__)
        click.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt as e:
        return _interrupted(e)
    except (UserError, UnsafePathError) as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_USER
    except OSError as e:  # the machine's, not ours: a full disk, a path that cannot be written, ...
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"error: {where}{e.strerror or e}; completed layers are kept, re-run the same command to resume",
                   err=True)
        return EXIT_USER
    except Exception as e:
        if isinstance(e, RuntimeError) and "can't start new thread" in str(e):  # threading under a limit
            click.echo(f"error: cannot start a thread ({e}): the system limits threads per user (ulimit -u) or "
                       "address space (ulimit -v); raise the limit or pass a smaller --cpuinfer-threads, then re-run "
                       "(completed layers are kept)", err=True)
            return EXIT_USER
        traceback.print_exc()
        click.echo("internal error: this is a bug in convert-cpu-weights; please report it with the trace above",
                   err=True)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
