"""
The paper's lost-in-the-middle experiment at the paper's scale on one model, against Ms-PoE.

    python experiments/lost_in_the_middle.py short              # run, or resume, the short task
    python experiments/lost_in_the_middle.py long               # the long-range task (--filler 1)
    python experiments/lost_in_the_middle.py edge               # near the trained length (~7k tokens)
    python experiments/lost_in_the_middle.py edge --searches-only --runs ga-middle-seed0
    python experiments/lost_in_the_middle.py short --report-only
    python experiments/lost_in_the_middle.py gemma              # Gemma 3 270M at its JSON 75-pair cell (issue 26)

Every step is skipped when its output exists, each GA search resumes from its checkpoint, and a task with
`chunk` scores its held-out rows `chunk` prompts at a time into rows/<row>.partial.json, so the same
command continues a killed run. Under OUT (results/lim-<task>/, or the task's `out` under results/):
  1. search-<run>.json   one GA search each (`python kv_retrieval.py search ... --heldout-samples 0`:
                         the task's search dtype, bfloat16 unless it says otherwise; its verdict on the
                         task's validation prompts, seed 5, in float32). Searches recorded before the
                         verdict existed have none: `--replay-verdict` says what it would have been
  2. uniform.json        the best uniform factor on the search set (of the task's `uniform` candidates)
  3. rows/<row>.json     each row scored on the one held-out set in float32 (--rows-dtype, in its own --out),
                         paired against no scaling
  4. table.md, summary.json, accuracy.png
Search and held-out prompts come from different seeds (checked disjoint); every row of a task is scored
on the same held-out prompts.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import baselines  # noqa: E402
import harness  # noqa: E402
import kv_retrieval as kv  # noqa: E402
import layer_rope as lr  # noqa: E402

# issue 35's rows (baselines.py, section 3): attention sorting, and the positional-bias calibration's rerank and
# attention intervention. They reorder or re-weight the prompts themselves, so they are scored `ATTENTION_CHUNK`
# prompts at a time with a checkpoint. The calibration's bias comes from CALIBRATION prompts per gold position
# (a task's `calibration`) of CALIBRATION_SEED, a seed no search (1), held-out (2) or validation (5) set uses,
# measured once per task into OUT/position-bias.json (calibrated attention's temperature and layers: calibration_setting).
# SORT_ROUNDS: the rounds the rows use (baselines' default is 5: 6 passes per prompt, more than the shared 2-core
# CPU allowed; 1 round is 2 passes). The retrieval-layer rerank takes its layer and placement from the same
# calibration prompts (retrieval_choice, OUT/retrieval-layer.json).
ATTENTION_ROWS = ("attention sort", "calibrated rerank", "calibrated attention", "retrieval-layer rerank")
CALIBRATION, CALIBRATION_SEED, ATTENTION_CHUNK, SORT_ROUNDS = 20, 3, 50, 1

TASKS = {  # search/held-out prompts per gold position, GA population x generations, GA runs
    "short": dict(filler=0, search=20, heldout=100, population=20, generations=11,
                  runs={"ga-middle-seed0": ["--weights", "middle", "--seed", "0"],
                        "ga-middle-seed1": ["--weights", "middle", "--seed", "1"],
                        "ga-middle-seed2": ["--weights", "middle", "--seed", "2"],
                        "linear-middle-seed0": ["--weights", "middle", "--seed", "0", "--curve", "linear"],
                        "step-middle-seed0": ["--weights", "middle", "--seed", "0", "--curve", "step"],
                        # stopped at 96 of 200 evaluations on a CPU without native bfloat16, then finished
                        # from its checkpoint. Layer 16 given, not re-scanned: the scan sees the same first
                        # search prompts in every run
                        "ga-unweighted-seed0": ["--weights", "uniform", "--seed", "0", "--freeze", "16"],
                        # beyond the paper: factors near 1 only (every factor > 1 we tried hurt), a smooth fitness
                        "ga-narrow-seed0": ["--weights", "middle", "--seed", "0", "--factor-max", "1.2",
                                            "--factor-step", "0.01"],
                        "ga-logprob-seed0": ["--weights", "middle", "--seed", "0", "--objective", "logprob"],
                        # the same search with racing: what racing saves and changes where most are hopeless
                        "ga-middle-seed0-race": ["--weights", "middle", "--seed", "0", "--race"]}),
    # issue 13's GPU run (experiments/gpu_run.sh): population >= 32, >= 20 generations, 200 / 500 prompts
    "gpu": dict(filler=0, search=40, heldout=100, population=32, generations=20,
                runs={f"ga-middle-seed{i}": ["--weights", "middle", "--seed", str(i)] for i in range(3)}),
    "smoke": dict(filler=0, search=1, heldout=1, validation=1, population=3, generations=2,  # checks the pipeline in ~2 min
                  runs={"ga-middle-seed0": ["--weights", "middle", "--seed", "0", "--scan-samples", "1"]}),
    "long": dict(filler=1, search=10, heldout=50, population=12, generations=10,  # seed 0 ran with racing
                 runs={"ga-middle-seed0": ["--weights", "middle", "--seed", "0", "--race"],
                       "ga-middle-seed1": ["--weights", "middle", "--seed", "1"],
                       # issue 24: the paper's search on the query-aware prompt (its row is scored on it too),
                       # seed 0's budget; float32 (exact, and 5x faster than bfloat16 on CPUs without native bf16)
                       # its own layer scan froze 16 (as every scan on this model has): given, so that a resumed
                       # search does not scan again (the GA settings, and so its checkpoint, are the same)
                       "ga-middle-seed0-query-aware": ["--weights", "middle", "--seed", "0", "--race",
                                                       "--query-aware", "--dtype", "float32", "--freeze", "16"]}),
    # issue 25: the paper's regime, near the trained 8,192 tokens: filler 14 -> 6,993 tokens scored per
    # prompt (prompt + answer, every prompt alike). A forward costs ~100x the short task's, so: racing on,
    # layer 16 given (both scans above flagged it; a scan here costs 30 layers x prompts), the searches in
    # bfloat16 as the issue asks (finalists re-scored in float32; pinned, so a checkpoint resumes alike on any
    # machine: fast on a GPU or a CPU with AMX / AVX512-BF16, ~5x slower than float32 on AVX2-only CPUs), rows
    # in float32, scored and checkpointed 10 prompts at a time, batch 5 (racing checks after every batch, one
    # prompt per gold position). Sized for one short GPU call (experiments/gpu_run.sh, STEPS=edge).
    "edge": dict(filler=14, search=5, heldout=20, validation=20, population=12, generations=6, search_dtype="bfloat16",
                 batch_size=5, chunk=10, uniform=[1.02, 1.05, 1.1, 1.2],
                 baselines=("uniform", "Ms-PoE (score order)", "query-aware prompt", "hidden-state scaling",
                            *ATTENTION_ROWS), calibration=10,
                 runs={"ga-middle-seed0": ["--weights", "middle", "--seed", "0", "--race", "--freeze", "16"],
                       "ga-narrow-seed0": ["--weights", "middle", "--seed", "0", "--race", "--freeze", "16",
                                           "--factor-max", "1.2", "--factor-step", "0.01"],
                       "ga-logprob-seed0": ["--weights", "middle", "--seed", "0", "--race", "--freeze", "16",
                                            "--objective", "logprob"]}),
}
# issue 26: Gemma 3 270M (18 layers; 5, 11 and 17 global, the rest sliding-window). Its length scan
# (results/gemma3-270m/length-scan.md) found no significant middle dip up to ~7k tokens; the lowest middle
# accuracy is the original JSON prompt at 75 generated pairs (~780 tokens): the fallback cell. No layer
# is frozen: its x2 sensitivity scan there (results/gemma3-270m/sensitivity-x2.json) flags none. Besides the
# paper's curve, the 3 global layers' own factors (a 3-gene search, 1.0-4.0 step 0.25: their RoPE base is 1e6,
# so x2 barely moves them): 13^3 points, so a smaller GA, 8 x 6 (38 evaluations, ~1.5 h on 2 cores, against
# the curve's 12 x 9). float32 throughout; rows scored and checkpointed 50 prompts at a time.
TASKS["gemma"] = dict(model="gemma3-270m", pairs=75, filler=0, search=10, heldout=50, population=12, generations=9,
                      search_dtype="float32", batch_size=10, chunk=50, out=os.path.join("gemma3-270m", "lim-json75"),
                      baselines=("uniform", "Ms-PoE (score order)", "query-aware prompt", "hidden-state scaling",
                                 *ATTENTION_ROWS), calibration=10,
                      runs={"ga-middle-seed0": ["--weights", "middle", "--seed", "0", "--race", "--freeze", "none"],
                            "global-middle-seed0": ["--weights", "middle", "--seed", "0", "--race",
                                                    "--search-layers", "5,11,17", "--factor-max", "4",
                                                    "--factor-step", "0.25", "--population", "8",
                                                    "--generations", "6"]})
# issue 25 on a longer GPU lease (EDGE_TASK=edge-gpu for experiments/gpu_run.sh): the edge task at 4x the
# prompts, a 20 x 10 GA, two search spaces; ~50 min of an H200 at the speeds the edge task measured there
TASKS["edge-gpu"] = dict(TASKS["edge"], search=20, heldout=100, population=20, generations=10, batch_size=25,
                         chunk=None, runs={k: v for k, v in TASKS["edge"]["runs"].items() if k != "ga-logprob-seed0"})
UNIFORM = [1.05, 1.1, 1.25, 1.5, 2.0]  # a task's default `uniform` candidates
# the verdict's validation prompts per gold position (a task's `validation`, else this), of a seed no task's
# search (1) or held-out (2) prompts use. Searches recorded before the verdict existed have none: the
# verdict they would have had is experiments/verdict_replay.py's
VALIDATION, VALIDATION_SEED = 50, 5
# a task's default comparison rows; the last three are issue 24's fixes known to work where Ms-PoE fails
BASELINES = ("uniform", "linear ramp 1..2", "Ms-PoE (score order)", "Ms-PoE (fixed order)", "query-aware prompt",
             "hidden-state scaling", "query-aware + GA factors", *ATTENTION_ROWS)
BEST = {"short": "smollm2-135m-kv.json", "long": "smollm2-135m-longkv.json",  # under results/: a task's factors
        "edge": "smollm2-135m-edgekv.json", "gemma": "gemma3-270m-kv.json"}


def prompt_sets(task) -> tuple:
    """(search set, held-out set) of a task: 5 gold positions, seeds 1 and 2 (the GA's own search set is the
    first: `kv_retrieval.py search` defaults to seed 1), checked disjoint."""
    pairs = task.get("pairs", 20)
    search_set = kv.kv_sets(pairs, 5, task["search"], 1, filler=task["filler"])
    held = kv.kv_sets(pairs, 5, task["heldout"], 2, filler=task["filler"])
    kv.check_disjoint(search_set, held)
    return search_set, held


def row_path(out, name):
    """Where the held-out row `name` of the task folder `out` is cached."""
    file = "none" if name == "no scaling" else name.replace(" ", "_").replace("/", "-")
    return os.path.join(out, "rows", file + ".json")


def load_rows(out) -> dict:
    """{row name: kv_fitness JSON with its paired comparison} of a task folder, in the table's order."""
    with open(os.path.join(out, "summary.json")) as f:
        names = list(json.load(f)["rows"])
    rows = {}
    for name in names:
        with open(row_path(out, name)) as f:
            rows[name] = json.load(f)
    return rows


