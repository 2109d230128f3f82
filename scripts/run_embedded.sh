#!/usr/bin/env bash
# `make run`: the whole job on the embedded data set, on CPU.
#   synth -> tokenizer -> prepare (train, val) -> pre-training on 2 CPU ranks (deepspeed, gloo)
#   -> evaluation summary (final validation of the run: retrieval R@1/5, localization accuracy, losses)
# Usage: scripts/run_embedded.sh [RUN_DIR] [NUM_IMAGES] [key=value ...]   (extra args: config overrides)
# Ctrl-C (or SIGTERM to this script's process group) saves a checkpoint and stops; running the same
# command again resumes from it (train.resume=auto).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/embedded}
NUM_IMAGES=${2:-2000}
shift $(( $# < 2 ? $# : 2 ))
BIN=${VENV_BIN:-.venv/bin}
DATA="$RUN/data"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false   # one thread per rank: 2 ranks on 2 cores
start=$SECONDS
mkdir -p "$RUN"

if [ ! -f "$DATA/synth/synth.json" ]; then
  "$BIN/loctex" synth --out "$DATA/synth" --num-images "$NUM_IMAGES" --seed 0
fi
"$BIN/loctex" tokenizer train --narratives "$DATA/synth/narratives_train.jsonl" --vocab-size 2000 \
  --out "$DATA/tokenizer.json"
for split in train val; do
  "$BIN/loctex" prepare --narratives "$DATA/synth/narratives_$split.jsonl" --images "$DATA/synth/images" \
    --out "$DATA/prepared_$split" --tokenizer "$DATA/tokenizer.json"
done
echo "data ready in $((SECONDS - start)) s"

# --num_gpus 2 on a machine without CUDA: DeepSpeed's accelerator is the CPU and its launcher starts
# 2 ranks (gloo); a free port keeps concurrent runs apart. The supervisor (engine/supervise.py) hands
# Ctrl-C / SIGTERM to the ranks alone, which save and exit 0, and waits for them.
PORT=$("$BIN/python" -c 'from loctex.engine.launch import free_port; print(free_port())')
"$BIN/python" -m loctex.engine.supervise -- \
  "$BIN/deepspeed" --num_gpus 2 --master_port "$PORT" engine/launch.py --config configs/embedded.yaml \
  run_dir="$RUN" data.prepared="$DATA/prepared_train" data.val_prepared="$DATA/prepared_val" "$@"

"$BIN/python" - "$RUN" "$((SECONDS - start))" <<'EOF'
import json, sys
from pathlib import Path
import yaml
run, seconds = Path(sys.argv[1]), int(sys.argv[2])
last = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()][-1]
max_steps = yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"]
summary = run / "eval_summary.json"
s = json.loads(summary.read_text()) if summary.is_file() else {}
if last["step"] < max_steps or s.get("step") != last["step"]:
    print(f"\nstopped at step {last['step']} of {max_steps}; checkpoint in {run}/checkpoints/. "
          f"Run the same command again to resume.")
    sys.exit(0)
print(f"\n== evaluation summary: {run} (step {s['step']}, {s['val_images']} validation images) ==")
print(f"retrieval  image->text R@1 {s['i2t_r1']:.3f}  R@5 {s['i2t_r5']:.3f}   "
      f"text->image R@1 {s['t2i_r1']:.3f}  R@5 {s['t2i_r5']:.3f}")
print(f"localization accuracy (pointing) {s['loc_acc']:.3f}")
print(f"val losses  total {s['val_loss']:.4f}  contrastive {s['val_loss_contrastive']:.4f}  "
      f"localization {s['val_loss_localization']:.4f}")
print(f"train (last log, step {last['step']})  loss {last['loss'] or float('nan'):.4f}  "
      f"global batch {last['global_batch']}  {last['images_per_s']:.1f} images/s")
print(f"median {s['seconds_per_step_median']:.2f} s/step; whole job {seconds} s")
print(f"attention maps: {run}/attention/   metrics: {run}/metrics.jsonl   checkpoints: {run}/checkpoints/")
EOF
