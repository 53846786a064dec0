"""DPO (llama_jax/dpo.py): its loss and gradient against numpy on the model's logits, the LoRA reference
being the base without the adapters, preference accuracy rising on a toy preference set, the pair rows,
bad input as one line, and `llama-jax dpo` resuming after an interruption with the same losses."""

import json

import jax
import numpy as np
import optax
import pytest

import llama_jax as lj
from llama_jax import cli, dpo, train
from llama_jax import lora as lora_lib
from llama_jax.checkpoints import TrainCheckpointer
from llama_jax.data import Batches
from llama_jax.model import apply
from llama_jax.ops import Kernels
from conftest import STORIES_GGUF

TINY = lj.PRESETS["tiny"]  # float32 params and compute
BETA = 0.5
MODEL = dict(remat="none", unroll=1, kernels=Kernels())  # make_train_step's defaults, for calling an objective


def _assert_trees_close(got, want, rtol=1e-4):
    """Leaf by leaf, within rtol of the leaf's largest value (float32 sums of many small terms)."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=rtol * float(np.abs(w).max()))


def _random_pairs(rng, cfg, n=4, seq_len=32):
    """Pair rows of random tokens: prompts of 2-7 tokens after BOS, responses of 1-7 ending in EOS."""
    examples = []
    for _ in range(n):
        prompt = [cfg.bos_id] + rng.integers(3, cfg.vocab_size, rng.integers(2, 8)).tolist()
        chosen, rejected = ([*rng.integers(3, cfg.vocab_size, rng.integers(1, 8)).tolist(), cfg.eos_id]
                            for _ in range(2))
        examples.append((np.array(prompt + chosen), np.array(prompt + rejected), len(prompt)))
    return dpo.PairRows(examples, seed=0, seq_len=seq_len).epoch(0)


@jax.jit
def _logits(params, batch):
    return apply(params, batch["tokens"][:, :-1], TINY, positions=batch["positions"],
                 segment_ids=batch["segment_ids"])[0]


def _numpy_logps(logits, batch):
    """float64 per-response log-probabilities [B, 2] and, per position, softmax and the one-hot target."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))  # [B, S, V]
    targets = np.asarray(batch["tokens"])[:, 1:]
    onehot = np.eye(x.shape[-1])[targets]
    token = (logp * onehot).sum(-1)  # [B, S]
    masks = np.stack([batch["chosen_mask"], batch["rejected_mask"]], -1).astype(np.float64)  # [B, S, 2]
    return np.einsum("bs,bsk->bk", token, masks), np.exp(logp), onehot, masks


def _numpy_dpo(policy_logits, reference_logits, batch, beta):
    """The DPO loss, its metrics and its gradient with respect to the policy's logits, in numpy."""
    pol, softmax, onehot, masks = _numpy_logps(policy_logits, batch)
    ref = _numpy_logps(reference_logits, batch)[0]
    rewards = beta * (pol - ref)  # [B, 2]
    margin = rewards[:, 0] - rewards[:, 1]
    n = len(margin)
    loss = np.mean(np.log1p(np.exp(-margin)))
    d_margin = -1.0 / (1.0 + np.exp(margin)) / n  # d loss / d margin, per pair
    # d margin / d logp(token) = beta on chosen tokens, -beta on rejected; d logp / d logits = onehot - softmax.
    d_token = d_margin[:, None] * beta * (masks[..., 0] - masks[..., 1])  # [B, S]
    d_logits = d_token[..., None] * (onehot - softmax)
    metrics = dict(loss=loss, reward_margin=margin.mean(), accuracy=(margin > 0).mean(),
                   chosen_reward=rewards[:, 0].mean(), rejected_reward=rewards[:, 1].mean())
    return metrics, d_logits


def test_loss_and_gradient_match_numpy():
    """The objective (whole sequence, and in chunks) and the train step (two micro-batches, SGD at lr 1)
    against the loss and gradient computed in numpy from the model's logits, pulled back through the
    model with jax.vjp."""
    batch = jax.tree.map(np.asarray, _random_pairs(np.random.default_rng(0), TINY))
    policy = lj.init_params(TINY, jax.random.key(0))
    reference = lj.init_params(TINY, jax.random.key(1))
    want, d_logits = _numpy_dpo(_logits(policy, batch), _logits(reference, batch), batch, BETA)
    _, pull_back = jax.vjp(lambda p: _logits(p, batch), policy)
    want_grad = pull_back(d_logits.astype(np.float32))[0]

    objective = dpo.objective(BETA)

    def mean_loss(p):  # the logits four chunks of the sequence at a time (the step below: all at once)
        total, count, _ = objective(p, reference, batch, cfg=TINY, loss_chunk=8, **MODEL)
        return total / count

    loss, grad = jax.jit(jax.value_and_grad(mean_loss))(policy)
    np.testing.assert_allclose(loss, want["loss"], rtol=1e-5)
    _assert_trees_close(grad, want_grad)

    state = train.init_train_state(TINY, optax.sgd(1.0), jax.random.key(0), params=policy)
    step = train.make_train_step(TINY, optax.sgd(1.0), accum_steps=2, objective=objective)
    new, metrics = step(state, batch, reference)
    assert float(metrics["tokens"]) == 4  # pairs
    for name, value in want.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    update = jax.tree.map(lambda a, b: a - b, new.params, policy)
    _assert_trees_close(update, jax.tree.map(lambda g: -g, want_grad))


