"""KV retrieval: prompt format, data, generator, metric, and teacher-forced scoring vs greedy generate."""

import copy
import os

import pytest
import torch

import harness
import kv_retrieval as kv

DATA = os.path.join(os.path.dirname(__file__), "data", "kv-retrieval-75_keys.head3.jsonl.gz")


def test_prompt_matches_the_original_template():
    p = kv.kv_prompt([("a", "1"), ("b", "2"), ("c", "3")], "b")
    assert p == ('Extract the value corresponding to the specified key in the JSON object below.\n\n'
                 'JSON data:\n{"a": "1",\n "b": "2",\n "c": "3"}\n\nKey: "b"\nCorresponding value:')
    assert kv.kv_prompt([("a", "1")], "a").endswith('JSON data:\n{"a": "1"}\n\nKey: "a"\nCorresponding value:')


# Liu et al.'s own test of the query-aware template (nelson-liu/lost-in-the-middle, tests/test_prompting.py,
# test_get_kv_retrieval_prompt_with_query_aware_contextualization): the rendering of
# prompts/kv_retrieval_with_query_aware_contextualization.prompt, copied line for line.
QUERY_AWARE_GOLD = "\n".join([
    "Extract the value corresponding to the specified key in the JSON object below.",
    "",
    'Key: "test key2"',
    "",
    "JSON data:",
    '{"test key1": "test value1",',
    ' "test key2": "test value2",',
    ' "test key3": "test value3"}',
    "",
    'Key: "test key2"',
    "Corresponding value:",
])
# sha256 of default prompts (generated, long-range, original data) rendered before query_aware existed
PLAIN_PROMPTS_SHA256 = "2e9529b6bb56e95cfd622746976b473768916cfdbd1c93f2b9205d46e6605090"


def test_query_aware_prompt_matches_the_original_template():
    data = [("test key1", "test value1"), ("test key2", "test value2"), ("test key3", "test value3")]
    assert kv.kv_prompt(data, "test key2", query_aware=True) == QUERY_AWARE_GOLD
    for ex in kv.load_kv_examples(DATA, gold_index=10, query_aware=True):  # the original rows: one line more
        plain = kv.kv_prompt(ex.records, ex.key)
        head = kv.KV_INSTRUCTION + "\n\n"
        assert ex.query_aware and ex.prompt == plain.replace(head, f'{head}Key: "{ex.key}"\n\n', 1)


def test_long_range_query_aware_asks_twice():
    recs = [("bird", "1234"), ("moon", "5678")]
    plain, aware = (kv.kv_prompt(recs, "moon", filler=1, query_aware=q) for q in (False, True))
    ask = "What is the number for moon?"
    assert plain.count(ask) == 1 and aware.count(ask) == 2
    assert aware == plain.replace(kv.LONG_KV_INSTRUCTION + "\n", f"{kv.LONG_KV_INSTRUCTION}\n{ask}\n", 1)
    assert aware.endswith(f"{ask} The number for moon is")


def test_query_aware_is_carried_and_default_prompts_are_unchanged():
    import hashlib

    plain = kv.kv_sets(20, 3, 2, 1) + kv.kv_sets(6, 2, 1, 5, filler=2) + kv.kv_sets(0, 2, 1, 0, data=DATA)
    digest = hashlib.sha256("\x00".join(ex.prompt for ex in plain).encode()).hexdigest()
    assert digest == PLAIN_PROMPTS_SHA256 and not any(ex.query_aware for ex in plain)
    aware = kv.kv_sets(20, 3, 2, 1, query_aware=True) + kv.kv_sets(0, 2, 1, 0, data=DATA, query_aware=True)
    assert all(ex.query_aware and ex.prompt.count(f'Key: "{ex.key}"') == 2 for ex in aware)
    assert [ex.records for ex in aware] == [ex.records for ex in plain[:6] + plain[-2:]]  # same examples


