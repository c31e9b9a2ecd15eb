"""
extrapolation: the paper's second experiment -- layer-specific factors on top of Position Interpolation
(PI) or Dynamic-NTK beyond the trained context, judged by passkey retrieval and perplexity.

Both measures come from ONE forward pass per (method, length, needle). Passkey retrieval (Mohtashami &
Jaggi's test, used by YaRN and LongRoPE): a 5-digit key hidden at a depth of a haystack, scored
teacher-forced like KV retrieval (right iff every key token is the argmax, i.e. greedy decoding would emit
it) plus the key's log-probability. Perplexity of the haystack on evenly strided positions (the lm_head
runs only on those and the key's, through the forward's `logits_to_keep`). The haystack is the classic
filler ("The grass is green. ..." repeated: it only shows positional breakdown) or real prose, the Python
Language Reference shipped with CPython (`pydoc_data.topics`, ~110k tokens, no download).

Methods at a length beyond the trained context T: none (as trained); pi (rope_type linear, factor
length / T); ntk (rope_type dynamic, HF's Dynamic-NTK); pi+layer / ntk+layer (the same, with layer l's
positions further divided by factors[l]). At length <= T pi and ntk ARE the unscaled model.

  python extrapolation.py table ...    every method at every length on held-out needles -> OUT.json/.md/.png
  python extrapolation.py search ...   a GA for the layer factors with a long-context passkey fitness
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
import os
import time
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

import harness
import layer_rope as lr

PASSKEY_FILLER = harness.FILLER  # the classic grass/sky filler, shared with the long-range KV task
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                 "them. I will quiz you about the important information there.")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
HAYSTACKS = ("classic", "pydoc")
HELDOUT_SEED = 0  # the needles `table` reports on; a search must draw its needles from another seed


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def pydoc_text() -> str:
    """The Python Language Reference topics shipped with CPython (pydoc_data.topics), in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@functools.cache  # keyed on the tokenizer object itself, which the cache keeps alive
def _pydoc_ids(tok) -> tuple:
    return tuple(_ids(tok, "\n" + pydoc_text()))


