"""
Issue 26: where does a model lose the middle? KV accuracy by gold position over prompt lengths, with Wilson
intervals and a test of the middle dip, as results/filler-curve.md did for SmolLM2 by hand.

    python experiments/length_scan.py --model gemma3-270m            # -> results/gemma3-270m/length-scan.{json,md,png}
    python experiments/length_scan.py --model gemma3-270m --cells long:20:14 --samples 8

A cell is a prompt format and a length: `long:PAIRS:FILLER` is the long-range prompt (PAIRS word keys with
4-digit values, FILLER filler paragraphs before each pair), `json:PAIRS` the original JSON prompt with PAIRS
generated word keys. Each cell scores `samples` prompts (seed 7, the seed of filler-curve.md) at each of
`positions` gold indices spread from first to last: the same records with the gold pair moved, so the
positions differ by position only. Teacher-forced exact match (kv_retrieval.score_kv, the scorer of every
table). The dip test: the middle positions pooled (all but the first and last) against the two ends, Fisher's
exact test, two-sided.

Every batch is written to the JSON before the next one starts (atomically): a killed run resumes where it
stopped with the same command, and cells already scored are not scored again. The cells run in the order
given, short to long by default, so a run cut short still has a scan up to some length.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import harness  # noqa: E402
import kv_retrieval as kv  # noqa: E402

SEED = 7
# Long-range prompts from ~750 to ~7,000 tokens (the trained range of SmolLM2 is 8k; Gemma 3 270M's 32k) and
# JSON prompts with more pairs (KV_WORDS has 292 distinct words).
DEFAULT_CELLS = ("long:20:1", "long:20:3", "long:20:6", "json:75", "json:140", "long:20:10", "json:280", "long:20:14")


def parse_cell(text: str) -> dict:
    """'long:PAIRS:FILLER' or 'json:PAIRS' -> {"name", "pairs", "filler"}, or an error naming the cell."""
    parts = text.split(":")
    try:
        if parts[0] == "long" and len(parts) == 3:
            pairs, filler = int(parts[1]), int(parts[2])
            ok = filler >= 1
        elif parts[0] == "json" and len(parts) == 2:
            pairs, filler = int(parts[1]), 0
            ok = True
        else:
            ok = False
    except ValueError:
        ok = False
    if not ok or not 1 <= pairs <= len(kv.KV_WORDS):
        raise ValueError(f"cell {text!r}: expected long:PAIRS:FILLER (FILLER >= 1) or json:PAIRS, "
                         f"with 1 <= PAIRS <= {len(kv.KV_WORDS)}")
    return {"name": text, "pairs": pairs, "filler": filler}


def cell_examples(cell: dict, positions: int, samples: int, seed: int = SEED) -> list:
    return kv.kv_sets(cell["pairs"], positions, samples, seed, filler=cell["filler"])


def dip_test(correct_at: dict) -> dict:
    """Middle positions pooled vs the first and last, Fisher's exact test (two-sided)."""
    from scipy.stats import fisher_exact

    ordered = sorted(correct_at)
    ends, middle = [ordered[0], ordered[-1]], ordered[1:-1]
    m_ok, m_n = sum(sum(correct_at[p]) for p in middle), sum(len(correct_at[p]) for p in middle)
    e_ok, e_n = sum(sum(correct_at[p]) for p in ends), sum(len(correct_at[p]) for p in ends)
    p = float(fisher_exact([[m_ok, m_n - m_ok], [e_ok, e_n - e_ok]])[1]) if m_n and e_n else float("nan")
    return {"middle": [m_ok, m_n], "ends": [e_ok, e_n], "p": p}


def summarise(name: str, record: dict) -> dict:
    """Per-position accuracy with Wilson intervals, the dip test and cost of the scored cell `name`."""
    correct_at = {}
    for key, score in record["scores"].items():
        correct_at.setdefault(int(key.split("/")[0]), []).append(bool(score["correct"]))
    positions = {p: {"correct": sum(v), "n": len(v), "accuracy": sum(v) / len(v),
                     "wilson95": kv.wilson_interval(sum(v), len(v))} for p, v in sorted(correct_at.items())}
    return {"cell": name, "tokens": record["tokens"], "positions": positions, "dip": dip_test(correct_at),
            "seconds": record["seconds"], "prompts": len(record["scores"])}


def scan_cell(model, tok, cell: dict, args, record: dict, save) -> None:
    """Score the cell's prompts not yet in record["scores"], a batch at a time, saving after each."""
    examples = cell_examples(cell, args.positions, args.samples)
    keys = [f"{ex.gold_index}/{i % args.samples}" for i, ex in enumerate(examples)]
    lengths = [len(kv.prompt_ids(tok, ex)) for ex in examples]
    record["tokens"] = {"mean": float(np.mean(lengths)), "max": int(max(lengths))}
    todo = [i for i, key in enumerate(keys) if key not in record["scores"]]
    for start in range(0, len(todo), args.batch_size):
        idx = todo[start:start + args.batch_size]
        t0 = time.perf_counter()
        scores = kv.score_kv(model, tok, [examples[i] for i in idx], batch_size=args.batch_size)
        record["seconds"] += time.perf_counter() - t0
        for i, s in zip(idx, scores):
            record["scores"][keys[i]] = {"correct": s.correct, "logprob": s.logprob, "n_tokens": s.n_tokens}
        save()
        print(f"  {cell['name']}: {len(record['scores'])}/{len(keys)} prompts, {record['seconds']:.0f} s", flush=True)