def test_lora_reference_is_the_base_without_adapters():
    """With LoRA the step's reference is the base it gets, read without the adapters: the rewards are
    beta * (log-probs with the adapters - log-probs of the base alone), not zero."""
    batch = jax.tree.map(np.asarray, _random_pairs(np.random.default_rng(1), TINY))
    base = lj.init_params(TINY, jax.random.key(0))
    lora = lora_lib.LoraConfig(rank=4, targets=("q", "v", "down"))
    adapters = lora_lib.init_adapters(TINY, lora, jax.random.key(1))
    keys = iter(jax.random.split(jax.random.key(2), 8))
    adapters = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape), adapters)  # b != 0: it shows
    with_adapters = lora_lib.merge(base, adapters, lora)  # w + (alpha / rank) a @ b: the adapted model
    want, _ = _numpy_dpo(_logits(with_adapters, batch), _logits(base, batch), batch, BETA)
    assert abs(want["chosen_reward"]) > 1e-2 and abs(want["rejected_reward"]) > 1e-2

    opt = optax.sgd(0.0)
    state = train.init_train_state(TINY, opt, jax.random.key(0), params=adapters, lora=lora)
    step = train.make_train_step(TINY, opt, lora=lora, objective=dpo.objective(BETA))
    _, metrics = step(state, batch, base)
    for name, value in want.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_pair_rows_mask_exactly_each_response():
    tok = lj.load_tokenizer(STORIES_GGUF)
    pairs = [{"prompt": "Tom had a ball.", "chosen": "He was happy.", "rejected": "It rolled far away."},
             {"prompt": "Lily saw a cat.", "chosen": "The cat was nice.", "rejected": "No."}]
    examples = dpo.encode_pairs(pairs, tok, max_len=64)
    rows = dpo.PairRows(examples, seed=3).epoch(0)
    seen = []
    for r in range(len(pairs)):
        targets, segments, positions = rows["tokens"][r, 1:], rows["segment_ids"][r], rows["positions"][r]
        chosen, rejected = (targets[rows[k][r] > 0] for k in ("chosen_mask", "rejected_mask"))
        assert chosen[-1] == rejected[-1] == tok.eos_id
        seen.append((tok.decode(chosen[:-1].tolist()), tok.decode(rejected[:-1].tolist())))
        n_chosen = int((segments == 1).sum())
        assert positions[0] == 0 and positions[n_chosen] == 0  # each side starts afresh
        assert rows["tokens"][r, n_chosen] == tok.bos_id  # the rejected side: the prompt again, with BOS
    assert sorted(seen) == sorted((p["chosen"], p["rejected"]) for p in pairs)
    # A prompt that fills --max-len leaves nothing to compare: dropped; all dropped is an error.
    assert len(dpo.encode_pairs(pairs + [{**pairs[0], "prompt": "word " * 80}], tok, max_len=64)) == 2
    with pytest.raises(ValueError, match="no response tokens left"):
        dpo.encode_pairs(pairs, tok, max_len=3)


# A toy preference: after a story's opening, a happy ending is preferred to a sad one.
NAMES = ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna", "Max", "Sue", "Tim", "Lucy", "Jack", "Emma", "Bob", "Kate",
         "Joe", "Amy", "Dan", "Zoe", "Leo", "Ella", "Tina", "Ned", "Rosa", "Finn"]
THINGS = ["a red ball", "a big box", "a little dog", "a blue kite", "a toy car", "a new hat"]


def _toy_pairs(names):
    return [{"prompt": f"{name} found {THINGS[i % len(THINGS)]} in the park.",
             "chosen": f"{name} smiled and played with it all day. {name} was very happy.",
             "rejected": f"{name} dropped it and it broke. {name} cried and was very sad."}
            for i, name in enumerate(names)]


