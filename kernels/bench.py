"""Kernel microbenchmarks: ``python -m loctex.kernels.bench [--device cpu|cuda] [--quick] [--threads N] [--out DIR]``.

``--roofline`` writes only the H100 roofline at the paper's shapes (no timing); ``--contrastive-large``
compares the CPU contrastive paths at N = 4k, 16k and 64k, one subprocess per run (time and RSS peak).

For each op (render_traces, trace_attention_loss, contrastive_loss) and provider (reference,
triton, cpp, blocked) over paper-scale shapes: forward, backward and full-pass time (median and 20/80%
quantiles; ``triton.testing.do_bench`` on CUDA, a timing loop on CPU) and the peak extra memory
of a full pass (``torch.cuda.max_memory_allocated`` on CUDA; on CPU the torch allocator's
allocations as recorded by the profiler). On CUDA it also measures the bf16 matmul rate and
reports the contrastive loss's rate on its nominal 8·N²·D flops as a fraction of it.

Beside each case: its roofline on an H100 SXM (``loctex.kernels.roofline``): the bytes and flops the
fused kernel (provider ``triton``) and the eager reference must move and do, the time bound they
imply, their ratio, and on CUDA ``fraction_of_bound`` (bound ÷ measured time; always against the
H100's figures, so on an H200, whose HBM moves 4.8 TB/s, a memory-bound kernel can pass 100%).
The summary checks the targets of ``loctex.kernels.targets``.

Writes ``DIR/<device>_<date>.csv`` (one row per kernel, provider, shape, metric), ``.md`` (the
tables and the targets) and ``.png``; after every case the CSV is rewritten, so a run cut short
keeps what it measured. A provider that is not available (not built, no
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

from . import roofline, targets, testing

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
    params: dict                         # the shape, as loctex.kernels.roofline takes it
    dtype: torch.dtype
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

    params = {"B": batch, "L": tokens, "grid": tuple(grid), "D": dim, "ppt": ppt}
    return Case(kernel, shape, build, params, dtype)


def _contrastive_case(n, dim, dtype, device) -> Case:
    def build(provider):
        import loctex.kernels as K
        image, text, ls = testing.contrastive_inputs(n, dim, dtype=dtype, device=device, seed=0)
        leaves = [image.requires_grad_(), text.requires_grad_(), ls.requires_grad_()]
        return (lambda: K.contrastive_loss(*leaves, provider=provider)), leaves

    return Case("contrastive_loss", f"N={n},D={dim}", build, {"N": n, "D": dim}, dtype,
                flops=8.0 * n * n * dim)


# the paper's shapes (issue 5): fused loss B=256, L=96, 7x7 and 14x14, D=256, ~20 points per
# token; contrastive N from 4k to 1M at D=512
PAPER_TRACE = [(256, 96, (7, 7), 256, 20), (256, 96, (14, 14), 256, 20)]
PAPER_CONTRASTIVE = [4096, 16384, 65536, 262144, 1048576]
PAPER_CONTRASTIVE_DIM = 512


def cases(device: str, quick: bool, dtype: torch.dtype, contrastive_n=None) -> list[Case]:
    if device == "cuda":
        if quick:
            trace = [(32, 96, (7, 7), 256, 20)]
            contrastive = [4096, 16384]
        else:
            trace, contrastive = PAPER_TRACE, PAPER_CONTRASTIVE
        cdim = PAPER_CONTRASTIVE_DIM
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
    out += [_contrastive_case(n, cdim, dtype, device) for n in (contrastive_n or contrastive)]
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
    if once > 0.5:  # huge shapes: a few timed runs instead of do_bench's hundreds (one above 5 s)
        times = []
        for _ in range(3 if once < 5 else 1):
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
    if provider == "blocked":
        if kernel != "contrastive_loss":
            return "only the contrastive loss has a blocked path"
        if device != "cpu":
            return "the blocked path is the CPU one (Triton on CUDA)"
    if provider == "cpp":
        if device != "cpu":
            return "the C++ ops are the CPU path"
        if kernel == "contrastive_loss":
            return "no C++ contrastive op (by design: Triton on CUDA, the blocked torch path on CPU)"
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


CSV_FIELDS = ["kernel", "provider", "shape", "metric", "value", "note", "device", "torch", "triton", "date"]


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in CSV_FIELDS} for r in rows)


def _table(rows) -> dict[tuple, dict]:
    """{(kernel, shape, provider): {metric: value, or the note for skipped and bound_ms's limiter}}."""
    table: dict[tuple, dict] = {}
    for r in rows:
        m = table.setdefault((r["kernel"], r["shape"], r["provider"]), {})
        m[r["metric"]] = r["value"] if r["metric"] != "skipped" else r["note"]
        if r["metric"] == "bound_ms":
            m["limiter"] = r["note"]
    return table


def roofline_markdown(rows) -> list[str]:
    """The roofline table: fused (triton) beside the reference, per kernel and shape."""
    lines = ["| kernel | shape | fused MB | fused GFLOP (mma) | fused bound µs | reference MB | "
             "reference GFLOP (mma) | reference bound µs | bound ratio | fused measured ÷ bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    table = _table(rows)
    for (kernel, shape, provider), m in table.items():
        if provider != "triton" or "bound_ms" not in m:
            continue
        ref = table.get((kernel, shape, "reference"), {})
        frac = m.get("fraction_of_bound")
        lines.append(
            f"| {kernel} | {shape} | {_fmt(m['bytes'] / 1e6)} | {_fmt(m['mma_flops'] / 1e9)} | "
            f"{_fmt(m['bound_ms'] * 1e3)} ({m['limiter']}) | {_fmt(ref.get('bytes', 0) / 1e6)} | "
            f"{_fmt(ref.get('mma_flops', 0) / 1e9)} | {_fmt(ref.get('bound_ms', 0) * 1e3)} "
            f"({ref.get('limiter', '–')}) | {_fmt(m['bound_ratio'])}× | "
            f"{'–' if frac is None else f'{frac:.0%}'} |")
    return lines


def roofline_notes() -> list[str]:
    hw = roofline.H100_SXM
    return [f"Bounds on an {hw.name}: the slowest of HBM bytes at {hw.hbm_bytes_per_s / 1e12:.2f} TB/s, "
            f"matmul flops at the operands' tensor-core rate (bf16 {hw.mma_flops_per_s['bfloat16'] / 1e12:.1f}, "
            f"TF32 {hw.mma_flops_per_s['tf32'] / 1e12:.1f}, FP32 {hw.mma_flops_per_s['float32'] / 1e12:.0f} TFLOP/s; "
            "the reference computes in float32), other fp32 work, and exp/log at the SFU rate "
            f"({hw.sfu_per_s / 1e12:.2f}e12/s); the limiter is in parentheses. Fused = the Triton kernels' "
            "traffic (formulas in `loctex.kernels.roofline`); reference = the eager reference's aten ops, "
            "counted. Bound ratio = reference bound ÷ fused bound. Sources:", ""] + \
        [f"- {src}" for src in hw.sources] + [""]


def write_markdown(path, rows, meta, target_lines):
    table = _table(rows)
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
        if not any(k in m for k in ("full_ms", "fwd_ms", "skipped")):
            continue  # roofline only (the table below)
        tf = m.get("tflops")
        tf_s = "–" if tf is None else _fmt(tf) + (f" ({m['frac_matmul']:.0%})" if "frac_matmul" in m else "")
        lines.append(f"| {kernel} | {shape} | {provider} | {span(m, 'fwd')} | {span(m, 'bwd')} | "
                     f"{span(m, 'full')} | {_fmt(m.get('peak_mem_mb'))} | "
                     f"{_fmt(m.get('speedup_full'))} | {_fmt(m.get('memory_ratio'))} | {tf_s} | "
                     f"{m.get('skipped', '')} |")
    lines += ["", "## Roofline (H100 SXM, on paper)", ""] + roofline_notes() + roofline_markdown(rows)
    lines += ["", "## Targets (`loctex.kernels.targets`)", ""] + [f"- {t}" for t in target_lines] + [""]
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


def add_roofline(add, case: Case, results: dict, device: str) -> None:
    """The case's H100 roofline rows (fused = provider "triton", and the reference); on CUDA also
    ``fraction_of_bound`` of each measured provider."""
    bounds = roofline.roofline(case.kernel, case.params, case.dtype)
    for provider, m in bounds.items():
        for metric in ("bytes", "mma_flops", "transcendentals", "bound_ms", "bound_ratio"):
            if metric in m:
                add(case, provider, metric, float(m[metric]), m["limiter"] if metric == "bound_ms" else "")
        measured = results.get(provider)
        if device == "cuda" and isinstance(measured, dict) and "full_ms" in measured:
            add(case, provider, "fraction_of_bound", m["bound_ms"] / measured["full_ms"])


# ----------------------------------------------------------------------------------------------

def run(device: str, quick: bool, out_dir: str, providers=("reference", "triton", "cpp", "blocked"),
        kernels=None, dtype: str = "auto", log=print, command: str | None = None,
        contrastive_n=None) -> dict:
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
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{slug}_{meta['date']}{'_quick' if quick else ''}")
    oom: set[tuple[str, str]] = set()
    for case in cases(device, quick, tdtype, contrastive_n):
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
        add_roofline(add, case, results, device)
        write_csv(stem + ".csv", rows)  # after every case: a run cut short keeps what it measured
    # the paper targets need the paper's shapes, which only the full CUDA run has
    where = {device, "paper"} if device == "cuda" and not quick else {device}
    target_lines = targets.summary_lines(targets.evaluate(rows, where))
    write_csv(stem + ".csv", rows)
    write_markdown(stem + ".md", rows, meta, target_lines)
    write_plot(stem + ".png", rows, meta)
    for t in target_lines:
        log(t)
    log(f"wrote {stem}.csv, .md, .png")
    return {"rows": rows, "targets": target_lines, "files": [stem + ext for ext in (".csv", ".md", ".png")]}


def _meta_rows(name: str):
    now = _dt.datetime.now()
    import triton
    base = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "date": now.isoformat(timespec="seconds")}

    def row(kernel, provider, shape, metric, value, note=""):
        return dict(base, kernel=kernel, provider=provider, shape=shape, metric=metric, value=value, note=note)
    return now, row


def paper_roofline(out_dir: str, dtype: torch.dtype = torch.bfloat16, log=print) -> dict:
    """The H100 roofline at the paper's shapes, no timing: ``DIR/roofline_h100-sxm_<date>.{csv,md}``."""
    now, row = _meta_rows(roofline.H100_SXM.name + " (on paper)")
    rows: list[dict] = []

    def add(case, provider, metric, value, note=""):
        rows.append(row(case.kernel, provider, case.shape, metric, value, note))

    paper = [_trace_case(k, *t, dtype=dtype, device="cpu") for k in ("render_traces", "trace_attention_loss")
             for t in PAPER_TRACE]
    paper += [_contrastive_case(n, PAPER_CONTRASTIVE_DIM, dtype, "cpu") for n in PAPER_CONTRASTIVE]
    for case in paper:
        add_roofline(add, case, {}, "paper")
    lines = roofline_markdown(rows)
    target_lines = targets.summary_lines(targets.evaluate(rows, {"paper"}))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"roofline_h100-sxm_{now.strftime('%Y-%m-%d')}")
    write_csv(stem + ".csv", rows)
    with open(stem + ".md", "w") as f:
        f.write("\n".join([f"# Roofline on paper — {roofline.H100_SXM.name}, {_name(dtype)} inputs", "",
                           f"{now.strftime('%Y-%m-%d')} · `python -m loctex.kernels.bench --roofline` "
                           "(no timing: bytes and flops counted)", ""]
                          + roofline_notes() + lines + ["", "## Targets", ""]
                          + [f"- {t}" for t in target_lines] + [""]))
    for line in lines + target_lines:
        log(line)
    log(f"wrote {stem}.csv, .md")
    return {"rows": rows, "targets": target_lines, "files": [stem + ".csv", stem + ".md"]}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# CPU contrastive at large N: one subprocess per run, so that each peak is its own


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))


