"""jaccli against torch.func on the same CPU: input and per-sample parameter Jacobians.

    make bench                      # everything: timings, memory, bounded-memory runs
    python bench/bench.py --quick   # fewer repeats
    python bench/bench.py --quick --only lenet   # some networks, timings only

Each network is built in PyTorch and exported to ONNX (TorchScript exporter, opset 17,
BatchNormalization kept), then timed side by side in one process with the same thread count,
warm, in blocks that alternate over five rounds, with a pause before each block (thread pools spin after their calls):
jaccli's Python API against vmap(jacrev), and vmap(jacfwd) where the input is at most four times
the output (elsewhere it cannot win and runs out of memory), for input Jacobians, and against
vmap(jacrev) over functional_call, assembled into the same (N, n_out, P) array, for per-sample
parameter Jacobians. Times are medians after a warm-up; a ratio is the median over the rounds of
the ratio within each (this machine's slow spells last minutes). Both results are checked to agree.
Peak memory is measured in a fresh process per run. The machine's limits are measured here:
the float32 matmul peak and the bandwidth of writing fresh memory.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "sample_models"))  # torch_models
THREADS = 2
PARAM_LIMIT = 1 << 30  # per-sample parameter Jacobians larger than this are taken on a slice of outputs
TARGET_INPUT, TARGET_PARAMS, TARGET_BANDWIDTH = 0.7, 0.5, 3.0


# ---- the networks ------------------------------------------------------------------------------


def networks():
    from torch import nn
    from torch_models import Encoder, ResNet, mlp

    lenet = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    return {
        "mlp_784_256_256_10_tanh": (lambda: mlp([784, 256, 256, 10], nn.Tanh), (784,), 64),
        "mlp_1024_768_768_1024_relu": (lambda: mlp([1024, 768, 768, 1024], nn.ReLU), (1024,), 32),
        "lenet_1x28x28": (lambda: lenet, (1, 28, 28), 64),
        "resnet_bn_3x32x32": (lambda: ResNet(channels=16, classes=10, downsample=False), (3, 32, 32), 16),
        "transformer_s16_d64_h4": (lambda: Encoder(d=64, heads=4, ff=128), (16, 64), 8),
        "regression_8_64_64_1_tanh": (lambda: mlp([8, 64, 64, 1], nn.Tanh), (8,), 256),
    }


def build(name):
    """(torch model, ONNX proto, x as a torch tensor) for one network, seeded."""
    import onnx
    import torch

    from torch_models import trained_looking_norms

    torch.manual_seed(0)
    make, shape, n = networks()[name]
    model = make().eval()
    trained_looking_norms(model)
    x = torch.randn(n, *shape)
    f = io.BytesIO()
    torch.onnx.export(model, (x,), f, opset_version=17, dynamo=False, input_names=["x"], output_names=["y"],
                      do_constant_folding=False, dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return model, onnx.load_from_string(f.getvalue()), x


# ---- the two contenders ------------------------------------------------------------------------------


def torch_input(model, x, mode):
    from torch.func import jacfwd, jacrev, vmap

    def f(xi):
        return model(xi[None])[0]

    jac = jacrev if mode == "reverse" else jacfwd
    return lambda: vmap(jac(f))(x)


def param_outputs(model, x):
    """How many output elements the per-sample parameter Jacobian covers (all, unless too large)."""
    import torch

    with torch.no_grad():
        n_out = model(x[:1]).numel()
    P = sum(p.numel() for p in model.parameters())
    k = n_out if len(x) * n_out * P * 4 <= PARAM_LIMIT else max(1, PARAM_LIMIT // (len(x) * P * 4))
    return k, n_out, P


def torch_params(model, x, k):
    import torch
    from torch.func import functional_call, jacrev, vmap

    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def g(p, xi):
        return functional_call(model, (p, buffers), (xi[None],))[0].reshape(-1)[:k]

    def run():
        d = vmap(jacrev(g), in_dims=(None, 0))(params, x)
        return torch.cat([d[name].reshape(len(x), k, -1) for name in params], dim=-1)  # (N, k, P)

    return run


def jaccli_input(model, x):
    import jaccli

    return lambda: jaccli.input_jacobian(model, x)


def jaccli_params(model, x, k, n_out):
    import jaccli

    sel = None if k == n_out else f"0:{k}"
    return lambda: jaccli.param_jacobian(model, x, outputs=sel)[0]


def median_times(fns, repeats, rounds=5, rest=0.5):
    """Each function's median time per block: blocks of warm calls, a pause before each (each
    framework's thread pool spins for a while after its calls and would slow the other), a
    warm-up call, then `repeats` timed calls (more for a fast function: a block lasts 0.2 s at
    least). The blocks alternate over several rounds. Returns, per function, its block medians
    in round order: a ratio is taken within each round, where a slow spell of this shared
    machine (minutes long) falls on both contenders alike, then its median over the rounds."""
    blocks = [[] for _ in fns]
    for _ in range(rounds):
        for fn, bm in zip(fns, blocks):
            time.sleep(rest)
            t = time.perf_counter()
            fn()
            warm = time.perf_counter() - t
            ts = []
            for _ in range(max(repeats, min(100, int(0.2 / max(warm, 1e-6))))):
                t = time.perf_counter()
                out = fn()
                ts.append(time.perf_counter() - t)
                del out
            bm.append(float(np.median(ts)))
    return [np.array(bm) for bm in blocks]


def paired(mine, theirs):
    """Median time of each, the median over rounds of the ratio within each round, and the
    least and greatest of those ratios."""
    r = mine / theirs
    return float(np.median(mine)), float(np.median(theirs)), float(np.median(r)), (float(r.min()), float(r.max()))


# ---- the machine's limits ------------------------------------------------------------------------------


def limit(flops, nbytes, limits, seconds):
    """The machine's limit for a Jacobian (its multiply-adds at the matmul peak, or its bytes at
    the fresh-memory write bandwidth, whichever is larger), which bounds it, and a time over it."""
    t_flops, t_write = flops / limits["matmul_flops"], nbytes / limits["write_fresh"]
    bound = max(t_flops, t_write)
    return {"x_bound": seconds / bound, "limit_s": bound, "bound": "flops" if t_flops > t_write else "write"}


def machine_limits():
    """float32 matmul peak (FLOP/s) and the bandwidth of writing fresh and warm memory (B/s)."""
    from jaccli.drivers import allocate

    a = np.random.rand(2048, 2048).astype(np.float32)
    a @ a
    best = float("inf")
    for _ in range(9):  # a peak: the best call (this machine has slow spells of minutes)
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    flops = 2 * 2048**3 / best
    size = 512 << 20
    fresh = []
    for _ in range(3):
        t = time.perf_counter()
        buf = allocate((size // 4,), np.float32)
        buf[...] = 1.0
        fresh.append(size / (time.perf_counter() - t))
        del buf
    warm_buf = np.ones(size // 4, np.float32)
    t = time.perf_counter()
    warm_buf[...] = 2.0
    warm = size / (time.perf_counter() - t)
    return {"matmul_flops": flops, "write_fresh": max(fresh), "write_warm": warm, "blas": numpy_blas()}


def numpy_blas():
    """numpy's BLAS and the kernels it runs, e.g. "OpenBLAS 0.3.31, SkylakeX kernels" (threadpoolctl)."""
    from threadpoolctl import threadpool_info

    for lib in threadpool_info():
        if lib.get("user_api") == "blas" and "numpy" in lib.get("filepath", ""):
            name = {"openblas": "OpenBLAS", "mkl": "MKL", "blis": "BLIS"}.get(lib["internal_api"], lib["internal_api"])
            arch = lib.get("architecture")
            return f"{name} {lib.get('version')}" + (f", {arch} kernels" if arch else "")
    return "unknown"


