"""Kernel microbenchmarks: ``python -m loctex.kernels.bench [--device cpu|cuda] [--quick] [--threads N] [--out DIR]``.

For each op (render_traces, trace_attention_loss, contrastive_loss) and provider (reference,
triton, cpp) over paper-scale shapes: forward, backward and full-pass time (median and 20/80%
quantiles; ``triton.testing.do_bench`` on CUDA, a timing loop on CPU) and the peak extra memory
of a full pass (``torch.cuda.max_memory_allocated`` on CUDA; on CPU the torch allocator's
allocations as recorded by the profiler). On CUDA it also measures the bf16 matmul rate and
reports the contrastive loss's rate on its nominal 8·N²·D flops as a fraction of it.

Writes ``DIR/<device>_<date>.csv`` (one row per kernel, provider, shape, metric), ``.md`` (a
table and the targets of issue 5) and ``.png``. A provider that is not available (not built, no
CUDA, out of memory) is skipped with a note, never an error. Inputs come from
``loctex.kernels.testing``, the builders the tests use.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import gc
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import testing

SIGMA = 0.08  # configs: loss.sigma
QUANTILES = (0.5, 0.2, 0.8)


# ----------------------------------------------------------------------------------------------
# cases

@dataclass
class Case:
    kernel: str
    shape: str
    build: Callable[[str], tuple[Callable[[], torch.Tensor], list[torch.Tensor]]]
    # (provider) -> (forward closure returning a scalar or a tuple, leaves that get gradients)
    flops: float | None = None           # nominal flops of a full pass (for a FLOP rate)


def _trace_case(kernel, batch, tokens, grid, dim, ppt, dtype, device) -> Case:
    shape = f"B={batch},L={tokens},grid={grid[0]}x{grid[1]},D={dim},pts/token={ppt}"

    def build(provider):
        import loctex.kernels as K
        x = testing.trace_inputs(batch, tokens, grid, dim, points_per_token=ppt, dtype=dtype,
                                 device=device, seed=0)
        if kernel == "render_traces":
            return (lambda: K.render_traces(x["points_xy"], x["point_weights"], x["token_ranges"],
                                            grid, SIGMA, provider=provider)), []
        q, k = x["q"].requires_grad_(), x["k"].requires_grad_()
        return (lambda: K.trace_attention_loss(q, k, x["points_xy"], x["point_weights"],
                                               x["token_ranges"], x["loc_mask"], grid, SIGMA,
                                               scale=1 / math.sqrt(dim), loss_type="kl",
                                               provider=provider)), [q, k]

    return Case(kernel, shape, build)


def _contrastive_case(n, dim, dtype, device) -> Case:
    def build(provider):
        import loctex.kernels as K
        image, text, ls = testing.contrastive_inputs(n, dim, dtype=dtype, device=device, seed=0)
        leaves = [image.requires_grad_(), text.requires_grad_(), ls.requires_grad_()]
        return (lambda: K.contrastive_loss(*leaves, provider=provider)), leaves

    return Case("contrastive_loss", f"N={n},D={dim}", build, flops=8.0 * n * n * dim)


def cases(device: str, quick: bool, dtype: torch.dtype) -> list[Case]:
    if device == "cuda":
        if quick:
            trace = [(32, 96, (7, 7), 256, 20)]
            contrastive = [4096, 16384]
        else:
            trace = [(256, 96, (7, 7), 256, 20), (256, 96, (14, 14), 256, 20)]
            contrastive = [4096, 16384, 65536, 262144, 1048576]
        cdim = 512
    else:
        if quick:
            trace = [(4, 8, (7, 7), 32, 20)]
            contrastive, cdim = [256], 64
        else:
            trace = [(32, 64, (7, 7), 256, 20), (32, 64, (14, 14), 256, 20)]
            contrastive, cdim = [1024, 4096, 8192], 512
    out = []
    for kernel in ("render_traces", "trace_attention_loss"):
        out += [_trace_case(kernel, *t, dtype=dtype, device=device) for t in trace]
    out += [_contrastive_case(n, cdim, dtype, device) for n in contrastive]
    return out


# ----------------------------------------------------------------------------------------------
# measuring

def _summary(times_ms: list[float]) -> tuple[float, float, float]:
    qs = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else times_ms * 9
    return statistics.median(times_ms), qs[1], qs[7]   # median, 20%, 80%


def _clear(leaves):
    for t in leaves:
        t.grad = None


def _time_cpu_interleaved(fns: dict, leaves: dict, budget_s: float, max_reps: int = 48,
                          block: int = 3) -> dict:
    """Times the providers in alternating blocks, so that all of them see the same machine load
    (CPU hosts are often shared); {provider: (median, p20, p80)} in ms.

    Each block starts with an untimed call and then times ``block`` calls back to back: a
    provider is measured with its own data in cache, as torch.utils.benchmark does, and not
    right after another provider has swept the caches. (Timed that way, an earlier C++ loss at
    B=32, L=64, 7x7 paid about 0.9 ms of cache misses per call on top of its 2.3 ms; a loss
    whose inputs the model has just computed finds them in cache.)
    """
    timed = block if budget_s > 0 else 1
    min_rounds = 2 if budget_s > 0 else 1
    times = {p: [] for p in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds * timed < max_reps and (rounds < min_rounds
                                         or time.perf_counter() - start < budget_s * len(fns)):
        for p, fn in fns.items():
            _clear(leaves[p])
            fn()  # warm-up: caches, allocator
            for _ in range(timed):
                _clear(leaves[p])
                t0 = time.perf_counter()
                fn()
                times[p].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {p: _summary(t) for p, t in times.items()}


def _time_cuda(fn, leaves, rep_ms: int):
    import triton.testing
    _clear(leaves)
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    if once > 0.5:  # huge shapes: a few timed runs instead of do_bench's hundreds
        times = []
        for _ in range(3):
            _clear(leaves)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return _summary(times)
    return tuple(triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms,
                                         grad_to_none=leaves, quantiles=list(QUANTILES)))


def _peak_mb(fn, leaves, device: str) -> float:
    """Peak memory of one call above what was allocated before it (MB)."""
    _clear(leaves)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # the torch CPU allocator's allocations and frees, in order, as the profiler records them
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def _steady_cpu_allocator() -> str:
    """Keeps glibc from returning large freed buffers to the system (and mapping them afresh, page
    faults included, at the next call), so that a CPU timing does not depend on which cases ran
    before it in the process: on one thread the reference trace loss measured 26 ms or 46 ms per
    call on the same machine depending on that alone. Tuned the way jemalloc/tcmalloc behave;
    returns a note for the report ("" where there is no glibc)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20)
    except (OSError, AttributeError):
        return ""
    return "glibc malloc: mmap threshold 32 MB, no trimming" if ok else ""


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() \
        or type(exc).__name__ == "OutOfMemoryError"


