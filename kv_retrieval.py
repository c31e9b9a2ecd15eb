"""
kv_retrieval: the Lost-in-the-Middle key-value retrieval experiment, the paper's main one.

The prompts (generated word keys, or the original data files), the teacher-forced scorer, the fitness
(with racing), the statistics (Wilson, paired bootstrap, McNemar), the layer scan, and the command line:

    python kv_retrieval.py search        layer scan, GA search, the validated verdict, held-out rows (the README's command)
    python kv_retrieval.py eval          held-out accuracy of saved factors, paired against no scaling
    python kv_retrieval.py sensitivity   the fitness with one layer at a time scaled

References: Lost in the Middle: How Language Models Use Long Contexts, arXiv:2307.03172 (the task);
layer_rope.py for the method it searches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from typing import Sequence

import numpy as np
import torch

from harness import (DTYPES, FILLER, cached_model, default_dtype, figure, keep_freed_memory, markdown_table,
                     model_help, run_info, worker_device, worker_pool)
from layer_rope import (CURVES, GAConfig, GAResult, Verdict, check_factors, check_int, control_points,
                        genetic_search, individual_factors, linear_factors, load_factors, num_layers, paired_test,
                        save_factors, scaled, synthetic_fitness, validated_choice, write_json)

# -----------------------------------------------------------------------------
# 1. KV retrieval (Lost in the Middle): prompts, the teacher-forced scorer, the fitness, the layer scan
#
# The task of Liu et al.: a JSON object of n key-value pairs, one key asked for; the model must copy its
# value. Accuracy against the gold pair's index gives the U-curve that layer-specific scaling tries to
# flatten. Prompts are rendered exactly as the original `kv_retrieval.prompt` does, the gold pair is
# moved as their scripts do (pop, re-insert), and the metric is theirs (value is a substring of the
# answer). A long-range variant writes each pair as a sentence between `filler` paragraphs of the
# classic grass/sky text, so that distances grow to where RoPE's decay acts.
#
# Fitness is scored teacher-forced: one forward pass per prompt instead of one per generated token. An
# answer is right iff each gold-answer token (the model's answer prefix, then the value: ANSWER_PREFIX) is
# the argmax after the prompt and the gold prefix -- exactly when greedy decoding would emit it -- and the
# gold log-probability comes for free.

KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
LONG_KV_INSTRUCTION = "Remember the number for each word in the text below."

# Short keys for small models (a 135M model cannot copy a 36-character UUID but copies 4 digits after a
# one-token word): 256 distinct common words; a prompt draws its keys without replacement.
KV_WORDS = tuple("""
able acid aged also area army away baby back ball band bank base bath bear beat bell belt bird blow blue
boat body bone book boot born boss bowl bulk burn bush busy cake call calm camp card care cart case cash
cast cell chat chip city club coal coat code cold cook cool cope copy core corn cost crew crop dark data
date dawn deal dear debt deck deep deer desk dial diet disc dish dock door dose down draw drop drum dust
duty earn ease east edge farm fast fear feed feel file film fire firm fish flag flat flow folk food foot
form fort fuel fund gain game gate gear gift girl glad goal gold golf grey grow gulf hair half hall hand
hard harm head heat hell help hero hill hint hold hole home hook hope horn host hour idea iron item jazz
join joke jury keen kick kind king knee lack lake lamp land lane lead leaf lean left lens life lift line
link lion list load loan lock look lord loss love luck mail main male mark mask mass meal meat menu mild
milk mill mind mine miss mode mood moon navy neck nest news nose note oven pack page pain pair palm park
path peak pine pink pipe plan play plot pool port post pull pump race rail rain rank rate rice ring road
rock roof room root rope rose rule safe sale salt sand seat seed ship shoe shop shot silk sink site size
skin slot snow sock soil song soup spot star step suit tail tank task team tent test tide tile tool tour
town tree trip tune unit vote wage wall ward wave wind wine wing wire wolf wood wool yard zone
""".split())
KEY_STYLES = ("uuid", "word")
VALUE_STYLES = ("uuid", "digits", "word")



@dataclasses.dataclass(frozen=True)
class KVExample:
    """One KV-retrieval prompt: `records` in prompt order, the gold pair (key, value) at `gold_index`;
    filler = 0 is the original JSON prompt, filler = k the long-range one (k filler paragraphs per pair);
    query_aware: the key is asked before the data as well (see kv_prompt)."""

    records: tuple  # ((key, value), ...)
    key: str
    value: str
    gold_index: int
    filler: int = 0
    query_aware: bool = False

    def __post_init__(self):
        in_range = 0 <= self.gold_index < len(self.records)
        if not in_range or tuple(self.records[self.gold_index]) != (self.key, self.value):
            raise ValueError(f"gold pair {(self.key, self.value)!r} is not at index {self.gold_index}")

    @property
    def prompt(self) -> str:
        return kv_prompt(self.records, self.key, self.filler, self.query_aware)


def kv_prompt(records, key: str, filler: int = 0, query_aware: bool = False) -> str:
    """The original Lost-in-the-Middle KV prompt (filler = 0), ending in 'Corresponding value:'; or the
    long-range prompt: "The number for {k} is {v}." after `filler` filler paragraphs each, then the question.

    query_aware: Liu et al.'s query-aware contextualization (section 4.2), the question before the data as
    well as after it. JSON prompt: their kv_retrieval_with_query_aware_contextualization.prompt, i.e. the
    line 'Key: "{key}"' and a blank line between the instruction and 'JSON data:'. Long-range prompt:
    'What is the number for {key}?' on its own line between the instruction and the text; the ending is
    unchanged. query_aware=False gives the plain prompts byte for byte (recorded results depend on them).
    """
    if filler:
        ask = f"What is the number for {key}?"
        body = " ".join(f"{' '.join([FILLER] * filler)} The number for {k} is {v}." for k, v in records)
        before = f"{ask}\n" if query_aware else ""
        return f"{LONG_KV_INSTRUCTION}\n{before}{body} {FILLER}\n{ask} The number for {key} is"
    ask = f'Key: "{key}"'
    pairs = ",\n ".join(f'"{k}": "{v}"' for k, v in records)
    before = f"{ask}\n\n" if query_aware else ""
    return f'{KV_INSTRUCTION}\n\n{before}JSON data:\n{{{pairs}}}\n\n{ask}\nCorresponding value:'


def move_gold(records, key: str, value: str, gold_index: int) -> list:
    """Pop the gold (key, value) pair and re-insert it at gold_index, as the original scripts do."""
    records = [tuple(r) for r in records]
    if not -len(records) <= gold_index < len(records):
        raise ValueError(f"gold_index {gold_index} out of range for {len(records)} records")
    gold = records.pop(records.index((key, value)))
    records.insert(gold_index % (len(records) + 1), gold)
    return records


def _with_gold_at(ex: KVExample, gold_index: int) -> KVExample:
    records = move_gold(ex.records, ex.key, ex.value, gold_index)
    return dataclasses.replace(ex, records=tuple(records), gold_index=records.index((ex.key, ex.value)))


def load_kv_examples(path: str, gold_index: int | None = None, limit: int | None = None,
                     offset: int = 0, query_aware: bool = False) -> list[KVExample]:
    """Rows offset .. offset+limit-1 of an original `kv-retrieval-*_keys.jsonl(.gz)` file; gold_index=None
    keeps the records' original order; query_aware: see kv_prompt."""
    import gzip
    import itertools

    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        rows = [json.loads(line) for line in itertools.islice(f, offset, None if limit is None else offset + limit)]
    out = []
    for row in rows:
        records = tuple(tuple(r) for r in row["ordered_kv_records"])
        ex = KVExample(records, row["key"], row["value"], records.index((row["key"], row["value"])),
                       query_aware=bool(query_aware))
        out.append(ex if gold_index is None else _with_gold_at(ex, gold_index))
    return out


def _kv_tokens(rng: np.random.Generator, style: str, n: int, digits: int) -> list[str]:
    if style == "uuid":  # uuid4 from the seeded generator (the original data used uuid.uuid4)
        import uuid
        return [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)]
    if style == "word":
        if n > len(KV_WORDS):
            raise ValueError(f"word style has {len(KV_WORDS)} distinct words, {n} asked for")
        return [KV_WORDS[i] for i in rng.choice(len(KV_WORDS), n, replace=False)]
    lo = 10 ** (digits - 1)
    return [str(v) for v in rng.choice(np.arange(lo, 10 * lo), n, replace=False)]