def test_dpo_raises_preference_accuracy_on_held_out_pairs():
    """stories260K, LoRA, 8 steps on 16 pairs: 8 held-out pairs (unseen names) are then ranked right."""
    model = lj.load(STORIES_GGUF)
    cfg, tok = model.config.replace(compute_dtype="float32"), model.tokenizer
    lora = lora_lib.LoraConfig(rank=8, alpha=16.0)
    train_rows = dpo.PairRows(dpo.encode_pairs(_toy_pairs(NAMES[:16]), tok), seed=0, seq_len=112)
    held_out = dpo.PairRows(dpo.encode_pairs(_toy_pairs(NAMES[16:]), tok), seed=0, seq_len=112).epoch(0)
    steps = 8
    opt = train.make_optimizer(lr=1e-3, warmup_steps=1, total_steps=steps, weight_decay=0.0, b2=0.999)
    state = train.init_train_state(cfg, opt, jax.random.key(0), lora=lora)
    step = train.make_train_step(cfg, opt, lora=lora, objective=dpo.objective(0.1))
    result = train.fit(state, lambda s, b: step(s, b, model.params), Batches(train_rows, 8), steps=steps, cfg=cfg,
                       progress=False)
    first, last = result.history[0], result.history[-1]
    # The policy starts as the reference: every margin 0, loss log 2, no pair ranked right (margin > 0).
    assert first["loss"] == pytest.approx(np.log(2), abs=1e-6) and first["accuracy"] == 0
    assert last["loss"] < 0.1 and last["accuracy"] == 1
    # One more step's metrics on the held-out pairs: those of the params before its update.
    _, held = step(result.state, held_out, model.params)
    assert float(held["accuracy"]) == 1 and float(held["reward_margin"]) > 1


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize("line, error", [
    ('{"prompt": "a", "chosen": "b"}', "line 2: field 'rejected' is missing"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "line 2: field 'chosen' must be a string, got int"),
    ('{"prompt": " ", "chosen": "b", "rejected": "c"}', "line 2: field 'prompt' is empty"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"', "line 2: not valid JSON"),
    ('["a", "b", "c"]', "line 2: expected a JSON object, got list"),
])
def test_bad_pairs_file_is_one_line_naming_file_line_and_field(tmp_path, capsys, line, error):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' + line + "\n")
    code = cli.main(["dpo", "--model", str(STORIES_GGUF), "--data", str(data), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"llama-jax dpo: error: {data}: {error}")
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_rank_that_does_not_fit_is_refused(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in _toy_pairs(NAMES[:2])))
    code = cli.main(["dpo", "--model", str(STORIES_GGUF), "--data", str(data), "--out", str(tmp_path / "run"),
                     "--lora-rank", "65"])
    err = capsys.readouterr().err
    assert code == 2 and "llama-jax dpo: error: --lora-*: LoRA rank 65 does not fit" in err


class _Killed(BaseException):
    """Raised from inside fit at a chosen step: the run stops there, as if killed."""


def test_cli_resumes_after_an_interruption_with_the_same_losses(tmp_path, monkeypatch):
    """`llama-jax dpo` (every weight trained; 8 fake devices, fsdp=8) stopped after step 5, with checkpoints
    every 2 steps: run again, it resumes from step 4 and its losses and metrics are those of a run never
    interrupted."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in _toy_pairs(NAMES[:16])))

    def run(out):
        return cli.main(["dpo", "--model", str(STORIES_GGUF), "--data", str(data), "--out", str(out), "--batch", "8",
                         "--epochs", "4", "--lr", "1e-3", "--save-every", "2", "--compute-dtype", "float32",
                         "--no-progress"])

    def metrics(out):
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    assert run(tmp_path / "ref") == 0
    reference = metrics(tmp_path / "ref")
    assert [m["step"] for m in reference] == list(range(1, 9))  # 16 pairs, 8 a step, 4 epochs
    assert all(set(dpo.METRICS) <= set(m) for m in reference)
    assert reference[0]["accuracy"] == 0 and reference[-1]["accuracy"] == 1
    assert list((tmp_path / "ref" / "tb").glob("events.out.tfevents.*"))

    fit = train.fit

    def fit_killed_after_step_5(*args, log, checkpoints, **kwargs):
        def hooked(m):
            log(m)
            if m["step"] == 5:
                checkpoints.wait()  # step 4's save finishes, as a separate process's would survive its kill
                raise _Killed
        return fit(*args, log=hooked, checkpoints=checkpoints, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(train, "fit", fit_killed_after_step_5)
    with pytest.raises(_Killed):
        run(out)
    monkeypatch.setattr(train, "fit", fit)
    assert TrainCheckpointer(out).all_steps() == [2, 4]
    assert run(out) == 0
    resumed = metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for got, want in zip(resumed, reference):
        for name in ("loss", "grad_norm", "lr", *dpo.METRICS):
            assert got[name] == want[name], (got["step"], name, got[name], want[name])