def haystack_tokens(tok, haystack: str = "classic", min_tokens: int = 0) -> list[int]:
    """Token ids of a haystack: the classic filler repeated to >= min_tokens, or the whole pydoc text."""
    if haystack == "classic":
        unit = _ids(tok, " " + PASSKEY_FILLER)
        return unit * (max(min_tokens, 1) // len(unit) + 1)
    if haystack == "pydoc":
        ids = _pydoc_ids(tok)
        if len(ids) < min_tokens:
            raise ValueError(f"the pydoc haystack has {len(ids)} tokens, {min_tokens} asked for")
        return list(ids)
    raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")


@dataclasses.dataclass(frozen=True)
class PasskeyExample:
    """One passkey prompt of exactly n_tokens input tokens.

    full_ids = input_ids + (last key token,): the model reads input_ids; position p predicts full_ids[p+1].
    The answer (" " + key) is full_ids[answer_start:]; the needle sentence starts at full_ids[needle_start].
    haystack_spans: the half-open full_ids ranges of the haystack before and after the needle.
    offset: where the haystack slice starts in its source (0 for the classic filler).
    """

    full_ids: tuple
    key: str
    depth: float
    answer_start: int
    needle_start: int
    haystack_spans: tuple
    haystack: str
    offset: int

    @property
    def input_ids(self) -> tuple:
        return self.full_ids[:-1]

    @property
    def n_tokens(self) -> int:
        return len(self.full_ids) - 1

    @property
    def answer_ids(self) -> tuple:
        return self.full_ids[self.answer_start:]


def passkey_prompt(key: str, filler_before: str, filler_after: str) -> str:
    """The passkey prompt as text (for reading and generation; the scorer builds token ids directly)."""
    return (f"{PASSKEY_INTRO}\n{filler_before} {PASSKEY_NEEDLE.format(key=key)} {filler_after}\n"
            f"{PASSKEY_QUESTION} {key}")


def make_passkey_example(tok, n_tokens: int, depth: float = 0.5, seed: int = 0, index: int = 0,
                         haystack: str = "classic") -> PasskeyExample:
    """A passkey example of exactly n_tokens input tokens, the needle at `depth` (0: first, 1: last) of
    the haystack. The key (5 digits) and, for prose, the text offset come from (seed, index).

    Pieces are tokenised separately and joined as token ids (intro, haystack before, needle, haystack
    after, question, answer), so the length is exact; the haystack is cut at token boundaries.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    rng = np.random.default_rng([seed, index])
    key = str(int(rng.integers(10000, 100000)))
    intro = _ids(tok, PASSKEY_INTRO + "\n")
    needle = _ids(tok, " " + PASSKEY_NEEDLE.format(key=key))
    question = _ids(tok, "\n" + PASSKEY_QUESTION)
    answer = _ids(tok, " " + key)
    hay_len = n_tokens + 1 - len(intro) - len(needle) - len(question) - len(answer)
    if hay_len < 2:
        raise ValueError(f"n_tokens={n_tokens} leaves no room for a haystack "
                         f"(the fixed parts take {n_tokens + 1 - hay_len})")
    source = haystack_tokens(tok, haystack, hay_len)
    offset = 0 if haystack == "classic" else int(rng.integers(0, len(source) - hay_len + 1))
    hay = source[offset:offset + hay_len]
    before = int(round(depth * hay_len))
    full = intro + hay[:before] + needle + hay[before:] + question + answer
    needle_start = len(intro) + before
    after_start = needle_start + len(needle)
    assert len(full) == n_tokens + 1
    return PasskeyExample(tuple(full), key, float(depth), len(full) - len(answer), needle_start,
                          ((len(intro), needle_start), (after_start, after_start + hay_len - before)),
                          haystack, offset)


def passkey_depths(n: int) -> list[float]:
    """Needle depths of n examples: n evenly spaced values in [0.1, 0.9] (0.5 for n = 1)."""
    return [0.5] if n == 1 else np.linspace(0.1, 0.9, n).tolist()


def make_passkey_examples(tok, n_tokens: int, n: int, seed: int = 0, haystack: str = "classic",
                          depths: Sequence[float] | None = None, first: int = 0) -> list[PasskeyExample]:
    """n examples of n_tokens tokens; example i has key (seed, first + i) and depth depths[i]
    (passkey_depths)."""
    depths = passkey_depths(n) if depths is None else list(depths)
    if len(depths) != n:
        raise ValueError(f"{len(depths)} depths for {n} examples")
    return [make_passkey_example(tok, n_tokens, d, seed, first + i, haystack) for i, d in enumerate(depths)]


def ppl_targets(ex: PasskeyExample, max_positions: int) -> np.ndarray:
    """full_ids indices of up to max_positions haystack tokens, evenly strided, to score perplexity on.
    The first token of each span is skipped: it follows a different piece (intro or needle)."""
    idx = np.concatenate([np.arange(start + 1, end) for start, end in ex.haystack_spans])
    if len(idx) > max_positions:
        idx = idx[np.round(np.linspace(0, len(idx) - 1, max_positions)).astype(int)]
    return idx


@torch.inference_mode()
def passkey_and_ppl(model, ex: PasskeyExample, ppl_positions: int = 2048, start_layer: int = 0,
                    hidden_in: torch.Tensor | None = None, capture_layer: int | None = None) -> dict:
    """Passkey retrieval (teacher-forced) and haystack perplexity of one example, in one forward pass:
    correct (every key token is the argmax), answer_logprob (summed over the key's tokens, nats), ppl (exp
    of the mean NLL on up to ppl_positions strided haystack targets), ppl_tail (targets in the last quarter
    of the positions), nll_by_quarter, ppl_n, seconds (the forward) and layers_run.

    Prefix sharing: capture_layer=k also returns "hidden_in", the hidden states entering decoder layer k;
    given back with start_layer=k they go in as inputs_embeds while the decoder's layer list is cut to
    layers k.. for the call (for decoders that feed their embeddings to layer 0 unchanged, as Llama does).
    Exact when layers < k compute the same in both runs: a base method, then base+layer with factors[:k] = 1.
    """
    device = next(model.parameters()).device
    targets = ppl_targets(ex, ppl_positions)
    scored = np.concatenate([targets, np.arange(ex.answer_start, len(ex.full_ids))])  # full_ids indices
    decoder = model.get_decoder()
    layers, captured, hook = decoder.layers, {}, None
    if capture_layer is not None:
        def grab(module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
        hook = layers[capture_layer].register_forward_pre_hook(grab, with_kwargs=True)
    keep = torch.as_tensor(scored - 1, device=device)  # position p predicts full_ids[p + 1]
    start = time.perf_counter()
    try:
        if hidden_in is None:
            inputs = {"input_ids": torch.tensor([ex.input_ids], device=device)}
        else:
            decoder.layers = torch.nn.ModuleList(list(layers)[start_layer:])  # hooks stay on the modules
            inputs = {"inputs_embeds": hidden_in}
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits[0]
    finally:
        decoder.layers = layers
        if hook is not None:
            hook.remove()
    logp = torch.log_softmax(logits.float(), -1)
    seconds = time.perf_counter() - start
    gold = torch.tensor([ex.full_ids[i] for i in scored], device=device)
    lp = logp.gather(-1, gold[:, None])[:, 0].cpu().numpy().astype(np.float64)
    hit = (logp.argmax(-1) == gold).cpu().numpy()
    k = len(targets)
    nll = -lp[:k]
    quarter = np.minimum((targets * 4) // (ex.n_tokens + 1), 3)
    return {
        "correct": bool(hit[k:].all()),
        "answer_logprob": float(lp[k:].sum()),
        "ppl": float(np.exp(nll.mean())),
        "ppl_tail": float(np.exp(nll[quarter == 3].mean())) if (quarter == 3).any() else float("nan"),
        "nll_by_quarter": [float(nll[quarter == q].mean()) if (quarter == q).any() else None
                           for q in range(4)],
        "ppl_n": int(k),
        "seconds": seconds,
        "layers_run": len(layers) - (start_layer if hidden_in is not None else 0),
        **({"hidden_in": captured["h"]} if capture_layer is not None else {}),
    }


EXTRAPOLATION_METHODS = ("none", "pi", "ntk", "pi+layer", "ntk+layer")


class MethodRope(NamedTuple):
    rope_parameters: dict | None  # the base method's rope_parameters (None: the model as trained)
    layer: bool  # whether the layer factors go on top


def method_rope(method: str, length: int, trained_context: int, rope_theta: float | None,
                ntk_factor: float = 2.0) -> MethodRope:
    """What a method computes at `length` tokens: PI with factor 1 and Dynamic-NTK inside the trained
    context are the unscaled RoPE, so they reduce to rope_parameters None. rope_theta None (model_rope_theta:
    one RoPE per layer type) is refused beyond the trained context."""
    if method not in EXTRAPOLATION_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {EXTRAPOLATION_METHODS}")
    base, layer = method.split("+")[0], method.endswith("+layer")
    if rope_theta is None and base != "none" and length > trained_context:
        # A flat rope_parameters on such a model (Gemma 3) is silently ignored by transformers, so PI would
        # measure the unscaled model. Which layer types to scale is a choice not made yet: Gemma 3's own
        # long-context models scale the global layers only; the sliding-window ones never see far positions.
        raise ValueError(f"{method} at {length} tokens (beyond the trained {trained_context}) is not "
                         "implemented for a model with one RoPE per layer type (Gemma 3: sliding-window and "
                         f"global layers); use lengths <= {trained_context}, where every method is the "
                         "model as trained")
    if base == "pi" and length > trained_context:
        return MethodRope({"rope_type": "linear", "factor": length / trained_context,
                           "rope_theta": rope_theta}, layer)
    if base == "ntk" and length > trained_context:
        return MethodRope({"rope_type": "dynamic", "factor": float(ntk_factor), "rope_theta": rope_theta},
                          layer)
    return MethodRope(None, layer)


def default_extrapolation_factors(num_layers: int, sensitive_depth: float, top: float = 1.5) -> list[float]:
    """A hand-made layer profile, piecewise linear through (0, 1), (sensitive_depth, 1), (1, top): 1.0
    from the first layer through the retrieval-critical depth, then a ramp to `top` at the last layer."""
    return lr.linear_factors([[0.0, 1.0], [sensitive_depth, 1.0], [1.0, top]], num_layers)


def model_rope_theta(config) -> float | None:
    """The model's RoPE base, or None where each layer type has its own RoPE (Gemma 3's rope_parameters are
    {"sliding_attention": {...theta 1e4}, "full_attention": {...theta 1e6}}), which method_rope refuses to
    scale."""
    params = config.rope_parameters
    return float(params["rope_theta"]) if "rope_theta" in params else None


def load_with_rope(rope_parameters: dict | None, model_path: str | None = None, dtype=torch.float32,
                   device: str = "cpu"):
    """(model, tokenizer) of `model_path` (default: the embedded model) with its rope_parameters replaced
    (None: as trained)."""
    overrides = {} if rope_parameters is None else {"rope_parameters": rope_parameters}
    return harness.load_model(model_path, dtype=dtype, device=device, **overrides)


# -- the table: every method at every length on the held-out needles -------------------------------

def _fingerprint(factors: Sequence[float]) -> str:
    return hashlib.sha256(json.dumps([float(f) for f in factors]).encode()).hexdigest()[:16]


def _read_log(log_path: str | None) -> dict:
    """Records of a JSON-lines log, by (length, example, haystack, method_key)."""
    done = {}
    if log_path and os.path.exists(log_path):
        with open(log_path) as f:
            for r in (json.loads(line) for line in f if line.strip()):
                done[(r["length"], r["example"], r["haystack"], r["method_key"])] = r
    return done


def _check_resumed(rec: dict, ex: PasskeyExample, fsha: str | None, log_path: str) -> None:
    """A record reused on resume must describe the forward this run would make: same needle (seed and
    depth, which follows from the sample count) and, for a +layer forward, the same layer factors."""
    for what, old, new in (("passkey", rec["key"], ex.key), ("needle depth", rec["depth"], ex.depth),
                           ("layer factors", rec.get("factors_sha") if fsha else None, fsha)):
        if old != new:
            raise ValueError(
                f"{log_path}: the record for length {rec['length']}, example {rec['example']} "
                f"({'/'.join(rec['methods'])}) has a different {what} ({old} != {new}) from this run's "
                "settings (--seed, --samples, --factors); resume with the settings that wrote it, or "
                "choose a new --out")


def _forward_groups(methods: Sequence[str], length: int, trained_context: int, rope_theta: float,
                    ntk_factor: float) -> list:
    """[(method_key, method names)] of the distinct forwards at `length`. method_key is the JSON of
    [rope_parameters, layer]. Each base method comes right before its +layer variant (same model, shared
    prefix); beyond the trained context the unscaled model comes last (its failure there says least)."""
    groups: dict = {}
    for m in methods:
        groups.setdefault(json.dumps(list(method_rope(m, length, trained_context, rope_theta, ntk_factor)),
                                     sort_keys=True), []).append(m)

    def order(item):
        rope, layer = json.loads(item[0])
        return rope is None and length > trained_context, json.dumps(rope), layer
    return sorted(groups.items(), key=order)


def _measure(model, ex: PasskeyExample, factors: list, layer: bool, prefix: dict, rope_key: str,
             ppl_positions: int) -> dict:
    """passkey_and_ppl of one method. With factors[:k] all 1.0 (0 < k < layers), a base forward leaves
    the hidden states entering layer k in prefix[rope_key] and its +layer forward starts from them."""
    k = next((j for j, f in enumerate(factors) if f != 1.0), len(factors))
    share = 0 < k < len(factors)
    if not layer:
        r = passkey_and_ppl(model, ex, ppl_positions, capture_layer=k if share else None)
        if share:
            prefix[rope_key] = r.pop("hidden_in")
        return r
    with lr.scaled(model, factors):
        if rope_key in prefix:
            return passkey_and_ppl(model, ex, ppl_positions, start_layer=k, hidden_in=prefix.pop(rope_key))
        return passkey_and_ppl(model, ex, ppl_positions)


def extrapolation_table(lengths: Sequence[int], samples: dict, factors: Sequence[float],
                        haystack: str = "classic", ppl_haystack: str | None = None, seed: int = HELDOUT_SEED,
                        ntk_factor: float = 2.0, ppl_positions: int = 2048, log_path: str | None = None,
                        model_path: str | None = None, dtype=torch.float32, device: str = "cpu",
                        load: Callable | None = None, log: Callable = print,
                        methods: Sequence[str] = EXTRAPOLATION_METHODS, remeasure_layer: bool = False) -> list[dict]:
    """Passkey and perplexity of every method at every length: one record per distinct forward.

    samples: {length: n examples}; example i at a length of n examples has the needle at
    passkey_depths(n)[i]. Rounds go example 0 at every length, then example 1, ... so a partial run
    covers every length. log_path: JSON lines, one record per forward, appended as they finish; records
    already there are reused (checked to be the same needle and factors), so a killed run resumes.
    methods: a subset of EXTRAPOLATION_METHODS (e.g. ntk and ntk+layer only, for searched NTK factors).
    load(rope_parameters) -> (model, tok) replaces load_with_rope (tests). A +layer forward reuses its
    base forward's hidden states up to the first scaled layer (exact); its record says layers_run.
    remeasure_layer: the log's +layer records of other factors (a finished search's new best) are dropped
    from it and measured again, instead of refused; its base-method records are reused as usual.
    """
    load = load or functools.partial(load_with_rope, model_path=model_path, dtype=dtype, device=device)
    model, tok = load(None)
    trained, theta = model.config.max_position_embeddings, model_rope_theta(model.config)
    for length in lengths:  # a length no method can run at is refused now, not after hours of the others
        _forward_groups(methods, length, trained, theta, ntk_factor)
    factors = lr.check_factors(factors, lr.num_layers(model))
    fsha = _fingerprint(factors)
    if remeasure_layer and log_path and os.path.exists(log_path):
        with open(log_path) as f:
            lines = [line for line in f if line.strip()]
        keep = [line for line in lines if json.loads(line).get("factors_sha", fsha) == fsha]
        if len(keep) < len(lines):
            with open(log_path, "w") as f:
                f.writelines(keep)
            log(f"{log_path}: {len(lines) - len(keep)} +layer records of other factors dropped, to measure again")
    done = _read_log(log_path)
    haystacks = [haystack] + ([ppl_haystack] if ppl_haystack and ppl_haystack != haystack else [])
    records, loaded = [], "null"  # the model loaded above is the unscaled one
    for i in range(max(samples[n] for n in lengths)):
        for length in (n for n in lengths if i < samples[n]):  # in the order given: most important first
            groups = _forward_groups(methods, length, trained, theta, ntk_factor)
            for hs in haystacks:
                ex = make_passkey_example(tok, length, passkey_depths(samples[length])[i], seed, i, hs)
                prefix: dict = {}  # base rope_parameters -> hidden states entering the first scaled layer
                for method_key, names in groups:
                    rope, layer = json.loads(method_key)
                    rope_key = json.dumps(rope)
                    if (old := done.get((length, i, hs, method_key))) is not None:
                        _check_resumed(old, ex, fsha if layer else None, log_path)
                        records.append(old)
                        continue
                    if rope_key != loaded:
                        del model
                        model, _ = load(rope)
                        loaded = rope_key
                    r = _measure(model, ex, factors, layer, prefix, rope_key, ppl_positions)
                    rec = {"length": length, "example": i, "depth": ex.depth, "key": ex.key, "haystack": hs,
                           "offset": ex.offset, "method_key": method_key, "methods": names,
                           **({"factors_sha": fsha} if layer else {}), **r}
                    records.append(rec)
                    if log_path:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                    log(f"length={length} example={i} {hs:7s} {'/'.join(names):24s} "
                        f"correct={r['correct']!s:5s} logprob={r['answer_logprob']:8.2f} "
                        f"ppl={r['ppl']:9.2f} tail={r['ppl_tail']:9.2f} {r['seconds']:6.1f}s")
    return records


def summarize_extrapolation(records: Sequence[dict]) -> list[dict]:
    """One row per (haystack, length, method): n, passkey accuracy, mean key log-prob, perplexity (exp of
    the mean per-example NLL), tail perplexity, median seconds per forward, layers run, shared-with."""
    rows = []
    most = max((r.get("layers_run") or 0 for r in records), default=0)  # a full forward
    for hs, length in sorted({(r["haystack"], r["length"]) for r in records}):
        for m in EXTRAPOLATION_METHODS:
            rs = [r for r in records if r["haystack"] == hs and r["length"] == length and m in r["methods"]]
            if rs:
                rows.append({
                    "haystack": hs, "length": length, "method": m, "n": len(rs),
                    "passkey_acc": float(np.mean([r["correct"] for r in rs])),
                    "answer_logprob": float(np.mean([r["answer_logprob"] for r in rs])),
                    "ppl": float(np.exp(np.mean([np.log(r["ppl"]) for r in rs]))),
                    "ppl_tail": float(np.exp(np.mean([np.log(r["ppl_tail"]) for r in rs]))),
                    "seconds": float(np.median([r["seconds"] for r in rs])),
                    "layers_run": min(r.get("layers_run") or most for r in rs),
                    "same_as": [x for x in rs[0]["methods"] if x != m]})
    return rows


def paired_needles(a: dict, b: dict, level: float = 0.95) -> dict:
    """Variant a minus variant b on the needles both measured; a and b map a needle (e.g. its index, or
    (length, index)) to its record. The key's log-probability: per-needle differences, their mean with a
    Student-t interval at `level` (None below two needles), how many needles a helped / hurt; passkeys
    retrieved by each; the mean difference in the filler's log-perplexity and on how many it is lower.
    Records under one needle must be of the same passkey (ValueError otherwise)."""
    from scipy import stats

    needles = sorted(set(a) & set(b))
    if clash := [k for k in needles if a[k].get("key") != b[k].get("key")]:
        raise ValueError(f"needles {clash} hold different passkeys in the two variants: not a paired comparison")
    d = np.array([a[k]["answer_logprob"] - b[k]["answer_logprob"] for k in needles])
    ppl = np.array([math.log(a[k]["ppl"]) - math.log(b[k]["ppl"]) for k in needles])
    half = (float(stats.t.ppf((1 + level) / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
            if len(d) > 1 else None)
    mean = float(d.mean()) if len(d) else None
    return {"n": len(d), "mean": mean, "interval": None if half is None else [mean - half, mean + half],
            "level": level, "helped": int((d > 0).sum()), "hurt": int((d < 0).sum()), "needles": needles,
            "differences": d.tolist(), "retrieved": [sum(bool(a[k]["correct"]) for k in needles),
                                                     sum(bool(b[k]["correct"]) for k in needles)],
            "log_ppl_mean": float(ppl.mean()) if len(d) else None, "ppl_lower": int((ppl < 0).sum())}


def paired_differences(records: Sequence[dict], level: float = 0.95) -> list[dict]:
    """Per (haystack, length, base method): paired_needles of base+layer against base on the same needle
    (same key, depth and filler): the key log-prob difference > 0 means the layer factors helped."""
    out = []
    for hs, length in sorted({(r["haystack"], r["length"]) for r in records}):
        by = {}  # method -> {needle: record}
        for r in records:
            if r["haystack"] == hs and r["length"] == length:
                for m in r["methods"]:
                    by.setdefault(m, {})[r["example"]] = r
        for base in ("pi", "ntk"):
            pair = paired_needles(by.get(base + "+layer", {}), by.get(base, {}), level)
            if pair["n"]:
                out.append({"haystack": hs, "length": length, "base": base, **pair})
    return out


# -- the report: markdown, plot, timing ------------------------------------------------------------

def extrapolation_markdown(rows: Sequence[dict], meta: dict, paired: Sequence[dict] | None = None) -> str:
    """The report: the settings in meta, one table per haystack (rows of summarize_extrapolation), the
    paired differences (paired_differences) if given, and the time per forward (meta["timing"])."""
    lines = [f"# Extrapolation on {meta.get('model', 'the model')} "
             f"(trained context {meta.get('max_position_embeddings')})", ""]
    lines += [f"- **{k}**: `{v}`" if k in ("command", "report_command", "factors") else f"- **{k}**: {v}"
              for k, v in meta.items()
              if k not in ("model", "max_position_embeddings", "timing", "timing_notes")]
    header = ["length", "method", "n", "passkey acc", "answer log-prob", "ppl", "ppl last 25%", "s/forward",
              "layers run", "same forward as"]
    for hs in sorted({r["haystack"] for r in rows}):
        table = [[r["length"], r["method"], r["n"], f"{r['passkey_acc']:.2f}", f"{r['answer_logprob']:.2f}",
                  f"{r['ppl']:.2f}", f"{r['ppl_tail']:.2f}", f"{r['seconds']:.1f}", r["layers_run"],
                  ", ".join(r["same_as"]) or "-"] for r in rows if r["haystack"] == hs]
        lines += ["", f"## Haystack: {hs}", "", harness.markdown_table(header, table), "",
                  "(layers run: decoder layers this forward computed; fewer than all = the +layer forward "
                  "started from its base method's hidden states at the first scaled layer, which is exact)"]
    if paired:
        level = f"{paired[0]['level']:.0%}"
        table = [[p["haystack"], p["length"], f"{p['base']}+layer - {p['base']}", p["n"], f"{p['mean']:+.2f}",
                  "-" if p["interval"] is None else f"[{p['interval'][0]:+.2f}, {p['interval'][1]:+.2f}]",
                  f"{p['helped']} / {p['hurt']}", " ".join(f"{d:+.2f}" for d in p["differences"])]
                 for p in paired]
        lines += ["", "## Paired: base + layer minus base, same needle", "", harness.markdown_table(
            ["haystack", "length", "difference", "needles", "mean (nats)", f"{level} t-interval",
             "helped / hurt", "per needle"], table), "",
            "Key log-probability of base+layer minus base on the same needle (same key, depth and filler); "
            f"> 0: the layer factors helped. Interval: Student t over needles at {level} (none below two "
            "needles)."]
    if "timing" in meta:
        table = [[t["length"], f"{t['forwards']} ({t['full_forwards']})", f"{t['median_seconds']:.1f}"]
                 for t in meta["timing"]]
        lines += ["", "## Time per forward", "", harness.markdown_table(
            ["length", "forwards (full)", "median s per full forward"], table)]
        lines += ["", meta["timing_notes"]] if "timing_notes" in meta else []
    return "\n".join(lines + [""])


def plot_extrapolation(rows: Sequence[dict], path: str, *, title: str, trained_context: int) -> None:
    """Left: key log-probability per method over length (filled marker: every needle of that point was
    retrieved); right: haystack perplexity (log scale). Methods are nudged apart on x so that coinciding
    methods (all of them inside the trained context) stay visible."""
    haystacks = sorted({r["haystack"] for r in rows})
    fig, axes = harness.figure(len(haystacks), 2, figsize=(12, 4.2 * len(haystacks)), squeeze=False)
    for (left, right), hs in zip(axes, haystacks):
        for j, m in enumerate(EXTRAPOLATION_METHODS):
            rs = sorted((r for r in rows if r["haystack"] == hs and r["method"] == m),
                        key=lambda r: r["length"])
            if not rs:
                continue
            x = np.array([r["length"] for r in rs]) + (j - 2) * 120
            style = "--" if "layer" in m else "-"
            line, = left.plot(x, [r["answer_logprob"] for r in rs], style, label=m)
            for xi, r in zip(x, rs):
                left.plot(xi, r["answer_logprob"], "o", color=line.get_color(),
                          markerfacecolor=line.get_color() if r["passkey_acc"] == 1.0 else "white")
            right.plot(x, [r["ppl"] for r in rs], style, marker="o", color=line.get_color(), label=m)
        for ax in (left, right):
            ax.axvline(trained_context, color="grey", linewidth=0.8, linestyle=":",
                       label=f"trained context ({trained_context})")
            ax.set_xlabel("input length (tokens)")
        left.set(ylabel="passkey answer log-prob (nats, 0 = certain)",
                 title=f"passkey, {hs} haystack (filled: every example retrieved it)")
        right.set(ylabel="haystack perplexity (log scale)", yscale="log",
                  title=f"perplexity of the {hs} haystack")
        right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _timing(records: Sequence[dict]) -> list[dict]:
    """Per length: forwards, full forwards (all layers), median seconds of a full forward."""
    out, most = [], max(r.get("layers_run", 0) for r in records)
    for length in sorted({r["length"] for r in records}):
        rs = [r for r in records if r["length"] == length]
        full = [r["seconds"] for r in rs if r.get("layers_run", most) == most]
        out.append({"length": length, "forwards": len(rs), "full_forwards": len(full),
                    "median_seconds": float(np.median(full)) if full else float("nan")})
    return out


# -- the long-context fitness for the search --------------------------------------------------------

def passkey_fitness(correct: int, n: int, key_logprob_per_token: float, filler_nll: float = 0.0,
                    ppl_weight: float = 0.0) -> float:
    """Fitness of n needles: accuracy correct/n, plus exp(key log-prob per key token) / (n + 1), a
    tie-breaker in (0, 1/(n+1)] that orders equal accuracies by the key's probability and never outweighs
    one more retrieved key (1/n), minus the perplexity penalty ppl_weight * (1 - exp(-filler_nll)): the
    share of the filler's geometric-mean token probability that is lost, in [0, ppl_weight). With
    ppl_weight < 1/(n(n+1)) the penalty too never outweighs one more key; larger weights trade keys for
    perplexity."""
    penalty = ppl_weight * (1.0 - math.exp(-filler_nll))
    return correct / n + math.exp(key_logprob_per_token) / (n + 1) - penalty


@dataclasses.dataclass(frozen=True)
class PasskeyObjective:
    """Picklable long-context fitness for lr.genetic_search: passkey_fitness of `needles` fixed needles
    at `length` tokens, with the layer factors on top of a base method ("pi" or "ntk", see method_rope).
    `length` may be a tuple of lengths: `needles` needles at each (keys drawn per length), one fitness
    over all of them; Dynamic-NTK only, since PI's factor depends on the length.

    The model with the base method's rope_parameters is loaded on first use, once per process (so the
    object works with built-in map and a process pool's map alike), and the needles are built with its
    tokenizer. `seed` may not be HELDOUT_SEED, whose needles the table reports on.
    """

    method: str = "ntk"
    length: int | tuple = 12288
    needles: int = 4
    seed: int = 1
    depths: tuple | None = None  # None: passkey_depths(needles)
    haystack: str = "classic"
    ntk_factor: float = 2.0
    ppl_weight: float = 0.0
    ppl_positions: int = 2048
    model_path: str | None = None
    dtype: str = "float32"  # a torch dtype's name
    device: str = "cpu"
    load: Callable | None = None  # load(rope_parameters) -> (model, tok); None: load_with_rope

    def __post_init__(self):
        if self.method not in ("pi", "ntk"):
            raise ValueError(f"method must be 'pi' or 'ntk', got {self.method!r}")
        if self.seed == HELDOUT_SEED:
            raise ValueError(f"seed {HELDOUT_SEED} draws the held-out needles of the table; search on another")
        if self.depths is not None:
            object.__setattr__(self, "depths", tuple(float(d) for d in self.depths))
        if not isinstance(self.length, numbers.Integral):
            object.__setattr__(self, "length", tuple(int(n) for n in self.length))
            if len(self.length) < 2 or len(set(self.length)) < len(self.length):
                raise ValueError(f"length: one int, or two or more different lengths, got {self.length}")
            if self.method != "ntk":
                raise ValueError(f"several lengths {self.length} need method 'ntk': PI's factor depends on "
                                 "the length, so one search covers one length")

    @property
    def lengths(self) -> tuple:
        return self.length if isinstance(self.length, tuple) else (self.length,)

    def prepared(self) -> tuple:
        """(model with the base method, tokenizer, needles), made on first use in this process."""
        return _prepared(self)

    def describe(self) -> dict:
        """The settings as JSON (what a search records and checks its checkpoint against)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("load", "device")}
        return {**d, "length": list(self.length) if isinstance(self.length, tuple) else self.length,
                "depths": list(self.depths or passkey_depths(self.needles))}

    def __call__(self, factors, bar: float | None = None) -> float:
        return self.score(factors, bar)["fitness"]

    def score(self, factors, bar: float | None = None) -> dict:
        """passkey_fitness of `factors` and what it was made of. Racing: with `bar`, needles stop being
        scored once even retrieving all the rest could not reach it; fitness is then that upper bound,
        (correct + remaining) / n + 1 / (n + 1), which is < bar, and raced is True."""
        model, _, needles = self.prepared()
        factors = lr.check_factors(factors, lr.num_layers(model))
        n, results = len(needles), []
        with lr.scaled(model, factors):
            for ex in needles:
                correct = sum(r["correct"] for r in results)
                bound = (correct + n - len(results)) / n + 1 / (n + 1)
                if bar is not None and bound < bar:
                    return {"fitness": bound, "raced": True, "scored": len(results), "correct": correct}
                results.append(passkey_and_ppl(model, ex, self.ppl_positions))
        correct = sum(r["correct"] for r in results)
        per_token = sum(r["answer_logprob"] for r in results) / sum(len(ex.answer_ids) for ex in needles)
        filler_nll = float(np.mean([math.log(r["ppl"]) for r in results]))
        fitness = passkey_fitness(correct, n, per_token, filler_nll, self.ppl_weight)
        return {"fitness": fitness, "raced": False, "scored": n, "correct": correct,
                "key_logprob_per_token": per_token,
                "filler_ppl": math.exp(filler_nll), "answer_logprob": [r["answer_logprob"] for r in results],
                "seconds": sum(r["seconds"] for r in results)}


