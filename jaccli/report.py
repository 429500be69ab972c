"""Rendering of summaries as rich tables. The library computes; only this module draws."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(x):
    if x == float("inf"):
        return "∞"
    return f"{x + 0.0:.4g}"  # + 0.0: a zero reached from below prints as 0, not -0


def _shape(s):
    return "(" + ", ".join(str(d) for d in s) + ")"


def render_summary(console: Console, d: dict):
    kind = "Input Jacobian" if d["kind"] == "input" else "Per-sample parameter Jacobian"
    head = Table(title=f"{kind}: ∂{d['output']}/∂{d['wrt'] if d['kind'] == 'input' else 'θ'}", show_header=False, box=None)
    head.add_column(style="bold")
    head.add_column()
    head.add_row("jacobian shape", f"{_shape(d['jacobian_shape'])} {d['dtype']}")
    head.add_row("per sample", f"{d['rows_per_sample']} outputs × {d['columns_per_sample']} "
                 + ("inputs" if d["kind"] == "input" else "parameters"))
    head.add_row("mode", d["mode"] + (" (chunks: %d samples × %d directions)" % (d["chunk_samples"], d["chunk_directions"])))
    head.add_row("time", f"{d['seconds']:.3f} s")
    head.add_row("exact zeros", f"{100 * d['zero_share']:.1f} % of entries")
    console.print(head)

    if d["stats"]:
        t = Table(title=f"Per-sample statistics over {d['samples']} samples (units of output per unit of "
                  + ("input)" if d["kind"] == "input" else "parameter)"))
        t.add_column("statistic")
        for col in ("mean", "min", "median", "max"):
            t.add_column(col, justify="right")
        labels = {"frobenius_norm": "Frobenius norm ‖J‖_F", "spectral_norm": "spectral norm σ_max",
                  "smallest_singular_value": "smallest singular value σ_min", "condition_number": "condition number σ_max/σ_min"}
        for k, v in d["stats"].items():
            t.add_row(labels[k], *(_fmt(v[c]) for c in ("mean", "min", "median", "max")))
        console.print(t)

    if d["kind"] == "input":
        t = Table(title="Most influential input elements (mean |∂y/∂x| over samples and outputs)")
        t.add_column("input element")
        t.add_column("mean |J|", justify="right")
        t.add_column("share of Σ|J|", justify="right")
        for e in d["top_inputs"]:
            label = f" “{e['label']}”" if "label" in e else ""  # the n-gram a count is of
            t.add_row(f"{d['wrt']}[{', '.join(map(str, e['index']))}]{label}", _fmt(e["mean_abs"]), f"{100 * e['share']:.1f} %")
        console.print(t)
    else:
        t = Table(title="Parameter tensors: share of the squared gradient norm ‖∂y/∂θ‖²")
        t.add_column("parameter")
        t.add_column("shape")
        t.add_column("entries", justify="right")
        t.add_column("share", justify="right")
        for p in sorted(d["parameters"], key=lambda p: -p["grad_norm_share"]):
            t.add_row(_parameter(p), _shape(p["shape"]), str(p["size"]), f"{100 * p['grad_norm_share']:.1f} %")
        console.print(t)
    for note in d["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")


def _parameter(p):
    """A parameter's name, with what torch.export's optimizer folded it from (see model._export_roles)
    or into it (a BatchNorm, see model._batchnorm_folded), or the node that reads one the
    TorchScript exporter folded (see Model.parameter_entry)."""
    return p["name"] + (f" (folded from {', '.join(p['folded_from'])})" if p.get("folded_from") else "") + (
        f" (BatchNorm {_module(p['batchnorm_folded_in'][0])} folded in)" if p.get("batchnorm_folded_in") else "") + (
        f" (read by {p['read_by'][0]})" if p.get("read_by") else "")


def _module(name):
    """The module of a parameter's or buffer's name (bn of bn.running_var), or the name itself."""
    return name.rpartition(".")[0] or name


def render_inspect(console: Console, info: dict):
    t = Table(title=f"Model {info['path']}  (producer {info['producer'] or '?'}, opsets {info['opsets']})")
    t.add_column("kind")
    t.add_column("name")
    t.add_column("type and shape")
    for v in info["inputs"]:
        t.add_row("input", v["name"], v["type"])
    for v in info["outputs"]:
        t.add_row("output", v["name"], v["type"])
    console.print(t)
    p = Table(title=f"Parameters: {len(info['parameters'])} tensors, {info['n_parameters']} entries")
    p.add_column("name")
    p.add_column("shape")
    p.add_column("entries", justify="right")
    for q in info["parameters"]:
        p.add_row(_parameter(q), _shape(q["shape"]), str(q["size"]))
    console.print(p)
    o = Table(title="Operators")
    o.add_column("operator")
    o.add_column("opset", justify="right")
    o.add_column("nodes", justify="right")
    o.add_column("status")
    for op in info["operators"]:
        o.add_row(op["op"], str(op["opset"]), str(op["count"]),
                  "[green]supported[/green]" if op["supported"] else f"[red]unsupported[/red] ({op['first_node']})")
    console.print(o)
    if info.get("fixed_batch"):
        b = info["fixed_batch"]
        console.print(f"[yellow]note:[/yellow] an input declares a batch of {b}: where the graph bakes it in, the samples "
                      + ("run one at a time" if b == 1 else f"run in runs of {b}, the last padded with copies of its last sample"))
    if info.get("expanded"):
        names = ", ".join(f"{op} ({n} node{'s' if n > 1 else ''})" for op, n in info["expanded"].items())
        console.print(f"[yellow]note:[/yellow] replaced by their ONNX function bodies, whose operators are listed above: {names}")
    if info.get("nchwc"):
        names = ", ".join(f"{op} ({n})" for op, n in info["nchwc"].items())
        console.print(f"[yellow]note:[/yellow] saved by onnxruntime in its NCHWc layout (com.microsoft.nchwc: {names}); read as "
                      f"the standard operators listed above, on the channels padded to its block; a weight keeps its padded "
                      f"channels, stored zeros whose columns a parameter Jacobian holds too")
    for name, axis in (info.get("sample_axes") or {}).items():
        if axis == "none":
            console.print(f"[yellow]note:[/yellow] input '{name}' has no sample axis: its data is one sample whole")
            continue
        console.print(f"[yellow]note:[/yellow] input '{name}' declares its batch on axis {axis}: its data comes in that layout "
                      f"(samples on axis {axis}), and each sample's Jacobian leaves that axis out")
    if info.get("held_weights"):
        console.print(f"[yellow]note:[/yellow] the model keeps its weights in {info['held_weights']} float Constant nodes and has no "
                      f"float initializer; those constants are its parameters")
    if info.get("hoisted_weights"):
        console.print(f"[yellow]note:[/yellow] {info['hoisted_weights']} float initializer(s) kept inside sub-graphs (a Loop's or "
                      f"Scan's body, an If's branches) count as the model's, read by the sub-graph from outside: parameters "
                      f"like the main graph's (by default those of rank 1 and more)")
    if info.get("untied_weights"):
        console.print(f"[yellow]note:[/yellow] {info['untied_weights']} Identity copies of a weight read more than once are "
                      f"tensors of their own, under the copies' names: the TorchScript exporter keeps one tensor of "
                      f"parameters equal when exported (a fresh model's zero biases, a BatchNorm's scale and running "
                      f"variance) and ties the others to it by name")
    if info.get("unmerged_weights"):
        console.print(f"[yellow]note:[/yellow] {info['unmerged_weights']} parameters that torch.export's optimizer merged into "
                      f"an equal one (it keeps one tensor of several equal ones, as a fresh model's LayerNorm weights) are "
                      f"tensors of their own again, under their own names, as the exporter's records of the calls and "
                      f"modules that read them say")
    if info.get("restored_weights"):
        console.print(f"[yellow]note:[/yellow] {info['restored_weights']} parameters that the exporter stored in another layout "
                      f"(a Linear's weight transposed for a MatMul, a GroupNorm's scale as (C, 1, 1), an LSTM's gates "
                      f"reordered) are read in their own, under their own names, through a Transpose, Reshape or Gather: "
                      f"their columns are the framework's parameters', and a tied weight's derivatives add up in one")
    if info.get("removed_parameters"):
        from .model import removed_note

        console.print(f"[yellow]note:[/yellow] {removed_note(info['removed_parameters'])}")
    if info.get("batchnorm_folded"):
        from .model import fused_note

        console.print(f"[yellow]note:[/yellow] {fused_note(info['batchnorm_folded'])}")
    if info.get("attribute_params"):
        console.print(f"[yellow]note:[/yellow] {', '.join(info['attribute_params'])}: weights that ai.onnx.ml operators hold "
                      f"as attributes, made parameters (a linear model's coefficients and intercepts, an SVR's "
                      f"coefficients and rho)")
    if info.get("quantized_values"):
        console.print(f"[yellow]note:[/yellow] {info['quantized_values']} QuantizeLinear, DynamicQuantizeLinear, "
                      f"DynamicQuantizeMatMul or MatMulNBits (accuracy_level 4) node(s) quantize values, not weights: an "
                      f"integer is piecewise constant, so "
                      f"derivatives stop there; --straight-through passes quantize-dequantize pairs as the identity, as "
                      f"quantization-aware training does")


def render_check(console: Console, d: dict):
    t = Table(title=f"Check of the {d['kind']} Jacobian against {d.get('oracle', 'onnxruntime')}'s central differences "
              f"({d['samples']} samples, step {d['step']:.1e}, {d['oracle_dtype']})")
    t.add_column("output")
    t.add_column("max |J - J_fd|", justify="right")
    t.add_column("max |J_fd|", justify="right")
    t.add_column("entries rel. error", justify="right")
    t.add_column("directions rel. error", justify="right")
    t.add_column("forward max |y - y_oracle|", justify="right")
    t.add_column("verdict")
    from .oracle import _verdict, verdict

    colour = {"pass": "[green]pass[/green]", "FAIL": "[red]FAIL[/red]", "unclear": "[yellow]unclear[/yellow]"}
    verdicts = [verdict(r, d["tolerance"]) for r in d["rows"]]
    for r, v in zip(d["rows"], verdicts):
        t.add_row(r["output"], _fmt(r["max_abs_error"]), _fmt(r["max_abs"]),
                  _fmt(r["entry_error"]) if r.get("entries_judged", True) else "—",
                  _fmt(r["directional_error"]) if r.get("directions_judged", True) else "—",
                  _fmt(r["forward_error"]), colour[v])
    console.print(t)
    if d.get("oracle_note"):
        console.print(f"[yellow]note:[/yellow] {d['oracle_note']}")
    for line in d.get("skipped", ()):
        console.print(f"[yellow]note:[/yellow] {line}")
    for r in d["rows"]:
        if r.get("rows"):
            c = r["rows"]
            console.print(f"rows ({r['output']}): {c['checked']} of its {c['of']} output elements, evenly spread "
                          f"(--outputs {c['slice']}); --outputs chooses others")
    for r, v in zip(d["rows"], verdicts):
        if r.get("jumps"):
            console.print(f"[yellow]note:[/yellow] {r['output']}: {r['jumps']} of the differences checked (sample by column) "
                          f"cross a jump of the model at the point (differences growing as 1/step: a Cast to an integer, a one-hot category, a "
                          f"threshold met exactly), where no derivative exists; they are not judged")
        if r.get("branch_points"):
            console.print(f"[yellow]note:[/yellow] {r['output']}: {r['branch_points']} of the differences checked (sample by "
                          f"column) move a value that sits exactly on a kink or a branch of the model at the point "
                          f"({', '.join(r['ties_at'][:3])}{' ...' if len(r['ties_at']) > 3 else ''}: a Relu or a Clip of exact "
                          f"zeros, a mask of padding, a window's maximum tied, the square root of a distance of 0); jaccli's derivative "
                          f"there is one side's, as TensorFlow's and PyTorch's are (NaN at a distance of 0, where no side has one), and "
                          f"central differences see the other side, or both: they are not judged")
        if v == "unclear" and r.get("quantized_zero"):
            console.print(f"unclear ({r['output']}): every path to it from what is differentiated passes a "
                          f"{r['quantized_zero']}, whose output is an integer: the Jacobian is zero where it exists, and "
                          f"differences only cross the levels' jumps; input and params with --straight-through "
                          f"differentiate through quantize-dequantize pairs, as quantization-aware training does")
        elif v == "unclear" and not (r.get("entries_judged", True) or r.get("directions_judged", True)):
            console.print(f"unclear ({r['output']}): every difference crosses a jump of the model")
        elif v == "unclear" and _verdict(r, d["tolerance"]) == "FAIL":
            console.print(f"unclear ({r['output']}): ours is off from the {d['oracle_dtype']} oracle's differences, but the second "
                          f"look below passes, the forward passes agree, and the {d.get('dtype', 'float32')} Jacobian is within "
                          f"the tolerance of the float64 one: the oracle's steps cross kinks, or round")
        elif v == "unclear" and r["max_abs_error"] <= r["noise"] and r.get("max_abs_direction_error", 0) <= r["noise"]:
            console.print(f"unclear ({r['output']}): every difference is within the {d['oracle_dtype']} oracle's own rounding "
                          f"(about {r['noise']:.1e} here), so this oracle cannot tell at this tolerance")
        elif v == "unclear":
            console.print(f"unclear ({r['output']}): ours is about as close to the {d['oracle_dtype']} oracle's differences as "
                          f"they are to each other: for 9 in 10 columns its three steps differ by up to "
                          f"{r.get('entry_spread', 0):.1e} (entries) and {r.get('direction_spread', 0):.1e} (directions), its "
                          f"rounding and the kinks its steps cross, and ours is within twice that, so this oracle cannot tell "
                          f"at this tolerance")
    for r in d["rows"]:
        own = r.get("own")
        if r.get("own_skipped"):
            console.print(f"second look ({r['output']}) skipped, the verdict is the oracle's: in float64 {r['own_skipped']}")
        if own:
            colour_own = colour[own["verdict"]]
            console.print(f"second look ({r['output']}): jaccli's Jacobian in float64 against central differences of its own "
                          f"forward in float64, steps {', '.join(f'{h:.0e}' for h in own['steps'])} (past most kinks): "
                          f"{colour_own}, relative errors {_fmt(own['entry_error'])} (entries) and "
                          f"{_fmt(own['directional_error'])} (directions). It checks the derivative rules against jaccli's "
                          f"forward, which the forward column checks against the oracle. The {d.get('dtype', 'float32')} "
                          f"Jacobian is within {_fmt(own.get('precision', 0.0))} of the float64 one (of its largest entry)")
            if own.get("precision", 0.0) > d["tolerance"]:
                console.print(f"[yellow]note:[/yellow] {r['output']}: the {d.get('dtype', 'float32')} Jacobian is further than the "
                              f"tolerance from the float64 one: rounding in this model (values of very different sizes) "
                              f"spoils it; --dtype float64 computes it to that precision")
    console.print(f"pass: the better of the two relative errors (max |J - J_fd| / max |J_fd| over sampled entries, and "
                  f"over random directions J v) ≤ {d['tolerance']:.0e}, the other ≤ {10 * d['tolerance']:.0e}; "
                  f"steps {d['step']:.0e} × (4, 1, 1/4), relative to the values perturbed")