def search_argv(name, flags, task, args) -> list:
    """`kv_retrieval.py search` arguments of the GA run `name` (flags: the run's own, last, so they win)."""
    return ["search", "--out", os.path.join(args.out, f"search-{name}.json"), "--no-progress",
            "--pairs", str(task.get("pairs", 20)), "--filler", str(task["filler"]),
            "--search-samples", str(task["search"]), "--heldout-samples", "0",
            "--population", str(task["population"]), "--generations", str(task["generations"]),
            "--validation-samples", str(task.get("validation", VALIDATION)), "--validation-seed", str(VALIDATION_SEED),
            "--batch-size", str(args.batch_size), "--device", args.device, "--dtype", args.search_dtype,
            *(["--model", args.model] if args.model else []), *flags]


def search(name, flags, task, args):
    """Run, or resume, the GA search `name`; returns (factors, record)."""
    out = os.path.join(args.out, f"search-{name}.json")
    if not os.path.exists(out):
        argv = search_argv(name, flags, task, args)
        print("$ kv_retrieval.py", " ".join(argv), flush=True)
        # its main() calls harness.keep_freed_memory()
        subprocess.run([sys.executable, os.path.join(ROOT, "kv_retrieval.py"), *argv], check=True)
    return lr.load_factors(out, with_metadata=True)