@functools.cache
def _prepared(objective: PasskeyObjective) -> tuple:
    load = objective.load or functools.partial(load_with_rope, model_path=objective.model_path,
                                               dtype=getattr(torch, objective.dtype), device=objective.device)
    model, tok = load(None)
    cfg = model.config
    rope = method_rope(objective.method, max(objective.lengths), cfg.max_position_embeddings,
                       model_rope_theta(cfg), objective.ntk_factor).rope_parameters
    if rope is not None:
        del model
        model, tok = load(rope)
    n = objective.needles  # the j-th length's needles have keys (seed, j * n + i), so no key repeats
    needles = [e for j, length in enumerate(objective.lengths) for e in make_passkey_examples(
        tok, length, n, objective.seed, objective.haystack, objective.depths, first=j * n)]
    return model, tok, needles


# -- command line ------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded GGUF)"
TIMING_NOTES = ("Times are wall seconds of one forward (decoder + lm_head on the scored positions). 'layers "
                "run' < all: a +layer forward that reused the hidden states entering the first scaled layer "
                "from its base method's forward (exact). peak_rss_mb and loadavg_1min are of the whole "
                "measuring run.")


def _machine_load() -> dict:
    """Peak RSS of this process and the 1-minute load average (whether other work shared the cores)."""
    import resource
    import sys

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return {"peak_rss_mb": round(rss_kib / 1024, 1), "loadavg_1min": round(os.getloadavg()[0], 2)}