def work(model_proto, x, kind, k=None):
    """Multiply-adds (x2 = FLOPs) and bytes written of one Jacobian, from jaccli's plan."""
    import jaccli

    m = jaccli.load(model_proto)
    N = len(x)
    if kind == "input":
        r = jaccli.input_jacobian(m, x, return_result=True)
        T = r.J.shape[2] if r.mode == "forward" else r.J.shape[1]
    else:
        r = jaccli.param_jacobian(m, x, outputs=None if k is None else f"0:{k}", return_result=True)
        T = r.J.shape[1]
    return 2 * r.estimate["flops_per_direction"] * T * N, r.J.nbytes, r.mode


# ---- peak memory in a fresh process ------------------------------------------------------------------


def peak_memory(name, kind, who):
    """Peak resident memory of a run, above the process after setup (MiB)."""
    out = subprocess.run([sys.executable, __file__, "--memory-child", name, kind, who], capture_output=True, text=True,
                         timeout=900)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return float("nan")


def memory_child(name, kind, who):
    import torch

    torch.set_num_threads(THREADS)
    model, proto, x = build(name)
    import jaccli

    m = jaccli.load(proto)
    xn = x.numpy()
    k, n_out, _ = param_outputs(model, x)
    if who == "torch":
        fn = torch_input(model, x, "reverse") if kind == "input" else torch_params(model, x, k)
    else:
        fn = jaccli_input(m, xn) if kind == "input" else jaccli_params(m, xn, k, n_out)
    # from before the first call: jaccli's allocator keeps freed arrays for reuse (and torch's
    # caches its own), so a second call may need no new memory at all; the peak over the first
    # two calls is what the work needs (plans and thread pools, small, included)
    base = _rss_reset()
    fn()
    result = fn()
    peak = _hwm()
    del result
    print((peak - base) / 1024)