def test_cli_query_aware_reaches_the_examples_and_the_tag_only_when_set():
    ap, _ = kv._parser()
    default = ap.parse_args(["search", "--pairs", "6", "--positions", "2"])
    aware = ap.parse_args(["search", "--pairs", "6", "--positions", "2", "--query-aware"])
    # the tag of a run without the option is the one existing checkpoints carry
    assert kv.search_tag(default) == {"model": None, "data": None, "pairs": 6, "positions": 2, "filler": 0,
                                      "search_samples": 4, "search_seed": 1, "chat": False, "dtype": None,
                                      "weights": "uniform", "objective": "accuracy"}
    assert kv.search_tag(aware) == {**kv.search_tag(default), "query_aware": True}
    assert not any(ex.query_aware for ex in kv._examples(default, 1, 0))
    assert all(ex.query_aware for ex in kv._examples(aware, 1, 0))
    for cmd in ("eval", "sensitivity"):
        assert ap.parse_args([cmd, "--query-aware"]).query_aware


def test_move_gold_pops_and_reinserts():
    recs = [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]
    assert kv.move_gold(recs, "c", "3", 0) == [("c", "3"), ("a", "1"), ("b", "2"), ("d", "4")]
    assert kv.move_gold(recs, "a", "1", 3) == [("b", "2"), ("c", "3"), ("d", "4"), ("a", "1")]
    assert kv.move_gold(recs, "a", "1", -1)[-1] == ("a", "1")
    with pytest.raises(ValueError):
        kv.move_gold(recs, "a", "1", 4)
    with pytest.raises(ValueError):
        kv.move_gold(recs, "zz", "1", 0)


def test_load_original_rows():
    rows = kv.load_kv_examples(DATA)
    assert len(rows) == 3 and all(len(ex.records) == 75 for ex in rows)
    moved = kv.load_kv_examples(DATA, gold_index=37, limit=2, offset=1)
    assert [ex.key for ex in moved] == [ex.key for ex in rows[1:3]]
    for ex, orig in zip(moved, rows[1:]):
        assert ex.gold_index == 37 and ex.records[37] == (ex.key, ex.value)
        assert sorted(ex.records) == sorted(orig.records)
        assert f'Key: "{ex.key}"' in kv.kv_prompt(ex.records, ex.key)


def test_generator_knobs_and_determinism():
    a = kv.make_kv_examples(5, num_pairs=12, gold_index=7, seed=4)
    assert a == kv.make_kv_examples(5, num_pairs=12, gold_index=7, seed=4)
    assert a != kv.make_kv_examples(5, num_pairs=12, gold_index=7, seed=5)
    b = kv.make_kv_examples(5, num_pairs=12, gold_index=0, seed=4)
    for x, y in zip(a, b):  # same prompts, gold pair moved
        assert x.gold_index == 7 and y.gold_index == 0 and sorted(x.records) == sorted(y.records)
        keys = [k for k, _ in x.records]
        assert len(set(keys)) == 12 and all(k in kv.KV_WORDS for k in keys)
        assert all(len(v) == 4 and v.isdigit() for _, v in x.records)
    u = kv.make_kv_examples(2, num_pairs=3, key_style="uuid", value_style="uuid", seed=0)
    assert all(len(k) == 36 and k[14] == "4" for ex in u for k, _ in ex.records)
    with pytest.raises(ValueError):
        kv.make_kv_examples(1, num_pairs=5, gold_index=5)
    with pytest.raises(ValueError):
        kv.make_kv_examples(1, key_style="emoji")
    with pytest.raises(TypeError):
        kv.make_kv_examples(1.0)


def test_metric():
    assert kv.kv_correct(' 1234\n\nJSON', "1234") and kv.kv_correct("The value is ABC-d", "abc-D")
    assert not kv.kv_correct(" 123", "1234")
    assert kv.gold_positions(20, 5) == [0, 5, 10, 14, 19] and kv.gold_positions(10, 3) == [0, 4, 9]


@pytest.fixture(scope="module")
def model():
    return harness.load_model()


@pytest.fixture(scope="module")
def sample():
    # short prompts keep this cheap; gold at both ends and the middle gives right and wrong answers
    return [ex for g in (0, 4, 9) for ex in kv.make_kv_examples(4, num_pairs=10, gold_index=g, seed=11)]