def report(doc: dict) -> str:
    """The markdown table of every finished cell: accuracy at its gold positions, first to last (a cell's
    own gold indices are listed beside it: 0/5/10/14/19 of 20 pairs, 0/18/37/56/74 of 75)."""
    rows, width = [], 0
    for name, record in doc["cells"].items():
        if not record.get("done"):
            continue
        s = summarise(name, record)
        width = max(width, len(s["positions"]))
        accs = [f"{v['accuracy']:.2f} [{v['wilson95'][0]:.2f}, {v['wilson95'][1]:.2f}]" for v in s["positions"].values()]
        d = s["dip"]
        rows.append([name, f"{s['tokens']['mean']:,.0f}", "/".join(str(p) for p in s["positions"]), *accs,
                     f"{d['middle'][0]}/{d['middle'][1]} vs {d['ends'][0]}/{d['ends'][1]}, p = {d['p']:.2g}",
                     f"{s['seconds'] / s['prompts']:.1f}"])
    if not rows:
        return "(no cell finished yet)\n"
    rows = [r[:-2] + [""] * (width + 5 - len(r)) + r[-2:] for r in rows]  # a cell with fewer positions: blanks
    header = ["cell", "tokens", "gold indices", *(f"position {k + 1} [95% Wilson]" for k in range(width)),
              "middle vs ends, Fisher p", "s/prompt"]
    return harness.markdown_table(header, rows)


def write_report(doc: dict, stem: str, command: str) -> None:
    """STEM.md (the table, how it was measured) and STEM.png, from the finished cells."""
    with open(f"{stem}.md", "w") as f:
        f.write(f"# {doc['model']}: KV accuracy by gold position and length\n\n`{command}` ({doc['dtype']}, "
                f"{doc['device']}; {doc['samples']} prompts per gold position, seed {doc['seed']}; teacher-forced "
                f"exact match; the middle dip: the middle positions pooled against the first and last, Fisher's "
                f"exact test, two-sided; s/prompt: scoring seconds per prompt).\n\n{report(doc)}")
    plot(doc, f"{stem}.png")


def plot(doc: dict, path: str) -> None:
    fig, ax = harness.figure(figsize=(7, 4))
    for name, record in doc["cells"].items():
        if record.get("done"):
            s = summarise(name, record)
            xs = list(s["positions"])
            ax.plot(xs, [v["accuracy"] for v in s["positions"].values()], "o-",
                    label=f"{name} (~{s['tokens']['mean']:,.0f} tokens)")
    ax.set(xlabel="gold pair index", ylabel="KV accuracy", ylim=(-0.05, 1.05),
           title=f"{doc['model']}: accuracy by gold position ({doc['samples']} prompts per point)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=harness.model_help())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(harness.DTYPES), default="float32",
                    help="float32 (default: exact, and faster than bfloat16 on CPUs without native bf16)")
    ap.add_argument("--cells", default=",".join(DEFAULT_CELLS), help="comma-separated cells, scanned in order")
    ap.add_argument("--positions", type=int, default=5, help="gold positions per cell, first to last")
    ap.add_argument("--samples", type=int, default=8, help="prompts per gold position")
    ap.add_argument("--batch-size", type=int, default=1, help="prompts per forward")
    ap.add_argument("--out", default=None, help="JSON to write (default results/<model>/length-scan.json)")
    args = ap.parse_args(argv)
    cells = [parse_cell(c.strip()) for c in args.cells.split(",") if c.strip()]
    if not cells:
        ap.error("--cells: no cell given")
    out = args.out or os.path.join(ROOT, "results", harness.model_slug(args.model), "length-scan.json")
    stem = os.path.splitext(out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    settings = {"model": harness.model_slug(args.model), "dtype": args.dtype, "positions": args.positions,
                "samples": args.samples, "seed": SEED}
    doc = json.load(open(out)) if os.path.exists(out) else {**settings, "cells": {}}
    clash = {k: (doc.get(k), v) for k, v in settings.items() if doc.get(k) != v}
    if clash:
        raise SystemExit(f"{out} was written with other settings {clash} (recorded, asked); use another --out")
    if args.device == "cpu":
        harness.keep_freed_memory()
    model, tok = harness.cached_model(args.model, args.device, args.dtype)

    command = " ".join(["python experiments/length_scan.py", *(sys.argv[1:] if argv is None else argv)])

    def save():
        doc.update(harness.run_info(args.device, args.dtype, sys.argv if argv is None else argv))
        harness.write_json(out, doc)

    for cell in cells:
        record = doc["cells"].setdefault(cell["name"], {"scores": {}, "seconds": 0.0})
        if record.get("done"):
            continue
        print(f"{cell['name']} ({args.positions} positions x {args.samples} prompts)", flush=True)
        scan_cell(model, tok, cell, args, record, save)
        record["done"] = True
        record["summary"] = summarise(cell["name"], record)
        save()
        write_report(doc, stem, command)
        print(report(doc), flush=True)
    write_report(doc, stem, command)


if __name__ == "__main__":
    main()