def _skip_reason(kernel: str, provider: str, device: str) -> str | None:
    import loctex.kernels as K
    if provider == "triton" and device != "cuda":
        return "Triton needs CUDA (the interpreter is for tests, not for timing)"
    if provider == "cpp":
        if device != "cpu":
            return "the C++ ops are the CPU path"
        if kernel == "contrastive_loss":
            return "no C++ contrastive op (by design: Triton on CUDA, reference on CPU)"
        if not K.cpp_available():
            return "C++ ops not built (pip install --no-build-isolation -e .)"
    return None


def _failure(exc: BaseException) -> str:
    if _is_oom(exc):
        return "out of memory"
    first = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def measure_all(case: Case, providers, device: str, rep_ms: int, budget_s: float, skip: dict) -> dict:
    """{provider: metrics dict, or the reason it was skipped} for one case. On CPU the providers
    are timed in alternating blocks (see ``_time_cpu_interleaved``); on CUDA one after the other."""
    results, ready = {}, {}
    for p in providers:
        if skip.get(p):
            results[p] = skip[p]
            continue
        try:
            fwd, leaves = case.build(p)

            def full(fwd=fwd, has_bwd=bool(leaves)):
                out = fwd()
                if has_bwd:
                    out.backward()

            full()  # first call: compilation / autotuning / lazy init stay out of every number
            ready[p] = {"fwd": fwd, "full": full, "leaves": leaves,
                        "metrics": {"peak_mem_mb": _peak_mb(full, leaves, device)}}
        except Exception as exc:  # noqa: BLE001 — a benchmark notes failures and goes on
            results[p] = _failure(exc)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    for phase in ("fwd", "bwd", "full"):
        fns, leaves, graphs = {}, {}, []
        for p, r in ready.items():
            if phase != "fwd" and not r["leaves"]:
                continue                  # no backward (render_traces): full pass = forward
            if phase == "bwd":
                out = r["fwd"]()          # one graph, back-propagated again and again
                graphs.append(out)
                fns[p] = (lambda out=out: out.backward(retain_graph=True))
            else:
                fns[p] = r[phase]
            leaves[p] = r["leaves"]
        grad_mode = torch.no_grad() if phase == "fwd" and not any(leaves.values()) else contextlib.nullcontext()
        with grad_mode:
            if device == "cuda":
                stats = {}
                for p, fn in fns.items():
                    try:
                        stats[p] = _time_cuda(fn, leaves[p], rep_ms)
                    except Exception as exc:  # noqa: BLE001
                        results[p] = _failure(exc)
                        ready.pop(p)
            else:
                try:
                    stats = _time_cpu_interleaved(fns, leaves, budget_s)
                except Exception as exc:  # noqa: BLE001
                    stats = {}
                    for p in fns:
                        results[p] = _failure(exc)
                        ready.pop(p)
        del graphs
        for p, (med, lo, hi) in stats.items():
            if p in ready:
                m = ready[p]["metrics"]
                m[f"{phase}_ms"], m[f"{phase}_ms_p20"], m[f"{phase}_ms_p80"] = med, lo, hi
    for p, r in ready.items():
        m = r["metrics"]
        if "bwd_ms" not in m and "fwd_ms" in m:
            m["full_ms"], m["full_ms_p20"], m["full_ms_p80"] = m["fwd_ms"], m["fwd_ms_p20"], m["fwd_ms_p80"]
        if case.flops and "full_ms" in m:
            m["tflops"] = case.flops / (m["full_ms"] * 1e-3) / 1e12
        results[p] = m
    return results