def _model_config(path: str | None):
    """The model's config without its weights (a GGUF file's metadata, or config.json)."""
    from transformers import AutoConfig

    path = harness.model_path(path)  # a known name (gemma3-270m) is its GGUF file
    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        return AutoConfig.from_pretrained(folder, gguf_file=name)
    return AutoConfig.from_pretrained(path)


def reproducing_argv(argv) -> list[str]:
    """The command line minus what only affects this invocation (--resume, --report-only, --note TEXT)."""
    out = list(argv)
    while "--note" in out:
        del out[out.index("--note"):out.index("--note") + 2]
    return [a for a in out if a not in ("--resume", "--remeasure-layer", "--report-only")
            and not a.startswith("--note=")]


def _table_factors(args, num_layers: int) -> tuple[list[float], str]:
    """(factors, where they came from) for `table`: --factors FILE, 'profile', or by default the recorded
    lost-in-the-middle search of the embedded model (the profile for any other model)."""
    path = args.factors
    if path is None:
        searched = os.path.join(HERE, "results", "first-search-kv.json")
        path = searched if args.model is None and os.path.exists(searched) else "profile"
    if path == "profile":
        return (default_extrapolation_factors(num_layers, args.profile_depth, args.profile_top),
                f"default_extrapolation_factors(sensitive_depth={args.profile_depth:.4g}, "
                f"top={args.profile_top}): 1.0 through that depth, then linear to {args.profile_top} at the "
                "last layer")
    if not os.path.exists(path):
        raise SystemExit(f"--factors {path}: no such file (give a save_factors JSON, or 'profile')")
    factors, doc = lr.load_factors(path, num_layers, with_metadata=True)
    said = {"command": doc.get("command") or (doc.get("run") or {}).get("command"),
            "frozen layers": doc.get("frozen"), "control points": doc.get("control_points")}
    return factors, f"{os.path.relpath(path)} (" + "; ".join(f"{k}: {v}" for k, v in said.items() if v) + ")"


