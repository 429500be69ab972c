"""The command line: parse, call the library, render. Nothing else."""

from __future__ import annotations

import json
import signal
import sys

import click

from . import __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class JaccliGroup(click.Group):
    """Turns library errors into one `Error:` line (exit 1) unless --debug; Ctrl-C exits 130."""

    def invoke(self, ctx):
        from .errors import JaccliError

        try:
            return super().invoke(ctx)
        except JaccliError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            err = click.ClickException(str(e))
            err.exit_code = getattr(e, "exit_code", 1)
            raise err from None
        except KeyboardInterrupt:
            click.echo("Interrupted; no output was written.", err=True)
            sys.exit(143 if _terminated else 130)
        except BrokenPipeError:
            # the reader went away (| head): not an error of ours; silence the final flush too
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except MemoryError:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise click.ClickException("out of memory; lower --max-memory or use fewer samples") from None
        except OSError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise click.ClickException(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")) from None
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise click.ClickException(
                f"internal error ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                "run with --debug for the traceback and please report it"
            ) from None


@click.group(cls=JaccliGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="jaccli")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@click.pass_context
def main(ctx, debug):
    """Jacobians of ONNX models: input Jacobians and per-sample parameter Jacobians.

    \b
    Examples:
      jaccli inspect model.onnx
      jaccli input model.onnx data.npy -o J.npy
      jaccli params model.onnx data.npy -o G.npy
      jaccli check model.onnx data.npy
      cat data.npy | jaccli input model.onnx - -o - > J.npy
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    signal.signal(signal.SIGTERM, _on_sigterm)


_terminated = False


def _on_sigterm(signum, frame):
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def _memory(value):
    """'2GiB', '512M', '1e9' -> bytes."""
    s = str(value).strip().upper().replace(" ", "")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    for suffix in ("IB", "B"):
        if s.endswith(suffix) and len(s) > len(suffix):
            s = s[: -len(suffix)]
            break
    mult = 1
    if s and s[-1] in units:
        mult, s = units[s[-1]], s[:-1]
    try:
        n = float(s) * mult
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size like 2GiB, 512MiB or 1e9") from None
    if n <= 0:
        raise click.BadParameter("must be positive")
    return int(n)


_MAX_MEMORY = click.option("--max-memory", default="2GiB", show_default=True, callback=lambda c, p, v: _memory(v),
                           help="Cap on working memory; work is chunked over samples and directions to fit.")


def _common(f):
    options = [
        click.argument("model", type=click.Path(dir_okay=False)),
        click.argument("data", type=click.Path(dir_okay=False, allow_dash=True)),
        click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True),
                     help="Where to write the Jacobian (.npy, .npz, .csv; '-' for stdout). Without it, only the summary."),
        click.option("--format", "fmt", type=click.Choice(["npy", "npz", "csv"]), help="Output format; overrides the extension."),
        click.option("--of", help="Output, or any value in the graph, to differentiate (default: the first float tensor output)."),
        click.option("--outputs", "outputs_slice", metavar="SLICE",
                     help="Only these elements of the flattened per-sample output, e.g. 0:5."),
        click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
                     help="Precision of the computation and the result."),
        _MAX_MEMORY,
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of tables."),
        click.option("-q", "--quiet", is_flag=True, help="Print no summary."),
        click.option("--strict", is_flag=True, help="Refuse data with NaN or Inf values instead of warning."),
        click.option("--straight-through", is_flag=True,
                     help="Pass derivatives through QuantizeLinear-DequantizeLinear pairs as the identity inside the "
                          "integer range (quantization-aware training's estimator), not their true derivative, zero."),
        _SAMPLE_AXIS,
        _ONE_BY_ONE,
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _sample_axes(specs):
    """{input: axis} from --sample-axis NAME=AXIS options (AXIS a number, or none)."""
    axes = {}
    for spec in specs:
        name, sep, axis = spec.rpartition("=")
        whole = axis.strip().lower() == "none"
        if not sep or not name or not (whole or axis.strip().lstrip("-").isdigit()):
            raise click.BadParameter(f"{spec!r}: expected NAME=AXIS, e.g. state=1, or NAME=none",
                                     param_hint="--sample-axis")
        axes[name] = "none" if whole else int(axis)
    return axes


_SAMPLE_AXIS = click.option("--sample-axis", "sample_axes", multiple=True, metavar="NAME=AXIS",
                            help="Input NAME carries the samples on AXIS of the model's layout (a recurrent state "
                                 "(layers, N, hidden): state=1); its data comes in that layout. NAME=none: its data "
                                 "is one sample, with no sample axis (a graph network's atoms; a model exported "
                                 "without a batch), shared by the other inputs' samples. NAME * is every input not "
                                 "named. Repeatable.")
_ONE_BY_ONE = click.option("--one-by-one", is_flag=True,
                           help="Run each sample alone, as a batch of one, as if the model were exported with a batch "
                                "of 1: where its batch statistics mix samples (a dynamically quantized model's scale "
                                "over the batch, a branch on a batch-wide sum), each sample's Jacobian as the model "
                                "computes it for that sample alone.")


def _console(to_stdout_data):
    from rich.console import Console

    return Console(stderr=True) if to_stdout_data else Console()


def _read(model, data, max_memory, strict, dtype="float64", of=None, wrt=None, every_output=False, sample_axes=None,
          one_by_one=False):
    """Load the model, check its operators, then read the data, checked against the inputs that
    the output (or, for a check, every float output) depends on; `wrt` an input among them.
    Returns the model, the data as prepared for it and the data as read."""
    from . import io as jio
    from .drivers import prepare_feeds
    from .errors import DataError
    from .model import NO_SAMPLE_AXIS, load
    from .plan import require_rules

    m = load(model, max_bytes=max_memory, sample_axes=sample_axes, one_by_one=one_by_one)
    outs = ([v.name for v in m.outputs if v.is_float] if every_output and of is None else []) or [m.output(of).name]
    require_rules(m.ancestors(outs))
    where = "stdin" if data == "-" else data
    targets = outs + ([wrt] if wrt else [])
    needed = m.inputs_of(targets)
    raw = jio.read_data(data)
    if not any(m.sample_axes.get(v.name) == NO_SAMPLE_AXIS for v in needed):  # its data is one sample, not rows
        raw = jio.shape_csv_rows(raw, needed)
    x, _ = prepare_feeds(m, raw, dtype, source=where, of=targets)
    bad = jio.nonfinite_count(x)
    if bad:
        if strict:
            raise DataError(f"{where}: {bad} NaN or Inf value(s); refused (--strict)")
        click.echo(f"warning: {where}: {bad} NaN or Inf value(s); their samples' Jacobians are NaN unless the model "
                   f"replaces them (an Imputer, a tree's missing-value branch)", err=True)
    return m, x, raw


def _run(kind, model, data, output, fmt, as_json, quiet, strict, max_memory, dtype, of, compute, sample_axes=(),
         one_by_one=False):
    """Read data, compute block by block into a file target (if any), summarize as blocks come,
    commit atomically."""
    from . import io as jio
    from .errors import UsageError
    from .summary import Summary

    if output == "-" and fmt in (None, "npy", "npz") and sys.stdout.isatty():
        raise UsageError("refusing to write binary data to a terminal; redirect stdout (> J.npy) or use --format csv")
    fmt = jio.output_format(output, fmt) if output else None
    m, x, _ = _read(model, data, max_memory, strict, dtype, of, sample_axes=_sample_axes(sample_axes), one_by_one=one_by_one)
    target = jio.FileTarget(output, fmt) if output else jio.NullTarget()
    console = _console(output == "-")
    summaries = []  # one, made from the result when its first block arrives (none with --quiet)
    progress = _Progress(enabled=not quiet and _console(True).is_terminal)

    def on_block(result, a, b, block, rows):
        if not quiet:
            if not summaries:
                summaries.append(Summary(result))
            summaries[0].update(block, rows)
        progress.advance(a + (b - a) * rows[1] / result.flat_shape[1], result.shape[0])  # rows: a sample in parts

    try:
        result = compute(m, x, target, on_block)
        if output:
            target.commit(result)
    except BaseException:
        if output:
            target.abort()
        raise
    finally:
        progress.stop()
    if not quiet:
        d = (summaries[0] if summaries else Summary(result)).finish()
        if as_json:
            console.print_json(json.dumps(d)) if output != "-" else click.echo(json.dumps(d), err=True)
        else:
            from .report import render_summary

            render_summary(console, d)
            if output and output != "-":
                console.print(f"wrote {output} ({fmt})" + (f" and {jio.columns_path(output)}" if kind == "params" and fmt in ("npy", "csv") else ""))


class _Progress:
    """A rich progress bar on stderr for runs longer than about a second (samples done, rate,
    time left); nothing when stderr is not a terminal or with --quiet."""

    def __init__(self, enabled):
        import time

        self.enabled, self.start, self.bar, self.task = enabled, time.monotonic(), None, None

    def advance(self, done, total):
        import time

        if not self.enabled or done >= total and self.bar is None:
            return
        if self.bar is None and time.monotonic() - self.start > 1.0:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn
            from rich.progress import TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("samples"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=_console(True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("jacobian", total=total, rate="")
        if self.bar is not None:
            rate = done / max(time.monotonic() - self.start, 1e-9)
            self.bar.update(self.task, completed=done, rate=f"{rate:,.0f} samples/s" if rate >= 10 else f"{rate:.2g} samples/s")

    def stop(self):
        if self.bar is not None:
            self.bar.stop()


@main.command("input", context_settings=CONTEXT)
@_common
@click.option("--wrt", help="Model input, or any float value in the graph, to differentiate with respect to "
                           "(default: the first float input), e.g. the embeddings of token ids.")
@click.option("--mode", type=click.Choice(["auto", "forward", "reverse"]), default="auto", show_default=True,
              help="Forward (one pass per input element) or reverse (one per output element); auto picks the cheaper.")
@click.option("--flat", is_flag=True, help="Shape (N, n_out, n_in) instead of (N, *out_shape, *in_shape).")
def input_cmd(model, data, output, fmt, of, outputs_slice, dtype, max_memory, as_json, quiet, strict, straight_through,
              sample_axes, one_by_one, wrt, mode, flat):
    """Input Jacobian dy/dx for every sample: shape (N, *out_shape, *in_shape).

    DATA is .npy (N, *input_shape) or one sample, .npz (one array per model input), or
    .csv (one row of flattened features per sample); '-' reads stdin.

    \b
    Examples:
      jaccli input model.onnx x.npy -o J.npy
      jaccli input model.onnx x.csv -o J.csv --of logits --outputs 0:3
      cat x.npy | jaccli input model.onnx - -o - > J.npy
    """
    from .drivers import input_jacobian

    def compute(m, x, target, on_block):
        return input_jacobian(m, x, wrt=wrt, of=of, mode=mode, dtype=dtype, outputs=outputs_slice, flat=flat,
                              max_memory=max_memory, target=target, return_result=True, on_block=on_block,
                              straight_through=straight_through)

    _run("input", model, data, output, fmt, as_json, quiet, strict, max_memory, dtype, of, compute, sample_axes, one_by_one)


@main.command("params", context_settings=CONTEXT)
@_common
@click.option("--param", "params", multiple=True, metavar="GLOB",
              help="Only parameters whose name matches (repeatable), e.g. --param 'fc2.*'.")
def params_cmd(model, data, output, fmt, of, outputs_slice, dtype, max_memory, as_json, quiet, strict, straight_through,
               sample_axes, one_by_one, params):
    """Per-sample parameter Jacobian dy/dθ: shape (N, *out_shape, P).

    Columns follow the model's initializer order, each tensor flattened in C order. A
    column map (name, shape, offset, size) is written beside the output as
    NAME.columns.json (inside the archive for .npz).

    \b
    Examples:
      jaccli params model.onnx x.npy -o G.npy
      jaccli params model.onnx x.npy -o G.npz --param 'fc*.weight'
    """
    from .drivers import param_jacobian

    def compute(m, x, target, on_block):
        return param_jacobian(m, x, params=params or None, of=of, dtype=dtype, outputs=outputs_slice,
                              max_memory=max_memory, target=target, return_result=True, on_block=on_block,
                              straight_through=straight_through)

    _run("params", model, data, output, fmt, as_json, quiet, strict, max_memory, dtype, of, compute, sample_axes, one_by_one)


@main.command("inspect", context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect_cmd(model, as_json):
    """Inputs, outputs, parameters and operators of MODEL, and which operators are supported.

    Exits 1 if an operator that an output depends on is unsupported.

    \b
    Example:
      jaccli inspect model.onnx
    """
    from .inspect import describe

    info = describe(model)
    if as_json:
        click.echo(json.dumps(info, indent=1))
    else:
        from rich.console import Console

        from .report import render_inspect

        render_inspect(Console(), info)
    if not all(op["supported"] for op in info["operators"]):
        sys.exit(1)


@main.command("check", context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--params", "params", is_flag=True, help="Check the parameter Jacobian instead of the input Jacobian.")
@click.option("--samples", default=3, show_default=True, help="How many samples to check.")
@click.option("--entries", default=64, show_default=True, help="Input elements or parameter entries sampled per check.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--tolerance", type=float, help="Relative error allowed (default 1e-3 in float32, 1e-6 in float64).")
@click.option("--outputs", "outputs_slice", metavar="SLICE",
              help="Only these elements of the flattened per-sample output, e.g. 0:5 (default: all, or 64 evenly "
                   "spread where there are more).")
@click.option("--of", help="Only this output or graph value (default: every float tensor output).")
@click.option("--wrt", help="The input, or float value in the graph (token embeddings), of the input Jacobian.")
@_SAMPLE_AXIS
@_ONE_BY_ONE
@_MAX_MEMORY
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def check_cmd(model, data, params, samples, entries, dtype, tolerance, outputs_slice, of, wrt, sample_axes, one_by_one,
              max_memory, as_json):
    """Our Jacobian against onnxruntime central differences on a few samples (onnx's reference
    evaluator's where onnxruntime cannot run the model); exit 1 above tolerance.

    \b
    Examples:
      jaccli check model.onnx x.npy
      jaccli check model.onnx x.npy --params --dtype float64
    """
    from .oracle import check

    if wrt and params:
        raise click.UsageError("--wrt names what an input Jacobian is taken with respect to; --params checks parameters")
    axes = _sample_axes(sample_axes)
    _, _, x = _read(model, data, None, True, of=of, wrt=wrt, every_output=True, sample_axes=axes, one_by_one=one_by_one)
    d = check(model, x, params=params, samples=samples, entries=entries, dtype=dtype, tolerance=tolerance,
              outputs=outputs_slice, of=of, wrt=wrt, sample_axes=axes, one_by_one=one_by_one, max_memory=max_memory)
    if as_json:
        click.echo(json.dumps(d, indent=1))
    else:
        from rich.console import Console

        from .report import render_check

        render_check(Console(), d)
    if not d["ok"]:
        sys.exit(1)


@main.command("ops", context_settings=CONTEXT)
def ops_cmd():
    """List the supported operators with their domains and opset ranges."""
    from rich.console import Console
    from rich.table import Table

    from .rules import all_rules

    t = Table(title="Supported operators")
    t.add_column("domain")
    t.add_column("operator")
    t.add_column("rules from opset")
    t.add_column("derivatives")
    for domain, op, sinces, diff in all_rules():
        t.add_row(domain or "ai.onnx", op, ", ".join(map(str, sinces)), "yes" if diff else "no (constant)")
    Console().print(t)