def matmul_tflops(dtype=torch.bfloat16, n: int = 8192) -> float:
    import triton.testing
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300)
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------------------------
# reporting

def device_info(device: str) -> tuple[str, str]:
    """(a readable device name, a file-name slug)."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        return name, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    cores = os.cpu_count() or 1
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
    except OSError:
        pass
    threads = torch.get_num_threads()
    slug = f"cpu-{cores}core" + ("" if threads == cores else f"-{threads}thread")
    return f"CPU {cores} cores ({model}; torch threads {threads})", slug


def _fmt(v) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, str):
        return v
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def write_markdown(path, rows, meta, targets):
    table: dict[tuple, dict] = {}
    for r in rows:
        key = (r["kernel"], r["shape"], r["provider"])
        table.setdefault(key, {})[r["metric"]] = r["value"] if r["metric"] != "skipped" else r["note"]
    lines = [f"# Kernel benchmarks — {meta['device']}", "",
             f"{meta['date']} · torch {meta['torch']} · triton {meta['triton']} · dtype {meta['dtype']} · "
             f"`{meta['command']}` · load average at start {meta['load']}", "",
             "Times in ms: median [20%–80%]. Peak: extra memory of one forward+backward (MB). "
             "Speed-up and memory ratio are against the reference on the same shape.", ""]
    if meta.get("allocator"):
        lines += [f"Allocator: {meta['allocator']} (see `_steady_cpu_allocator`).", ""]
    if meta.get("matmul_tflops"):
        lines += [f"bf16 matmul rate (8192³, torch): **{meta['matmul_tflops']:.0f} TFLOP/s**", ""]
    lines += ["| kernel | shape | provider | fwd | bwd | fwd+bwd | peak MB | speed-up | memory ÷ | TFLOP/s | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]

    def span(m, phase):
        if f"{phase}_ms" not in m:
            return "–"
        return f"{_fmt(m[f'{phase}_ms'])} [{_fmt(m[f'{phase}_ms_p20'])}–{_fmt(m[f'{phase}_ms_p80'])}]"

    for (kernel, shape, provider), m in table.items():
        tf = m.get("tflops")
        tf_s = "–" if tf is None else _fmt(tf) + (f" ({m['frac_matmul']:.0%})" if "frac_matmul" in m else "")
        lines.append(f"| {kernel} | {shape} | {provider} | {span(m, 'fwd')} | {span(m, 'bwd')} | "
                     f"{span(m, 'full')} | {_fmt(m.get('peak_mem_mb'))} | "
                     f"{_fmt(m.get('speedup_full'))} | {_fmt(m.get('memory_ratio'))} | {tf_s} | "
                     f"{m.get('skipped', '')} |")
    lines += ["", "## Targets (issue 5)", ""] + [f"- {t}" for t in targets] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_plot(path, rows, meta):
    plt = _pyplot()

    kernels = list(dict.fromkeys(r["kernel"] for r in rows if r["metric"] == "full_ms"))
    if not kernels:
        return
    fig, axes = plt.subplots(2, len(kernels), figsize=(5 * len(kernels), 7), squeeze=False)
    for col, kernel in enumerate(kernels):
        for row, (metric, label) in enumerate((("full_ms", "fwd+bwd time (ms)"),
                                               ("peak_mem_mb", "peak extra memory (MB)"))):
            ax = axes[row][col]
            sel = [r for r in rows if r["kernel"] == kernel and r["metric"] == metric]
            shapes = list(dict.fromkeys(r["shape"] for r in sel))
            providers = list(dict.fromkeys(r["provider"] for r in sel))
            width = 0.8 / max(1, len(providers))
            for i, p in enumerate(providers):
                vals = {r["shape"]: r["value"] for r in sel if r["provider"] == p}
                xs = [j + i * width for j, s in enumerate(shapes) if s in vals]
                ax.bar(xs, [max(vals[s], 1e-3) for s in shapes if s in vals], width, label=p)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
            ax.set_xticklabels([s.replace(",", "\n") for s in shapes], fontsize=6)
            ax.set_yscale("log")
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(kernel)
            ax.legend(fontsize=7)
    fig.suptitle(f"{meta['device']} · torch {meta['torch']} · {meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _targets(rows, device) -> list[str]:
    def get(kernel, provider, metric, shape_has=""):
        for r in rows:
            if (r["kernel"], r["provider"], r["metric"]) == (kernel, provider, metric) and shape_has in r["shape"]:
                return r["value"]
        return None

    out = []
    if device == "cpu":
        s = get("trace_attention_loss", "cpp", "speedup_full", "B=32,L=64,grid=7x7")
        out.append("CPU, C++ fused loss, B=32, L=64, 7×7, fwd+bwd ≥ 10× the reference: " +
                   ("not measured (C++ ops unavailable or shape not run)" if s is None else
                    f"{s:.1f}× — {'met' if s >= 10 else 'NOT met'}"))
    else:
        for grid in ("7x7", "14x14"):
            s = get("trace_attention_loss", "triton", "speedup_full", f"B=256,L=96,grid={grid}")
            m = get("trace_attention_loss", "triton", "memory_ratio", f"B=256,L=96,grid={grid}")
            out.append(f"CUDA fused loss B=256, L=96, {grid}: ≥10× faster and ≥10× less memory: " +
                       ("not measured" if s is None or m is None else
                        f"{s:.1f}× faster, {m:.1f}× less memory — "
                        f"{'met' if s >= 10 and m >= 10 else 'NOT met'}"))
        f = get("contrastive_loss", "triton", "frac_matmul", "N=65536,")
        mem = get("contrastive_loss", "triton", "peak_mem_mb", "N=65536,")
        out.append("contrastive N=65,536, D=512: ≥ 50% of the bf16 matmul rate on 8·N²·D, < 2 GB extra: " +
                   ("not measured" if f is None else
                    f"{f:.0%}, {mem / 1024:.2f} GB — {'met' if f >= 0.5 and mem < 2048 else 'NOT met'}"))
        big = get("contrastive_loss", "triton", "full_ms", "N=1048576,")
        out.append("contrastive N=1,048,576 on one GPU: " +
                   ("not run" if big is None else f"ran, fwd+bwd {big / 1e3:.1f} s"))
    return out


# ----------------------------------------------------------------------------------------------

def run(device: str, quick: bool, out_dir: str, providers=("reference", "triton", "cpp"),
        kernels=None, dtype: str = "auto", log=print, command: str | None = None) -> dict:
    import triton
    _pyplot()  # load matplotlib's libraries before any profiling (a late dlopen crashed once here)
    tdtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32,
              "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    name, slug = device_info(device)
    allocator = _steady_cpu_allocator() if device == "cpu" else ""
    now = _dt.datetime.now()
    meta = {"device": name, "date": now.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "triton": triton.__version__, "dtype": str(tdtype).replace("torch.", ""),
            "command": command or ("python -m loctex.kernels.bench --device " + device
                                   + (" --quick" if quick else "")),
            "load": " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a",
            "allocator": allocator}
    rows: list[dict] = []

    def add(case, provider, metric, value, note=""):
        rows.append({"kernel": case.kernel, "provider": provider, "shape": case.shape, "metric": metric,
                     "value": value, "note": note, "device": name, "torch": meta["torch"],
                     "triton": meta["triton"], "date": now.isoformat(timespec="seconds")})

    if device == "cuda" and not quick:
        meta["matmul_tflops"] = matmul_tflops()
        log(f"bf16 matmul: {meta['matmul_tflops']:.0f} TFLOP/s")
    rep_ms, budget_s = (20, 0.0) if quick else (100, 2.0)
    oom: set[tuple[str, str]] = set()
    for case in cases(device, quick, tdtype):
        if kernels and case.kernel not in kernels:
            continue
        skip = {p: _skip_reason(case.kernel, p, device) or
                ("out of memory at a smaller shape" if (case.kernel, p) in oom else None) for p in providers}
        results = measure_all(case, providers, device, rep_ms, budget_s, skip)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        ref = results.get("reference")
        for provider in providers:
            m = results[provider]
            if isinstance(m, str):
                if m == "out of memory":
                    oom.add((case.kernel, provider))
                add(case, provider, "skipped", "", m)
                log(f"{case.kernel:22s} {case.shape:45s} {provider:9s} skipped: {m}")
                continue
            if provider != "reference" and isinstance(ref, dict):
                m["speedup_full"] = ref["full_ms"] / m["full_ms"]
                if m["peak_mem_mb"] > 0:
                    m["memory_ratio"] = ref["peak_mem_mb"] / m["peak_mem_mb"]
            if "tflops" in m and meta.get("matmul_tflops"):
                m["frac_matmul"] = m["tflops"] / meta["matmul_tflops"]
            for metric, value in m.items():
                add(case, provider, metric, float(value))
            log(f"{case.kernel:22s} {case.shape:45s} {provider:9s} fwd {m['fwd_ms']:9.3f} ms  "
                f"full {m['full_ms']:9.3f} ms  peak {m['peak_mem_mb']:9.1f} MB"
                + (f"  x{m['speedup_full']:.1f}" if "speedup_full" in m else ""))
    targets = _targets(rows, device)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{slug}_{meta['date']}{'_quick' if quick else ''}")
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["kernel", "provider", "shape", "metric", "value", "note",
                                               "device", "torch", "triton", "date"])
        writer.writeheader()
        writer.writerows(rows)
    write_markdown(stem + ".md", rows, meta, targets)
    write_plot(stem + ".png", rows, meta)
    for t in targets:
        log(t)
    log(f"wrote {stem}.csv, .md, .png")
    return {"rows": rows, "targets": targets, "files": [stem + ext for ext in (".csv", ".md", ".png")]}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m loctex.kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and few repetitions (smoke test)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--providers", default="reference,triton,cpp")
    p.add_argument("--kernels", default="", help="comma-separated subset of "
                   "render_traces,trace_attention_loss,contrastive_loss")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="embeddings / q, k dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU: torch threads (default: torch's, one per core); other counts name the files")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    run(args.device, args.quick, args.out, providers=tuple(args.providers.split(",")),
        kernels=set(filter(None, args.kernels.split(","))), dtype=args.dtype,
        command=shlex.join(["python", "-m", "loctex.kernels.bench",
                            *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