def _read_records(args, factors: list) -> tuple[list[dict], dict]:
    """--report-only: the records of OUT.jsonl (refused if measured with other factors) and the run that
    measured them, as an earlier OUT.json describes it."""
    with open(args.out + ".jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if {r["factors_sha"] for r in records if "factors_sha" in r} - {_fingerprint(factors)}:
        raise SystemExit(f"{args.out}.jsonl was measured with other layer factors than --factors gives")
    old = {}
    if os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            old = json.load(f).get("meta", {})
    run = harness.run_info(args.device, args.dtype, args.argv)
    measured = {k: v for k, v in old.items() if k in set(run) | {"peak_rss_mb", "loadavg_1min"}}
    legacy = [r["peak_rss_mb"] for r in records if "peak_rss_mb" in r]  # logs that kept it per forward
    if legacy and "peak_rss_mb" not in measured:
        measured["peak_rss_mb"] = round(max(legacy), 1)  # ru_maxrss only grows within a run
    return records, {**measured, "report_command": run["command"]}


def cmd_table(args) -> dict:
    """`python extrapolation.py table ...`: measure (or --report-only), write OUT.json, .md and .png."""
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths, counts = [int(x) for x in args.lengths], [int(x) for x in args.samples]
    counts = counts * len(lengths) if len(counts) == 1 else counts
    if len(counts) != len(lengths):
        raise SystemExit(f"--samples needs 1 or {len(lengths)} counts, got {len(counts)}")
    config = _model_config(args.model)
    trained = config.max_position_embeddings
    factors, source = _table_factors(args, config.num_hidden_layers)
    layered = any(m.endswith("+layer") for m in args.methods)
    if not layered:  # the factors play no part in any forward: the record must not name a file as if they did
        source = "none: no +layer method in --methods"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    log_path = args.out + ".jsonl"
    if not (args.resume or args.remeasure_layer or args.report_only) and os.path.exists(log_path):
        os.remove(log_path)
    if args.report_only:
        records, run = _read_records(args, factors)
    else:
        records = extrapolation_table(
            lengths, dict(zip(lengths, counts)), factors, args.haystack, args.ppl_haystack, args.seed,
            args.ntk_factor, args.ppl_positions, log_path, args.model, getattr(torch, args.dtype),
            args.device, methods=args.methods, remeasure_layer=args.remeasure_layer)
        run = {**harness.run_info(args.device, args.dtype, reproducing_argv(args.argv)), **_machine_load()}
    rows, paired = summarize_extrapolation(records), paired_differences(records)
    meta = {
        "model": os.path.basename(args.model) if args.model else EMBEDDED_NAME,
        "max_position_embeddings": trained, **run, "haystacks": sorted({r["haystack"] for r in records}),
        "samples": {f"{hs} {n}": len({r["example"] for r in records
                                     if r["haystack"] == hs and r["length"] == n})
                    for hs, n in sorted({(r["haystack"], r["length"]) for r in records})},
        "seed": args.seed, "ntk_factor": args.ntk_factor, "factors_source": source,
        "factors": [round(f, 4) for f in factors] if layered else None, "ppl_positions": args.ppl_positions,
        "pydoc_sha256": hashlib.sha256(pydoc_text().encode()).hexdigest(),
        "timing": _timing(records), "timing_notes": TIMING_NOTES,
        "notes": (f"PI factor = max(1, L/{trained}); Dynamic-NTK factor {args.ntk_factor} (HF `dynamic`, "
                  f"active only above {trained} tokens). At L <= {trained} pi and ntk are the unscaled model "
                  "and pi+layer = ntk+layer: those rows share one forward ('same forward as'). Example i at "
                  "length L has the needle at depth linspace(0.1, 0.9, n_L)[i] (0.5 if n_L = 1). ppl: exp of "
                  f"the mean NLL over up to {args.ppl_positions} evenly strided haystack targets per "
                  "example, geometric mean over "
                  "examples; 'ppl last 25%' restricts to targets in the last quarter of the positions."
                  + (f" {args.note}" if args.note else ""))}
    doc = {"meta": meta, "rows": rows, "paired": paired, "records": records}
    lr.write_json(args.out + ".json", doc, indent=1)
    report = extrapolation_markdown(rows, meta, paired)
    with open(args.out + ".md", "w") as f:
        f.write(report)
    plot_extrapolation(rows, args.out + ".png", title=f"{meta['model']} beyond its {trained}-token context",
                       trained_context=trained)
    print(report)
    return doc


def _check_disjoint(tok, needles: Sequence[PasskeyExample], length: int, count: int = 64) -> None:
    """Refuse search needles whose key is one of the first `count` held-out keys (the table's needles)."""
    heldout = {make_passkey_example(tok, length, 0.5, HELDOUT_SEED, i).key for i in range(count)}
    if clash := sorted({ex.key for ex in needles} & heldout):
        raise SystemExit(f"search needles share keys {clash} with the held-out needles; "
                         "use another --needle-seed")


def _recorded_base(out: str, objective: dict) -> dict | None:
    """The base method's score from an earlier record at `out` of a search with the same objective (needles,
    length, dtype, ...), else None. It is deterministic and costs one forward per needle, which at 12k
    tokens is minutes each: a search stopped early and then finished need not pay for it twice."""
    try:
        with open(out) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc.get("base_method_alone") if doc.get("objective") == objective else None


def cmd_search(args) -> dict:
    """`python extrapolation.py search ...`: the GA on PasskeyObjective, checkpointed; writes OUT."""
    start, timings, mark = time.time(), {}, [time.time()]

    def step(name):  # wall seconds of each step, recorded with the result
        timings[name], mark[0] = round(time.time() - mark[0], 1), time.time()

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join("results", f"extrapolation-search-{args.method}.json")
    checkpoint = args.checkpoint or f"{os.path.splitext(out)[0]}.ckpt.json"
    if args.max_evaluations is not None and args.max_evaluations < 1:
        raise SystemExit(f"--max-evaluations must be at least 1, got {args.max_evaluations}")
    if args.needle_seed == HELDOUT_SEED:
        raise SystemExit(f"--needle-seed {HELDOUT_SEED} draws the held-out needles of `table`; "
                         "choose another")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if args.restart and os.path.exists(checkpoint):
        os.remove(checkpoint)
    length = args.length[0] if len(args.length) == 1 else tuple(args.length)
    objective = PasskeyObjective(
        method=args.method, length=length, needles=args.needles, seed=args.needle_seed,
        depths=args.depths, haystack=args.haystack, ntk_factor=args.ntk_factor, ppl_weight=args.ppl_weight,
        ppl_positions=args.ppl_positions, model_path=args.model, dtype=args.dtype, device=args.device)
    model, tok, needles = objective.prepared()
    _check_disjoint(tok, needles, max(args.length))
    step("model load")
    freeze = [] if args.freeze == "none" else [int(v) for v in args.freeze.split(",") if v.strip()]
    config = lr.GAConfig(num_layers=lr.num_layers(model), num_points=args.points, factor_min=args.factor_min,
                         factor_max=args.factor_max, factor_step=args.factor_step, curve=args.curve,
                         freeze=tuple(freeze), population=args.population, generations=args.generations,
                         seed=args.seed)
    resumed = os.path.exists(checkpoint)
    result = lr.genetic_search(objective, config, checkpoint=checkpoint, tag={"fitness": "passkey",
                               **objective.describe()}, progress=not args.no_progress,
                               race=args.race, max_evaluations=args.max_evaluations)
    step("GA (resumed from a checkpoint)" if resumed else "GA")
    base, base_from = _recorded_base(out, objective.describe()), out
    if base is None:
        base, base_from = objective.score([1.0] * config.num_layers), None
        step("base method alone")
    record = {"run": {**harness.run_info(args.device, args.dtype, args.argv), **_machine_load()},
              "settings": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
              "objective": objective.describe(), "heldout_seed": HELDOUT_SEED, "ga": config.to_json(),
              "result": result.to_json(), "base_method_alone": base, "base_method_alone_from": base_from,
              "timings_s": timings,
              "wall_s": round(time.time() - start, 1)}
    lr.save_factors(out, result.factors, control_points=result.control_points, **record)
    print(f"[search] {args.method}+layer best fitness {result.fitness:.4f} ({len(result.evaluations)} evaluations"
          f"{', stopped at --max-evaluations' if result.stopped_early else ''}), {args.method} alone "
          f"{base['fitness']:.4f}{f' (recorded in {base_from})' if base_from else ''}; "
          f"wrote {out}; steps (s): {timings}")
    return record


def _shared_args(p) -> None:
    p.add_argument("--haystack", choices=HAYSTACKS, default="classic", help="passkey haystack")
    p.add_argument("--ntk-factor", type=float, default=2.0, help="Dynamic-NTK factor")
    p.add_argument("--ppl-positions", type=int, default=2048, help="haystack targets scored per example")
    p.add_argument("--model", default=None, help=harness.model_help())
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def build_parser():
    """The argparse parser of `python extrapolation.py {table,search}`."""
    import argparse

    ap = argparse.ArgumentParser(prog="extrapolation.py", description=__doc__.strip().split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="passkey retrieval and perplexity beyond the trained context: none / "
                       "PI / Dynamic-NTK, each with and without layer-specific factors")
    t.add_argument("--lengths", nargs="+", default=["4096", "8192", "12288", "16384"], help="input lengths")
    t.add_argument("--samples", nargs="+", default=["3", "2", "2", "1"],
                   help="examples per length (one count, or one per length)")
    t.add_argument("--methods", nargs="+", choices=EXTRAPOLATION_METHODS, default=list(EXTRAPOLATION_METHODS),
                   help="methods to run (default: all; e.g. ntk ntk+layer for factors searched on NTK)")
    t.add_argument("--ppl-haystack", choices=HAYSTACKS, default=None,
                   help="also run every example with this haystack (e.g. pydoc, for prose perplexity)")
    t.add_argument("--factors", default=None,
                   help="layer factors file (save_factors format), or 'profile' (default_extrapolation_"
                        "factors); default: results/first-search-kv.json (the first, small search) for the embedded model, "
                        "else the profile")
    t.add_argument("--profile-depth", type=float, default=16 / 29,
                   help="the profile's retrieval-critical depth (default 16/29: SmolLM2's layer 16)")
    t.add_argument("--profile-top", type=float, default=1.5, help="top factor of the profile")
    t.add_argument("--seed", type=int, default=HELDOUT_SEED, help="needle seed")
    _shared_args(t)
    t.add_argument("--out", default="results/extrapolation-smollm2", 
                   help="output prefix (.json .md .png .jsonl)")
    t.add_argument("--resume", action="store_true", help="reuse records in OUT.jsonl from an interrupted run")
    t.add_argument("--remeasure-layer", action="store_true",
                   help="--resume, but measure again the +layer records of other factors than --factors "
                        "(e.g. a search that found a new best); the base-method records are reused")
    t.add_argument("--report-only", action="store_true",
                   help="write OUT.json/.md/.png from the records in OUT.jsonl without running anything")
    t.add_argument("--note", default="", help="free text appended to the notes of the written table")
    t.set_defaults(func=cmd_table)

    s = sub.add_parser("search", help="GA for layer factors on top of PI or Dynamic-NTK, fitness: passkey "
                       "retrieval beyond the trained context")
    s.add_argument("--method", choices=("ntk", "pi"), default="ntk", help="base method under the factors")
    s.add_argument("--length", type=int, nargs="+", default=[12288],
                   help="input length of the search needles; several (ntk only): needles at each")
    s.add_argument("--needles", type=int, default=4, help="search needles (depths passkey_depths(N))")
    s.add_argument("--needle-seed", type=int, default=1, help=f"needle seed (not {HELDOUT_SEED}: held out)")
    s.add_argument("--depths", type=float, nargs="+", default=None, help="needle depths (default: spread)")
    s.add_argument("--ppl-weight", type=float, default=0.0, help="perplexity penalty (passkey_fitness)")
    s.add_argument("--points", type=int, default=4)
    s.add_argument("--curve", default="bezier")
    s.add_argument("--factor-min", type=float, default=1.0)
    s.add_argument("--factor-max", type=float, default=2.0)
    s.add_argument("--factor-step", type=float, default=0.05)
    s.add_argument("--freeze", default="none", help="layers held at 1.0, e.g. 16 or 15,16 (default: none)")
    s.add_argument("--population", type=int, default=8)
    s.add_argument("--generations", type=int, default=4)
    s.add_argument("--seed", type=int, default=0, help="GA seed")
    s.add_argument("--race", action="store_true", help="genetic_search(race=True): stop scoring an "
                   "individual's needles once it cannot beat the weakest elite")
    s.add_argument("--max-evaluations", type=int, default=None,
                   help="stop the GA after this many evaluations in all (checkpoint included); resumable")
    _shared_args(s)
    s.add_argument("--out", default=None, 
                   help="factors JSON (default: results/extrapolation-search-METHOD.json)")
    s.add_argument("--checkpoint", default=None, help="GA checkpoint (default OUT with .ckpt.json); resumed")
    s.add_argument("--restart", action="store_true", help="delete an existing checkpoint first")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_search)
    return ap


def main(argv=None):
    """`python extrapolation.py {table,search} ...`."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.device == "cpu":
        harness.keep_freed_memory()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        again = "--resume" if args.cmd == "table" else "the same command (the checkpoint is intact)"
        print(f"\ninterrupted; run {again} to continue", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
