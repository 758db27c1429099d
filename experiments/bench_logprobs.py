"""Speed and memory of the tokenwise log-prob implementations.

  python -m experiments.bench_logprobs                    # small CPU shapes (~30 s)
  python -m experiments.bench_logprobs --preset accel     # N=32768,V=128256 / N=8192,D=4096,V=128256
  python -m experiments.bench_logprobs --out results.json --runs 50

For each path (logits, hidden) and impl (reference = naive XLA, chunked,
pallas) it prints the median over --runs timed calls after warm-up of the
forward and of forward+backward, tokens/s, XLA's temporary / total memory
from `compiled.memory_analysis()`, the device's peak memory where the
runtime reports it, and % of roofline = t_floor / t_measured with

    logits fwd:     t_floor = N·V·bytes / BW         (one read of the logits)
    logits fwd+bwd: t_floor = 3·N·V·bytes / BW       (read, read, write dlogits)
    hidden fwd:     t_floor = 2·N·D·V / FLOPS
    hidden fwd+bwd: t_floor = 8·N·D·V / FLOPS        (fwd, recompute, dh, dw)

BW and FLOPS are measured on the same device first (a row reduction of a
large array in the benchmark dtype; a square matmul), so the percentages
are against measured, not paper, peaks. Pallas on CPU exists only in
interpret mode (orders of magnitude slower): it runs only with --interpret.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from cpo_jax import atomic
from cpo_jax import kernels as K

PRESETS = {
    "cpu": dict(logits=(2048, 8192), hidden=(512, 128, 8192), dtype="float32"),
    "accel": dict(logits=(32768, 128256), hidden=(8192, 4096, 128256), dtype="bfloat16"),
}
MiB = 2**20


def timed(fn, args, runs, warmup):
    """Median seconds of fn(*args) over `runs` calls after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_peaks(dtype, runs, big):
    """(bytes/s of a row reduction, FLOP/s of a square matmul) on the default device."""
    n_rows, n_cols = big
    x = jnp.ones((n_rows, n_cols), dtype)
    reduce_fn = jax.jit(lambda x: jnp.max(x, axis=-1))
    bw = x.size * x.dtype.itemsize / timed(reduce_fn, (x,), runs, 2)
    del x
    m = 8192 if jax.default_backend() != "cpu" else 1024
    a = jnp.ones((m, m), dtype)
    mm = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    flops = 2 * m**3 / timed(mm, (a,), max(runs // 4, 3), 2)
    return bw, flops


def memory(compiled):
    ma = compiled.memory_analysis()
    if ma is None:
        return None, None
    total = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
    return ma.temp_size_in_bytes / MiB, total / MiB


def device_peak_mib():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / MiB if "peak_bytes_in_use" in stats else None


def make_inputs(path, shape, dtype, key):
    k1, k2, k3 = jax.random.split(key, 3)
    if path == "logits":
        n, v = shape
        ops = ((jax.random.normal(k1, (n, v), jnp.float32) * 2).astype(dtype),)
    else:
        n, d, v = shape
        ops = (
            jax.random.normal(k1, (n, d), jnp.float32).astype(dtype),
            (jax.random.normal(k2, (d, v), jnp.float32) * d**-0.5).astype(dtype),
        )
    return ops, jax.random.randint(k3, (n,), 0, v)


def build(path, impl, y, args):
    kw = dict(impl=impl)
    if impl == "pallas":
        kw.update(interpret=args.interpret or None, block_n=args.block_n, block_v=args.block_v)
    elif impl == "chunked":
        kw.update(block_v=args.block_v)
    if path == "logits":
        def f(x):
            return K.token_logprobs(x, y, **kw).logprobs
    else:
        def f(h, w):
            return K.token_logprobs_from_hidden(h, w, y, **kw).logprobs
    argnums = tuple(range(1 if path == "logits" else 2))
    loss = lambda *ops: jnp.sum(f(*ops))  # noqa: E731
    return jax.jit(f), jax.jit(jax.value_and_grad(loss, argnums=argnums))


def floors(path, shape, itemsize, bw, flops):
    if path == "logits":
        n, v = shape
        return n * v * itemsize / bw, 3 * n * v * itemsize / bw
    n, d, v = shape
    return 2 * n * d * v / flops, 8 * n * d * v / flops


def bench_one(path, impl, shape, dtype, args, peaks):
    row = dict(path=path, impl=impl, shape=list(shape), dtype=jnp.dtype(dtype).name)
    backend = jax.default_backend()
    if impl == "pallas" and backend == "cpu" and not args.interpret:
        return dict(row, skipped="CPU runs Pallas only in interpret mode (--interpret)")
    if impl == "pallas" and path == "hidden" and backend == "gpu":
        return dict(row, skipped="no GPU Pallas matmul kernel; GPUs use 'chunked'")
    ops, y = make_inputs(path, shape, dtype, jax.random.PRNGKey(0))
    fwd, fwdbwd = build(path, impl, y, args)
    try:
        for name, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            compiled = fn.lower(*ops).compile()
            row[f"{name}_temp_mib"], row[f"{name}_total_mib"] = memory(compiled)
            row[f"{name}_s"] = timed(compiled, ops, args.runs, args.warmup)
            row[f"{name}_tok_per_s"] = shape[0] / row[f"{name}_s"]
        row["device_peak_mib_cumulative"] = device_peak_mib()
    except Exception as e:  # report and go on: one failing impl must not hide the others
        return dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    t_fwd, t_fwdbwd = floors(path, shape, jnp.dtype(dtype).itemsize, *peaks)
    row["fwd_pct_roofline"] = 100 * t_fwd / row["fwd_s"]
    row["fwdbwd_pct_roofline"] = 100 * t_fwdbwd / row["fwdbwd_s"]
    return row


def acceptance_memory(n=4096, d=256, v=32768):
    """XLA temp MiB of the hidden-path gradient, (naive, auto), compile only."""
    avals = [jax.ShapeDtypeStruct(s, t) for s, t in (((n, d), jnp.float32), ((d, v), jnp.float32), ((n,), jnp.int32))]
    out = []
    for impl in ("reference", "auto"):
        loss = lambda h, w, y, impl=impl: jnp.sum(K.token_logprobs_from_hidden(h, w, y, impl=impl).logprobs)  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*avals).compile()
        out.append(memory(compiled)[0])
    return out


def fmt(row, ref):
    head = f"{row['path']:<7}{row['impl']:<10}"
    if "skipped" in row or "error" in row:
        return head + ("skipped: " + row["skipped"] if "skipped" in row else "ERROR " + row["error"])
    speed = ref["fwdbwd_s"] / row["fwdbwd_s"] if ref and "fwdbwd_s" in ref else float("nan")
    mem = row["fwdbwd_temp_mib"] / ref["fwdbwd_temp_mib"] if ref and ref.get("fwdbwd_temp_mib") else float("nan")
    return head + (
        f"{row['fwd_s'] * 1e3:9.2f} {row['fwdbwd_s'] * 1e3:10.2f} {row['fwd_tok_per_s']:11.3g} "
        f"{row['fwdbwd_tok_per_s']:11.3g} {row['fwd_pct_roofline']:7.1f} {row['fwdbwd_pct_roofline']:7.1f} "
        f"{row['fwd_temp_mib']:9.1f} {row['fwdbwd_temp_mib']:9.1f} {speed:7.2f}x {mem:7.3f}"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: cpu on CPU, accel elsewhere")
    p.add_argument("--paths", default="logits,hidden")
    p.add_argument("--impls", default="reference,chunked,pallas")
    p.add_argument("--n", type=int, default=None, help="override tokens N (both paths)")
    p.add_argument("--v", type=int, default=None, help="override vocabulary V")
    p.add_argument("--d", type=int, default=None, help="override hidden size D")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--block-n", type=int, default=None, help="Pallas row tile (default: per backend)")
    p.add_argument("--block-v", type=int, default=None, help="Pallas vocab tile / chunked chunk size")
    p.add_argument("--interpret", action="store_true", help="allow Pallas interpret mode (CPU)")
    p.add_argument("--out", default=None, help="write all numbers as JSON here")
    args = p.parse_args(argv)
    if args.runs < 20:
        p.error("--runs must be >= 20")
    preset = PRESETS[args.preset or ("cpu" if jax.default_backend() == "cpu" else "accel")]
    dtype = jnp.dtype(args.dtype or preset["dtype"])
    n_l, v_l = preset["logits"]
    n_h, d_h, v_h = preset["hidden"]
    shapes = dict(
        logits=(args.n or n_l, args.v or v_l),
        hidden=(args.n or n_h, args.d or d_h, args.v or v_h),
    )
    big = (4096, 32768) if jax.default_backend() == "cpu" else (32768, 65536)
    peaks = measure_peaks(dtype, args.runs, big)
    dev = jax.devices()[0]
    meta = dict(
        jax=jax.__version__, python=platform.python_version(), backend=jax.default_backend(),
        device=getattr(dev, "device_kind", str(dev)), n_devices=jax.device_count(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        measured_bw_gb_s=peaks[0] / 1e9, measured_matmul_tflop_s=peaks[1] / 1e12,
        runs=args.runs, warmup=args.warmup, dtype=dtype.name,
    )
    print(f"jax {meta['jax']} | {meta['backend']} | {meta['device']} | {meta['date']}")
    print(f"measured peaks ({dtype.name}): row-reduction read {meta['measured_bw_gb_s']:.1f} GB/s, "
          f"matmul {meta['measured_matmul_tflop_s']:.3f} TFLOP/s | median of {args.runs} runs")
    print(f"{'path':<7}{'impl':<10}{'fwd_ms':>9} {'fwdbwd_ms':>10} {'fwd_tok/s':>11} {'fb_tok/s':>11} "
          f"{'fwd_%rf':>7} {'fb_%rf':>7} {'fwd_tmpM':>9} {'fb_tmpM':>9} {'fb_spd':>8} {'fb_mem':>7}")
    rows = []
    for path in args.paths.split(","):
        print(f"# {path}: shape {shapes[path]} ({'N, V' if path == 'logits' else 'N, D, V'}), {dtype.name}")
        ref = None
        for impl in args.impls.split(","):
            row = bench_one(path, impl, shapes[path], dtype, args, peaks)
            ref = row if impl == "reference" else ref
            rows.append(row)
            print(fmt(row, ref), flush=True)
    print("fb_spd = reference fwd+bwd time / this; fb_mem = this fwd+bwd XLA temp / reference's; "
          "%rf = % of the measured roofline; tmpM = XLA temp MiB")
    naive, fused = acceptance_memory()
    meta.update(acceptance_naive_temp_mib=naive, acceptance_fused_temp_mib=fused)
    print(f"memory (compile only), hidden-path gradient N=4096 D=256 V=32768 f32: naive {naive:.1f} MiB, "
          f"fused ({K.resolve_impl('auto', 'hidden', jax.default_backend(), 4096, 32768)}) {fused:.1f} MiB "
          f"= {100 * fused / naive:.1f}% of naive")
    if args.out:
        atomic.write_json(args.out, dict(meta=meta, rows=rows), indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