@contextlib.contextmanager
def _patched(model, how):
    """The model as a row is scored: with its layer factors, Ms-PoE or hidden-state scaling (any of them)."""
    with contextlib.ExitStack() as stack:
        if how.get("factors") is not None:
            stack.enter_context(lr.scaled(model, how["factors"]))
        if how.get("mspoe"):
            stack.enter_context(baselines.mspoe(model, order=how["mspoe"]))
        if how.get("hidden"):
            stack.enter_context(baselines.hidden_scaling(model, **how["hidden"]))
        yield


def _answer(model, tok, part, how, batch_size):
    """(scores of the prompts `part`, where each gold was answered, the attention the prompts as given received
    (baselines.record_attention, averaged over heads: (prompts, layers, records) float32) or None): scored as
    they are, or attention-sorted (how["sort"] rounds), reranked or answered with calibrated attention
    (how["calibrate"], with how["bias"]), or reranked by one layer's attention (how["layer"], how["place"])."""
    if how.get("sort"):
        done = baselines.attention_sort(model, tok, part, how["sort"], batch_size)
    elif how.get("calibrate") == "rerank":
        done = baselines.calibrated_rerank(model, tok, part, how["bias"], batch_size)
    elif how.get("calibrate") == "layer":
        done = baselines.layer_rerank(model, tok, part, how["layer"], how["place"], batch_size)
    elif how.get("calibrate") == "attention":
        rel = baselines.calibrated_relevance(baselines.record_attention(model, tok, part, batch_size), how["bias"])
        with baselines.calibrated_attention(model, tok, part, rel, how["temperature"], how.get("layers")):
            return kv.score_kv(model, tok, part, batch_size=batch_size), [ex.gold_index for ex in part], None
    else:
        return kv.score_kv(model, tok, part, batch_size=batch_size), [ex.gold_index for ex in part], None
    return (kv.score_kv(model, tok, done.examples, batch_size=batch_size), [ex.gold_index for ex in done.examples],
            done.attention.mean(axis=2).astype(np.float32))


def score(path, model, tok, held, how, baseline=None, batch_size=8, chunk=None):
    """One held-out row, cached in `path`: kv_fitness JSON, its wall seconds and the paired comparison to
    `baseline`. how: factors / mspoe / hidden (see _patched), query_aware (the same prompts with the
    question before the data too), sort / calibrate (see _answer; such a row records where each gold was
    answered, answered_gold_index, and its forward passes per prompt). With `chunk`, prompts are scored `chunk`
    at a time and each chunk's scores are kept in PATH.partial.json, so a killed row resumes where it stopped."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if how.get("query_aware"):
        held = [dataclasses.replace(ex, query_aware=True) for ex in held]
    partial = path.replace(".json", ".partial.json")
    done = json.load(open(partial)) if chunk and os.path.exists(partial) else {"scores": [], "seconds": 0.0}
    step = chunk or len(held)
    with _patched(model, how):
        while len(done["scores"]) < len(held):
            started, part = time.time(), held[len(done["scores"]):len(done["scores"]) + step]
            scores, answered, att = _answer(model, tok, part, how, batch_size)
            if att is not None:  # kept beside the row: experiments/attention_diagnosis.py reads it
                npz = path.replace(".json", ".attention.npz")
                old = np.load(npz)["attention"][:len(done["scores"])] if done["scores"] else att[:0]
                np.savez_compressed(npz, attention=np.concatenate([old, att]))
            done["scores"] += [dataclasses.astuple(s) for s in scores]
            done.setdefault("answered_gold_index", []).extend(answered)
            done["seconds"] += time.time() - started
            if chunk:
                lr.write_json(partial, done)
    fit = kv.fitness_of(held, [kv.KVScore(*s) for s in done["scores"]])
    row = dict(fit.to_json(), seconds=round(done["seconds"], 1))
    if how.get("sort") or how.get("calibrate"):  # the passes per prompt: measuring, then the answer's
        row.update(answered_gold_index=done["answered_gold_index"],
                   forwards_per_prompt=1 + (how.get("sort") or 1), settings={
                       k: how[k] for k in ("sort", "calibrate", "calibration", "temperature", "scope", "layers", "layer", "place")
                       if k in how})
    if baseline is not None:
        row["vs_baseline"] = kv.paired_comparison(fit, kv.KVFitness.from_json(baseline))
    lr.write_json(path, row)
    if chunk and os.path.exists(partial):
        os.remove(partial)
    return row


def best_uniform(args, task, model, tok, search_set, layers, measure=True):
    """The best of the task's uniform factors on the search set (ties: the smaller), each factor's fitness
    written to uniform.json as soon as it is measured (not with measure=False: None until it is recorded)."""
    path, candidates = os.path.join(args.out, "uniform.json"), task.get("uniform", UNIFORM)
    doc = json.load(open(path)) if os.path.exists(path) else {"search_set_fitness": {}}
    if "best" not in doc:
        for u in candidates:
            if str(u) not in doc["search_set_fitness"] and measure and not args.report_only:
                fit = kv.kv_fitness(model, tok, search_set, [u] * layers, batch_size=args.batch_size)
                doc["search_set_fitness"][str(u)] = fit.fitness
                lr.write_json(path, doc)
        if len(doc["search_set_fitness"]) < len(candidates):
            return None
        fit = {u: doc["search_set_fitness"][str(u)] for u in candidates}
        doc["best"] = max(candidates, key=lambda u: (fit[u], -u))
        lr.write_json(path, doc)
    return doc["best"]


def baseline_rows(args, task, best_u, layers) -> dict:
    """{row name: how to score it} of the task's comparison rows."""
    plan = {}
    for name in task.get("baselines", BASELINES):
        if name == "uniform":
            if best_u is not None:
                plan[f"uniform x{best_u:g}"] = dict(factors=[best_u] * layers)
        elif name == "linear ramp 1..2":
            plan[name] = dict(factors=lr.linear_factors([1.0, 2.0], layers))
        elif name.startswith("Ms-PoE"):  # "Ms-PoE (score order)", "Ms-PoE (fixed order)"
            plan[name] = dict(mspoe=name.split("(")[1].split()[0])
        elif name == "query-aware prompt":
            plan[name] = dict(query_aware=True)
        elif name == "query-aware + GA factors":  # the task's committed factors (BEST), on the query-aware prompt
            if args.task in BEST:
                plan[name] = dict(query_aware=True, factors=lr.load_factors(
                    os.path.join(ROOT, "results", BEST[args.task]), num_layers=layers))
        elif name == "attention sort":
            plan[f"attention sort ({SORT_ROUNDS} rounds)"] = dict(sort=SORT_ROUNDS)
        elif name in ("calibrated rerank", "calibrated attention"):  # how["bias"]: main() measures it when needed
            plan[name] = dict(calibrate=name.split()[1], calibration=task.get("calibration", CALIBRATION))
        elif name == "retrieval-layer rerank":  # how["layer"], how["place"]: main() chooses them when needed
            plan[name] = dict(calibrate="layer", calibration=task.get("calibration", CALIBRATION))
        elif name == "hidden-state scaling":  # the channel and scale found for this model, if recorded
            hidden = position_channel(args)
            if hidden is not None:
                plan[f"hidden scaling (channel {hidden['channel']}, x{hidden['scale']:g}, "
                     f"{hidden['last_tokens']} rows)"] = dict(hidden=hidden)
        else:
            raise ValueError(f"unknown comparison row {name!r}")
    return plan


