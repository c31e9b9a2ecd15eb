"""glibc malloc settings for CPU scoring: the same KV scoring in fresh processes, default malloc vs
harness.keep_freed_memory() (mallopt: freed activation buffers are kept, not unmapped and faulted in again as
zeroed pages), alternating A/B so that machine load hits both alike.

    python benchmarks/bench_malloc.py [--pairs 2] [--prompts 16] [--repeats 3]

Prints each run's CPU seconds (user + sys), minor page faults and wall time, and the median CPU-time ratio.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")  # removed from the children: mallopt alone decides
CHILD = """
import json, resource, sys, time
import harness
import kv_retrieval as kv
import layer_rope as lr
prompts, repeats, tuned = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "tuned"
if tuned and not harness.keep_freed_memory():
    raise SystemExit("mallopt is not available (not glibc)")
model, tok = harness.cached_model(None, "cpu", harness.default_dtype("cpu"))
examples = kv.kv_sets(20, 5, -(-prompts // 5), 1)[:prompts]
kv.kv_fitness(model, tok, examples, batch_size=16)  # warm-up
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
for _ in range(repeats):
    kv.kv_fitness(model, tok, examples, [1.1] * lr.num_layers(model), batch_size=16)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu_s": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, "wall_s": time.time() - t0,
                  "minflt": r1.ru_minflt - r0.ru_minflt, "dtype": harness.default_dtype("cpu")}))
"""


def run(name, prompts, repeats):
    env = {k: v for k, v in dict(os.environ, PYTHONPATH=ROOT).items() if k not in MALLOC_ENV}
    out = subprocess.run([sys.executable, "-c", CHILD, str(prompts), str(repeats), name], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    results = {"default": [], "tuned": []}
    for _ in range(args.pairs):
        for name in ("default", "tuned"):
            r = run(name, args.prompts, args.repeats)
            results[name].append(r)
            print(f"{name:8s} cpu {r['cpu_s']:6.1f} s  wall {r['wall_s']:6.1f} s  minor faults {r['minflt']:>9,d}"
                  f"  ({r['dtype']}, {args.repeats} x {args.prompts} prompts)", flush=True)
    ratio = statistics.median(d["cpu_s"] / t["cpu_s"] for d, t in zip(results["default"], results["tuned"]))
    print(f"median CPU-time ratio default / tuned over {args.pairs} pairs: {ratio:.3f}")


if __name__ == "__main__":
    main()
