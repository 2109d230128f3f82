"""``make gpu-check``: everything a GPU machine must show, in one command of at most 8 minutes.

    python benchmarks/gpu_check.py [--out DIR] [--budget-s 470]     # on a GPU machine
    python benchmarks/gpu_check.py --dry-run                          # the rehearsal, on CPU, tiny shapes

For a fresh GPU machine that has torch, triton, transformers and torchvision but not DeepSpeed,
DALI or pycocotools. Stages, each a subprocess with its own timeout (a stage that fails or times
out is recorded and the next one runs):

1. ``install``: a venv that sees the launching interpreter's packages (``--system-site-packages``
   plus a ``.pth`` that adds the launcher's own site-packages: on GPU images that interpreter is
   itself often a venv), then ``pip install --no-deps --no-build-isolation -e .`` and any wheels
   carried in ``.whl/``. Every later stage runs in that venv.
2. ``roofline``: ``python -m loctex.kernels.bench --roofline`` (H100 bounds on paper).
3. ``kernel_tests``: ``tests/test_kernels_*.py`` on the GPU, compiled (``TRITON_INTERPRET=0``,
   inputs on CUDA through ``LOCTEX_TEST_DEVICE=cuda``), against the float64 reference; the C++
   (CPU) and gloo tests are deselected.
4. ``kernel_bench``: ``python -m loctex.kernels.bench --device cuda`` at the paper's shapes (fused
   loss B=256, L=96, 7×7 and 14×14, D=256; contrastive N = 4k, 64k and 1M at D=512, bf16), with
   peak memory.
5. ``train_throughput``: the paper-scale model (ResNet-50, 224 px, bf16 autocast, channels-last,
   fused AdamW) on synthetic batches in a plain torch loop, LocTex against contrastive-only.
6. ``jpeg_decode``: decoding + resizing to 224 px on the GPU, in images/s: DALI's ``mixed`` decoder
   when DALI is installed, else ``torchvision.io.decode_jpeg(device="cuda")`` (nvJPEG).

Writes ``DIR/gpu-check_<device>_<date>.{md,json}`` beside the benchmark's own files, and prints the
targets of ``loctex.kernels.targets`` as met / missed. ``--dry-run`` runs the same stages on the
CPU with tiny shapes (and reuses the current environment instead of installing), so that the real
run does not fail on its first try.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, "build", "gpu-check-venv")   # build/ is git-ignored
WHEELS = os.path.join(ROOT, ".whl")

# seconds per stage on the GPU machine; they add up to the 8-minute budget with a little to spare
STAGE_TIMEOUTS = {"install": 120, "roofline": 25, "kernel_tests": 100, "kernel_bench": 130,
                  "train_throughput": 70, "jpeg_decode": 25}
# CPU-only kernel tests (the CPU benchmark's smoke test, the roofline's counts): not run on the GPU
CPU_ONLY_TESTS = ("test_kernels_bench.py", "test_kernels_roofline.py")
# the rehearsal's limits are generous: CI machines are often shared
DRY_RUN_TIMEOUTS = {"install": 60, "roofline": 60, "kernel_tests": 60, "kernel_bench": 60,
                    "train_throughput": 60, "jpeg_decode": 30}
TAIL_CHARS = 3000


# ----------------------------------------------------------------------------------------------
# running stages


def run_stage(name: str, cmd: list[str], timeout_s: float, env: dict | None = None, log=print) -> dict:
    """Runs ``cmd`` in its own process group; on timeout the whole group is killed (no stage can
    hang the check). Returns {name, status: ok|failed|timeout, seconds, returncode, tail}."""
    log(f"== {name}: {' '.join(cmd)} (timeout {timeout_s:.0f} s)")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout_s))
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = "timeout"
    seconds = time.monotonic() - t0
    tail = (out or "")[-TAIL_CHARS:]
    log(tail.rstrip()[-1500:])
    log(f"== {name}: {status} in {seconds:.1f} s")
    return {"name": name, "status": status, "seconds": round(seconds, 1), "returncode": proc.returncode,
            "tail": tail}


def _site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def make_venv(path: str) -> str:
    """A venv at ``path`` that sees this interpreter's packages; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", path],
                   check=True)
    python = os.path.join(path, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # addsitedir, not a plain path line: it also runs the launcher's own .pth files (editable installs)
    with open(os.path.join(site, "_gpu_check_parent.pth"), "w") as f:
        f.write("".join(f"import site; site.addsitedir({d!r})\n" for d in _site_dirs()))
    return python


def install_commands(python: str, dry_run: bool) -> list[list[str]]:
    """pip runs from the launcher, installing into the venv (``--python``), since the venv has no pip."""
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
           "--no-build-isolation"]
    cmds = [pip + (["--dry-run"] if dry_run else []) + ["-e", ROOT]]
    wheels = sorted(glob.glob(os.path.join(WHEELS, "*.whl")))
    if wheels:
        cmds.append(pip + (["--dry-run"] if dry_run else []) + wheels)
    return cmds