def test_smollm2_reads_the_prompt_ids_every_recorded_result_read(model):
    """SmolLM2's tokenizer adds no special tokens (its bos_token <|im_start|> included), so prompt_ids -- the
    tokenizer's BOS where it adds one -- are the text's ids alone, raw and chat, JSON and long-range; and
    its one answer prefix is ' ': the ids every recorded result was scored on."""
    m, tok = model
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]
    assert kv.bos_ids(tok) == [] and tok.bos_token_id is not None
    assert kv.answer_prefixes(m) == (kv.ANSWER_PREFIX,) == (" ",)
    examples = (kv.make_kv_examples(2, num_pairs=10, gold_index=4, seed=11)
                + kv.make_kv_examples(2, num_pairs=4, gold_index=1, seed=13, filler=2)
                + kv.make_kv_examples(1, num_pairs=10, gold_index=9, seed=12, query_aware=True)
                + kv.load_kv_examples(DATA, gold_index=10, limit=1))
    for ex in examples:
        for chat in (False, True):
            text = kv.prompt_text(tok, ex, chat)
            assert kv.prompt_ids(tok, ex, chat) == tok(text, add_special_tokens=False)["input_ids"]


def test_answer_prefixes_by_model_type():
    import types

    def model(model_type):
        return types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type))

    assert kv.answer_prefixes(model("gemma3_text")) == (" ", ' "')
    assert kv.answer_prefixes(model("llama")) == kv.answer_prefixes(model("gemma2")) == (" ",)


def test_the_prefix_tried_first_changes_the_cost_not_the_score(model, monkeypatch):
    """With an alternative answer prefix, each prompt is scored with the gold whose first token is its argmax
    (ANSWER_PREFIX's if none) -- the oracle below, one prompt at a time, plain gold first -- whichever prefix
    the first pass tries (_lead_prefix: ' "' where the prompt writes the value in quotes); a second pass only
    where the argmax is not the lead's."""
    m, tok = model
    monkeypatch.setitem(kv.ANSWER_ALTERNATIVES, m.config.model_type, (' "',))
    examples = kv.make_kv_examples(3, num_pairs=6, gold_index=2, seed=5) + kv.make_kv_examples(
        3, num_pairs=3, gold_index=1, seed=5, filler=1)
    assert [kv._lead_prefix(kv.answer_prefixes(m), ex) for ex in examples] == [' "'] * 3 + [" "] * 3
    passes, real = [], kv._teacher_forced
    monkeypatch.setattr(kv, "_teacher_forced", lambda *a: passes.append(len(a[2])) or real(*a))
    scores = kv.score_kv(m, tok, examples, batch_size=4)
    for ex, got in zip(examples, scores):
        ids = kv.prompt_ids(tok, ex)
        golds = [kv.encode(tok, p + ex.value) for p in (" ", ' "')]
        (plain,), (first,) = real(m, tok, [ids], golds[:1], 1)
        want = real(m, tok, [ids], golds[1:], 1)[0][0] if first != golds[0][0] and first == golds[1][0] else plain
        assert got.correct == want.correct and got.n_tokens == want.n_tokens
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
    assert passes[0] == len(examples) and sum(passes[1:]) <= len(examples)


def test_teacher_forced_agrees_with_greedy_generate(model, sample):
    m, tok = model
    scores = kv.score_kv(m, tok, sample, batch_size=6)
    answers = kv.greedy_answers(m, tok, sample, max_new_tokens=6, batch_size=6)
    tf = [s.correct for s in scores]
    greedy = [kv.kv_correct(a, ex.value) for a, ex in zip(answers, sample)]
    assert tf == greedy, list(zip(answers, [ex.value for ex in sample], tf))
    assert 0 < sum(tf) < len(tf)  # the sample has both outcomes, so agreement is not trivial
    assert all(s.logprob < 0 and s.n_tokens == len(tok(" " + ex.value, add_special_tokens=False)["input_ids"])
               for s, ex in zip(scores, sample))


def test_teacher_forced_agrees_with_greedy_generate_query_aware(model):
    m, tok = model
    sample = [ex for g in (0, 5, 9) for ex in kv.make_kv_examples(2, num_pairs=10, gold_index=g, seed=12,
                                                                   query_aware=True)]
    sample += kv.make_kv_examples(2, num_pairs=4, gold_index=1, seed=13, filler=1, query_aware=True)
    scores = kv.score_kv(m, tok, sample, batch_size=4)
    answers = kv.greedy_answers(m, tok, sample, max_new_tokens=6, batch_size=4)
    tf = [s.correct for s in scores]
    assert tf == [kv.kv_correct(a, ex.value) for a, ex in zip(answers, sample)], list(zip(answers, tf))
    assert 0 < sum(tf) < len(tf)  # both outcomes: agreement is not trivial


