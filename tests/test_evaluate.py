"""Evaluation: log-likelihoods and perplexity against transformers, batched against one window at a
time, SmolLM2 on hand-written questions, the task readers, and one-line errors from `llama-jax eval`."""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import llama_jax as lj
from llama_jax import evaluate as ev
from llama_jax.cli import main
from conftest import STORIES_GGUF, smollm2_path
from hf_reference import hf_model
from hf_reference import hf_from_gguf

DATA = Path(__file__).parent / "data"
STORY = (DATA / "story.txt").read_text()
QUESTIONS = DATA / "mc_questions.jsonl"


@pytest.fixture(scope="module")
def stories():
    return lj.load(STORIES_GGUF, compute_dtype="float32")


@pytest.fixture(scope="module")
def stories_hf():
    return hf_from_gguf(STORIES_GGUF)


def hf_token_logprobs(model, ids) -> np.ndarray:
    """transformers' log p(ids[t] | ids[:t]) for t >= 1, float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits[:-1], dim=-1)
    return lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


# ---------------------------------------------------------------------------------------------
# Log-likelihoods and perplexity against transformers


def test_completion_loglikelihoods_match_transformers(tmp_path):
    ref = hf_model(seed=3, heads=8, kv_heads=2, vocab=200)
    ref.save_pretrained(tmp_path)
    model = lj.load(tmp_path)
    cfg = model.config.replace(compute_dtype="float32")
    rng = np.random.default_rng(0)
    # Lengths spread over three buckets (16, 32, 64) and batches of 3 that leave partial batches.
    pairs = [(rng.integers(0, 200, c).tolist(), rng.integers(0, 200, k).tolist())
             for c, k in [(1, 1), (1, 5), (7, 3), (12, 9), (20, 1), (30, 2), (33, 8), (40, 20), (5, 30), (2, 2)]]
    ours = ev.loglikelihoods(model.params, cfg, pairs, batch_size=3)
    theirs = np.array([hf_token_logprobs(ref, ctx + cont)[len(ctx) - 1:].sum() for ctx, cont in pairs])
    assert ours.shape == (len(pairs),)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    # Unpadded, one row at a time: the same numbers.
    np.testing.assert_allclose(ev.loglikelihoods(model.params, cfg, pairs[2:5], batch_size=1, buckets=False),
                               ours[2:5], rtol=0, atol=1e-5)


def test_sliding_windows_score_each_token_once():
    for n, window, stride in [(100, 16, 8), (100, 16, 16), (100, 16, 1), (17, 16, 5), (5, 16, 8), (2, 2, 1)]:
        seen = []
        for begin, end, first in ev.sliding_windows(n, window, stride):
            assert end - begin <= window and begin < first < end or (begin == 0 and first == 1)
            for i in range(first, end):
                assert min(i, window - min(stride, window - 1)) <= i - begin <= window - 1  # context of token i
            seen += range(first, end)
        assert seen == list(range(1, n)), (n, window, stride)


def test_stories_perplexity_batched_equals_one_window_at_a_time_and_transformers(stories, stories_hf):
    ids = stories.tokenizer.encode(STORY)
    assert ids[0] == 1 and len(ids) > 300  # BOS, then the story
    window, stride = 96, 40
    batched = ev.perplexity(stories, STORY, window=window, stride=stride, batch_size=4)
    single = ev.perplexity(stories, STORY, window=window, stride=stride, batch_size=1, buckets=False)
    assert batched.tokens == single.tokens == len(ids) - 1
    assert batched.bytes == len(STORY.encode("utf-8"))
    assert abs(batched.nll - single.nll) <= 1e-6 * single.nll
    # transformers, window by window (Hugging Face's sliding-window definition).
    nll = -sum(hf_token_logprobs(stories_hf, ids[b:e])[f - b - 1:].sum()
               for b, e, f in ev.sliding_windows(len(ids), window, stride))
    assert abs(batched.nll - nll) <= 1e-5 * nll
    assert batched.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    assert batched.bits_per_byte == pytest.approx(nll / math.log(2) / len(STORY.encode()), rel=1e-5)
    # A TinyStories model reads a simple story easily; a shorter window (less context) reads it worse.
    assert batched.perplexity < 6
    assert ev.perplexity(stories, STORY, window=8, stride=8).perplexity > batched.perplexity


def test_whole_text_perplexity_equals_transformers_loss(stories, stories_hf):
    ids = stories.tokenizer.encode(STORY)[:200]
    with torch.no_grad():
        loss = stories_hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()  # mean NLL of ids[1:]
    [(nll, n)] = ev.perplexity_tokens(stories.params, stories.config, [ids], window=256)
    assert n == 199
    assert nll / n == pytest.approx(loss, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Multiple choice


def test_completion_tokens_split_where_the_context_ends(stories):
    tok = stories.tokenizer
    ctx, cont = ev.completion_tokens(tok, "Question: What is the capital of France?\nAnswer:", " Paris")
    assert ctx + cont == tok.encode("Question: What is the capital of France?\nAnswer: Paris")
    assert ctx == tok.encode("Question: What is the capital of France?\nAnswer:")
    assert tok.decode(cont).strip() == "Paris"
    # An empty context starts the completion from BOS.
    assert ev.completion_tokens(tok, "", "Once upon a time") == ([1], tok.encode("Once upon a time", bos=False))


def test_answer_normalisation_subtracts_the_unconditional_likelihood(stories):
    questions = [ev.Question(["Lily went to the park. She saw a"] * 2, [" dog", " table"], 0),
                 ev.Question(["Tom was sad. He"] * 3, [" cried", " cat", " was happy"], 2)]
    result = ev.evaluate_choice(stories, questions, norm="answer", batch_size=2)
    tok = stories.tokenizer
    for q, lls, pred in zip(questions, result.loglikelihoods, result.predictions):
        cond = ev.loglikelihoods(stories.params, stories.config, [ev.completion_tokens(tok, c, x)
                                                                   for c, x in zip(q.contexts, q.choices)])
        uncond = ev.loglikelihoods(stories.params, stories.config,
                                   [ev.completion_tokens(tok, "Answer:", x) for x in q.choices])
        np.testing.assert_allclose(lls, cond, atol=1e-5)
        assert pred == int(np.argmax(cond - uncond))
    assert set(result.accuracies) == {"none", "chars", "tokens", "answer"}


@pytest.fixture(scope="module")
def smollm2():
    return lj.load(smollm2_path())


def test_smollm2_beats_chance_on_hand_written_questions(smollm2):
    model = smollm2
    task = ev.read_task(QUESTIONS)
    assert task.name == "mc_questions" and task.norm == "chars" and len(task.questions) == 20
    assert all(len(q.choices) == 4 for q in task.questions)  # chance is 25%
    start = time.perf_counter()
    result = ev.evaluate_choice(model, task)
    print(f"\nSmolLM2-135M-Instruct on {QUESTIONS.name}: {result.accuracies} "
          f"(chars: {100 * result.accuracy:.0f}% +- {100 * result.stderr:.0f}%), {time.perf_counter() - start:.1f}s")
    assert result.n == 20
    assert result.accuracy >= 0.5
    assert result.stderr == pytest.approx(math.sqrt(result.accuracy * (1 - result.accuracy) / 19))


# ---------------------------------------------------------------------------------------------
# Readers of the released task files


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


ARC_RECORD = {"id": "Mercury_7175875", "question": {"stem": "Which is a gas at room temperature?", "choices": [
    {"text": "iron", "label": "A"}, {"text": "oxygen", "label": "B"}, {"text": "wood", "label": "C"},
    {"text": "salt", "label": "D"}]}, "answerKey": "B"}


def test_readers_of_the_released_formats(tmp_path):
    boolq = ev.read_task(write_jsonl(tmp_path / "dev.jsonl", [
        {"question": "is the sky blue", "title": "Sky", "answer": True, "passage": "The sky is blue."}]))
    assert (boolq.name, boolq.norm) == ("boolq", "answer")
    q = boolq.questions[0]
    assert q.contexts[0] == "The sky is blue.\nQuestion: is the sky blue?\nAnswer:"
    assert (q.choices, q.label) == ([" no", " yes"], 1)

    write_jsonl(tmp_path / "valid.jsonl", [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid."},
                                           {"goal": "Dry hair", "sol1": "Use water.", "sol2": "Use a towel."}])
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    piqa = ev.read_task(tmp_path / "valid.jsonl")
    assert piqa.name == "piqa" and [q.label for q in piqa.questions] == [0, 1]
    assert piqa.questions[0].contexts[0] == "Question: Open a jar\nAnswer:"
    assert piqa.questions[0].choices == [" Twist the lid.", " Eat the lid."]

    write_jsonl(tmp_path / "socialiqa.jsonl", [{"context": "Tracy gave a gift.", "question": "How will Tracy feel?",
                                                "answerA": "happy", "answerB": "angry", "answerC": "bored"}])
    (tmp_path / "socialiqa-labels.lst").write_text("1\n")
    siqa = ev.read_task(tmp_path / "socialiqa.jsonl")
    assert siqa.name == "siqa" and siqa.questions[0].label == 0 and len(siqa.questions[0].choices) == 3

    hella = ev.read_task(write_jsonl(tmp_path / "hellaswag_val.jsonl", [{
        "ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
        "endings": ["is using wrap.", "is ripping level tiles off.", "is holding a rubik's cube.",
                    "starts pulling up roofing [step] on a roof."], "source_id": "activitynet~v_-JhWjGDPHMY"}]))
    q = hella.questions[0]
    assert hella.name == "hellaswag" and q.label == 3
    assert q.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert q.choices[3] == " starts pulling up roofing on a roof."

    wino = ev.read_task(write_jsonl(tmp_path / "dev.winogrande.jsonl", [{
        "qID": "3D5G8J4N5CI2K40F4RZLF9OG2CKVTH-2", "sentence": "Kyle doesn't wear leg warmers to bed, while Logan "
        "almost always does. _ is more likely to live in a colder climate.", "option1": "Kyle", "option2": "Logan",
        "answer": "2"}]))
    q = wino.questions[0]
    assert wino.name == "winogrande" and q.label == 1
    assert q.contexts[1].endswith("almost always does. Logan") and q.choices == [" is more likely to live in a "
                                                                                 "colder climate."] * 2

    arc = ev.read_task(write_jsonl(tmp_path / "ARC-Challenge-Test.jsonl", [ARC_RECORD]))
    assert (arc.name, arc.norm, arc.questions[0].label) == ("arc-c", "chars", 1)
    assert arc.questions[0].contexts[0] == "Question: Which is a gas at room temperature?\nAnswer:"
    assert ev.read_task(write_jsonl(tmp_path / "ARC-Easy-Dev.jsonl", [ARC_RECORD])).name == "arc-e"
    obqa = ev.read_task(write_jsonl(tmp_path / "openbookqa_test.jsonl", [ARC_RECORD]))
    assert (obqa.name, obqa.norm, obqa.questions[0].contexts[0]) == ("obqa", "answer",
                                                                      "Which is a gas at room temperature?")
    with pytest.raises(ValueError, match="--format"):
        ev.read_task(write_jsonl(tmp_path / "test.jsonl", [ARC_RECORD]))
    assert ev.read_task(tmp_path / "test.jsonl", format="obqa").name == "obqa"

    mine = ev.read_task(QUESTIONS, limit=3)
    assert (mine.name, len(mine.questions), mine.questions[1].choices[1]) == ("mc_questions", 3, " blue")


def test_results_table_beside_the_paper():
    assert ev.paper_size(lj.PRESETS["llama-7b"]) == "7B"
    assert ev.paper_size(lj.PRESETS["llama2-13b"]) == "13B"
    assert ev.paper_size(lj.PRESETS["llama-33b"]) == "33B"
    assert ev.paper_size(lj.PRESETS["llama2-70b"]) == "65B"
    result = ev.ChoiceResult("arc-e", "chars", 2376, 0.7, 0.0094, [], [], [], {})
    other = ev.ChoiceResult("mine", "chars", 20, 0.5, 0.11, [], [], [], {})
    lines = ev.results_table([result, other], "13B").splitlines()
    assert "LLaMA 13B" in lines[0]
    assert lines[1].split() == ["arc-e", "2376", "chars", "70.0", "±", "0.9", "74.8"]
    assert lines[2].split()[-1] == "-"


# ---------------------------------------------------------------------------------------------
# The command line: results and one-line errors


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_perplexity_and_choice(capsys, stories, tmp_path):
    rc, out, err = run_cli(capsys, "eval", "perplexity", "--model", str(STORIES_GGUF), str(DATA / "story.txt"),
                           "--window", "96", "--stride", "40", "--json")
    assert rc == 0, err
    got = json.loads(out)
    want = ev.perplexity(stories, STORY, window=96, stride=40)
    assert got["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(want.bits_per_byte, rel=1e-6)

    rc, out, err = run_cli(capsys, "eval", "choice", "--model", str(STORIES_GGUF), str(QUESTIONS), "--limit", "4")
    assert rc == 0, err
    header, row = out.splitlines()
    assert "LLaMA 7B" in header and row.split()[:3] == ["mc_questions", "4", "chars"]


BAD = {
    "bad_json": ('{"context": "Q", "choices": [" a", " b"], "label": 0}\n{"context": "Q", "choices": \n',
                 r"bad\.jsonl: line 2: not valid JSON"),
    "missing_field": ('{"context": "Q", "choices": [" a", " b"], "label": 0}\n\n{"context": "Q", "label": 1}\n',
                      r"bad\.jsonl: line 3: missing field 'choices'"),
    "label_out_of_range": ('{"context": "Q", "choices": [" a", " b"], "label": 2}\n',
                           r"bad\.jsonl: line 1: field 'label' = 2 is out of range for 2 choices"),
    "label_type": ('{"context": "Q", "choices": [" a", " b"], "label": "0"}\n',
                   r"bad\.jsonl: line 1: field 'label' must be int"),
    "choices_type": ('{"context": "Q", "choices": " a", "label": 0}\n',
                     r"bad\.jsonl: line 1: field 'choices' must be list"),
    "empty": ("\n", r"bad\.jsonl: empty file"),
    "arc_key": (json.dumps(dict(ARC_RECORD, answerKey="E")) + "\n", r"bad\.jsonl: line 1: field 'answerKey' = 'E'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_bad_task_file_one_line_error(case, capsys, tmp_path):
    text, message = BAD[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    fmt = ["--format", "arc-e"] if case == "arc_key" else []
    rc, out, err = run_cli(capsys, "eval", "choice", "--model", str(STORIES_GGUF), str(path), *fmt)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("llama-jax eval: error: ")
    import re
    assert re.search(message, err), err


def test_cli_perplexity_errors(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    for argv, message in [([str(empty)], "empty.txt: empty file"),
                          ([str(tmp_path / "missing.txt")], "missing.txt: no such file"),
                          ([str(DATA / "story.txt"), "--window", "4096"], "window must be between 2 and the model's "
                                                                          "context (2048)"),
                          ([str(DATA / "story.txt"), "--window", "64", "--stride", "65"], "stride must be between"),
                          ([str(DATA / "story.txt"), "--batch-size", "0"], "--batch-size must be >= 1")]:
        rc, out, err = run_cli(capsys, "eval", "perplexity", "--model", str(STORIES_GGUF), *argv)
        assert rc == 2 and out == "", (argv, err)
        assert len(err.strip().splitlines()) == 1 and message in err, (argv, err)


def test_smollm2_perplexity_without_bos(smollm2):
    """SmolLM2 adds no BOS: the first token has no context, is not scored, and its bytes leave the count."""
    ids = smollm2.tokenizer.encode(STORY)
    assert ids[0] != smollm2.tokenizer.bos_id
    result = ev.perplexity(smollm2, STORY, window=256, stride=128)
    first = smollm2.tokenizer.decode(ids[:1])
    assert STORY.startswith(first) and result.tokens == len(ids) - 1
    assert result.bytes == len(STORY.encode()) - len(first.encode())
    print(f"\nSmolLM2 on story.txt: perplexity {result.perplexity:.2f}, {result.bits_per_byte:.3f} bits/byte")
    assert 1 < result.perplexity < 20  # a simple story in plain English
