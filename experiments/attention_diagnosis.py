"""
Is the middle found and not used? Where the attention of the prompt's last position goes, record by record,
on a task's held-out prompts, next to whether the answer was right (issue 35, item 4).

    python experiments/attention_diagnosis.py short     # SmolLM2, results/attention-diagnosis/short/
    python experiments/attention_diagnosis.py long      # SmolLM2, long-range prompts, .../long/
    python experiments/attention_diagnosis.py gemma     # Gemma 3 270M, JSON 75 pairs, results/gemma3-270m/attention-diagnosis/

For every held-out prompt of the task (the same prompts as experiments/lost_in_the_middle.py's rows: 5 gold
positions, seed 2) baselines.record_attention measures the attention the last prompt position pays to each
record (summed over its tokens), per layer and head, in float32 (or --dtype): without scaling, and with the
task's committed LPES factors (results/BEST[task], `lr.scaled`). The gold record's rank among the records (1 =
most attended), per layer and summed over layers and heads, is split by gold position and by the answer of the
same setting's recorded row (rows/none.json; rows/<the factors' selected run>.json), right or wrong. The
measurements are kept (attention-<setting>-<dtype>.npz: prompts x layers x records, averaged over heads) and
measured a chunk at a time, so a killed run resumes. Where the driver's attention-sort row kept its first
measurement of the same prompts (rows/attention_sort_*.attention.npz, no scaling, float32), it is reused.

Outputs under OUT: table.md, summary.json, ranks.png.
"""

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import baselines  # noqa: E402
import harness  # noqa: E402
import kv_retrieval as kv  # noqa: E402
import layer_rope as lr  # noqa: E402

# the held-out sets of experiments/lost_in_the_middle.py's tasks (its TASKS: pairs, filler, prompts per position)
TASKS = {
    "short": dict(model=None, pairs=20, filler=0, heldout=100, rows="lim-short", factors="smollm2-135m-kv.json",
                  out="attention-diagnosis/short", batch_size=16),
    "long": dict(model=None, pairs=20, filler=1, heldout=50, rows="lim-long", factors="smollm2-135m-longkv.json",
                 out="attention-diagnosis/long", batch_size=8),
    "gemma": dict(model="gemma3-270m", pairs=75, filler=0, heldout=50, rows="gemma3-270m/lim-json75",
                  factors="gemma3-270m-kv.json", out="gemma3-270m/attention-diagnosis", batch_size=10),
}
CHUNK = 50


def held_out(task) -> list:
    return kv.kv_sets(task["pairs"], 5, task["heldout"], 2, filler=task["filler"])


def measure(path, model, tok, held, batch_size, factors=None) -> np.ndarray:
    """(prompts, layers, records) float32 head-averaged record attention, CHUNK prompts at a time into path."""
    att = np.load(path)["attention"] if os.path.exists(path) else None
    while att is None or len(att) < len(held):
        done = 0 if att is None else len(att)
        part = held[done:done + CHUNK]
        started = time.time()
        if factors is None:
            new = baselines.record_attention(model, tok, part, batch_size)
        else:
            with lr.scaled(model, factors):
                new = baselines.record_attention(model, tok, part, batch_size)
        new = new.mean(axis=2).astype(np.float32)
        att = new if att is None else np.concatenate([att, new])
        np.savez_compressed(path, attention=att)
        print(f"{os.path.basename(path)}: {len(att)}/{len(held)} ({time.time() - started:.0f} s)", flush=True)
    return att


def ranks(att: np.ndarray, gold: np.ndarray) -> tuple:
    """(rank per layer (prompts, layers), rank of the layer sum (prompts,)): 1 + records attended more than gold."""
    g = np.take_along_axis(att, gold[:, None, None], axis=2)  # (n, L, 1)
    by_layer = 1 + (att > g).sum(axis=2)
    total = att.sum(axis=1)
    return by_layer, 1 + (total > total[np.arange(len(gold)), gold][:, None]).sum(axis=1)


def breakdown(att, gold, correct) -> list:
    """Per answer (right/wrong) and gold position: n, share with the gold most attended (layers summed), its mean
    rank, and the layer where the gold is most often the most attended (its share)."""
    by_layer, total = ranks(att, gold)
    out = []
    for answer, want in (("right", True), ("wrong", False)):
        for p in sorted(set(gold.tolist())):
            sel = (gold == p) & (correct == want)
            if not sel.any():
                out.append(dict(answer=answer, position=int(p), n=0))
                continue
            top = (by_layer[sel] == 1).mean(axis=0)
            out.append(dict(answer=answer, position=int(p), n=int(sel.sum()), top1=float((total[sel] == 1).mean()),
                            mean_rank=float(total[sel].mean()), best_layer=int(top.argmax()),
                            best_layer_top1=float(top.max()), top1_by_layer=[round(float(t), 4) for t in top]))
    return out