def position_channel(args):
    """{channel, scale, layers, last_tokens} of the positional hidden-state channel recorded for this model by
    experiments/position_channel.py, or None when there is none yet."""
    path = os.path.join(ROOT, "results", f"{harness.model_slug(args.model)}-position-channel.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        pick = json.load(f)["pick"]
    return {k: pick[k] for k in ("channel", "scale", "layers", "last_tokens")}  # last_tokens: the answer's rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--filler", type=int, default=None, help="long task: filler paragraphs per pair")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="HF model dir or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--batch-size", type=int, default=None, help="prompts per forward (default: the task's, or 16)")
    ap.add_argument("--search-dtype", default=None, choices=sorted(harness.DTYPES),
                    help="GA searches' dtype (default: the task's, else bfloat16), pinned so that a checkpoint "
                    "resumes alike on any machine")
    ap.add_argument("--runs", nargs="+", default=None, help="run or resume only these GA runs; the others "
                    "are reported if done (default: all)")
    ap.add_argument("--rows", nargs="+", default=None, help="score only the comparison rows whose names start "
                    "with these (e.g. 'query-aware prompt' 'hidden'), and no GA run not in --runs; the others are "
                    "reported if done (default: all)")
    ap.add_argument("--searches-only", action="store_true", help="run or resume the GA searches (of --runs), "
                    "nothing else: no held-out rows, no report")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--replay-verdict", action="store_true", help="what the validated verdict would have said "
                    "about the task's recorded searches (resumes), and the table of every task replayed so far")
    ap.add_argument("--rows-dtype", default="float32", choices=sorted(harness.DTYPES),
                    help="the held-out rows' dtype (float32: the report's). Another one needs its own --out, no scaling "
                    "scored in it too: a table's rows are paired in one dtype")
    ap.add_argument("--replay-dtype", default="float32", choices=sorted(harness.DTYPES),
                    help="--replay-verdict's scoring dtype (float32: the report's; bfloat16 where a CPU has AMX)")
    args = ap.parse_args()
    if args.device == "cpu":
        harness.keep_freed_memory()  # this process scores the held-out rows
    task = dict(TASKS[args.task])
    unknown = sorted(set(args.runs or ()) - set(task["runs"]))
    if unknown:
        ap.error(f"--runs: {unknown} are not runs of the {args.task} task ({', '.join(task['runs'])})")
    task["filler"] = task["filler"] if args.filler is None else args.filler
    args.batch_size = args.batch_size or task.get("batch_size", 16)
    args.search_dtype = args.search_dtype or task.get("search_dtype", "bfloat16")
    args.model = args.model or task.get("model")
    if args.rows_dtype != "float32" and (args.out is None or
                                         os.path.abspath(args.out) == os.path.abspath(default_out(args.task))):
        ap.error(f"--rows-dtype {args.rows_dtype}: give an --out of its own (the task's folder holds float32 rows)")
    args.out = args.out or default_out(args.task)
    os.makedirs(os.path.join(args.out, "rows"), exist_ok=True)
    if args.replay_verdict:
        replay_verdict(args)
        return
    if args.searches_only:
        for name in args.runs or task["runs"]:
            search(name, task["runs"][name], task, args)
        return
    search_set, held = prompt_sets(task)

    model, tok = harness.load_model(args.model, args.rows_dtype, args.device)
    args.model_obj = model  # report(): the scorer's answer prefixes depend on the model
    layers = lr.num_layers(model)
    chunk = task.get("chunk")
    rows = {"no scaling": score(row_path(args.out, "no scaling"), model, tok, held, {},
                                batch_size=args.batch_size, chunk=chunk)}
    # the uniform row's name is "uniform x<best>": measure the candidates only where --rows may select it
    uniform = args.rows is None or any("uniform x".startswith(r) or r.startswith("uniform x") for r in args.rows)
    plan = baseline_rows(args, task, best_uniform(args, task, model, tok, search_set, layers, uniform), layers)
    plan.update({name: dict(run=flags) for name, flags in task["runs"].items()})
    searched = {}
    for name, how in plan.items():  # baselines first, then each GA run followed by its held-out row
        file = row_path(args.out, name)
        only = args.runs is not None or args.rows is not None  # --rows alone runs no GA search
        skip = args.report_only or ("run" in how and only and name not in (args.runs or ())) or (
            "run" not in how and args.rows is not None and not name.startswith(tuple(args.rows)))
        if "run" in how:
            done = os.path.exists(os.path.join(args.out, f"search-{name}.json"))
            if skip and not done:
                continue
            flags = how.pop("run")
            searched[name] = search(name, flags, task, args)
            how.update(factors=searched[name][0], query_aware="--query-aware" in flags)
        if skip and not os.path.exists(file):
            continue
        fresh = not os.path.exists(file)
        if how.get("calibrate") == "layer" and fresh:
            how.update(retrieval_choice(args, task, model, tok, search_set, held))
        elif how.get("calibrate") and fresh:
            how["bias"] = calibration_bias(args, task, model, tok, search_set, held)
            if how["calibrate"] == "attention":
                how.update(calibration_setting(args, task, model, tok, how["bias"], search_set, held))
        rows[name] = score(file, model, tok, held, how, rows["no scaling"], args.batch_size,
                           chunk or (ATTENTION_CHUNK if how.get("sort") or how.get("calibrate") else None))
        print(f"{name}: {rows[name]['mean_accuracy']:.3f}", flush=True)
        if fresh:  # after every newly scored row: a killed run leaves its table so far
            report(args, task, rows, searched, held, tok)
    report(args, task, rows, searched, held, tok)
    save_best(args, searched, rows)  # once every run is in: a partial table must not choose the task's factors