def _rss_reset():
    """Reset the peak resident size to the current one (Linux: /proc/self/clear_refs), return it (KiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _hwm():
    return _status("VmHWM")


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


# ---- bounded memory: outputs larger than the cap ---------------------------------------------------


def bounded_memory_runs(tmp):
    """The CLI on a million samples of the regression network and on a CNN parameter Jacobian
    several times the cap: peak memory above the process that has imported jaccli and loaded the
    model (the CLI then reads the data itself: the data's size counts too), and the result
    against an unchunked run."""
    import onnx
    import torch

    import jaccli

    rows = []
    for name, kind, n, cap in (("regression_8_64_64_1_tanh", "input", 1_000_000, "256MiB"),
                               ("lenet_1x28x28", "params", 2000, "256MiB")):
        model, proto, _ = build(name)
        shape = networks()[name][1]
        x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(1)).numpy()
        mpath, xpath, out = (os.path.join(tmp, f"{name}.{e}") for e in ("onnx", "npy", "out.npy"))
        onnx.save(proto, mpath)
        np.save(xpath, x)
        code = (
            "import resource, sys, numpy as np, jaccli, jaccli.io as jio\n"
            "from jaccli.cli import main\n"
            f"m = jaccli.load({mpath!r})\n"
            "open('/proc/self/clear_refs', 'w').write('5')\n"
            "base = int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])\n"
            f"try:\n    main([{kind!r}, {mpath!r}, {xpath!r}, '-o', {out!r}, '--max-memory', {cap!r}, '-q'])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "peak = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
            "print(base / 1024, peak / 1024)\n"
        )
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
        seconds = time.perf_counter() - t
        if p.returncode:
            raise RuntimeError(p.stderr[-2000:])
        base, peak = map(float, p.stdout.split()[-2:])
        J = np.load(out, mmap_mode="r")
        check = slice(0, 200)
        ref = (jaccli.input_jacobian(mpath, x[check], max_memory=1 << 34) if kind == "input"
               else jaccli.param_jacobian(mpath, x[check], max_memory=1 << 34)[0])
        same = float(np.abs(np.asarray(J[check]) - ref).max() / max(np.abs(ref).max(), 1e-30))
        cap_mib = int(cap[:-3])
        data_mib = os.path.getsize(xpath) / 2**20
        rows.append({"run": f"{kind} {name}, N={n:,}", "output_MiB": J.nbytes / 2**20, "cap_MiB": cap_mib,
                     "peak_above_loaded_MiB": peak - base, "model_MiB": os.path.getsize(mpath) / 2**20,
                     "data_MiB": data_mib, "seconds": seconds, "max_rel_diff_vs_unchunked": same,
                     "within_cap": peak - base <= cap_mib + os.path.getsize(mpath) / 2**20 + data_mib})
        del J
        os.unlink(out)
    return rows


# ---- main ------------------------------------------------------------------------------------------


def run(quick, only=None, memory=True):
    import torch

    import jaccli

    torch.set_num_threads(THREADS)
    limits = machine_limits()
    repeats = 2 if quick else 5
    rows = []
    for name in networks():
        if only and only not in name:
            continue
        model, proto, x = build(name)
        m = jaccli.load(proto)
        xn = x.numpy()
        # input Jacobian: the faster of vmap(jacrev) and vmap(jacfwd)
        J = jaccli_input(m, xn)()
        Jt = torch_input(model, x, "reverse")().detach().numpy()
        agree_in = float(np.abs(J - Jt).max() / np.abs(Jt).max())
        # jacfwd pushes every input direction through every activation at once: only where it can win
        n_in, n_out_all = x[0].numel(), Jt[0].size // x[0].numel()
        contenders = [jaccli_input(m, xn), torch_input(model, x, "reverse")]
        if n_in <= 4 * n_out_all:
            contenders.append(torch_input(model, x, "forward"))
        b_j, b_rev, *rest = median_times(contenders, repeats)
        fwd_wins = bool(rest) and np.median(rest[0]) < np.median(b_rev)
        t_j, t_t, ratio, spread = paired(b_j, rest[0] if fwd_wins else b_rev)
        flops, nbytes, mode = work(proto, xn, "input")
        rows.append({"network": name, "kind": "input", "N": len(x), "jaccli_s": t_j, "torch_s": t_t,
                     "torch_how": "jacfwd" if fwd_wins else "jacrev", "ratio": ratio, "spread": spread,
                     "target": TARGET_INPUT, "agree": agree_in, "jaccli_mode": mode, "output_MiB": nbytes / 2**20,
                     **limit(flops, nbytes, limits, t_j)})
        # per-sample parameter Jacobian
        k, n_out, P = param_outputs(model, x)
        G = jaccli_params(m, xn, k, n_out)()
        Gt = torch_params(model, x, k)().detach().numpy()
        agree_p = float(np.abs(np.linalg.norm(G.reshape(len(x), -1), axis=1) - np.linalg.norm(Gt.reshape(len(x), -1), axis=1)).max()
                        / np.linalg.norm(Gt.reshape(len(x), -1), axis=1).max())
        del G, Gt
        t_j, t_t, ratio, spread = paired(*median_times([jaccli_params(m, xn, k, n_out), torch_params(model, x, k)], repeats))
        flops, nbytes, _ = work(proto, xn, "params", None if k == n_out else k)
        rows.append({"network": name, "kind": "params", "N": len(x), "jaccli_s": t_j, "torch_s": t_t, "torch_how": "jacrev",
                     "ratio": ratio, "spread": spread, "target": TARGET_PARAMS, "agree": agree_p, "jaccli_mode": "reverse",
                     "output_MiB": nbytes / 2**20, "outputs": f"{k} of {n_out}", "P": P, **limit(flops, nbytes, limits, t_j)})
        print(f"{name}: done", file=sys.stderr)
    for r in rows:
        r["jaccli_peak_MiB"] = peak_memory(r["network"], r["kind"], "jaccli") if memory else float("nan")
        r["torch_peak_MiB"] = peak_memory(r["network"], r["kind"], "torch") if memory else float("nan")
    return limits, rows


def render(limits, rows, bounded):
    lines = [
        f"Machine: {os.cpu_count()} cores, {THREADS} threads for both; float32 matmul peak "
        f"{limits['matmul_flops'] / 1e9:.0f} GFLOP/s; writing fresh memory {limits['write_fresh'] / 1e9:.1f} GB/s "
        f"(warm {limits['write_warm'] / 1e9:.1f} GB/s); numpy's BLAS {limits['blas']}. Medians after a warm-up over five alternating rounds; "
        f"a ratio is the median of the ratios within each round; torch {_torch_version()}.",
        "",
        "| network | Jacobian | N | jaccli | torch.func | jaccli / torch | target | x limit | limit / torch | peak MiB jaccli / torch | agree |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        what = "input" if r["kind"] == "input" else f"per-sample params ({r['outputs']} outputs, P={r['P']:,})"
        ok = "✓" if r["ratio"] <= r["target"] else "✗"
        lines.append(
            f"| {r['network']} | {what} | {r['N']} | {r['jaccli_s'] * 1e3:.1f} ms ({r['jaccli_mode']}) | "
            f"{r['torch_s'] * 1e3:.1f} ms ({r['torch_how']}) | {r['ratio']:.2f} {ok} ({r['spread'][0]:.2f}–{r['spread'][1]:.2f}) | ≤ {r['target']} | "
            f"{r['x_bound']:.1f}× ({r['bound']}) | {r['limit_s'] / r['torch_s']:.2f} | {r['jaccli_peak_MiB']:.0f} / {r['torch_peak_MiB']:.0f} | {r['agree']:.0e} |")
    lines += ["", "jaccli / torch: the median of the rounds' ratios (their least and greatest in brackets). x limit: jaccli's time over the machine's limit for that Jacobian: its multiply-adds at the matmul "
              "peak, or its bytes at the fresh-memory write bandwidth, whichever is larger. limit / torch: that limit over "
              "torch's time, the least ratio jaccli could reach doing the work it does; a target below it needs less work, "
              "not faster kernels. agree: max relative "
              "difference between the two results (input Jacobians entry by entry, parameter Jacobians by per-sample norm). "
              "peak MiB: resident memory above the set-up process, at its peak over the first two calls, in a fresh process.",
              "", "Bounded memory (the CLI writing .npy block by block):", "",
              "| run | output | --max-memory | data | peak above loaded model | within cap + model + data | vs unchunked | time |",
              "|---|---|---|---|---|---|---|---|"]
    for b in bounded:
        lines.append(f"| {b['run']} | {b['output_MiB']:.0f} MiB | {b['cap_MiB']} MiB | {b['data_MiB']:.0f} MiB | {b['peak_above_loaded_MiB']:.0f} MiB | "
                     f"{'✓' if b['within_cap'] else '✗'} | {b['max_rel_diff_vs_unchunked']:.0e} | {b['seconds']:.1f} s |")
    return "\n".join(lines)


def _torch_version():
    import torch

    return torch.__version__


def main():
    ap = argparse.ArgumentParser(description="jaccli against torch.func")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--memory-child", nargs=3)
    ap.add_argument("--bounded-only", action="store_true", help="only the bounded-memory runs")
    ap.add_argument("--only", help="time only the networks whose name contains this (prints the table, writes nothing)")
    ap.add_argument("--out", default=os.path.join(HERE, "results.md"))
    args = ap.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    if os.environ.get("OPENBLAS_CORETYPE"):
        print(f"note: OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is set, so numpy's OpenBLAS runs those "
              "kernels, not the ones it would choose for this CPU (make bench unsets it)", file=sys.stderr)
    import tempfile

    if args.bounded_only:
        with tempfile.TemporaryDirectory(dir=os.environ.get("JACCLI_BENCH_TMP")) as tmp:
            for b in bounded_memory_runs(tmp):
                print(b)
        return
    if args.only:
        limits, rows = run(args.quick, args.only, memory=False)
        print(render(limits, rows, []))
        return
    limits, rows = run(args.quick)
    with tempfile.TemporaryDirectory(dir=os.environ.get("JACCLI_BENCH_TMP")) as tmp:
        bounded = bounded_memory_runs(tmp)
    text = render(limits, rows, bounded)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"limits": limits, "rows": rows, "bounded": bounded}, f, indent=1)
    disagree = [f"{r['network']} {r['kind']}" for r in rows if not r["agree"] <= 1e-3]
    if disagree:
        print(f"RESULTS DISAGREE with torch.func: {', '.join(disagree)}", file=sys.stderr)
        sys.exit(1)
    met = all(r["ratio"] <= r["target"] for r in rows)
    mlp = next(r for r in rows if r["network"].startswith("mlp_784") and r["kind"] == "params")
    met = met and mlp["x_bound"] <= TARGET_BANDWIDTH and all(b["within_cap"] for b in bounded)
    print("targets met" if met else "targets NOT met", file=sys.stderr)


if __name__ == "__main__":
    main()
