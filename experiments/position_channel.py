"""
Issue 24: the positional hidden-state channel of a model (Yu et al. 2024, "Mitigate Position Bias in Large
Language Models via Scaling a Single Dimension", arXiv 2406.02536), found without training, and the scale
chosen for it on a small KV validation set; the driver's "hidden-state scaling" rows read the pick.

    python experiments/position_channel.py                      # the embedded SmolLM2 -> results/smollm2-135m-position-channel.json
    python experiments/position_channel.py --model gemma3-270m --pairs 75 --filler 0
                                        # validated on Gemma's experiment cell -> results/gemma3-270m-position-channel.json

baselines.find_position_channel averages each layer's hidden states over random strings, keeps channels that
change monotonically with position in many layers, ranks them by smoothness, and tries the top_k candidates
with every scale of the paper's grid {0.5, 0, -0.5, -1} in the middle layers (theirs: 10-25 of 32; here the
same share of the model's depth). The validation loss is the mean gold NLL per token on KV prompts (by default
the long-range ones, 20 pairs, filler 1; --pairs/--filler pick the cell of the experiment that will use the
channel) of a seed that no task's search (1) or held-out (2) prompts use, checked disjoint; the
scaled rows are the answer's tokens (last_tokens = the gold answer's length), as the scorer reads them.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import baselines  # noqa: E402
import harness  # noqa: E402
import kv_retrieval as kv  # noqa: E402
import layer_rope as lr  # noqa: E402

VALIDATION_SEED = 4


def middle_layers(num_layers: int) -> list[int]:
    """The paper's middle layers, 10-25 of 32, as the same share of another depth."""
    return list(range(round(10 * num_layers / 32), round(25 * num_layers / 32) + 1))


def validation_set(per_position: int, filler: int, pairs: int = 20) -> list:
    """KV prompts of VALIDATION_SEED, refused if they share an example with the tasks' search or held-out sets
    (those of the experiments' cells and of this one)."""
    val = kv.kv_sets(pairs, 5, per_position, VALIDATION_SEED, filler=filler)
    for seed in (1, 2):
        for task_pairs, task_filler in {(20, 0), (20, 1), (20, 14), (75, 0), (pairs, filler)}:
            kv.check_disjoint(kv.kv_sets(task_pairs, 5, 100, seed, filler=task_filler), val)
    return val


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=harness.model_help())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=200, help="random strings (theirs: 200)")
    ap.add_argument("--length", type=int, default=1000, help="tokens per random string (theirs: 1,000)")
    ap.add_argument("--top-k", type=int, default=5, help="candidates tried on the validation set (theirs: 10)")
    ap.add_argument("--validation", type=int, default=4, help="validation prompts per gold position")
    ap.add_argument("--pairs", type=int, default=20, help="validation prompts' key-value pairs")
    ap.add_argument("--filler", type=int, default=1, help="validation prompts' filler (1: the long-range task's; "
                    "0: the JSON prompt)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    started = time.time()
    if args.device == "cpu":
        harness.keep_freed_memory()
    model, tok = harness.load_model(args.model, "float32", args.device)
    val = validation_set(args.validation, args.filler, args.pairs)
    # The scorer's gold is prefix + value with any of the model's answer prefixes (Gemma 3: ' 1234' or ' "1234');
    # the rows that predict it are its last len(gold) input rows, so the longest gold covers every prompt.
    last_tokens = max(len(kv.encode(tok, p + ex.value)) for ex in val for p in kv.answer_prefixes(model))
    layers = middle_layers(lr.num_layers(model))

    def validation_loss(m) -> float:  # mean gold NLL per token, every gold position weighted alike
        return -kv.kv_fitness(m, tok, val, objective="logprob", batch_size=args.batch_size).fitness

    found = baselines.find_position_channel(model, tok, validation_loss, layers, samples=args.samples,
                                            length=args.length, top_k=args.top_k, last_tokens=last_tokens)
    pick = None if found.channel is None else dict(channel=found.channel, scale=found.scale, layers=layers,
                                                   last_tokens=last_tokens)
    out = args.out or os.path.join(ROOT, "results", f"{harness.model_slug(args.model)}-position-channel.json")
    lr.write_json(out, {**harness.run_info(args.device, "float32", argv), "pick": pick, **found.to_json(),
                        "validation": dict(seed=VALIDATION_SEED, per_position=args.validation, pairs=args.pairs,
                                           filler=args.filler,
                                           prompts=len(val), loss="mean gold NLL per token (nats)"),
                        "wall_s": round(time.time() - started, 1)}, indent=1)
    print(f"[position channel] pick {pick}; loss {found.loss} vs unpatched {found.baseline_loss:.4f}; "
          f"{found.monotone_channels} channels qualified, candidates {found.candidates}; wrote {out} in "
          f"{time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
