"""Every Triton kernel compiles for the GPUs users have — sm_80 (A100) and sm_90 (H100/H200) — with
every launch configuration its launcher or autotuner can pick, and none of them spills registers,
runs out of shared memory or misses the tensor cores. No GPU needed: Triton compiles to PTX and its
bundled ``ptxas`` assembles it for a target named by ``GPUTarget``.

What each compile is checked for:
* it succeeds (the launchers would otherwise fail on their first call on that GPU);
* no register spills: ``ptxas -v`` of the very invocation Triton makes (same flags) reports
  "N bytes spill stores" — the compiled kernel's ``n_regs`` needs a driver, its log does not;
* shared memory (Triton's metadata ``shared``) within the target's per-block opt-in maximum:
  sm_80 163 KiB = 166,912 B, sm_90 227 KiB = 232,448 B ("Maximum amount of shared memory per thread
  block", CUDA C++ Programming Guide, Compute Capabilities table; the same figures are
  ``sharedMemPerBlockOptin`` on an A100 and an H100);
* matmul-shaped kernels emit tensor-core instructions for 16-bit inputs: ``mma`` on sm_80,
  ``wgmma`` or ``mma`` on sm_90 (grep of the PTX);
* no memory fences or ordered atomics: the kernels' atomics are relaxed (acq_rel ones cost a
  fence around each, and nothing reads their results back).

The configurations come from the kernel modules' ``launch_space(dtype)`` — the same tables and
pruning rules the launchers use — not from a list kept here. Each test run compiles afresh (a
temporary Triton cache) in a subprocess without ``TRITON_INTERPRET`` (conftest.py sets it for the
other tests), on a process pool, and writes the table to ``benchmarks/results/compile_sm80_sm90.md``.
``python tests/test_kernels_compile.py`` does the same by hand.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "results" / "compile_sm80_sm90.md"
TARGETS = {80: 166_912, 90: 232_448}           # compute capability -> shared memory per block (B)
DTYPES = ("bfloat16", "float32")
# fp16 takes the bf16 code path (same element size, same tile shapes, same mma shapes), so it is
# not compiled separately.
MODULES = ("render", "trace_attention", "contrastive")
MATMUL_KERNELS = {"trace_attention": ("_fwd_kernel", "_bwd_kernel"),
                  "contrastive": ("_fwd_kernel", "_grad_kernel")}
_TRITON_DTYPE = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}
# argument types by name: the pointers that carry the inputs' dtype, the int32 ones and the float
# scalars; every other pointer is float32 and every other scalar int32
_INPUT_POINTERS = {"q_ptr", "k_ptr", "a_ptr", "b_ptr", "g_ptr"}
_INT_POINTERS = {"ranges_ptr"}
_FLOAT_SCALARS = {"scale", "neg_inv_2s2"}
_OPTIONS = ("num_warps", "num_stages", "maxnreg")   # launch keywords that are compile options
# memory-ordering fences and ordered atomics (not wgmma.fence / fence.proxy, which order the
# tensor cores' operand reads)
_ORDERING = (r"(?<![\w.])(?:membar\.\w+|fence\.(?:acq_rel|sc)\b"
             r"|(?:atom|red)(?:\.\w+)*\.(?:acq_rel|acquire|release|sc)\b)")


def _signature(kernel, constexprs: dict, dtype: str):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + (_TRITON_DTYPE[dtype] if name in _INPUT_POINTERS
                               else "i32" if name in _INT_POINTERS else "fp32")
        else:
            sig[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
    return sig


def _jobs():
    """(module, kernel name, constexprs, compile options, dtype, capability) of every compile."""
    import importlib

    import torch
    jobs = []
    for mod_name in MODULES:
        mod = importlib.import_module(f"loctex.kernels.triton.{mod_name}")
        for dtype in DTYPES:
            for kernel, meta in mod.launch_space(getattr(torch, dtype)):
                meta = dict(meta)
                options = {k: meta.pop(k) for k in _OPTIONS if k in meta}
                for cap in TARGETS:
                    jobs.append((mod_name, kernel.__name__, meta, options, dtype, cap))
    return jobs


def compile_one(job):
    """Compile one job; -> its table row (a dict). Runs in a pool worker."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    mod_name, kernel_name, constexprs, options, dtype, cap = job
    kernel = getattr(importlib.import_module(f"loctex.kernels.triton.{mod_name}"), kernel_name)
    src = ASTSource(fn=kernel, signature=_signature(kernel, constexprs, dtype), constexprs=constexprs,
                    attrs={(i,): [["tt.divisibility", 16]]        # fresh tensors: 16 B aligned
                           for i, name in enumerate(kernel.arg_names) if name.endswith("_ptr")})
    knobs.nvidia.dump_ptxas_log = True   # Triton prints ptxas -v's log of this very compile
    log = io.StringIO()
    row = dict(kernel=f"{mod_name}.{kernel_name}", config=constexprs, dtype=dtype, target=f"sm_{cap}",
               warps=options["num_warps"], stages=options["num_stages"],
               maxnreg=options.get("maxnreg"))
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
    except Exception as exc:  # noqa: BLE001 -- any compile failure is a finding, reported in the table
        return dict(row, error=f"{type(exc).__name__}: {str(exc)[:500]}")
    text = log.getvalue()
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", text)]
    spills = [int(a) + int(b) for a, b in
              re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    stack = [int(s) for s in re.findall(r"(\d+) bytes stack frame", text)]
    ptx = compiled.asm["ptx"]
    if not regs:
        return dict(row, error="no ptxas -v output:\n" + text[-500:])
    return dict(row, registers=max(regs), spill_bytes=max(spills, default=0),
                stack_bytes=max(stack, default=0), shared=compiled.metadata.shared,
                wgmma="wgmma.mma_async" in ptx, mma=bool(re.search(r"\bmma\.sync", ptx)),
                fences=len(re.findall(_ORDERING, ptx)))


def compile_all(workers: int | None = None):
    """Compile every job in a fresh Triton cache on a process pool; -> rows."""
    from concurrent.futures import ProcessPoolExecutor
    jobs = _jobs()
    # the biggest kernels first, so that the pool does not end on one long compile
    jobs.sort(key=lambda j: (j[1] == "_bwd_kernel", j[4] == "float32", str(j[2])), reverse=True)
    with tempfile.TemporaryDirectory(prefix="loctex-compile-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache     # the workers inherit it
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
            return list(pool.map(compile_one, jobs, chunksize=1))


def problems(row) -> list[str]:
    """What is wrong with one compile (empty: nothing)."""
    if "error" in row:
        return [row["error"]]
    out = []
    if row["spill_bytes"] or row["stack_bytes"]:
        out.append(f"spills {row['spill_bytes']} B (stack frame {row['stack_bytes']} B)")
    limit = TARGETS[int(row["target"][3:])]
    if row["shared"] > limit:
        out.append(f"shared memory {row['shared']} B > {limit} B")
    if row["fences"]:
        # what acq_rel atomics compile to (a fence and an L1 invalidate around each); the kernels'
        # atomics are relaxed: nothing reads their results back
        out.append(f"{row['fences']} memory fences or ordered atomics in the PTX")
    mod, name = row["kernel"].split(".")
    if row["dtype"] == "bfloat16" and name in MATMUL_KERNELS.get(mod, ()):
        if not (row["mma"] or row["wgmma"]):
            out.append("no tensor-core instruction (mma/wgmma) in the PTX")
    return out


def _config_text(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items() if k != "INTERPRET")


def write_table(rows, path: Path) -> None:
    """The committed table: nothing in it changes between runs of the same code (no timings)."""
    import triton
    ok = [r for r in rows if "error" not in r]
    lines = [
        "# Triton kernels compiled offline for sm_80 and sm_90",
        "",
        f"`tests/test_kernels_compile.py` (triton {triton.__version__}, its bundled ptxas): every "
        "kernel x launch configuration x dtype x target that the launchers and autotuners can pick, "
        f"{len(rows)} compiles. Registers and spills from `ptxas -v`; shared memory "
        "from Triton's metadata, against the per-block maximum (sm_80 166,912 B, sm_90 232,448 B); "
        "tensor cores: `mma`/`wgmma` in the PTX.",
        "",
    ]
    for target in TARGETS:
        sel = [r for r in ok if r["target"] == f"sm_{target}"]
        if sel:
            lines.append(f"- sm_{target}: max {max(r['registers'] for r in sel)} registers, max "
                         f"{max(r['shared'] for r in sel):,} B shared memory, "
                         f"{sum(bool(problems(r)) for r in sel)} with findings.")
    lines += ["", "| kernel | config | dtype | target | warps | stages | maxnreg | registers "
              "| spills (B) | shared (B) | tensor cores | findings |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {_config_text(r['config'])} | {r['dtype']} | {r['target']} "
                         f"| {r['warps']} | {r['stages']} | {r['maxnreg'] or ''} | | | | "
                         f"| {r['error'].splitlines()[0]} |")
            continue
        tc = "wgmma" if r["wgmma"] else "mma" if r["mma"] else "-"
        lines.append(f"| {r['kernel']} | {_config_text(r['config'])} | {r['dtype']} | {r['target']} "
                     f"| {r['warps']} | {r['stages']} | {r['maxnreg'] or ''} | {r['registers']} "
                     f"| {r['spill_bytes']} "
                     f"| {r['shared']:,} | {tc} | {'; '.join(problems(r)) or 'ok'} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    import time
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[argv.index("--json") + 1]) if "--json" in argv else None
    t0 = time.perf_counter()
    rows = compile_all()
    seconds = time.perf_counter() - t0
    rows.sort(key=lambda r: (r["kernel"], r["dtype"], json.dumps(r["config"]), r["target"]))
    write_table(rows, TABLE)
    if out is not None:
        out.write_text(json.dumps(rows))
    bad = [(r, p) for r in rows if (p := problems(r))]
    for r, p in bad:
        print(r["kernel"], _config_text(r["config"]), r["dtype"], r["target"], "; ".join(p))
    print(f"{len(rows)} compiles in {seconds:.1f} s, {len(bad)} with findings -> {TABLE}")
    return 1 if bad else 0


def _bundled_ptxas() -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.exists() else None


@pytest.mark.skipif(_bundled_ptxas() is None, reason="triton or its bundled ptxas is not installed")
def test_every_kernel_config_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, __file__, "--json", str(result)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert result.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(result.read_text())
    # the enumeration covers every kernel, both dtypes and both targets
    assert {r["kernel"].split(".")[0] for r in rows} == set(MODULES)
    assert {(r["dtype"], r["target"]) for r in rows} == {(d, f"sm_{t}") for d in DTYPES for t in TARGETS}
    assert all(r["stages"] >= 1 for r in rows)
    findings = [f"{r['kernel']} {_config_text(r['config'])} {r['dtype']} {r['target']}: "
                + "; ".join(p) for r in rows if (p := problems(r))]
    assert not findings, "\n".join(findings)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


if __name__ == "__main__":
    sys.exit(main())