def make_kv_examples(n: int, num_pairs: int = 20, gold_index: int = 0, key_style: str = "word",
                     value_style: str = "digits", digits: int = 4, seed: int = 0, filler: int = 0,
                     query_aware: bool = False) -> list[KVExample]:
    """n new KV examples; keys (and values) within an example are distinct. filler > 0: long-range prompts;
    query_aware: the question before the data as well (kv_prompt).

    Example i depends only on (seed, i, num_pairs, styles), not on gold_index: the same records with the
    gold pair moved, so accuracy differences across gold positions are not sampling noise between sets.
    """
    n, num_pairs = check_int("n", n, 0), check_int("num_pairs", num_pairs, 1)
    digits, seed = check_int("digits", digits, 1), check_int("seed", seed, 0)
    filler = check_int("filler", filler, 0)
    gold_index = check_int("gold_index", gold_index)
    if key_style not in KEY_STYLES or value_style not in VALUE_STYLES:
        raise ValueError(f"key_style must be one of {KEY_STYLES} and value_style one of {VALUE_STYLES}, "
                         f"got {key_style!r}, {value_style!r}")
    if not -num_pairs <= gold_index < num_pairs:
        raise ValueError(f"gold_index {gold_index} out of range for {num_pairs} pairs")
    if value_style == "digits" and num_pairs > 9 * 10 ** (digits - 1):
        raise ValueError(f"{num_pairs} distinct {digits}-digit values do not exist")
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        keys, values = _kv_tokens(rng, key_style, num_pairs, digits), _kv_tokens(rng, value_style, num_pairs, digits)
        asked = int(rng.integers(num_pairs))  # which pair is asked for; then moved to gold_index
        ex = KVExample(tuple(zip(keys, values)), keys[asked], values[asked], asked, filler, bool(query_aware))
        out.append(_with_gold_at(ex, gold_index))
    return out


def kv_correct(answer: str, value: str) -> bool:
    """The original metric: the lower-cased value is a substring of the lower-cased model answer."""
    return value.lower() in answer.lower()


def gold_positions(num_pairs: int, k: int) -> list[int]:
    """k gold indices spread evenly over 0 .. num_pairs-1, first and last included."""
    if k < 1 or k > num_pairs:
        raise ValueError(f"need 1 <= positions <= num_pairs, got {k} positions for {num_pairs} pairs")
    return sorted({int(round(x)) for x in np.linspace(0, num_pairs - 1, k)})


def kv_sets(pairs: int, positions: int, samples: int, seed: int, data: str | None = None, offset: int = 0,
            filler: int = 0, query_aware: bool = False) -> list[KVExample]:
    """`samples` examples with the gold pair at each of `positions` spread indices: generated word keys
    with 4-digit values (data=None), or rows offset.. of an original jsonl(.gz) file (its own pair count)."""
    if data is None:
        return [ex for p in gold_positions(pairs, positions)
                for ex in make_kv_examples(samples, pairs, p, seed=seed, filler=filler, query_aware=query_aware)]
    first = load_kv_examples(data, None, 1, offset)
    if not first:
        raise ValueError(f"{data}: no row {offset}")
    return [ex for p in gold_positions(len(first[0].records), positions)
            for ex in load_kv_examples(data, p, samples, offset, query_aware)]


def check_disjoint(*sets: Sequence[KVExample], names: Sequence[str] = ("search", "held-out", "validation")) -> None:
    """Refuse prompt sets that share an example: the same records (so the same prompt text), whatever the
    gold pair's position. Every pair of sets is checked; the error names the two."""
    seen = [{frozenset(ex.records) for ex in s} for s in sets]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            shared = len(seen[i] & seen[j])
            if shared:
                raise ValueError(f"the {names[i]} and {names[j]} sets share {shared} example(s); "
                                 "use different seeds/offsets")


# The gold answer must be the tokens greedy decoding emits, so that teacher forcing agrees with `generate`,
# and what the model writes before the value is part of it. SmolLM2-135M-Instruct answers every prompt with
# ` <value>`: a space, then the digits -- ANSWER_PREFIX. Gemma 3 270M (a base model) answers the generated
# JSON prompt in the JSON's own format, the token ' "', the digits, a closing quote (' "1234"'), but the
# query-aware JSON prompt, the original data's 75-key JSON prompt and the long-range prompts with ' 1234'
# (greedy first tokens, float32: ' "' on 27 of 27, 0 of 14, 0 of 3, 0 of 25). No fixed prefix per prompt
# format holds, so a model listed in ANSWER_ALTERNATIVES gets its prefix per prompt: the candidate
# (ANSWER_PREFIX first, then its alternatives) whose gold starts with the model's own argmax after the
# prompt -- greedy decoding's first token, so scorer and `generate` agree by construction. Every model not
# listed (SmolLM2 included) has ANSWER_PREFIX alone and is scored exactly as before, one pass per prompt.
# A listed model's first pass tries the prefix the prompt suggests (_lead_prefix: ' "' where the value is
# written in quotes); a prompt whose argmax says otherwise costs a second pass.
ANSWER_PREFIX = " "
ANSWER_ALTERNATIVES = {"gemma3_text": (' "',)}  # config.model_type -> prefixes besides ANSWER_PREFIX


def answer_prefixes(model) -> tuple:
    """The answer prefixes the scorer tries for `model`: ANSWER_PREFIX, then ANSWER_ALTERNATIVES' (see there)."""
    return (ANSWER_PREFIX,) + ANSWER_ALTERNATIVES.get(getattr(model.config, "model_type", None), ())


def prompt_text(tok, ex: KVExample, chat: bool = False) -> str:
    """The text the model reads: the raw prompt, or the tokenizer's chat template around it."""
    if chat:
        return tok.apply_chat_template([{"role": "user", "content": ex.prompt}], tokenize=False,
                                       add_generation_prompt=True)
    return ex.prompt


def encode(tok, text: str) -> list[int]:
    """Token ids of text, without special tokens."""
    return tok(text, add_special_tokens=False)["input_ids"]


def bos_ids(tok) -> list[int]:
    """[BOS] if the tokenizer puts its BOS before a text (Gemma: [<bos>]), else [] (SmolLM2: its tokenizer adds
    no special tokens, although its bos_token is <|im_start|>). Nothing a tokenizer appends (an EOS) is taken."""
    bos = tok.bos_token_id
    return [bos] if bos is not None and tok("")["input_ids"][:1] == [bos] else []


def prompt_ids(tok, ex: KVExample, chat: bool = False) -> list[int]:
    """The token ids the model reads, in the scorer and in greedy_answers alike.

    Raw prompt: bos_ids + the text's ids, i.e. the text as the tokenizer encodes it with its own BOS. Gemma
    needs its <bos>: without it Gemma 3 270M mostly echoes a key on the JSON prompt (1 of 12 right, 9 of 12
    with it). SmolLM2's tokenizer adds nothing, so its ids are the text's alone, as every recorded result
    read them. Chat: the template's text, nothing added: a template writes its own BOS where the model
    wants one (Gemma's begins with '<bos>'), and a second one would be out of distribution.
    """
    return ([] if chat else bos_ids(tok)) + encode(tok, prompt_text(tok, ex, chat))


def _left_padded(tok, sequences: list[list[int]], device) -> dict:
    """input_ids, attention_mask and position_ids (counting real tokens only) of a left-padded batch."""
    batch = tok.pad({"input_ids": sequences}, padding_side="left", return_tensors="pt")
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
            "position_ids": position_ids.to(device)}


@dataclasses.dataclass
class KVScore:
    """Teacher-forced score of one prompt: `correct` (every gold token is the argmax) and `logprob` (sum
    of the n_tokens gold-token log-probabilities, nats)."""

    correct: bool
    logprob: float
    n_tokens: int


