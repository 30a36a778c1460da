"""Attention benchmark: forward+backward wall time and memory against sequence length.

    python -m lwm.benchmarks.attention                  # default sweep on CPU with 8 virtual devices
    python -m lwm.benchmarks.attention --lengths 1024,4096 --impls dense,blockwise --out bench.json

Columns (causal self-attention, fp32, batch 1, --heads x --head-dim):
  dense             the reference: materialises [heads, seq, seq]
  blockwise         lwm.ops.blockwise, chunks --chunk
  ring_contiguous   ring over sp=8 virtual devices, blockwise block kernel, contiguous layout
  ring_zigzag       the same with the load-balanced zigzag layout
  pallas_interpret  the Pallas flash kernel in interpret mode (small lengths only)

Each (column, length) runs in a fresh subprocess, so its memory is its own: the child samples
its resident set size (RSS) every 5 ms while the timed runs execute and reports the peak above
its RSS before the first run (inputs and compiled program already resident) -- the working
memory of attention itself -- together with XLA's compiled memory analysis (arguments +
outputs + temporaries, summed over devices). A child is limited by RLIMIT_DATA to
--memory-limit-gib, so running out of memory fails cleanly (RESOURCE_EXHAUSTED) instead of
waking the kernel's OOM killer on a shared machine. A column stops at its first OOM or timeout.
"Fits in" is the longest power-of-two length whose compiled footprint stays within --fit-gib
(24 GiB here), found by compiling (not running) at doubling lengths.
Achieved FLOP/s counts the useful causal FLOPs (forward 2 matmuls, backward 5, half of the
[seq, seq] square) against a jitted 2048^3 fp32 matmul measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from lwm import cli
from lwm.benchmarks import matmul_gflops
from lwm.host_memory import env_with_huge_pages
from lwm.mesh import cpu_xla_flags

COLUMNS = {
    # name: (attention kwargs, uses the sp=8 mesh, longest length to try by default)
    "dense": (dict(impl="dense"), False, None),
    "blockwise": (dict(impl="blockwise"), False, None),
    "ring_contiguous": (dict(impl="blockwise", layout="contiguous"), True, None),
    "ring_zigzag": (dict(impl="blockwise", layout="zigzag"), True, None),
    "pallas_interpret": (dict(impl="pallas"), False, 4096),
}
SP = 8
GIB = 2 ** 30


def causal_flops(seq, heads, head_dim, batch=1):
    """Useful FLOPs of causal attention forward + backward: 7 matmuls of 2*S*S*D over half the square."""
    return 7 * 2 * batch * heads * seq * seq * head_dim / 2


# ----------------------------------------------------------------------------- child process


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples RSS in a background thread; .peak is the largest value seen."""

    def __init__(self, interval=0.005):
        self.interval, self.peak, self._stop = interval, _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _build(column, seq, args):
    """(jitted fwd+bwd function, its abstract inputs, how many devices its memory figures cover)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as PS

    from lwm.ops import attention

    kwargs, uses_mesh, _ = COLUMNS[column]
    kwargs = dict(kwargs, query_chunk_size=args.chunk, key_chunk_size=args.chunk)
    sharding, devices = None, 1
    if uses_mesh:
        mesh = Mesh(np.array(jax.devices()[:SP]).reshape(1, 1, 1, SP), ("dp", "fsdp", "tp", "sp"))
        kwargs["mesh"] = mesh
        sharding, devices = NamedSharding(mesh, PS(None, "sp", None, None)), SP

    def loss(q, k, v, d_out):
        return jnp.sum(attention(q, k, v, causal=True, **kwargs) * d_out)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    shape = jax.ShapeDtypeStruct((1, seq, args.heads, args.head_dim), jnp.float32, sharding=sharding)
    return fn, shape, devices


def _compiled_bytes(compiled, devices):
    m = compiled.memory_analysis()
    per_device = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return per_device * devices


def run_child(column, seq, args):
    """Time one (column, length); returns a dict (printed as JSON by the child)."""
    import jax
    import numpy as np

    fn, shape, devices = _build(column, seq, args)
    rng = np.random.default_rng(0)
    inputs = [jax.device_put(rng.standard_normal(shape.shape, np.float32), shape.sharding) for _ in range(4)]
    t0 = time.perf_counter()
    compiled = fn.lower(*inputs).compile()
    compile_s = time.perf_counter() - t0
    baseline = _rss_bytes()
    times = []
    with _PeakRSS() as rss:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))  # first run (warm-up) also counts toward the peak
        first = time.perf_counter() - t0
        repeats = max(1, min(args.repeats, int(args.run_budget_s / max(first, 1e-3))))
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*inputs))
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return dict(column=column, seq=seq, status="ok", seconds=seconds, runs=len(times), compile_s=compile_s,
                peak_bytes=rss.peak - baseline, peak_rss_bytes=rss.peak, compiled_bytes=_compiled_bytes(compiled, devices),
                flops=causal_flops(seq, args.heads, args.head_dim))


def probe_fit(column, args):
    """Longest power-of-two length whose compiled footprint fits in args.fit_gib (compile only)."""
    import jax

    best, seq = None, 1024
    while seq <= args.fit_max_length:
        fn, shape, devices = _build(column, seq, args)
        try:
            need = _compiled_bytes(fn.lower(shape, shape, shape, shape).compile(), devices)
        except Exception:  # noqa: BLE001 - a length the compiler rejects does not fit
            break
        if need > args.fit_gib * GIB:
            break
        best, seq = (seq, need), seq * 2
        jax.clear_caches()
    return dict(column=column, status="fit", fit_seq=None if best is None else best[0],
                fit_bytes=None if best is None else best[1])


# ----------------------------------------------------------------------------- parent process


def _spawn(args, extra, timeout):
    env = dict(env_with_huge_pages(), XLA_FLAGS=cpu_xla_flags(SP, collective_timeout_s=3600), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "lwm.benchmarks.attention", *extra, *_child_flags(args)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(status="timeout")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout)[-2000:]
    status = "oom" if ("RESOURCE_EXHAUSTED" in tail or "MemoryError" in tail or proc.returncode == -9) else "error"
    return dict(status=status, returncode=proc.returncode, message=tail.strip().splitlines()[-1:] if tail else [])


def _child_flags(args):
    return ["--heads", str(args.heads), "--head-dim", str(args.head_dim), "--chunk", str(args.chunk),
            "--repeats", str(args.repeats), "--run-budget-s", str(args.run_budget_s),
            "--memory-limit-gib", str(args.memory_limit_gib), "--fit-gib", str(args.fit_gib),
            "--fit-max-length", str(args.fit_max_length)]


def _fmt_bytes(n):
    return "-" if n is None else f"{n / GIB:.2f}G" if n >= GIB else f"{n / 2 ** 20:.0f}M"


def _cell(r, matmul):
    if r is None:
        return ""
    if r["status"] != "ok":
        return r["status"].upper()
    per_token = r["peak_bytes"] / r["seq"]
    return (f"{r['seconds']:.3g}s {_fmt_bytes(r['peak_bytes'])} ({per_token / 1024:.0f}K/tok) "
            f"{100 * r['flops'] / r['seconds'] / matmul:.0f}%")


def print_table(report):
    matmul = report["matmul_flops"]
    columns = report["columns"]
    print(f"\nforward+backward, causal, fp32, batch 1, heads {report['heads']}, head_dim {report['head_dim']}, "
          f"chunk {report['chunk']}; matmul {matmul / 1e9:.0f} GFLOP/s (2048^3 fp32)")
    print("cell: median seconds, peak working memory (per token), useful FLOP/s as % of matmul\n")
    width = 34
    print(f"{'seq':>8} | " + " | ".join(f"{c:<{width}}" for c in columns))
    for seq in report["lengths"]:
        cells = [_cell(report["results"].get(c, {}).get(str(seq)), matmul) for c in columns]
        if any(cells):
            print(f"{seq:>8} | " + " | ".join(f"{x:<{width}}" for x in cells))
    print(f"{'fits':>8} | " + " | ".join(
        f"{(str(report['fits'][c]['fit_seq']) + ' (' + _fmt_bytes(report['fits'][c]['fit_bytes']) + ')') if report['fits'].get(c, {}).get('fit_seq') else '-':<{width}}"
        for c in columns))
    print(f"\n'fits': longest power-of-two length whose compiled footprint <= {report['fit_gib']} GiB "
          f"(compile-only probe up to {report['fit_max_length']})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--lengths", default="1024,4096,16384,65536",
                        help="comma-separated lengths; with --beyond, doubling continues past the last")
    parser.add_argument("--beyond", type=int, default=0, help="extra doublings after the last length")
    parser.add_argument("--impls", default=",".join(COLUMNS), help=f"columns among {list(COLUMNS)}")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1024, help="query and key chunk size")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (median reported)")
    parser.add_argument("--run-budget-s", type=float, default=120.0, help="fewer repeats when a run is this slow")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per (column, length) subprocess")
    parser.add_argument("--memory-limit-gib", type=float, default=20.0, help="RLIMIT_DATA of each child")
    parser.add_argument("--fit-gib", type=float, default=24.0)
    parser.add_argument("--fit-max-length", type=int, default=1 << 24)
    parser.add_argument("--no-fit", action="store_true", help="skip the compile-only fit probe")
    parser.add_argument("--out", default="attention_benchmark.json")
    parser.add_argument("--child", nargs=2, metavar=("COLUMN", "SEQ"), help=argparse.SUPPRESS)
    parser.add_argument("--fit-child", metavar="COLUMN", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child or args.fit_child:
        limit = int(args.memory_limit_gib * GIB)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        result = probe_fit(args.fit_child, args) if args.fit_child else run_child(args.child[0], int(args.child[1]), args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    columns = [c for c in args.impls.split(",") if c]
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        parser.error(f"unknown columns {unknown}; expected among {list(COLUMNS)}")
    lengths = [int(x) for x in args.lengths.split(",")]
    lengths += [lengths[-1] * 2 ** (i + 1) for i in range(args.beyond)]
    report = dict(heads=args.heads, head_dim=args.head_dim, chunk=args.chunk, columns=columns, lengths=lengths,
                  fit_gib=args.fit_gib, fit_max_length=args.fit_max_length, matmul_flops=matmul_gflops() * 1e9,
                  results={}, fits={}, cpu_count=os.cpu_count())
    print(f"matmul 2048^3 fp32: {report['matmul_flops'] / 1e9:.1f} GFLOP/s", flush=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    for column in columns:
        report["results"][column] = {}
        cap = COLUMNS[column][2]
        for seq in lengths:
            if cap is not None and seq > cap:
                break
            result = _spawn(args, ["--child", column, str(seq)], args.timeout_s)
            result.update(column=column, seq=seq)
            report["results"][column][str(seq)] = result
            print(f"{column:>17} {seq:>8}: " + (_cell(result, report["matmul_flops"]) if result["status"] == "ok"
                                                 else f"{result['status']} {result.get('message', '')}"), flush=True)
            save()
            if result["status"] != "ok":
                break  # the column stops at its first OOM / timeout / error
        if not args.no_fit:
            report["fits"][column] = _spawn(args, ["--fit-child", column], args.timeout_s)
            save()
    print_table(report)
    save()
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
