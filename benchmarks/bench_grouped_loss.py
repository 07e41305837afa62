"""Benchmark: ant_core.grouped_mse (fused op) vs the eager pure-torch reference vs torch.compile.

For each shape and dtype, times the forward and the forward+backward (gradient for pred) of
  ours     ant_core.grouped_mse
  eager    ant_core.reference_grouped_mse
  compile  torch.compile(reference_grouped_mse, fullgraph=True)
in the same run, and prints a table with the median times (ms) and the speed-ups of ours over
eager and over compile (>1: ours is faster). On CUDA it also prints the achieved bandwidth of
ours (minimal traffic: forward reads pred and target; forward+backward reads them twice and
writes grad_pred) as a fraction of a device-to-device copy measured in the same run, and the
number of GPU kernels (and memsets/copies) each variant launches per direction.

    python benchmarks/bench_grouped_loss.py --device cpu --quick          (< 2 minutes)
    python benchmarks/bench_grouped_loss.py --device cpu --threads 1      (steadier on a busy box)
    python benchmarks/bench_grouped_loss.py --device cuda --json results.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from ant_core.losses import grouped_mse, reference_grouped_mse

SHAPES = {
    "tiny": (32, 2, 16, 16),
    "latent": (256, 4, 32, 32),
    "pixel": (64, 3, 256, 256),
    "large": (64, 3, 512, 512),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NUM_GROUPS = 5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    return parser.parse_args(argv)


# ---- timing -------------------------------------------------------------------------------------
def time_interleaved(fns, device, warmup, reps):
    """Median ms of each function; the functions take turns in every repetition, so a change of
    machine load during the run affects all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    if device == "cuda":
        # events created (first record) before timing: creating one inside the timed region
        # adds its host cost to a host-bound measurement
        events = {name: [(torch.cuda.Event(enable_timing=True),
                          torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
                  for name in fns}
        for pairs in events.values():
            for start, end in pairs:
                start.record(), end.record()
        torch.cuda.synchronize()
        for i in range(reps):
            for name, fn in fns.items():
                start, end = events[name][i]
                start.record()
                fn()
                end.record()
        torch.cuda.synchronize()
        for name, pairs in events.items():
            samples[name] = [start.elapsed_time(end) for start, end in pairs]
    else:
        for _ in range(reps):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def time_cuda(fn, warmup, reps):
    return time_interleaved({"fn": fn}, "cuda", warmup, reps)["fn"]


def copy_bandwidth(warmup, reps):
    """Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB clone."""
    buffer = torch.empty(2**28, dtype=torch.float32, device="cuda")
    ms = time_cuda(lambda: buffer.clone(), warmup, reps)
    return 2 * buffer.numel() * buffer.element_size() / (ms * 1e-3)


def count_gpu_activities(fn):
    """GPU kernels + memsets + copies launched by one call of fn (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


# ---- one case -----------------------------------------------------------------------------------
def make_variants(use_compile):
    variants = {"ours": grouped_mse, "eager": reference_grouped_mse}
    if use_compile:
        torch._dynamo.reset()
        variants["compile"] = torch.compile(reference_grouped_mse, fullgraph=True, dynamic=False)
    return variants


def bench_case(shape, dtype, device, args):
    gen = torch.Generator(device="cpu").manual_seed(0)
    pred = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    target = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    groups = torch.randint(0, NUM_GROUPS, (shape[0],), generator=gen).to(device)
    grad_loss = torch.ones(NUM_GROUPS, device=device)
    pred_leaf = pred.detach().requires_grad_(True)

    numel = pred.numel()
    big = numel * pred.element_size() > 64 * 2**20
    if device == "cuda":
        warmup, reps = (3, 10) if args.quick else (10, 50)
    else:
        warmup, reps = (1, 3 if big else 5) if args.quick else (2, 7 if big else 20)

    forwards, forward_backwards = {}, {}
    for name, fn in make_variants(not args.no_compile).items():
        def forward(fn=fn):
            with torch.no_grad():
                return fn(pred, target, groups, NUM_GROUPS)

        def forward_backward(fn=fn):
            loss = fn(pred_leaf, target, groups, NUM_GROUPS)
            return torch.autograd.grad(loss, pred_leaf, grad_loss)

        forward()  # compile (if any) outside the timed region
        forward_backward()
        forwards[name], forward_backwards[name] = forward, forward_backward

    fwd_ms = time_interleaved(forwards, device, warmup, reps)
    fwd_bwd_ms = time_interleaved(forward_backwards, device, warmup, reps)
    results = {}
    for name in forwards:
        entry = {"fwd_ms": fwd_ms[name], "fwd_bwd_ms": fwd_bwd_ms[name]}
        if device == "cuda":
            entry["fwd_launches"] = count_gpu_activities(forwards[name])
            entry["fwd_bwd_launches"] = count_gpu_activities(forward_backwards[name])
        results[name] = entry

    bytes_io = numel * (pred.element_size() + target.element_size())
    traffic = {"fwd": bytes_io, "fwd_bwd": 2 * bytes_io + numel * pred.element_size()}
    return results, traffic


# ---- report -------------------------------------------------------------------------------------
def print_table(rows, device, copy_bw):
    header = ["shape", "dtype", "dir", "ours ms", "eager ms", "compile ms", "eager/ours",
              "compile/ours"]
    if device == "cuda":
        header += ["ours GB/s", "of copy", "launches ours/eager/compile"]
    lines = [header]
    for row in rows:
        for direction in ("fwd", "fwd_bwd"):
            times = {v: row["results"][v][f"{direction}_ms"] for v in row["results"]}
            compiled = times.get("compile")
            line = [row["shape"], row["dtype"], direction.replace("_", "+"),
                    f"{times['ours']:.3f}", f"{times['eager']:.3f}",
                    f"{compiled:.3f}" if compiled is not None else "-",
                    f"{times['eager'] / times['ours']:.2f}x",
                    f"{compiled / times['ours']:.2f}x" if compiled is not None else "-"]
            if device == "cuda":
                gbps = row["traffic"][direction] / (times["ours"] * 1e-3) / 1e9
                launches = "/".join(str(row["results"][v].get(f"{direction}_launches", "-"))
                                    for v in ("ours", "eager", "compile") if v in row["results"])
                line += [f"{gbps:.0f}", f"{gbps * 1e9 / copy_bw:.0%}", launches]
            lines.append(line)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(str(cell).rjust(w) for cell, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    meta = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "num_groups": NUM_GROUPS, "quick": args.quick}
    copy_bw = None
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
        copy_bw = copy_bandwidth(*((3, 10) if args.quick else (10, 50)))
        meta["copy_bandwidth_GBps"] = copy_bw / 1e9
        print(f"{meta['gpu']}: device-to-device copy {copy_bw / 1e9:.0f} GB/s (read + write)")
    else:
        meta["cpu_threads"] = torch.get_num_threads()
        meta["cpu"] = platform.processor() or platform.machine()
        print(f"CPU, {meta['cpu_threads']} threads")

    rows = []
    for shape_name in args.shapes:
        for dtype_name in args.dtypes:
            shape = SHAPES[shape_name]
            results, traffic = bench_case(shape, DTYPES[dtype_name], device, args)
            rows.append({"shape": shape_name, "dims": list(shape), "dtype": dtype_name,
                         "results": results, "traffic": traffic})
            print(f"  done {shape_name} {dtype_name}", file=sys.stderr)
    print_table(rows, device, copy_bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