def calibration_set(task, *others) -> tuple:
    """(prompts per gold position, the task's calibration prompts): seed CALIBRATION_SEED, checked disjoint from
    each set in `others` (search, held-out)."""
    n = task.get("calibration", CALIBRATION)
    calib = kv.kv_sets(task.get("pairs", 20), 5, n, CALIBRATION_SEED, filler=task["filler"])
    kv.check_disjoint(*others, calib, names=(*("search", "held-out")[:len(others)], "calibration"))
    return n, calib


def retrieval_choice(args, task, model, tok, search_set, held) -> dict:
    """{layer, place} of the retrieval-layer rerank, from the task's calibration prompts: the layer of
    baselines.retrieval_layer on their record attention, and place = "first" where the unscaled model answers
    more of them right with the gold first than with it last, else "last" (attention sorting's). Once per task,
    into OUT/retrieval-layer.json with every layer's hit rate."""
    path = os.path.join(args.out, "retrieval-layer.json")
    if not os.path.exists(path):
        n, calib = calibration_set(task, search_set, held)
        started = time.time()
        gold = [ex.gold_index for ex in calib]
        layer, hits = baselines.retrieval_layer(baselines.record_attention(model, tok, calib, args.batch_size), gold)
        right = np.array([s.correct for s in kv.score_kv(model, tok, calib, batch_size=args.batch_size)])
        first, last = (float(right[np.array(gold) == g].mean()) for g in (0, len(calib[0].records) - 1))
        lr.write_json(path, {"layer": int(layer), "place": "first" if first > last else "last",
                             "hits_by_layer": [round(float(h), 4) for h in hits],
                             "accuracy_gold_first": first, "accuracy_gold_last": last,
                             "prompts_per_position": n, "seed": CALIBRATION_SEED, "prompts": len(calib),
                             "seconds": round(time.time() - started, 1)})
    with open(path) as f:
        doc = json.load(f)
    return {"layer": doc["layer"], "place": doc["place"]}


def calibration_bias(args, task, model, tok, search_set, held):
    """(layers, heads, records) the positional attention bias of the calibrated rows (baselines.position_bias) on
    the task's calibration prompts (seed CALIBRATION_SEED, checked disjoint from the search and held-out sets),
    measured once into OUT/position-bias.json."""
    path = os.path.join(args.out, "position-bias.json")
    if not os.path.exists(path):
        n, calib = calibration_set(task, search_set, held)
        started = time.time()
        bias = baselines.position_bias(model, tok, calib, args.batch_size)
        lr.write_json(path, {"prompts_per_position": n, "seed": CALIBRATION_SEED, "prompts": len(calib),
                             "seconds": round(time.time() - started, 1), "shape": list(bias.shape),
                             "bias": bias.tolist()})
    with open(path) as f:
        return np.array(json.load(f)["bias"])


TEMPERATURES = (0.002, 0.005, 0.01, 0.02, 0.05)  # calibrated attention's candidates (attention shares)