def test_batched_scores_equal_unbatched(model, sample):
    m, tok = model
    one = kv.score_kv(m, tok, sample[:6], batch_size=1)
    many = kv.score_kv(m, tok, sample[:6], batch_size=6)
    assert [s.correct for s in one] == [s.correct for s in many]
    assert [s.logprob for s in one] == pytest.approx([s.logprob for s in many], abs=1e-3)


def test_fitness_is_lexicographic(model, sample):
    m, tok = model
    f = kv.kv_fitness(m, tok, sample, batch_size=6)
    assert set(f.accuracy) == {0, 4, 9} and f.n == 12
    assert f.mean_accuracy < f.fitness < f.mean_accuracy + 1 / (f.n + 1)
    w = kv.kv_fitness(m, tok, sample, weights={0: 0.0, 4: 1.0, 9: 0.0}, batch_size=6)
    assert w.mean_accuracy == f.accuracy[4]
    with pytest.raises(ValueError):
        kv.kv_fitness(m, tok, sample, weights={0: -1.0}, batch_size=6)


def test_sensitive_layers_use_accuracy_or_gold_probability():
    def fit(acc, p):
        return kv.KVFitness(acc, acc, {0: acc}, {0: 0.0}, 10, p)

    # baseline gets nothing right (small scan): only the probability can flag a layer
    s = kv.SensitivityScan(2.0, fit(0.0, 0.58), {0: fit(0.3, 0.6), 1: fit(0.0, 0.5), 16: fit(0.0, 0.16)})
    assert s.sensitive(0.5) == [16]
    s = kv.SensitivityScan(2.0, fit(1.0, 0.58), {0: fit(0.3, 0.6), 16: fit(1.0, 0.5)})
    assert s.sensitive(0.5) == [0]
    with pytest.raises(ValueError):
        s.sensitive(0.0)


def test_a_killed_sensitivity_scan_resumes_from_its_checkpoint(model, tmp_path, monkeypatch):
    m, tok = model
    sample = [ex for p in (0, 9) for ex in kv.make_kv_examples(2, 10, p, seed=5)]
    ck = str(tmp_path / "scan.ckpt.json")
    whole = kv.sensitivity(m, tok, sample, 2.0, layers=[3, 16, 29], progress=False, batch_size=4)
    real, calls = kv.kv_fitness, []

    def scaled(a, k):  # a call that scores a layer (kv_fitness calls itself once more, factors None)
        return (a[3] if len(a) > 3 else k.get("factors")) is not None

    def dies_on_the_second_layer(*a, **k):
        if scaled(a, k):
            if len(calls) == 1:
                raise KeyboardInterrupt
            calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(kv, "kv_fitness", dies_on_the_second_layer)
    with pytest.raises(KeyboardInterrupt):  # the baseline and layer 3 are scored, then the run dies
        kv.sensitivity(m, tok, sample, 2.0, layers=[3, 16, 29], progress=False, checkpoint=ck, batch_size=4)
    calls.clear()
    monkeypatch.setattr(kv, "kv_fitness", lambda *a, **k: (calls.append(1) if scaled(a, k) else None) or real(*a, **k))
    resumed = kv.sensitivity(m, tok, sample, 2.0, layers=[3, 16, 29], progress=False, checkpoint=ck, batch_size=4)
    assert len(calls) == 2  # layers 16 and 29 only; the baseline came from the checkpoint too
    assert resumed.to_json() == whole.to_json()
    for other in (dict(factor=0.5), dict(batch_size=8)):  # another scan is refused, not mixed in
        with pytest.raises(ValueError, match="other settings"):
            kv.sensitivity(m, tok, sample, **{"factor": 2.0, "batch_size": 4, **other}, layers=[3], progress=False,
                           checkpoint=ck)
    with pytest.raises(ValueError, match="other settings"):
        kv.sensitivity(m, tok, sample[:2], 2.0, layers=[3], progress=False, checkpoint=ck, batch_size=4)
    with pytest.raises(ValueError, match="other settings"):  # the same model in another dtype
        kv.sensitivity(copy.deepcopy(m).to(torch.bfloat16), tok, sample, 2.0, layers=[3], progress=False,
                       checkpoint=ck, batch_size=4)
