"""glibc malloc settings for CPU scoring: the same KV scoring in fresh processes, default malloc vs
harness.keep_freed_memory() (mallopt: freed activation buffers are kept, not unmapped and faulted in again as
zeroed pages), alternating A/B so that machine load hits both alike.

    python benchmarks/bench_malloc.py [--pairs 2] [--prompts 16] [--repeats 3]
    python benchmarks/bench_malloc.py --buffers      # no model: 20 freed-and-reallocated 32 MiB buffers

Prints each run's CPU seconds (user + sys), minor page faults and wall time, and the median CPU-time and
page-fault ratios. The fault counts depend on the kernel's page reclaim (they differ between machines), which
is why they live here and not in a test; tests/test_cli.py checks the machine-independent part (glibc serves
the buffer from the heap, per mallinfo2).
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


BUFFERS = """
import json, resource, sys, torch
import harness
if sys.argv[1] == "tuned" and not harness.keep_freed_memory():
    raise SystemExit("mallopt is not available (not glibc)")
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # a batch's activation buffer, freed and allocated again
    torch.empty(32 << 20, dtype=torch.uint8).fill_(1)
print(json.dumps({"minflt": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def buffers(pairs):
    """Minor page faults of 20 freed-and-reallocated 32 MiB buffers, default vs tuned, alternating."""
    env = {k: v for k, v in dict(os.environ, PYTHONPATH=ROOT).items() if k not in MALLOC_ENV}
    faults = {"default": [], "tuned": []}
    for _ in range(pairs):
        for name in faults:
            out = subprocess.run([sys.executable, "-c", BUFFERS, name], env=env, check=True, capture_output=True,
                                 text=True).stdout
            faults[name].append(json.loads(out.strip().splitlines()[-1])["minflt"])
    print(f"minor faults, 20 x 32 MiB buffers: default {faults['default']}, tuned {faults['tuned']}; median ratio "
          f"default / tuned {statistics.median(d / max(t, 1) for d, t in zip(faults['default'], faults['tuned'])):.1f}")


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
    ap.add_argument("--buffers", action="store_true", help="the buffer measurement alone (no model)")
    args = ap.parse_args()
    if args.buffers:
        buffers(max(args.pairs, 3))
        return
    results = {"default": [], "tuned": []}
    for _ in range(args.pairs):
        for name in ("default", "tuned"):
            r = run(name, args.prompts, args.repeats)
            results[name].append(r)
            print(f"{name:8s} cpu {r['cpu_s']:6.1f} s  wall {r['wall_s']:6.1f} s  minor faults {r['minflt']:>9,d}"
                  f"  ({r['dtype']}, {args.repeats} x {args.prompts} prompts)", flush=True)
    ratio = statistics.median(d["cpu_s"] / t["cpu_s"] for d, t in zip(results["default"], results["tuned"]))
    faults = statistics.median(d["minflt"] / max(t["minflt"], 1) for d, t in zip(results["default"], results["tuned"]))
    print(f"median CPU-time ratio default / tuned over {args.pairs} pairs: {ratio:.3f}; minor-fault ratio {faults:.1f}")


if __name__ == "__main__":
    main()