def one_contrastive_run(n: int, dim: int, dtype: str, provider: str, reps: int) -> dict:
    """In this process: one forward+backward pass whose resident-set peak above the resident set
    before it is the memory figure (VmHWM reset through /proc/self/clear_refs; where that is
    refused, the peak since the process started), then ``reps - 1`` more; the times are the median
    of those (of the first when reps == 1)."""
    import loctex.kernels as K
    image, text, ls = testing.contrastive_inputs(n, dim, dtype=getattr(torch, dtype), seed=0)
    leaves = [t.requires_grad_() for t in (image, text, ls)]

    def full():
        _clear(leaves)
        t0 = time.perf_counter()
        loss = K.contrastive_loss(*leaves, provider=provider)
        t1 = time.perf_counter()
        loss.backward()
        return (t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3

    # a small pass first: code pages, lazy imports and thread pools stay out of the peak
    K.contrastive_loss(*[t[:64].detach().requires_grad_() for t in leaves[:2]], leaves[2].detach(),
                       provider=provider).backward()
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = _rss_kb("VmRSS")
    times = [full()]
    peak = _rss_kb("VmHWM") - before
    times = [full() for _ in range(reps - 1)] or times
    return {"fwd_ms": statistics.median(t[0] for t in times), "full_ms": statistics.median(t[1] for t in times),
            "peak_rss_mb": peak / 1024, "hwm_reset": reset, "reps": len(times)}


def _mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("MemAvailable:")) / 1024