def calibration_setting(args, task, model, tok, bias, search_set, held) -> dict:
    """{temperature, layers, scope} of the calibrated-attention row: of TEMPERATURES x three scopes -- every layer,
    the second half of the layers, the retrieval-layer rerank's layer alone (retrieval_choice) -- the most
    accurate (then the highest mean gold log-prob; then the earlier scope and the smaller temperature) on the first
    5 calibration prompts per gold position: prompts no search or held-out set holds (the paper tunes its
    temperature on validation data too). Once per task, into OUT/calibrated-attention.json."""
    path = os.path.join(args.out, "calibrated-attention.json")
    if not os.path.exists(path):
        n, calib = calibration_set(task)
        part = [ex for i, ex in enumerate(calib) if i % n < 5]
        L = lr.num_layers(model)
        scopes = {"all layers": list(range(L)), "second half": list(range(L // 2, L)),
                  "retrieval layer": [retrieval_choice(args, task, model, tok, search_set, held)["layer"]]}
        started = time.time()
        rel = baselines.calibrated_relevance(baselines.record_attention(model, tok, part, args.batch_size), bias)

        def fit(scores):
            return {"accuracy": float(np.mean([s.correct for s in scores])),
                    "logprob": float(np.mean([s.logprob for s in scores]))}

        fits = []
        for rank, (scope, layers) in enumerate(scopes.items()):
            for t in TEMPERATURES:
                with baselines.calibrated_attention(model, tok, part, rel, t, layers):
                    got = fit(kv.score_kv(model, tok, part, batch_size=args.batch_size))
                fits.append(dict(scope=scope, layers=layers, temperature=t, **got, key=(rank, t)))
        best = max(fits, key=lambda f: (f["accuracy"], f["logprob"], -f["key"][0], -f["key"][1]))
        lr.write_json(path, {"scope": best["scope"], "layers": best["layers"], "temperature": best["temperature"],
                             "prompts": len(part), "seed": CALIBRATION_SEED,
                             "settings": [{k: v for k, v in f.items() if k != "key"} for f in fits],
                             "no_calibration": fit(kv.score_kv(model, tok, part, batch_size=args.batch_size)),
                             "seconds": round(time.time() - started, 1)})
    with open(path) as f:
        doc = json.load(f)
    return {k: doc[k] for k in ("temperature", "layers", "scope")}


def prompt_lengths(tok, model, held) -> dict:
    """min and max tokens of a held-out prompt with its answer (kv_retrieval.prompt_ids + the gold answer's tokens,
    each of the scorer's answer prefixes; the scorer's input is one token shorter), plain and query-aware."""
    out = {"counted": "prompt_ids + the gold answer's tokens (answer prefix included)"}
    for name, qa in (("plain", False), ("query_aware", True)):
        n = [len(kv.prompt_ids(tok, dataclasses.replace(ex, query_aware=qa))) + len(kv.encode(tok, p + ex.value))
             for ex in held for p in kv.answer_prefixes(model)]
        out[name] = {"min": min(n), "max": max(n)}
    return out


def save_best(args, searched, rows):
    """results/BEST[task]: of the runs with the paper's fitness (middle-weighted accuracy) and a held-out
    row, the one whose chosen finalist scored best in float32 on the search set. Held-out rows do not take
    part in the choice; the chosen run's row is recorded beside it."""
    def search_fitness(doc):  # a search with a verdict ranks its finalists on the validation prompts instead
        fin = doc["finalists"]
        return max(fin.get(doc["settings"]["heldout_dtype"]) or fin["validation"])

    runs = {name: doc for name, (_, doc) in searched.items() if name in rows
            and doc["settings"]["weights"] == "middle" and doc["settings"]["objective"] == "accuracy"
            and not doc["settings"].get("query_aware")  # the plain prompt's fitness, comparable across runs
            and not doc["settings"].get("search_layers")}  # the paper's curve, not a search of a few layers
    if args.task not in BEST or os.path.abspath(args.out) != default_out(args.task) or not runs:
        return
    name = max(runs, key=lambda k: search_fitness(runs[k]))
    doc, row = runs[name], rows[name]
    selected = {"run": name, "rule": "the best float32 search-set fitness of the middle-weighted accuracy runs",
                "search_fitness_float32": {k: search_fitness(d) for k, d in runs.items()},
                "heldout": {k: row[k] for k in ("n", "mean_accuracy", "accuracy", "accuracy_ci95", "vs_baseline")}}
    meta = {k: v for k, v in doc.items() if k not in ("format", "num_layers", "factors")}
    lr.save_factors(os.path.join(ROOT, "results", BEST[args.task]), searched[name][0], **meta, selected=selected)


def default_out(task):
    return os.path.join(ROOT, "results", TASKS[task].get("out", f"lim-{task}"))


def logprob_report(rows, baseline="no scaling"):
    """Markdown table of each row's mean gold log-prob and its paired difference to `baseline` (bootstrap over
    prompts), and those comparisons: a smooth measure that shows a shift too small to flip answers."""
    base = kv.KVFitness.from_json(rows[baseline])
    lp = {k: kv.paired_comparison(kv.KVFitness.from_json(v), base) for k, v in rows.items() if k != baseline}
    text = harness.markdown_table(
        ["factors", "mean gold log-prob (nats)", f"vs {baseline} [95% paired bootstrap]", "prompts higher / lower"],
        [[k, f"{np.mean(v['logprobs']):.3f}", "-" if k not in lp else
          f"{lp[k]['logprob_difference']:+.3f} [{lp[k]['logprob_ci95'][0]:+.3f}, {lp[k]['logprob_ci95'][1]:+.3f}]",
          "-" if k not in lp else f"{lp[k]['logprob_higher']} / {lp[k]['logprob_lower']}"] for k, v in rows.items()])
    return text, lp


def report(args, task, rows, searched, held, tok):
    positions = sorted(rows["no scaling"]["accuracy"], key=int)
    n = len(held) // len(positions)
    text = kv.kv_report(rows)
    lp_text, lp = logprob_report(rows)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(f"{args.model or 'SmolLM2-135M'}: {n} held-out prompts per gold position (seed 2), "
                f"{task.get('pairs', 20)} pairs, filler {task['filler']}; accuracy [95% Wilson]\n\n"
                + text + "\n\nThe gold value's log-probability (summed over its tokens), the same prompts:\n\n"
                + lp_text + "\n")
    info, path = harness.run_info(args.device, f"{args.rows_dtype} (held-out)"), os.path.join(args.out, "summary.json")
    if args.report_only and os.path.exists(path):  # the rows' run stays on record; this command is the report's
        with open(path) as f:
            old = json.load(f)
        info = {**{k: old.get(k, v) for k, v in info.items()}, "report_command": info["command"]}
    lr.write_json(path, {
        "task": task, **info,
        "prompt_tokens": prompt_lengths(tok, args.model_obj, held), "rows": {
            k: {**{x: v[x] for x in ("accuracy", "accuracy_ci95", "mean_accuracy", "vs_baseline", "seconds",
                                     "forwards_per_prompt") if x in v},
                "logprob_vs_baseline": {x: y for x, y in lp[k].items() if x.startswith("logprob")} if k in lp else None}
            for k, v in rows.items()},
        "searches": {k: {"control_points": doc.get("control_points"), "factors": f, "frozen": doc.get("frozen"),
                         "finalists": doc.get("finalists"), "racing": doc.get("racing"), "timings_s": doc.get("timings_s"),
                         "command": doc.get("command")} for k, (f, doc) in searched.items()}}, indent=1)
    factor_sets = {name: f for name, (f, _) in searched.items()}
    kv.plot_kv(os.path.join(args.out, "accuracy.png"), rows, factor_sets,
               f"{args.model or 'SmolLM2-135M'}, {args.task} task (filler {task['filler']}): {n} held-out prompts per position")
    print(text)


# -----------------------------------------------------------------------------
# The verdict, replayed (issue 34): what kv_retrieval.py search's validated selection would have said about
# every search recorded before it existed, beside what those searches' factors then did held out.
#
#   python experiments/lost_in_the_middle.py short --replay-verdict     (resumes; also long, gemma)
#
# For each recorded search of the task: its distinct finalists (the run's best --finalists by search fitness,
# as `search` takes them), the task's best uniform factor (uniform.json) and no scaling are scored (float32,
# or --replay-dtype) on validation prompts of VALIDATION_SEED (checked disjoint from the search and held-out sets), with the
# run's own prompt (plain or query-aware), position weights and objective; layer_rope.validated_choice
# decides. Every score is cached per (prompt set, variant, factors) in results/verdict-replay/scores-<task>.json
# as soon as it is measured (a killed run resumes; no scaling and the uniform factor are scored once per
# task). The held-out side is read from the task's rows/; a verdict that picks a finalist without a held-out
# row gets that row scored on the held-out prompts. Writes results/verdict-replay/<task>.json and table.md.

REPLAY_OUT = os.path.join(ROOT, "results", "verdict-replay")
REPLAY_PER_POSITION = {"short": 20, "long": 20, "gemma": 20, "edge": 20}  # validation prompts per gold position


def recorded_runs(task: str) -> dict:
    """{run name: search JSON} of the task's finished searches, in the task's order."""
    runs = {}
    for name in TASKS[task]["runs"]:
        path = os.path.join(default_out(task), f"search-{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                runs[name] = json.load(f)
    return runs


def recorded_finalists(doc: dict) -> list:
    """The run's distinct finalists as `search` takes them (kv_retrieval._finalists): (name, factors, search fitness)."""
    cfg = lr.GAConfig(**doc["ga"])
    res = lr.GAResult(None, None, None, None, [], [(tuple(e[0]), *e[1:]) for e in doc["result"]["evaluations"]])
    n = doc["search_baseline"]["n"]
    picked = kv._finalists(argparse.Namespace(finalists=doc["settings"]["finalists"]), [None] * n, res, cfg)
    return [(f"GA #{i + 1}", lr.individual_factors(e[0], cfg), e[1]) for i, e in enumerate(picked)]


class ScoreCache:
    """KVScore tuples per (set, prompt variant, factors), kept in one JSON file, written after each score."""

    def __init__(self, path):
        self.path = path
        self.doc = json.load(open(path)) if os.path.exists(path) else {}

    def scores(self, key: str, model, tok, examples, factors, batch_size) -> list:
        if key not in self.doc:
            started = time.time()
            with lr.scaled(model, factors):
                scores = kv.score_kv(model, tok, examples, batch_size=batch_size)
            self.doc[key] = {"scores": [dataclasses.astuple(s) for s in scores], "seconds": round(time.time() - started, 1)}
            lr.write_json(self.path, self.doc)
            print(f"  scored {key} ({len(examples)} prompts, {time.time() - started:.0f} s)", flush=True)
        return [kv.KVScore(*s) for s in self.doc[key]["scores"]]


def replay_task(task_name: str, model, tok, batch_size: int, dtype: str) -> dict:
    task = TASKS[task_name]
    search_set, held = prompt_sets(task)
    pairs, per_position = task.get("pairs", 20), REPLAY_PER_POSITION[task_name]
    plain = kv.kv_sets(pairs, 5, per_position, VALIDATION_SEED, filler=task["filler"])
    kv.check_disjoint(search_set, held, plain)
    cache = ScoreCache(os.path.join(REPLAY_OUT, f"scores-{task_name}.json"))
    layers = lr.num_layers(model)
    with open(os.path.join(default_out(task_name), "uniform.json")) as f:
        best_u = json.load(f)["best"]
    out = {"task": task_name, "validation": {"seed": VALIDATION_SEED, "per_position": per_position,
                                             "n": len(plain), "dtype": dtype}, "runs": {}}
    for run, doc in recorded_runs(task_name).items():
        s = doc["settings"]
        qa = bool(s.get("query_aware"))
        variant = "query-aware" if qa else "plain"
        validation = [dataclasses.replace(ex, query_aware=True) for ex in plain] if qa else plain
        fin = recorded_finalists(doc)
        candidates = {"no scaling": [1.0] * layers, f"uniform x{best_u:g}": [best_u] * layers,
                      **{name: f for name, f, _ in fin}}
        fits = {}
        print(f"[{task_name}] {run}: {len(candidates)} candidates on {len(validation)} {variant} validation prompts",
              flush=True)

        def validate(factors, names=iter(candidates)):
            name = next(names)
            key = f"validation/{dtype}/{variant}/{json.dumps([round(x, 6) for x in factors])}"
            fit = kv.fitness_of(validation, cache.scores(key, model, tok, validation, factors, batch_size),
                                s["weights"], s["objective"])
            fits[name] = fit
            return fit.fitness, fit.correct if s["objective"] == "accuracy" else fit.logprobs

        verdict = lr.validated_choice(validate, candidates, "no scaling",
                                      "mcnemar" if s["objective"] == "accuracy" else "bootstrap",
                                      0.05, f"uniform x{best_u:g}")
        recorded = doc["factors"]
        held_rows = {"recorded factors": _held_row(task_name, run)}
        if qa:  # the verdict's baseline is the query-aware prompt unscaled: so is the held-out comparison
            base = kv.KVFitness.from_json(_held_row(task_name, "query-aware prompt"))
            held_rows["recorded factors"] = dict(held_rows["recorded factors"], vs_baseline=kv.paired_comparison(
                kv.KVFitness.from_json(held_rows["recorded factors"]), base))
        else:
            held_rows[f"uniform x{best_u:g}"] = _held_row(task_name, f"uniform x{best_u:g}")
        chosen_held = None
        if verdict.scaled:
            if verdict.factors == recorded:
                chosen_held = held_rows["recorded factors"]
            elif verdict.chosen.startswith("uniform") and not qa:
                chosen_held = held_rows[verdict.chosen]
            else:  # a finalist the recorded run did not pick: score it held out, paired against no scaling
                key = f"heldout/{dtype}/{variant}/{json.dumps([round(x, 6) for x in verdict.factors])}"
                ex = [dataclasses.replace(e, query_aware=True) for e in held] if qa else held
                fit = kv.fitness_of(ex, cache.scores(key, model, tok, ex, verdict.factors, batch_size))
                base = kv.KVFitness.from_json(_held_row(task_name, "query-aware prompt" if qa else "no scaling"))
                chosen_held = dict(fit.to_json(), vs_baseline=kv.paired_comparison(fit, base))
        pick = max((n for n, _, _ in fin), key=lambda n: verdict.candidates[n]["fitness"])
        out["runs"][run] = {
            "prompt": variant, "objective": s["objective"], "weights": s["weights"],
            "candidates": {k: {**{x: y for x, y in verdict.candidates[k].items()}, "factors": candidates[k],
                               "search_fitness": next((sf for n, _, sf in fin if n == k), None)} for k in candidates},
            "verdict": verdict.to_json(), "ga_pick_by_validation": pick,
            "recorded_is_finalist": next((n for n, f, _ in fin if f == recorded), None),
            "heldout": {k: _summary(v) for k, v in held_rows.items()},
            "heldout_of_verdict": _summary(chosen_held) if chosen_held else None}
        print(f"[{task_name}] {run}: {verdict.line()}", flush=True)
    lr.write_json(os.path.join(REPLAY_OUT, f"{task_name}.json"), out, indent=1)
    return out


def _held_row(task_name: str, name: str) -> dict:
    with open(row_path(default_out(task_name), name)) as f:
        return json.load(f)


def _summary(row: dict) -> dict:
    return {"mean_accuracy": row["mean_accuracy"], "n": row["n"], "vs_baseline": row["vs_baseline"]}


def _diff(vs) -> str:
    if not vs:
        return "-"
    return f"{vs['difference']:+.3f} [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}], p = {vs['mcnemar_p']:.2g}"


def replay_table(results: dict) -> str:
    """One row per recorded search: the verdict (the chosen candidate, or the best GA finalist it rejected,
    with its validation difference from no scaling), the held-out result of the factors the search recorded
    and of the verdict's choice, and whether the guard would have protected a user."""
    rows = []
    for task_name, doc in results.items():
        for run, r in doc["runs"].items():
            v = r["verdict"]
            shown = v["chosen"] if v["scaled"] else r["ga_pick_by_validation"]
            c = r["candidates"][shown]
            unit = " nats (gold log-prob)" if r["objective"] == "logprob" else ""
            val = (f"{shown}: {c['difference']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]{unit}, "
                   f"Holm p = {c['p_holm']:.2g}")
            said = f"**{v['chosen']}** ({val})" if v["scaled"] else f"no scaling (its best finalist, {val})"
            noise = v.get("noise") or {}
            detect = f"{v['detectable']:.3f}" if v["detectable"] is not None else (
                f"none: {noise['discordant']:.0%} of prompts differ" if "discordant" in noise else "none")
            held, after = r["heldout"]["recorded factors"], r["heldout_of_verdict"]
            rows.append([f"{task_name}: {run}" + (" (query-aware prompt: every comparison is with that prompt "
                                                  "unscaled)" if r["prompt"] == "query-aware" else ""),
                         f"{doc['validation']['n']}", said, detect, _diff(held["vs_baseline"]),
                         "0 (no scaling)" if not v["scaled"] else _diff(after["vs_baseline"]),
                         _agreement(v, held, after)])
    return harness.markdown_table(["recorded search", "validation n", "verdict (vs no scaling on validation)",
                                   "detectable", "held out: recorded factors vs no scaling",
                                   "held out: the verdict's choice", "the guard"], rows)


def _agreement(v, held, after) -> str:
    """Would the guard have protected the user? Held-out significance: exact McNemar p < 0.05."""
    lost = held["vs_baseline"]["difference"] < 0 and held["vs_baseline"]["mcnemar_p"] < 0.05
    if not v["scaled"]:
        return "rejected factors that lost held out" if lost else "rejected; held out they were neutral"
    vs = after["vs_baseline"]
    if vs["difference"] < 0 and vs["mcnemar_p"] < 0.05:
        return "**passed factors that lost held out**"
    return "passed; held out they gained" if vs["difference"] > 0 and vs["mcnemar_p"] < 0.05 else \
        "passed; held out they were neutral"


def replay_verdict(args):
    """--replay-verdict: replay the task (unless --report-only), then table.md of every task replayed so far."""
    os.makedirs(REPLAY_OUT, exist_ok=True)
    if args.task not in REPLAY_PER_POSITION:
        raise SystemExit(f"--replay-verdict: no validation size set for the {args.task} task "
                         f"({', '.join(REPLAY_PER_POSITION)})")
    if not args.report_only:
        model, tok = harness.load_model(args.model, args.replay_dtype, args.device)
        replay_task(args.task, model, tok, args.batch_size, args.replay_dtype)
    results = {}
    for name in REPLAY_PER_POSITION:
        path = os.path.join(REPLAY_OUT, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[name] = json.load(f)
    with open(os.path.join(REPLAY_OUT, "table.md"), "w") as f:
        f.write("What the verdict would have said about every recorded search (validation seed "
                f"{VALIDATION_SEED}; the dtype of each task's file; exact McNemar or, for the log-prob objective, a paired bootstrap; "
                "Holm over each run's candidates, alpha = 0.05), beside the held-out result (exact McNemar).\n\n"
                + replay_table(results) + "\n")
    print(replay_table(results))


if __name__ == "__main__":
    main()