@torch.inference_mode()
def score_kv(model, tok, examples: Sequence[KVExample], chat: bool = False, batch_size: int = 8) -> list[KVScore]:
    """Teacher-forced exact match and gold log-probability, one forward pass per prompt (two for some, below).

    The model reads prompt + gold[:-1], prompt = prompt_ids (with the tokenizer's BOS where it adds one),
    gold = tokens(prefix + value) with prefix = ANSWER_PREFIX (' 1234'); the logits at the last len(gold)
    positions predict the gold tokens. A model with ANSWER_ALTERNATIVES (Gemma 3: ' "1234') is scored with
    the gold whose first token is the argmax after the prompt (the one greedy decoding starts with; none of
    them: ANSWER_PREFIX's). The first pass uses each prompt's likely prefix (_lead_prefix); a prompt whose
    argmax says otherwise is scored again with the right gold. The model's own forward computes logits only at the gold
    positions (`logits_to_keep`), so any final soft-capping or logit scaling of the family is applied.
    Prompts are sorted by length and left-padded in batches on the model's device; position_ids count real
    tokens, so a batched score equals the unbatched one up to float rounding.
    """
    check_int("batch_size", batch_size, 1)
    prompts = [prompt_ids(tok, ex, chat) for ex in examples]
    prefixes = answer_prefixes(model)
    leads = [_lead_prefix(prefixes, ex) for ex in examples]
    out, first = _teacher_forced(model, tok, prompts, [encode(tok, p + ex.value) for p, ex in zip(leads, examples)],
                                 batch_size)
    again = {}  # example -> its gold with the prefix greedy decoding starts with, where that is not its lead's
    for i, ex in enumerate(examples):
        golds = {p: encode(tok, p + ex.value) for p in prefixes}
        starts = {golds[p][0]: p for p in reversed(prefixes)}  # a first token two prefixes share: the earlier's
        chosen = starts.get(first[i], ANSWER_PREFIX)  # greedy starts with none of them: the plain gold, wrong
        if chosen != leads[i]:
            again[i] = golds[chosen]
    if again:
        rescored, _ = _teacher_forced(model, tok, [prompts[i] for i in again], list(again.values()), batch_size)
        for i, score in zip(again, rescored):
            out[i] = score
    return out


def _lead_prefix(prefixes: tuple, ex: KVExample) -> str:
    """The answer prefix scored first: an alternative whose text precedes the value in the prompt, as models
    copy a value as it is written (Gemma 3 answers the JSON prompt, '"1234"', with ' "'), else ANSWER_PREFIX.
    Only the cost depends on it (a second pass where greedy decoding starts otherwise), not the score."""
    return next((p for p in prefixes[1:] if p.strip() + ex.value in ex.prompt), ANSWER_PREFIX)


def _teacher_forced(model, tok, prompts: list, golds: list, batch_size: int) -> tuple[list, list]:
    """(KVScore of each prompt + gold, the argmax token after each prompt): score_kv's forward passes."""
    inputs = [p + g[:-1] for p, g in zip(prompts, golds)]
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    device = next(model.parameters()).device
    out: list[KVScore | None] = [None] * len(inputs)
    first: list[int | None] = [None] * len(inputs)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        keep = max(len(golds[i]) for i in idx)
        logits = model(**_left_padded(tok, [inputs[i] for i in idx], device), logits_to_keep=keep,
                       use_cache=False).logits.float()  # (batch, keep, vocab): the last `keep` positions
        for row, i in zip(logits, idx):
            gold = torch.tensor(golds[i], device=device)
            scores = row[keep - len(gold):]  # position t predicts gold[t]
            nll = torch.nn.functional.cross_entropy(scores, gold, reduction="none")
            best = scores.argmax(-1)
            out[i] = KVScore(bool((best == gold).all()), -float(nll.sum()), len(gold))
            first[i] = int(best[0])
    return out, first


@torch.inference_mode()
def greedy_answers(model, tok, examples: Sequence[KVExample], max_new_tokens: int = 8, chat: bool = False,
                   batch_size: int = 8) -> list[str]:
    """Greedy `generate` continuations of each prompt (decoded, special tokens dropped); the prompts are the
    scorer's ids (prompt_ids)."""
    device = next(model.parameters()).device
    prompts = [prompt_ids(tok, ex, chat) for ex in examples]
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = _left_padded(tok, prompts[start:start + batch_size], device)
        batch.pop("position_ids")  # generate derives them from the mask
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += [tok.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True) for row in gen]
    return out


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (scipy's binomtest)."""
    from scipy.stats import binomtest

    if n == 0:
        return (0.0, 1.0)
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence, method="wilson")
    return (float(ci.low), float(ci.high))


OBJECTIVES = ("accuracy", "logprob")