def contrastive_large(out_dir: str, ns=(4096, 16384, 65536), dim: int = 512, dtype: str = "float32",
                      providers=("blocked", "reference"), timeout_s: float = 3600, log=print) -> dict:
    """The blocked CPU path against the N x N reference, each run in a fresh subprocess (time, and
    peak resident memory above the inputs'). The reference runs only where its extrapolated peak
    fits in 70% of the available memory; otherwise its row says what it would need."""
    import json
    import subprocess
    name, slug = device_info("cpu")
    now, row = _meta_rows(name)
    rows: list[dict] = []
    ref_peak: tuple[int, float] | None = None   # (N, MB) of the largest reference run
    for n in ns:
        shape = f"N={n},D={dim},{dtype}"
        for provider in providers:
            if provider == "reference":
                # its peak grows as N² (logits, two log-softmaxes and their gradients, float32)
                need = ref_peak[1] * (n / ref_peak[0]) ** 2 if ref_peak else 5 * 4 * n * n / 2**20
                if need > 0.7 * _mem_available_mb():
                    note = (f"not run: needs ~{need / 1024:.0f} GiB (N² scaling of the measured "
                            f"N={ref_peak[0]} peak)" if ref_peak else f"not run: needs ~{need / 1024:.0f} GiB")
                    rows.append(row("contrastive_loss", provider, shape, "skipped", "", note))
                    log(f"contrastive_loss {shape} {provider}: {note}")
                    continue
            reps = 4 if n <= 16384 else 1
            cmd = [sys.executable, "-m", "loctex.kernels.bench", "--one-contrastive",
                   f"{n},{dim},{dtype},{provider},{reps}", "--threads", str(torch.get_num_threads())]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
                result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
                note = "" if result else (proc.stderr.strip().splitlines() or ["failed"])[-1][:160]
            except subprocess.TimeoutExpired:
                result, note = None, f"timed out after {timeout_s:.0f} s"
            if result is None:
                rows.append(row("contrastive_loss", provider, shape, "skipped", "", note))
                log(f"contrastive_loss {shape} {provider}: {note}")
                continue
            if provider == "reference":
                ref_peak = (n, result["peak_rss_mb"])
            for metric in ("fwd_ms", "full_ms", "peak_rss_mb"):
                rows.append(row("contrastive_loss", provider, shape, metric, result[metric],
                                f"median of {result['reps']}" if metric != "peak_rss_mb" else
                                ("VmHWM reset" if result["hwm_reset"] else "VmHWM since start")))
            log(f"contrastive_loss {shape} {provider}: fwd {result['fwd_ms']:.0f} ms, fwd+bwd "
                f"{result['full_ms']:.0f} ms, peak +{result['peak_rss_mb']:.0f} MB RSS")
    target_lines = targets.summary_lines(targets.evaluate(
        [dict(r, shape=r["shape"].replace(f",{dtype}", "")) for r in rows], {"cpu"})[1:])
    table = _table(rows)
    lines = [f"# Contrastive loss at large N on CPU — {name}", "",
             f"{now.strftime('%Y-%m-%d')} · torch {torch.__version__} · `python -m loctex.kernels.bench "
             f"--contrastive-large` · load average at start "
             f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())}", "",
             "Each run in its own process. Time: forward, and forward+backward (median of 3 after a "
             "first pass up to N = 16k; the one pass above). Peak: the resident set's high-water mark "
             "during the first forward+backward minus the resident set before it (Linux VmHWM, reset through "
             "/proc/self/clear_refs), so it sees torch's CPU allocations, which tracemalloc does not.", "",
             "| N, D, dtype | provider | fwd ms | fwd+bwd ms | peak MB | note |", "|---|---|---|---|---|---|"]
    for (kernel, shape, provider), m in table.items():
        lines.append(f"| {shape} | {provider} | {_fmt(m.get('fwd_ms'))} | {_fmt(m.get('full_ms'))} | "
                     f"{_fmt(m.get('peak_rss_mb'))} | {m.get('skipped', '')} |")
    lines += ["", "## Target", ""] + [f"- {t}" for t in target_lines] + [""]
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{slug}_contrastive-large_{now.strftime('%Y-%m-%d')}")
    write_csv(stem + ".csv", rows)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    for t in target_lines:
        log(t)
    log(f"wrote {stem}.csv, .md")
    return {"rows": rows, "targets": target_lines, "files": [stem + ".csv", stem + ".md"]}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m loctex.kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and few repetitions (smoke test)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--providers", default="reference,triton,cpp,blocked")
    p.add_argument("--kernels", default="", help="comma-separated subset of "
                   "render_traces,trace_attention_loss,contrastive_loss")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="embeddings / q, k dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU: torch threads (default: torch's, one per core); other counts name the files")
    p.add_argument("--contrastive-n", default="", metavar="N,N,...",
                   help="contrastive batch sizes instead of the device's default list")
    p.add_argument("--roofline", action="store_true",
                   help="only the H100 roofline at the paper's shapes (no timing)")
    p.add_argument("--contrastive-large", default="", metavar="N,N,...",
                   help="CPU contrastive, blocked vs reference, at these N (e.g. 4096,16384,65536), "
                        "D=512, one subprocess per run")
    p.add_argument("--one-contrastive", default="", help=argparse.SUPPRESS)  # N,D,dtype,provider,reps
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.one_contrastive:
        import json
        n, d, dtype, provider, reps = args.one_contrastive.split(",")
        print(json.dumps(one_contrastive_run(int(n), int(d), dtype, provider, int(reps))))
        return
    if args.roofline:
        paper_roofline(args.out, dtype=torch.float32 if args.dtype == "float32" else torch.bfloat16)
        return
    if args.contrastive_large:
        contrastive_large(args.out, ns=[int(x) for x in args.contrastive_large.split(",")],
                          dtype="bfloat16" if args.dtype == "bfloat16" else "float32")
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    run(args.device, args.quick, args.out, providers=tuple(args.providers.split(",")),
        kernels=set(filter(None, args.kernels.split(","))), dtype=args.dtype,
        contrastive_n=[int(x) for x in args.contrastive_n.split(",") if x],
        command=shlex.join(["python", "-m", "loctex.kernels.bench",
                            *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
