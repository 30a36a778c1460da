"""VQGAN benchmark: seconds per frame to encode and to decode at LWM's default config (256 px).

    python -m lwm.benchmarks.vqgan                       # batch of 4 frames, 5 timed runs each
    python -m lwm.benchmarks.vqgan --batch 2 --repeats 3 --out vqgan_benchmark.json

Random weights with the released tokenizer's shapes (146M params); the timing of a conv net
does not depend on the values. Each of encode (pixels -> codes) and decode (codes -> pixels)
is compiled once (compile time reported separately), then run --repeats times on the same
batch; the table gives the median, and the min/max, divided by the batch size. FLOPs come
from XLA's cost analysis of the compiled program, so "achieved" is useful work per second.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np

from lwm import cli
from lwm.vqgan import VQGAN, VQGANConfig


def _time_calls(fn, arg, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - start)
    return times


def benchmark(batch: int = 4, repeats: int = 5, seed: int = 0, config: VQGANConfig = VQGANConfig()) -> dict:
    """Time VQGAN encode and decode on `batch` frames; returns the rows of the table."""
    params = VQGAN.init_params(config, jax.random.PRNGKey(seed))
    vqgan = VQGAN(params, config, frames_per_chunk=batch)
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(-1, 1, (batch, config.resolution, config.resolution, config.num_channels)).astype(np.float32)
    side = config.latent_size
    codes = rng.integers(0, config.num_embeddings, (batch, side, side)).astype(np.int32)
    rows = []
    for name, compiled_fn, arg in (("encode", vqgan._encode_fn, pixels), ("decode", vqgan._decode_fn, codes)):
        start = time.perf_counter()
        compiled = compiled_fn.lower(vqgan.params, arg).compile()
        compile_s = time.perf_counter() - start
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
        call = (lambda x, c=compiled: c(vqgan.params, x))
        jax.block_until_ready(call(arg))  # warm-up: first-run allocations
        times = _time_calls(call, arg, repeats)
        median = statistics.median(times)
        rows.append({
            "op": name,
            "batch": batch,
            "s_per_frame_median": median / batch,
            "s_per_frame_min": min(times) / batch,
            "s_per_frame_max": max(times) / batch,
            "frames_per_s": batch / median,
            "gflop_per_frame": flops / batch / 1e9,
            "achieved_gflop_per_s": flops / median / 1e9,
            "compile_s": compile_s,
            "times_s": times,
        })
    return {
        "config": config.to_dict(),
        "n_params": int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params))),
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "host": platform.processor() or platform.machine(),
        "repeats": repeats,
        "rows": rows,
    }


def format_table(report: dict) -> str:
    lines = [f"VQGAN {report['config']['resolution']} px, {report['n_params'] / 1e6:.0f}M params, "
             f"{report['backend']} ({report['device']}), {report['repeats']} runs each",
             f"{'op':<8}{'batch':>6}{'s/frame (median)':>18}{'min':>9}{'max':>9}{'frames/s':>10}"
             f"{'GFLOP/frame':>13}{'GFLOP/s':>10}{'compile s':>11}"]
    for r in report["rows"]:
        lines.append(f"{r['op']:<8}{r['batch']:>6}{r['s_per_frame_median']:>18.3f}{r['s_per_frame_min']:>9.3f}"
                     f"{r['s_per_frame_max']:>9.3f}{r['frames_per_s']:>10.2f}{r['gflop_per_frame']:>13.1f}"
                     f"{r['achieved_gflop_per_s']:>10.1f}{r['compile_s']:>11.1f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="frames per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per op (the median is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="vqgan_benchmark.json", help="where to write the JSON report")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be >= 1")
    report = benchmark(args.batch, args.repeats, args.seed)
    print(format_table(report))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