@dataclasses.dataclass
class KVFitness:
    """Fitness of one factor setting on a prompt set, with every prompt's result (in input order).

    objective "accuracy": fitness = sum_p w_p acc_p + exp(mean gold log-prob per token) / (n + 1). The
    tie-breaker lies in (0, 1/(n+1)), less than one more right answer adds, so prompts right come first
    and gold probability orders equal accuracies. objective "logprob" (smooth, for small sets): fitness =
    sum_p w_p mean_{i at p}(log-prob_i / tokens_i). w: position weights, normalised to sum 1.
    complete=False: scoring was stopped early (racing); then `fitness` is an upper bound and the
    per-prompt lists hold only the prompts scored.
    """

    fitness: float
    mean_accuracy: float
    accuracy: dict  # gold index -> accuracy of the prompts scored there
    logprob: dict  # gold index -> mean summed gold log-prob
    n: int  # prompts scored
    token_prob: float  # exp(mean gold log-prob per token) over the prompts scored
    gold_index: list = dataclasses.field(default_factory=list)
    correct: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    complete: bool = True

    def __float__(self) -> float:
        return self.fitness

    def intervals(self) -> dict:
        """95% Wilson interval of the accuracy at each gold index."""
        out = {}
        for p in self.accuracy:
            hits = [c for g, c in zip(self.gold_index, self.correct) if g == p]
            out[p] = wilson_interval(sum(hits), len(hits))
        return out

    @classmethod
    def from_json(cls, doc: dict) -> "KVFitness":
        """The inverse of to_json (gold indices back to ints; the intervals are recomputed, not read)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        doc = {k: v for k, v in doc.items() if k in fields}
        for k in ("accuracy", "logprob"):
            doc[k] = {int(p): v for p, v in doc[k].items()}
        return cls(**doc)

    def to_json(self) -> dict:
        return {"fitness": self.fitness, "mean_accuracy": self.mean_accuracy, "n": self.n,
                "token_prob": self.token_prob, "complete": self.complete,
                "accuracy": {str(k): v for k, v in self.accuracy.items()},
                "accuracy_ci95": {str(k): list(v) for k, v in self.intervals().items()},
                "logprob": {str(k): v for k, v in self.logprob.items()},
                "gold_index": self.gold_index, "correct": self.correct, "logprobs": self.logprobs}


def position_weights(positions: Sequence[int], weights=None) -> dict:
    """{gold index: weight}: None or "uniform" = equal; "middle" = 1, 2, ... rising to the middle position
    and falling again (the paper weights the middle more); a dict or a list aligned with `positions`."""
    positions = sorted(positions)
    if weights is None or weights == "uniform":
        w = [1.0] * len(positions)
    elif weights == "middle":
        w = [1.0 + min(i, len(positions) - 1 - i) for i in range(len(positions))]
    elif isinstance(weights, dict):
        w = [float(weights.get(p, 0.0)) for p in positions]
    elif isinstance(weights, str) or len(weights) != len(positions):
        raise ValueError(f"weights must be 'uniform', 'middle', a dict or {len(positions)} numbers, got {weights!r}")
    else:
        w = [float(v) for v in weights]
    if not all(math.isfinite(v) and v >= 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"position weights must be finite, >= 0 and not all 0, got {weights}")
    return {p: v / sum(w) for p, v in zip(positions, w)}


def _summarise(golds: list, scores: list, n_at: dict, weights: dict, objective: str) -> tuple[float, float, bool]:
    """(fitness, its upper bound over the unscored prompts, complete) of the prompts scored so far.
    n_at[p]: prompts at gold index p in the whole set. Unscored prompts count as right (accuracy) or as
    log-prob 0 (logprob objective) in the bound: nothing can do better."""
    n = sum(n_at.values())
    right, lp_per_token = dict.fromkeys(n_at, 0), dict.fromkeys(n_at, 0.0)
    scored = dict.fromkeys(n_at, 0)
    for g, s in zip(golds, scores):
        scored[g] += 1
        right[g] += s.correct
        lp_per_token[g] += s.logprob / s.n_tokens
    if objective == "logprob":
        value = sum(weights[p] * lp_per_token[p] / n_at[p] for p in n_at)
        return value, value, len(scores) == n
    token_prob = math.exp(sum(s.logprob for s in scores) / max(1, sum(s.n_tokens for s in scores)))
    value = sum(weights[p] * right[p] / n_at[p] for p in n_at) + token_prob / (n + 1)
    bound = sum(weights[p] * (right[p] + n_at[p] - scored[p]) / n_at[p] for p in n_at) + 1 / (n + 1)
    return value, bound, len(scores) == n


def kv_fitness(model, tok, examples: Sequence[KVExample], factors=None, weights=None, chat: bool = False,
               batch_size: int = 8, objective: str = "accuracy", bar: float | None = None) -> KVFitness:
    """Score `examples` with `factors` applied (None: the model as it is); see KVFitness for the value.

    bar (racing): prompts are scored a batch at a time, in an order that takes each gold index in turn,
    and scoring stops as soon as even a perfect rest could not reach `bar`; the result then has
    complete=False and fitness = that upper bound (< bar).
    """
    if factors is not None:
        with scaled(model, factors):
            return kv_fitness(model, tok, examples, None, weights, chat, batch_size, objective, bar)
    n_at, w = _gold_counts(examples, weights, objective)
    if bar is None:
        order, chunks = list(range(len(examples))), [len(examples)]
    else:  # interleave the gold indices: the k-th prompt of every gold index, then the (k+1)-th, ...
        seen, rank = dict.fromkeys(n_at, 0), []
        for ex in examples:
            rank.append((seen[ex.gold_index], ex.gold_index))
            seen[ex.gold_index] += 1
        order = sorted(range(len(examples)), key=rank.__getitem__)
        chunks = [batch_size] * math.ceil(len(examples) / batch_size)
    scores, done = [], []
    for size in chunks:
        idx = order[len(done):len(done) + size]
        scores += score_kv(model, tok, [examples[i] for i in idx], chat, batch_size)
        done += idx
        if bar is not None and len(done) < len(examples):
            _, bound, _ = _summarise([examples[i].gold_index for i in done], scores, n_at, w, objective)
            if bound < bar:
                break
    done, scores = zip(*sorted(zip(done, scores), key=lambda pair: pair[0]))  # back to input order
    return _fitness([examples[i].gold_index for i in done], list(scores), n_at, w, objective)


def fitness_of(examples: Sequence[KVExample], scores: Sequence[KVScore], weights=None,
               objective: str = "accuracy") -> KVFitness:
    """The KVFitness of complete scores, one per example in order, exactly as kv_fitness computes it: for
    prompts scored in parts (a held-out row checkpointed every few prompts)."""
    if len(scores) != len(examples):
        raise ValueError(f"{len(scores)} scores for {len(examples)} examples")
    n_at, w = _gold_counts(examples, weights, objective)
    return _fitness([ex.gold_index for ex in examples], list(scores), n_at, w, objective)


def _gold_counts(examples, weights, objective) -> tuple[dict, dict]:
    """({gold index: prompts there}, {gold index: weight}), or an error for no examples or an unknown objective."""
    if not examples:
        raise ValueError("no examples to score")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    n_at = {p: sum(ex.gold_index == p for ex in examples) for p in sorted({ex.gold_index for ex in examples})}
    return n_at, position_weights(list(n_at), weights)


def _fitness(golds: list, scores: list, n_at: dict, w: dict, objective: str) -> KVFitness:
    """The KVFitness of the scored prompts (golds[i] the gold index of scores[i], in input order)."""
    value, bound, complete = _summarise(golds, scores, n_at, w, objective)
    by = {p: [s for g, s in zip(golds, scores) if g == p] for p in n_at}
    accuracy = {p: float(np.mean([s.correct for s in by[p]])) if by[p] else 0.0 for p in n_at}
    token_prob = math.exp(sum(s.logprob for s in scores) / sum(s.n_tokens for s in scores))
    return KVFitness(value if complete else bound, float(sum(w[p] * accuracy[p] for p in n_at)), accuracy,
                     {p: float(np.mean([s.logprob for s in by[p]])) if by[p] else 0.0 for p in n_at}, len(scores),
                     token_prob, golds, [s.correct for s in scores], [s.logprob for s in scores], complete)


def paired_comparison(a: KVFitness, b: KVFitness, resamples: int = 10000, seed: int = 0) -> dict:
    """a against b scored on the same prompts: mean accuracy difference a - b with a 95% paired bootstrap
    interval over prompts, and the exact McNemar test (binomial test on the discordant prompts); the same
    for the gold log-prob (nats, summed over the answer's tokens), a smooth measure of the same change.
    Both use one resampling of the prompts (`paired_test` with the same seed)."""
    if a.gold_index != b.gold_index or not (a.complete and b.complete):
        raise ValueError("a paired comparison needs two complete scores of the same prompts")
    acc = paired_test(np.array(a.correct, dtype=float), np.array(b.correct, dtype=float), "mcnemar", resamples, seed)
    lp = paired_test(a.logprobs, b.logprobs, "bootstrap", resamples, seed)
    dlp = np.array(a.logprobs, dtype=float) - np.array(b.logprobs, dtype=float)
    return {"difference": acc["difference"], "ci95": acc["ci95"], "only_a_right": acc["only_a"],
            "only_b_right": acc["only_b"], "mcnemar_p": acc["p"], "n": acc["n"],
            "logprob_difference": lp["difference"], "logprob_ci95": lp["ci95"],
            "logprob_higher": int(np.sum(dlp > 0)), "logprob_lower": int(np.sum(dlp < 0))}


@dataclasses.dataclass
class SensitivityScan:
    """Fitness without scaling and with layer l alone scaled by `factor`, for each scanned layer."""

    factor: float
    baseline: KVFitness
    layers: dict  # layer index -> KVFitness

    def sensitive(self, max_drop: float = 0.5) -> list[int]:
        """Layers whose accuracy or per-token gold probability falls below (1 - max_drop) x the baseline's.
        The probability matters on small scans, where the baseline may get no prompt right."""
        if not 0 < max_drop <= 1:
            raise ValueError(f"max_drop must lie in (0, 1], got {max_drop}")
        b = self.baseline
        return [layer for layer, f in sorted(self.layers.items())
                if f.mean_accuracy < (1 - max_drop) * b.mean_accuracy or f.token_prob < (1 - max_drop) * b.token_prob]

    def to_json(self) -> dict:
        return {"factor": self.factor, "baseline": self.baseline.to_json(),
                "layers": {str(layer): f.to_json() for layer, f in sorted(self.layers.items())}}

    def table(self) -> str:
        positions = sorted(self.baseline.accuracy)
        rows = [[name, *(f"{f.accuracy[p]:.2f}" for p in positions), f"{f.mean_accuracy:.3f}", f"{f.token_prob:.3f}"]
                for name, f in [("none", self.baseline), *sorted(self.layers.items())]]
        return markdown_table(["layer", *(f"pos {p}" for p in positions), "mean", "p(token)"], rows)


def sensitivity(model, tok, examples: Sequence[KVExample], factor: float = 2.0, layers=None,
                progress: bool = True, checkpoint: str | None = None, **fitness_kw) -> SensitivityScan:
    """Fitness with each layer in `layers` (default all) alone scaled by `factor`, the others at 1.0.

    checkpoint: a JSON file written after the baseline and after every layer; a rerun with the same model,
    dtype, prompts, factor and fitness settings takes the layers found there back instead of scoring them
    again (a scan on long prompts takes hours), and is refused if any of those differ."""
    import hashlib

    from tqdm.auto import tqdm

    count = num_layers(model)
    check_factors([factor])
    layers = list(range(count)) if layers is None else list(layers)
    for layer in layers:
        if check_int("layer", layer) not in range(count):
            raise ValueError(f"layer {layer!r} is not a decoder layer index in 0 .. {count - 1}")
    prompts = hashlib.sha256("\x00".join(f"{ex.prompt}\x01{ex.value}" for ex in examples).encode()).hexdigest()
    tag = {"model": getattr(model.config, "_name_or_path", None), "layers": count,
           "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "factor": float(factor),
           "prompts": prompts, "fitness": {k: fitness_kw[k] for k in sorted(fitness_kw)}}
    saved = {}
    if checkpoint and os.path.exists(checkpoint):
        with open(checkpoint) as f:
            saved = json.load(f)
        if saved.get("tag") != json.loads(json.dumps(tag)):
            raise ValueError(f"{checkpoint} holds a scan of other settings ({saved.get('tag')}, now {tag}): "
                             "delete it or write elsewhere")

    def save():
        if checkpoint:
            write_json(checkpoint, {"tag": tag, "baseline": base.to_json(),
                                    "layers": {str(k): v.to_json() for k, v in out.items()}})

    out = {int(k): KVFitness.from_json(v) for k, v in saved.get("layers", {}).items()}  # kept, asked for or not
    base = KVFitness.from_json(saved["baseline"]) if "baseline" in saved else kv_fitness(
        model, tok, examples, None, **fitness_kw)
    save()
    for layer in tqdm([layer for layer in layers if layer not in out], desc=f"sensitivity x{factor}",
                      disable=not progress):
        alone = [factor if i == layer else 1.0 for i in range(count)]
        out[layer] = kv_fitness(model, tok, examples, alone, **fitness_kw)
        save()
    return SensitivityScan(float(factor), base, {layer: out[layer] for layer in layers})


@dataclasses.dataclass
class KVObjective:
    """Picklable fitness for `genetic_search`: factors -> kv_fitness on fixed prompts, with racing (`bar`).

    The model is loaded lazily, once per process, so the same object works with built-in map and with a
    process pool (each worker loads its own copy, on the device its pool initializer gave it).
    """

    examples: list
    model_path: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    weights: object = None
    objective: str = "accuracy"
    chat: bool = False
    batch_size: int = 8

    def __call__(self, factors, bar: float | None = None) -> KVFitness:
        model, tok = cached_model(self.model_path, worker_device(self.device), self.dtype)
        return kv_fitness(model, tok, self.examples, factors, self.weights, self.chat, self.batch_size,
                          self.objective, bar)


# -----------------------------------------------------------------------------
# 2. Command line: search, eval, sensitivity
#
# `search` runs the paper's experiment end to end on three disjoint prompt sets: baseline per gold position,
# a layer scan to pick the layers to freeze, the GA on the search set (in bfloat16 where the device has it),
# then the verdict: the GA's distinct finalists, the best uniform factor and no scaling scored in float32 on
# the validation set, a candidate kept only if it beats no scaling there (layer_rope.validated_choice), else
# no scaling is written; last, held-out accuracy of no scaling, the best uniform factor, a linear ramp and
# the GA's pick, each with 95% intervals and paired against no scaling, and the verdict line.


def kv_report(rows: dict, baseline: str = "no scaling") -> str:
    """Markdown table of KVFitness JSONs: accuracy [95% Wilson interval] per gold position, the mean, the
    mean over the middle positions, and the paired difference to `baseline` (bootstrap interval, exact
    McNemar p) for rows that carry one ("vs_baseline")."""
    first = next(iter(rows.values()))
    positions = sorted(first["accuracy"], key=int)
    n = {p: sum(g == int(p) for g in first["gold_index"]) for p in positions}
    table = []
    for name, r in rows.items():
        vs, acc, ci = r.get("vs_baseline"), r["accuracy"], r["accuracy_ci95"]
        table.append([name, *(f"{acc[p]:.2f} [{ci[p][0]:.2f}, {ci[p][1]:.2f}]" for p in positions),
                      f"{r['mean_accuracy']:.3f}", f"{np.mean([acc[p] for p in positions[1:-1]] or [np.nan]):.3f}",
                      "-" if not vs else f"{vs['difference']:+.3f} [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}], "
                                         f"p={vs['mcnemar_p']:.3g}"])
    return markdown_table(["factors", *(f"pos {p} (n={n[p]})" for p in positions), "mean", "middle mean",
                           f"vs {baseline} (paired)"], table)


def evaluate_rows(model, tok, examples, factor_sets: dict, **fitness_kw) -> dict:
    """{name: KVFitness JSON} of each factor setting on the same prompts, each with its paired comparison
    to the first setting ("vs_baseline")."""
    scores = {name: kv_fitness(model, tok, examples, f, **fitness_kw) for name, f in factor_sets.items()}
    first = next(iter(scores.values()))
    return {name: dict(s.to_json(), vs_baseline=None if s is first else paired_comparison(s, first))
            for name, s in scores.items()}


def plot_kv(path: str, rows: dict, factor_sets: dict, title: str) -> None:
    """Left: accuracy by gold index with 95% interval bars; right: the factors per layer."""
    fig, (left, right) = figure(1, 2, figsize=(11, 4))
    for j, (name, r) in enumerate(rows.items()):
        pos = sorted(r["accuracy"], key=int)
        acc, ci = np.array([r["accuracy"][p] for p in pos]), np.array([r["accuracy_ci95"][p] for p in pos])
        x = np.array(pos, dtype=float) + 0.12 * (j - len(rows) / 2)  # side by side, not on top of each other
        left.errorbar(x, acc, yerr=[acc - ci[:, 0], ci[:, 1] - acc], marker="o", capsize=3, label=name)
    left.set(xlabel="gold pair index", ylabel="held-out accuracy (95% Wilson)", ylim=(-0.02, 1.02),
             title="KV retrieval")
    left.legend(fontsize=8)
    for name, f in factor_sets.items():
        right.plot(range(len(f)), f, marker=".", label=name)
    right.set(xlabel="decoder layer", ylabel="RoPE position factor", title="factors")
    if factor_sets:
        right.legend(fontsize=8)
    else:  # rows scored before any search finished
        right.text(0.5, 0.5, "no searched factors yet", ha="center", va="center", transform=right.transAxes)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def checkpoint_path(out: str) -> str:
    return f"{os.path.splitext(out)[0]}.ckpt.json"


def _examples(args, samples: int, seed: int, offset: int = 0) -> list[KVExample]:
    return kv_sets(args.pairs, args.positions, samples, seed, args.data, offset, args.filler, args.query_aware)


def search_tag(args) -> dict:
    """What the search's fitness depends on, stored in its checkpoint and checked on resume. query_aware
    is added only when set, so checkpoints written before the option existed keep their tag and resume."""
    tag = {k: getattr(args, k) for k in ("model", "data", "pairs", "positions", "filler", "search_samples",
                                          "search_seed", "chat", "dtype", "weights", "objective")}
    return {**tag, "query_aware": True} if args.query_aware else tag


def _fitness_kw(args) -> dict:
    return dict(chat=args.chat, batch_size=args.batch_size, weights=args.weights, objective=args.objective)


def _ga_config(args, layers: int, freeze) -> GAConfig:
    return GAConfig(num_layers=layers, num_points=args.points, factor_min=args.factor_min, factor_max=args.factor_max,
                    factor_step=args.factor_step, curve=args.curve, freeze=tuple(freeze),
                    layers=tuple(args.search_layers), population=args.population, generations=args.generations, seed=args.seed)


@dataclasses.dataclass
class _SyntheticObjective:
    """synthetic_fitness with an optional delay and a log line per evaluation (for the CLI's kill tests)."""

    delay: float = 0.0
    log: str | None = None

    def __call__(self, factors, bar=None) -> float:
        time.sleep(self.delay)
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps(factors) + "\n")
        return synthetic_fitness(factors)


def _run_ga(args, objective, layers: int, freeze, tag) -> GAResult:
    pool = worker_pool(args.workers, args.device) if args.workers > 1 else None
    try:
        res = genetic_search(objective, _ga_config(args, layers, freeze), pool or map, checkpoint_path(args.out),
                             tag, progress=not args.no_progress, race=args.race, max_evaluations=args.max_evaluations)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if res.stopped_early:
        print(f"[search] stopped at --max-evaluations {args.max_evaluations}: the best of "
              f"{len(res.evaluations)} evaluations; run again without it to go on", flush=True)
    return res


def _scan_for_frozen_layers(args, model, tok, search, record) -> list[int]:
    """The layers the sensitivity scan flags, on the first --scan-samples search prompts per position."""
    scan_set = [ex for p in sorted({e.gold_index for e in search})
                for ex in [e for e in search if e.gold_index == p][:args.scan_samples]]
    scan = sensitivity(model, tok, scan_set, args.scan_factor, progress=not args.no_progress, **_fitness_kw(args))
    freeze = scan.sensitive(args.max_drop)
    record["sensitivity"] = {"prompts": len(scan_set), "frozen": freeze, **scan.to_json()}
    print(f"{scan.table()}\n[search] freezing layers {freeze} (x{args.scan_factor}, drop > {args.max_drop:.0%})")
    return freeze


def _finalists(args, search, res: GAResult, cfg: GAConfig) -> list:
    """The GA's best --finalists individuals by search fitness, fully scored (not stopped by racing) and with
    distinct factors (two individuals can draw the same curve), best first."""
    finalists, seen = [], set()
    for e in sorted((e for e in res.evaluations if e[3] in (None, len(search))), key=lambda e: -e[1]):
        factors = tuple(individual_factors(e[0], cfg))
        if factors not in seen and len(finalists) < args.finalists:
            finalists.append(e)
            seen.add(factors)
    return finalists


def _rescore_finalists(args, model, tok, search, res: GAResult, cfg: GAConfig, record) -> tuple:
    """Without validation prompts (--validation-samples 0): the finalists re-scored on the search set with
    `model` (the held-out dtype); returns the best of those, recording both rankings and whether they agree."""
    from scipy.stats import kendalltau

    finalists = _finalists(args, search, res, cfg)
    before = [e[1] for e in finalists]
    if args.heldout_dtype == args.dtype:  # the search's scores are already the held-out dtype's
        after = list(before)
    else:
        after = [kv_fitness(model, tok, search, individual_factors(e[0], cfg), **_fitness_kw(args)).fitness
                 for e in finalists]
    chosen = finalists[int(np.argmax(after))][0]  # ties: the better search-dtype rank
    record["finalists"] = {"individuals": [list(e[0]) for e in finalists], "search_dtype": before,
                           args.heldout_dtype: after, "chosen": list(chosen), "same_best": chosen == finalists[0][0],
                           "rescored": args.heldout_dtype != args.dtype,
                           "kendall_tau": float(kendalltau(before, after)[0]) if len(finalists) > 2 else None}
    return chosen


def best_uniform_factor(model, tok, search, uniform: Sequence[float], layers: int, **fitness_kw) -> tuple:
    """(the best uniform factor on the search set, ties to the smaller; {factor: its search fitness})."""
    fit = {u: kv_fitness(model, tok, search, [u] * layers, **fitness_kw).fitness for u in uniform}
    return max(uniform, key=lambda u: (fit[u], -u)), fit


def validate_search(model, tok, validation, candidates: dict, uniform: str | None = None, alpha: float = 0.05,
                    **fitness_kw) -> tuple[Verdict, dict]:
    """The verdict (layer_rope.validated_choice) over `candidates` ({name: factors}, "no scaling" among them)
    on the validation prompts, scored with `model` as it is (the report's dtype): exact McNemar on right/wrong
    for the accuracy objective, a paired bootstrap of the gold log-prob for the log-prob objective. Returns
    (verdict, {name: KVFitness JSON})."""
    scores, objective, names = {}, fitness_kw.get("objective", "accuracy"), iter(candidates)

    def validate(factors):  # called once per candidate, in order
        name = next(names)
        fit = kv_fitness(model, tok, validation, factors, **fitness_kw)
        scores[name] = fit.to_json()
        return fit.fitness, fit.correct if objective == "accuracy" else fit.logprobs

    verdict = validated_choice(validate, candidates, "no scaling", "mcnemar" if objective == "accuracy" else "bootstrap",
                               alpha, uniform)
    return verdict, scores


def _verdict_step(args, model, tok, search, validation, res: GAResult, cfg: GAConfig, record, step) -> tuple:
    """Score the GA's distinct finalists, the best uniform factor (on the search set) and no scaling on the
    validation prompts and decide (validate_search). Returns (the factors to write: the verdict's, the GA's
    pick: its finalist of best validation fitness). Records verdict, validation and ga_best."""
    kw, layers = _fitness_kw(args), cfg.num_layers
    best_u, ufit = best_uniform_factor(model, tok, search, [float(v) for v in args.uniform.split(",")], layers, **kw)
    record.update(uniform_search_fitness={str(u): f for u, f in ufit.items()}, best_uniform=best_u)
    step("uniform factors (search set)")
    finalists = _finalists(args, search, res, cfg)
    names = [f"GA #{i + 1}" for i in range(len(finalists))]  # by search fitness
    candidates = {"no scaling": [1.0] * layers, f"uniform x{best_u:g}": [best_u] * layers,
                  **{n: individual_factors(e[0], cfg) for n, e in zip(names, finalists)}}
    verdict, scores = validate_search(model, tok, validation, candidates, f"uniform x{best_u:g}", args.alpha, **kw)
    pick = max(names, key=lambda n: verdict.candidates[n]["fitness"])
    if verdict.chosen in names:  # the chosen GA curve is the GA's row even when a rejected one scored higher
        pick = verdict.chosen
    ind, pick_search_fitness = finalists[names.index(pick)][:2]
    record["finalists"] = {"individuals": [list(e[0]) for e in finalists], "names": names,
                           "search_dtype": [e[1] for e in finalists],
                           "validation": [verdict.candidates[n]["fitness"] for n in names], "chosen": list(ind)}
    record["validation"] = {"seed": args.validation_seed, "per_position": args.validation_samples, "n": verdict.n,
                            "dtype": args.heldout_dtype, "alpha": args.alpha, "test": verdict.test,
                            "candidates": {k: {**verdict.candidates[k], "factors": list(f), "score": scores[k]}
                                           for k, f in candidates.items()}}
    record["verdict"] = {"chosen": verdict.chosen, "scaled": verdict.scaled, "line": verdict.line(),
                         "detectable_difference": verdict.to_json()["detectable"],
                         "shape_vs_uniform": verdict.shape_vs_uniform}
    record["ga_best"] = {"name": pick, "individual": list(ind), "factors": individual_factors(ind, cfg),
                         "control_points": control_points(ind, cfg), "search_fitness": pick_search_fitness,
                         "validation": verdict.candidates[pick]}
    step("validation (verdict)")
    print(f"[search] {verdict.line()}", flush=True)
    return verdict.factors, ind


def _heldout_rows(args, model, tok, search, held, ga_factors, freeze, record, step) -> tuple[dict, dict]:
    """The held-out rows (no scaling, the best uniform factor on the search set, a linear ramp, the GA's
    pick), each paired against no scaling; recorded in `record`. Returns (rows, factor settings)."""
    kw, layers = _fitness_kw(args), len(ga_factors)
    if "best_uniform" not in record:  # no validation step chose it already
        best_u, ufit = best_uniform_factor(model, tok, search, [float(v) for v in args.uniform.split(",")], layers, **kw)
        record.update(uniform_search_fitness={str(u): f for u, f in ufit.items()}, best_uniform=best_u)
        step("uniform factors (search set)")
    best_u = record["best_uniform"]
    settings = {"no scaling": [1.0] * layers, f"uniform x{best_u:g}": [best_u] * layers,
                f"linear ramp 1..{args.factor_max:g}": linear_factors([1.0, args.factor_max], layers),
                _ga_label(args, freeze): ga_factors}
    heldout = evaluate_rows(model, tok, held, settings, **kw)
    step("held-out evaluation")
    record.update(heldout={"seed": args.heldout_seed, "per_position": args.heldout_samples,
                           "dtype": args.heldout_dtype, "results": heldout}, heldout_factors=settings)
    return heldout, settings


def _ga_label(args, freeze) -> str:
    if args.search_layers:
        return f"GA layers {','.join(map(str, args.search_layers))}"
    return "GA " + args.curve + (f" (frozen {freeze})" if freeze else "")


def prompt_sets(args) -> tuple[list, list, list]:
    """(search, validation, held-out) prompts: generated from three seeds, or three consecutive row ranges
    of --data (search, held-out, validation, so held-out rows stay where they were before validation
    existed); checked disjoint."""
    search = _examples(args, args.search_samples, args.search_seed)
    held = _examples(args, args.heldout_samples, args.heldout_seed, args.search_samples if args.data else 0)
    validation = _examples(args, args.validation_samples, args.validation_seed,
                           args.search_samples + args.heldout_samples if args.data else 0)
    check_disjoint(search, held, validation)
    return search, validation, held


def cmd_search(args) -> dict:
    """`python kv_retrieval.py search`: see the section comment; writes OUT (factors JSON) and OUT's .png."""
    started, timings = time.time(), {}
    if args.max_evaluations is not None and args.max_evaluations < 1:
        raise SystemExit(f"--max-evaluations must be at least 1, got {args.max_evaluations}")
    for name in ("search_samples", "heldout_samples", "validation_samples"):
        if getattr(args, name) < (1 if name == "search_samples" else 0):
            raise SystemExit(f"--{name.replace('_', '-')} must be at least {1 if name == 'search_samples' else 0}, "
                             f"got {getattr(args, name)}")
    if not 0 < args.alpha < 1:
        raise SystemExit(f"--alpha must lie in (0, 1), got {args.alpha}")
    if len({args.search_seed, args.heldout_seed, args.validation_seed}) < 3 and not args.data:
        raise SystemExit(f"--search-seed, --heldout-seed and --validation-seed must differ, got "
                         f"{args.search_seed}, {args.heldout_seed}, {args.validation_seed}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.restart and os.path.exists(checkpoint_path(args.out)):
        os.remove(checkpoint_path(args.out))
    freeze = args.freeze
    record = {**run_info(args.device, args.dtype, args.argv), "settings": {
        k: v for k, v in vars(args).items() if k not in ("func", "argv")}}

    def step(name):  # wall seconds of each step, recorded with the result
        timings[name] = round(time.time() - started - sum(timings.values()), 1)

    if args.synthetic:  # no model: the GA machinery alone, for tests of kill/resume
        freeze = freeze if isinstance(freeze, list) else []
        res = _run_ga(args, _SyntheticObjective(args.eval_delay, args.eval_log), args.layers, freeze,
                      {"fitness": "synthetic"})
        save_factors(args.out, res.factors, control_points=res.control_points, **record,
                     ga=_ga_config(args, args.layers, freeze).to_json(), result=res.to_json())
        return record
    kw = _fitness_kw(args)
    model, tok = cached_model(args.model, args.device, args.dtype)
    layers = num_layers(model)
    _ga_config(args, layers, freeze if isinstance(freeze, list) else [])  # bad GA settings fail before scoring
    step("model load")
    search, validation, held = prompt_sets(args)
    print(f"[search] {layers} layers; {len(search)} search, {len(validation)} validation and {len(held)} held-out "
          f"prompts (seeds {args.search_seed}, {args.validation_seed}, {args.heldout_seed}; disjoint); {args.dtype}",
          flush=True)
    record["search_baseline"] = kv_fitness(model, tok, search, None, **kw).to_json()
    print(f"[search] baseline on the search set: {record['search_baseline']['accuracy']}", flush=True)
    step("baseline (search set)")
    if freeze == "auto" and not args.search_layers:  # with --search-layers every other layer is 1.0 anyway
        freeze = _scan_for_frozen_layers(args, model, tok, search, record)
        step("sensitivity scan")
    freeze = [] if freeze == "auto" else freeze
    freeze = [] if freeze == "none" else freeze
    tag = search_tag(args)
    objective = KVObjective(search, args.model, args.device, args.dtype, args.weights, args.objective, args.chat,
                            args.batch_size)
    res = _run_ga(args, objective, layers, freeze, tag)
    scored = [e[3] for e in res.evaluations if e[3] is not None]
    record["racing"] = {"prompts_scored": sum(scored), "prompts_without_racing": len(scored) * len(search)}
    step("GA")
    if args.heldout_dtype != args.dtype:  # free the search model first: a 7B model twice may not fit
        cached_model.cache_clear()
        model, tok = cached_model(args.model, args.device, args.heldout_dtype)
    cfg = _ga_config(args, layers, freeze)
    record.update(num_layers=layers, frozen=freeze, ga=cfg.to_json(), result=res.to_json())
    if validation:
        factors, chosen = _verdict_step(args, model, tok, search, validation, res, cfg, record, step)
    else:  # no verdict: the GA's pick is written as it is, and the output says so
        chosen = _rescore_finalists(args, model, tok, search, res, cfg, record)
        factors = individual_factors(chosen, cfg)
        record["verdict"] = {"chosen": "GA (not validated)", "scaled": True, "line": "verdict: none -- "
                             "--validation-samples 0: the GA's best is written unvalidated; it may be noise"}
        step("finalists re-scored")
    # control points only where the written factors are a GA curve (not no scaling, not a uniform factor)
    points = control_points(chosen, cfg) if record["verdict"]["chosen"].startswith("GA") else None
    if not held:  # --heldout-samples 0: the search alone (an experiment judges several runs on one set)
        save_factors(args.out, factors, control_points=points, **record, timings_s=timings)
        print(f"[search] wrote {args.out}\n{record['verdict']['line']}", flush=True)
        return record
    heldout, settings = _heldout_rows(args, model, tok, search, held, individual_factors(chosen, cfg), freeze,
                                      record, step)
    record.update(timings_s=timings, wall_s=round(time.time() - started, 1))
    save_factors(args.out, factors, control_points=points, **record)
    print(kv_report(heldout))
    plot_kv(f"{os.path.splitext(args.out)[0]}.png", heldout, settings, f"{args.model or 'embedded model'}; "
            f"{args.pairs} pairs; held-out seed {args.heldout_seed}, {args.heldout_samples}/position")
    print(f"[search] wrote {args.out} in {time.time() - started:.0f} s; steps: {timings}")
    print(record["verdict"]["line"], flush=True)
    return record


def cmd_eval(args) -> dict:
    """`python kv_retrieval.py eval`: held-out accuracy of saved factors, paired against no scaling; for a
    file from a validated search, its verdict beside the rows (and the GA's best as a row of its own when
    the verdict rejected it)."""
    import warnings

    model, tok = cached_model(args.model, args.device, args.dtype)
    layers = num_layers(model)
    settings, doc = {"no scaling": [1.0] * layers}, {}
    if args.factors:
        with warnings.catch_warnings(record=True) as caught:  # the verdict is printed below, with the rows
            warnings.simplefilter("always")
            settings[args.factors], doc = load_factors(args.factors, model=model, with_metadata=True)
        if doc.get("verdict", {}).get("scaled") is False and "ga_best" in doc:
            settings[f"GA best ({doc['ga_best']['name']}, rejected by the verdict)"] = doc["ga_best"]["factors"]
        for w in caught:
            if "verdict" not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    examples = _examples(args, args.samples, args.seed, args.offset)
    rows = evaluate_rows(model, tok, examples, settings, **_fitness_kw(args))
    print(kv_report(rows))
    verdict = doc.get("verdict")
    if verdict:
        print(f"{args.factors}: {verdict['line']}")
    out = dict(rows[list(settings)[-1]], factors=args.factors, seed=args.seed, samples=args.samples,
               rows=rows, verdict=verdict, **run_info(args.device, args.dtype, args.argv))
    if args.json:
        print(json.dumps(out))
    return out


def cmd_sensitivity(args) -> dict:
    """`python kv_retrieval.py sensitivity`: the fitness with each layer alone scaled."""
    model, tok = cached_model(args.model, args.device, args.dtype)
    examples = _examples(args, args.samples, args.seed)
    scan = sensitivity(model, tok, examples, args.factor, progress=not args.no_progress,
                       checkpoint=args.out and checkpoint_path(args.out), **_fitness_kw(args))
    print(scan.table())
    doc = {**run_info(args.device, args.dtype, args.argv), "prompts": len(examples), "seed": args.seed,
           "sensitive(max_drop=0.5)": scan.sensitive(0.5), **scan.to_json()}
    if args.out:
        write_json(args.out, doc)
        fig, ax = figure(figsize=(7, 3.5))
        ax.bar(sorted(scan.layers), [scan.layers[k].mean_accuracy for k in sorted(scan.layers)],
               label=f"layer alone x{args.factor:g}")
        ax.axhline(scan.baseline.mean_accuracy, color="k", ls="--", label="no scaling")
        ax.set(xlabel="decoder layer", ylabel="mean KV accuracy",
               title=f"per-layer sensitivity ({len(examples)} prompts)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{os.path.splitext(args.out)[0]}.png", dpi=120)
    return doc


def _freeze_arg(s: str):
    if s in ("auto", "none"):
        return s
    try:
        return sorted({int(v) for v in s.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--freeze takes 'auto', 'none' or comma-separated layer indices, "
                                         f"got {s!r}") from None


def _layers_arg(s: str) -> list[int]:
    try:
        layers = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--search-layers takes comma-separated layer indices, got {s!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("--search-layers needs at least one layer index")
    return layers


def _weights_arg(s: str):
    return s if s in ("uniform", "middle") else [float(v) for v in s.split(",")]


QUICK = dict(pairs=10, positions=3, search_samples=2, heldout_samples=3, validation_samples=3, scan_samples=1, population=4,
             generations=2, uniform="1.5,2.0", out=os.path.join("results", "quick-kv.json"))


def _common_args(c):
    c.add_argument("--model", default=None, help=model_help())
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    c.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="search: bfloat16 where the device has it, else float32; eval, sensitivity: float32")
    c.add_argument("--data", default=None, help="an original kv-retrieval-*.jsonl.gz (default: generated)")
    c.add_argument("--pairs", type=int, default=20, help="key-value pairs per generated prompt")
    c.add_argument("--positions", type=int, default=5, help="gold positions, spread from first to last")
    c.add_argument("--filler", type=int, default=0, help="long-range prompts: filler paragraphs per pair")
    c.add_argument("--batch-size", type=int, default=16, help="prompts per forward")
    c.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    c.add_argument("--query-aware", action="store_true",
                   help="ask the key before the data as well (Liu et al.'s query-aware contextualization)")
    c.add_argument("--weights", type=_weights_arg, default="uniform",
                   help="gold position weights: uniform, middle, or one number per position")
    c.add_argument("--objective", choices=OBJECTIVES, default="accuracy",
                   help="accuracy (+ gold-probability tie-breaker) or mean gold log-prob (smooth)")
    c.add_argument("--no-progress", action="store_true")
    return c


def _parser():
    ap = argparse.ArgumentParser(prog="kv_retrieval.py", description=__doc__.strip().split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    commands = {"search": "baseline, layer scan, GA search and held-out evaluation on KV retrieval",
                "eval": "held-out accuracy per gold position of saved factors, paired against no scaling",
                "sensitivity": "fitness with one layer at a time scaled"}
    p = {name: _common_args(sub.add_parser(name, help=text)) for name, text in commands.items()}
    s = p["search"]
    s.add_argument("--out", default=os.path.join("results", "default-search-kv.json"), help="factors JSON to write")
    s.add_argument("--restart", action="store_true", help="delete an existing checkpoint (OUT.ckpt.json) first")
    s.add_argument("--quick", action="store_true", help="tiny settings for a ~2 minute smoke test")
    for name, default, text in [("search-samples", 4, "search prompts per gold position"),
                                ("heldout-samples", 10, "held-out prompts per gold position"),
                                ("validation-samples", 40, "validation prompts per gold position: the verdict's "
                                 "(5 x 40 = 200 prompts detect a gain of ~0.1, the size the paper claims, at 80%% "
                                 "power where 15-20%% of prompts differ; the verdict line prints this set's own "
                                 "figure; 0: no verdict, the GA's best is written unvalidated)"),
                                ("search-seed", 1, ""), ("heldout-seed", 2, ""),
                                ("validation-seed", 5, "a seed no recorded run used for search or held-out prompts"),
                                ("points", 4, "control points"),
                                ("scan-samples", 2, "prompts per gold position for the auto scan"),
                                ("population", 8, ""), ("generations", 4, ""), ("seed", 0, "GA seed"),
                                ("finalists", 4, "the GA's best distinct candidates, scored on the validation "
                                 "prompts in --heldout-dtype"),
                                ("workers", 1, "processes evaluating the population (cuda: one GPU each)"),
                                ("layers", 30, "layers for --synthetic")]:
        s.add_argument(f"--{name}", type=int, default=default, help=text or None)
    for name, default in [("scan-factor", 2.0), ("max-drop", 0.5), ("factor-min", 1.0), ("factor-max", 2.0),
                          ("factor-step", 0.05), ("eval-delay", 0.0)]:
        s.add_argument(f"--{name}", type=float, default=default)
    s.add_argument("--alpha", type=float, default=0.05, help="the verdict's level (Holm-corrected over candidates)")
    s.add_argument("--freeze", type=_freeze_arg, default="auto", help="'auto' (layer scan), 'none', or e.g. 16,17")
    s.add_argument("--curve", default="bezier", choices=sorted(CURVES))
    s.add_argument("--search-layers", type=_layers_arg, default=[], metavar="L1,L2,...",
                   help="no curve: search these layers' factors directly, one gene each, every other layer at "
                   "1.0 (e.g. a hybrid model's global-attention layers); no layer scan")
    s.add_argument("--uniform", default="1.25,1.5,2.0", help="uniform factors tried for the 'best uniform' row")
    s.add_argument("--race", action=argparse.BooleanOptionalAction, default=False,
                   help="stop scoring a candidate once it cannot reach the elite (off by default: see README)")
    s.add_argument("--max-evaluations", type=int, default=None,
                   help="stop the GA after this many evaluations in all (checkpoint included); resumable")
    s.add_argument("--heldout-dtype", choices=sorted(DTYPES), default="float32")
    s.add_argument("--synthetic", action="store_true", help="no model: GA on synthetic_fitness (tests)")
    s.add_argument("--eval-log", default=None, help="append each --synthetic evaluation to this file")
    s.set_defaults(func=cmd_search)
    e = p["eval"]
    e.add_argument("--factors", default=None, help="factors JSON from `search` (default: no scaling only)")
    e.add_argument("--seed", type=int, default=2, help="held-out seed (search uses 1)")
    e.add_argument("--samples", type=int, default=20, help="prompts per gold position")
    e.add_argument("--offset", type=int, default=0, help="first row of --data")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    e.set_defaults(func=cmd_eval)
    t = p["sensitivity"]
    t.add_argument("--factor", type=float, default=2.0)
    t.add_argument("--samples", type=int, default=4, help="prompts per gold position")
    t.add_argument("--seed", type=int, default=3)
    t.add_argument("--out", default=None, help="JSON (and .png beside it) to write")
    t.set_defaults(func=cmd_sensitivity)
    return ap, s


def main(argv=None) -> None:
    import sys
    from concurrent.futures.process import BrokenProcessPool

    argv = sys.argv[1:] if argv is None else list(argv)
    ap, search = _parser()
    args = ap.parse_args(argv)
    if getattr(args, "quick", False):  # the quick settings become defaults: what the command line sets stays
        search.set_defaults(**QUICK)
        args = ap.parse_args(argv)
    args.argv = argv
    if args.dtype is None:
        args.dtype = default_dtype(args.device) if args.cmd == "search" else "float32"
    if args.device == "cpu":
        keep_freed_memory()
    try:
        args.func(args)
    except (KeyboardInterrupt, BrokenProcessPool) as e:
        ck = checkpoint_path(args.out) if args.cmd == "search" else None
        resumable = ck is not None and os.path.exists(ck)
        hint = f"; the checkpoint {ck} is intact: run the same command again to resume" if resumable else ""
        print(f"\n{'interrupted' if isinstance(e, KeyboardInterrupt) else 'a worker process died'}{hint}",
              file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 1)


if __name__ == "__main__":
    main()