# ----------------------------------------------------------------------------------------------
# stage bodies that are not other commands: `python benchmarks/gpu_check.py --stage NAME`


def _device_name(device: str) -> tuple[str, str]:
    import torch
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU {os.cpu_count()} cores"
    return name, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def synthetic_batch(batch: int, tokens: int, image_size: int, vocab: int, ppt: int, device, seed=0) -> dict:
    """A §2.4 batch of random tensors: every token has ``ppt`` points of its own and is a target."""
    import torch
    g = torch.Generator().manual_seed(seed)
    T = batch * tokens
    starts = torch.arange(T, dtype=torch.int32) * ppt
    b = {"images": torch.randn(batch, 3, image_size, image_size, generator=g),
         "tokens": torch.randint(1, vocab, (batch, tokens), generator=g),
         "attention_mask": torch.ones(batch, tokens, dtype=torch.bool),
         "points_xy": torch.rand(T * ppt, 2, generator=g),
         "point_weights": torch.full((T * ppt,), 0.1),
         "token_ranges": torch.stack([starts, starts + ppt], -1).reshape(batch, tokens, 2),
         "loc_mask": torch.ones(batch, tokens, dtype=torch.bool),
         "index": torch.arange(batch)}
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}


def train_throughput(device: str, dry_run: bool) -> dict:
    """Images/s of fwd+bwd+AdamW steps of the model and ``loctex.losses`` (no DeepSpeed), LocTex
    (localization_weight 1) against contrastive-only (0), one after the other in this process."""
    import torch

    from loctex import configs
    from loctex.config import load_config
    from loctex.losses import build_loss
    from loctex.models import build_model

    if dry_run:
        # channels-last is for the GPU's tensor cores; on the CPU it makes convolutions crawl
        overrides = ["model.visual=resnet18", "model.channels_last=false", "data.image_size=32", "data.max_tokens=6",
                     "train.micro_batch_size=2", "model.text.layers=1", "model.text.width=32",
                     "model.text.heads=2", "model.embed_dim=16", "model.attention_dim=16"]
        warmup, steps, vocab = 0, 1, 100
    else:
        overrides, warmup, steps, vocab = [], 3, 8, 10000
    cuda = device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    ppt = 20
    result = {"device": _device_name(device)[0], "steps": steps, "warmup": warmup}
    for label, weight in (("loctex", 1.0), ("contrastive_only", 0.0)):
        cfg = load_config(configs.path("coco_ln_r50"), overrides + [f"loss.localization_weight={weight}"])
        torch.manual_seed(0)
        model = build_model(cfg, vocab_size=vocab).to(device)
        model.train()
        loss_fn = build_loss(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
        B, L, S = cfg.train.micro_batch_size, cfg.data.max_tokens, cfg.data.image_size
        batch = synthetic_batch(B, L, S, vocab, ppt, device)
        autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cuda)

        def step():
            with autocast:
                out = model(batch)
                losses = loss_fn(out, batch)
            losses["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return losses

        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            losses = step()
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        result[label] = {"visual": cfg.model.visual, "image_size": S, "micro_batch": B, "tokens": L,
                         "step_ms": dt * 1e3, "images_per_s": B / dt,
                         "loss": losses["loss"].item(),
                         "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        print(f"{label}: {B / dt:.1f} images/s ({dt * 1e3:.1f} ms/step, batch {B}, {S} px, "
              f"{cfg.model.visual})", flush=True)
        del model, opt, batch, losses
        if cuda:
            torch.cuda.empty_cache()
    result["loctex_over_contrastive"] = result["loctex"]["images_per_s"] / result["contrastive_only"]["images_per_s"]
    return result


def _jpegs(count: int, size: tuple[int, int]) -> list:
    """COCO-like JPEGs (smooth content, some texture), encoded on the CPU by torchvision."""
    import torch
    import torchvision.io as io
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        low = torch.rand(1, 3, 12, 16, generator=g)
        img = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)[0]
        img = (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(0, 1)
        out.append(io.encode_jpeg((img * 255).to(torch.uint8), quality=90))
    return out


def jpeg_decode(device: str, dry_run: bool) -> dict:
    """Images/s of decoding 640×480 JPEGs and resizing them to 224×224 (uint8 out), in batches."""
    import importlib.util

    import torch
    import torchvision.io as io
    count, batch, rounds = (8, 4, 2) if dry_run else (512, 128, 5)
    data = _jpegs(count, (64, 80) if dry_run else (480, 640))
    use_dali = device == "cuda" and importlib.util.find_spec("nvidia.dali") is not None
    if use_dali:
        import numpy as np
        from nvidia.dali import fn, pipeline_def

        arrays = [np.frombuffer(d.numpy().tobytes(), dtype=np.uint8) for d in data]

        @pipeline_def(batch_size=batch, num_threads=8, device_id=0)
        def pipe():
            enc = fn.external_source(
                source=lambda info: [arrays[(info.iteration * batch + i) % count] for i in range(batch)],
                batch=True, batch_info=True)
            img = fn.decoders.image(enc, device="mixed")
            return fn.resize(img, resize_x=224, resize_y=224)

        p = pipe()
        p.build()
        p.run()                     # warm-up: decoder state, allocations
        t0 = time.perf_counter()
        for _ in range(rounds):
            p.run()
        dt = time.perf_counter() - t0
        decoder = "DALI fn.decoders.image(device='mixed') + fn.resize"
    else:
        def one_round(i):
            chunk = [data[(i * batch + j) % count] for j in range(batch)]
            imgs = torch.stack(io.decode_jpeg(chunk, device=device))   # one source size
            return torch.nn.functional.interpolate(imgs.float(), size=(224, 224), mode="bilinear",
                                                   antialias=True).round_().to(torch.uint8)
        one_round(0)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(rounds):
            one_round(i)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        decoder = f"torchvision.io.decode_jpeg(device={device!r}) + interpolate (antialias)"
    result = {"decoder": decoder, "images": rounds * batch, "batch": batch,
              "images_per_s": rounds * batch / dt,
              "source": "64x80" if dry_run else "640x480", "mean_jpeg_kb": sum(len(d) for d in data) / count / 1024}
    print(f"{decoder}: {result['images_per_s']:.0f} images/s", flush=True)
    return result


# ----------------------------------------------------------------------------------------------
# the check


def _bench_rows(out_dir: str, since: float) -> list[dict]:
    import csv
    rows = []
    for path in glob.glob(os.path.join(out_dir, "*.csv")):
        if os.path.getmtime(path) >= since:
            with open(path) as f:
                rows += list(csv.DictReader(f))
    return rows


def check(out_dir: str, dry_run: bool, budget_s: float, python: str | None = None, log=print) -> dict:
    t_start = time.monotonic()
    wall_start = time.time()
    device = "cpu" if dry_run else "cuda"
    timeouts = DRY_RUN_TIMEOUTS if dry_run else STAGE_TIMEOUTS
    os.makedirs(out_dir, exist_ok=True)
    stages: list[dict] = []

    def remaining(name: str) -> float:
        later = list(timeouts)[list(timeouts).index(name) + 1:]
        left = budget_s - (time.monotonic() - t_start) - 5 * len(later)
        return max(1.0, min(timeouts[name], left))

    # 1. install (the rehearsal's pip runs with --dry-run: the venv sees this checkout's editable
    # install through the launcher's site-packages)
    if python is None:
        t0 = time.monotonic()
        try:
            python = make_venv(VENV)
            stage = {"name": "install", "status": "ok", "seconds": 0.0, "tail": ""}
            for cmd in install_commands(python, dry_run):
                # The GPU check is about the GPU kernels: the CPU ops are not built (a GPU image may
                # have no CMake), and the C++ tests are deselected below.
                stage = run_stage("install", cmd, remaining("install"),
                                  dict(os.environ, LOCTEX_BUILD_CPP="0"), log=log)
                if stage["status"] != "ok":
                    break
        except (OSError, subprocess.CalledProcessError) as exc:
            stage = {"name": "install", "status": "failed", "tail": repr(exc)}
            python = sys.executable
        stage["seconds"] = round(time.monotonic() - t0, 1)
        stages.append(stage)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    me = [python, os.path.abspath(__file__)] + (["--dry-run"] if dry_run else [])

    # 2. roofline on paper
    stages.append(run_stage("roofline", [python, "-m", "loctex.kernels.bench", "--roofline", "--out", out_dir],
                            remaining("roofline"), env, log))

    # 3. kernel tests against the float64 reference: compiled on the GPU; the rehearsal interprets
    junit = os.path.join(out_dir, "gpu-check_kernel-tests.xml")
    test_env = dict(env, TRITON_INTERPRET="1" if dry_run else "0", LOCTEX_TEST_DEVICE=device)
    if not dry_run:
        test_env.update(LOCTEX_REQUIRE_CPP="0", LOCTEX_JIT_BUILD="0")
    selection = (["tests/test_kernels_contrastive.py", "-k", "dispatch_provider_triton or rejects_bad_shapes"]
                 if dry_run else [t for t in sorted(glob.glob(os.path.join(ROOT, "tests", "test_kernels_*.py")))
                                  if os.path.basename(t) not in CPU_ONLY_TESTS] + ["-k", "not cpp and not gloo"])
    stage = run_stage("kernel_tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                       f"--junitxml={junit}", *selection],
                      remaining("kernel_tests"), test_env, log)
    counts = re.findall(r"^=*\s*(\d+ (?:passed|failed|error).*?) in [\d.]+s", stage["tail"], re.M)
    stage["note"] = counts[-1] if counts else ""
    stages.append(stage)

    # 4. kernel benchmark at the paper's shapes
    bench = [python, "-m", "loctex.kernels.bench", "--device", device, "--out", out_dir]
    bench += (["--quick", "--kernels", "trace_attention_loss,contrastive_loss"] if dry_run else
              ["--dtype", "bfloat16", "--contrastive-n", "4096,65536,1048576"])
    stages.append(run_stage("kernel_bench", bench, remaining("kernel_bench"), env, log))

    # 5-6. in-process stages, each in a subprocess of its own that prints its JSON last
    measured = {}
    for name in ("train_throughput", "jpeg_decode"):
        stage = run_stage(name, me + ["--stage", name], remaining(name), env, log)
        lines = [l for l in stage["tail"].splitlines() if l.startswith("{")]
        if stage["status"] == "ok" and lines:
            measured[name] = json.loads(lines[-1])
        stages.append(stage)

    # summary (by file: the launcher need not have the project installed)
    import importlib.util
    spec = importlib.util.spec_from_file_location("loctex_targets", os.path.join(ROOT, "kernels", "targets.py"))
    targets = sys.modules["loctex_targets"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)
    rows = _bench_rows(out_dir, wall_start)
    verdicts = targets.summary_lines(targets.evaluate(rows, {"paper", "cpu" if dry_run else "cuda"}))
    name, slug = _device_name(device) if not dry_run else (f"CPU rehearsal ({os.cpu_count()} cores)", "cpu-dry-run")
    date = _dt.datetime.now().strftime("%Y-%m-%d")
    total = time.monotonic() - t_start
    report = {"device": name, "date": date, "dry_run": dry_run, "total_seconds": round(total, 1),
              "budget_seconds": budget_s, "stages": stages, "measured": measured, "targets": verdicts}
    stem = os.path.join(out_dir, f"gpu-check_{slug}_{date}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# gpu-check — {name}, {date}", "",
             f"{'Rehearsal on CPU (`--dry-run`, tiny shapes). ' if dry_run else ''}"
             f"Total {total:.0f} s (budget {budget_s:.0f} s).", "",
             "| stage | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s.get('note', '')} |" for s in stages]
    tp = measured.get("train_throughput")
    if tp:
        lines += ["", "## Training throughput (one device, synthetic batches, no DeepSpeed)", "",
                  "| objective | model | px | batch | images/s | ms/step | peak GB |", "|---|---|---|---|---|---|---|"]
        for label in ("loctex", "contrastive_only"):
            m = tp[label]
            peak = "–" if m["peak_gb"] is None else f"{m['peak_gb']:.1f}"
            lines.append(f"| {label} | {m['visual']} | {m['image_size']} | {m['micro_batch']} | "
                         f"{m['images_per_s']:.1f} | {m['step_ms']:.1f} | {peak} |")
        lines += ["", f"LocTex runs at {tp['loctex_over_contrastive']:.0%} of contrastive-only's rate."]
    jd = measured.get("jpeg_decode")
    if jd:
        lines += ["", "## JPEG decoding to 224 px", "",
                  f"{jd['decoder']}: **{jd['images_per_s']:.0f} images/s** ({jd['images']} {jd['source']} "
                  f"JPEGs of {jd['mean_jpeg_kb']:.0f} KB on average, batches of {jd['batch']})."]
    lines += ["", "## Targets (`loctex.kernels.targets`)", ""] + [f"- {v}" for v in verdicts] + [""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    log("\n".join(lines))
    log(f"wrote {stem}.md, .json")
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="rehearse on the CPU with tiny shapes")
    p.add_argument("--out", default="", help="results folder (default benchmarks/results; "
                   "build/gpu-check-dry-run for --dry-run)")
    p.add_argument("--budget-s", type=float, default=470.0, help="the whole check, in seconds")
    p.add_argument("--python", default=None, help="run the stages with this interpreter (no install stage)")
    p.add_argument("--stage", choices=("train_throughput", "jpeg_decode"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if args.stage:
        fn = {"train_throughput": train_throughput, "jpeg_decode": jpeg_decode}[args.stage]
        print(json.dumps(fn(device, args.dry_run)), flush=True)
        return 0
    out = args.out or (os.path.join(ROOT, "build", "gpu-check-dry-run") if args.dry_run
                       else os.path.join(ROOT, "benchmarks", "results"))
    report = check(out, args.dry_run, args.budget_s, python=args.python)
    return 0 if all(s["status"] == "ok" for s in report["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