def plot(path, results, title, records):
    settings = list(results)
    fig, axes = harness.figure(len(settings), 2, figsize=(11, 3.6 * len(settings)), layout="constrained",
                               squeeze=False)
    for r, name in enumerate(settings):
        for c, answer in enumerate(("right", "wrong")):
            ax = axes[r][c]
            cells = [d for d in results[name]["breakdown"] if d["answer"] == answer]
            positions = [d["position"] for d in cells]
            layers = len(next((d["top1_by_layer"] for d in results[name]["breakdown"] if d["n"]), []))
            grid = np.array([d["top1_by_layer"] if d["n"] else [np.nan] * layers for d in cells]).T
            im = ax.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(positions)), [f"{p}\n(n={d['n']})" for p, d in zip(positions, cells)])
            ax.set_xlabel(f"gold record's position (of {records})")
            ax.set_ylabel("layer")
            ax.set_title(f"{name}: answer {answer}", fontsize=10)
    fig.colorbar(im, ax=axes, label="share of prompts whose gold record is the most attended", shrink=0.8)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--settings", nargs="+", default=["no scaling", "LPES"], choices=["no scaling", "LPES"])
    ap.add_argument("--dtype", default="float32", choices=sorted(harness.DTYPES), help="the measuring passes' "
                    "dtype (the answers are the recorded float32 rows')")
    ap.add_argument("--per-position", type=int, default=None, help="only the first N held-out prompts of each "
                    "gold position (default: all)")
    args = ap.parse_args()
    harness.keep_freed_memory()
    task = TASKS[args.task]
    out = os.path.join(ROOT, "results", task["out"])
    rows_dir = os.path.join(ROOT, "results", task["rows"], "rows")
    os.makedirs(out, exist_ok=True)
    held = held_out(task)
    keep = [i for i in range(len(held)) if args.per_position is None or i % task["heldout"] < args.per_position]
    held, gold = [held[i] for i in keep], np.array([held[i].gold_index for i in keep])
    model, tok = harness.load_model(task["model"], args.dtype, "cpu")
    factors_file = os.path.join(ROOT, "results", task["factors"])
    selected = lr.load_factors(factors_file, with_metadata=True)[1]["selected"]["run"]
    results = {}
    for name in args.settings:
        row_file = os.path.join(rows_dir, "none.json" if name == "no scaling" else f"{selected}.json")
        with open(row_file) as f:
            row = json.load(f)
        row["correct"] = [row["correct"][i] for i in keep]
        if [row["gold_index"][i] for i in keep] != gold.tolist():
            raise ValueError(f"{row_file} was not scored on these held-out prompts")
        part = "" if args.per_position is None else f"-first{args.per_position}"
        path = os.path.join(out, f"attention-{'none' if name == 'no scaling' else 'lpes'}-{args.dtype}{part}.npz")
        reuse = sorted(glob.glob(os.path.join(rows_dir, "attention_sort_*.attention.npz")))  # float32, as rows are
        if name == "no scaling" and args.dtype == "float32" and not part and not os.path.exists(path) and reuse and \
                len(np.load(reuse[0])["attention"]) == len(held):
            np.savez_compressed(path, attention=np.load(reuse[0])["attention"])
        factors = None if name == "no scaling" else lr.load_factors(factors_file, model=model)
        att = measure(path, model, tok, held, args.batch_size or task["batch_size"], factors)
        results[name] = dict(row=os.path.relpath(row_file, ROOT), mean_accuracy=row["mean_accuracy"],
                             measured=os.path.relpath(path, ROOT), dtype=args.dtype,
                             breakdown=breakdown(att, gold, np.array(row["correct"], dtype=bool)))
        if name == "LPES":
            results[name]["factors"] = f"results/{task['factors']} (selected run {selected})"
    records = task["pairs"]
    table = []
    for name, res in results.items():
        for d in res["breakdown"]:
            table.append([name, d["answer"], d["position"], d["n"]] + (
                ["-"] * 4 if not d["n"] else [f"{d['top1']:.2f}", f"{d['mean_rank']:.1f}",
                                              f"{d['best_layer_top1']:.2f} (layer {d['best_layer']})",
                                              f"{np.mean(d['top1_by_layer']):.2f}"]))
    model_name = task["model"] or "SmolLM2-135M"
    per = task["heldout"] if args.per_position is None else f"the first {args.per_position} of {task['heldout']}"
    text = (f"{model_name}, {args.task} task: {len(held)} held-out prompts ({per} per gold position, "
            f"seed 2, {records} records); attention of the last prompt position, measured in {args.dtype} (answers: "
            "the float32 rows). 'most attended': the "
            "gold record gets more attention than each other record (summed over its tokens; layers and heads "
            "summed); rank 1 = most attended; best layer: the layer where the gold is most often the most "
            "attended (heads averaged)\n\n" + harness.markdown_table(
                ["setting", "answer", "gold position", "prompts", "gold most attended (all layers)",
                 f"gold's mean rank (of {records})", "best layer: gold most attended", "mean over layers"], table))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    lr.write_json(os.path.join(out, "summary.json"), {"task": args.task, "model": model_name,
                                                      **harness.run_info("cpu", args.dtype), "results": results},
                  indent=1)
    plot(os.path.join(out, "ranks.png"), results,
         f"{model_name}, {args.task} task: is the gold record the most attended by the last prompt position?",
         records)
    print(text)


if __name__ == "__main__":
    main()
