"""Which 4-bit format for QLoRA's frozen base: the perplexity each costs, on real weights.

    python bench/qlora_formats.py                      # SmolLM2-135M (the default model), English prose
    python bench/qlora_formats.py --model ckpt/llama2-7b --text wiki.txt

Every linear layer weight is quantized and decoded back, then perplexity is measured (sliding windows,
float32, on the CPU) for:
  float          the weights as they are
  int4-g64-zp    llama-jax's int4: groups of 64 along the input axis, a float16 scale and zero point each
                 (quantize.py's default, Q4_1's layout; 4.5 bits a weight with f16 scale and zero)
  int4-g64-sym   the same without zero points (Q4_0's layout; 4.25 bits a weight)
  nf4-g64        llama-jax's NF4 (qarray.py, what `finetune --quantize-base 4` uses): groups of 64, a float16
                 absmax each, codes onto the 16 quantiles of a normal (4.25 bits a weight)
  nf4-g64-dq     QLoRA's NormalFloat4 as the paper stores it (Dettmers et al., 2023): the same blocks, with
                 the absmax constants double-quantized to 8 bits in blocks of 256 (4.127 bits a weight);
                 written here from the paper, in numpy
One JSON line per format: perplexity, its increase over float, bits a weight.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

# The NF4 code book: the 16 values of the QLoRA paper's Appendix E (normal quantiles, exact zero).
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


def nf4_roundtrip(w: np.ndarray, block: int = 64, dq_block: int = 256) -> np.ndarray:
    """w [K, N] (x @ w) quantized to NF4 in blocks of `block` along K and decoded back, with the blocks'
    absmax constants stored as 8-bit codes (double quantization: blocks of `dq_block` constants, their
    mean subtracted, each block scaled by its own float32 absmax)."""
    k, n = w.shape
    pad = (-k) % block
    wp = np.concatenate([w, np.repeat(w[-1:], pad, 0)]) if pad else w
    blocks = wp.reshape(-1, block, n)  # [K / block, block, N]
    absmax = np.abs(blocks).max(axis=1)  # [K / block, N]
    # Double quantization of the constants: int8 codes of (absmax - mean) per 256 of them.
    flat = absmax.reshape(-1)
    mean = flat.mean()
    cpad = (-flat.size) % dq_block
    c = np.concatenate([flat - mean, np.zeros(cpad, np.float32)]).reshape(-1, dq_block)
    c_scale = np.abs(c).max(axis=1, keepdims=True) / 127.0
    c_scale[c_scale == 0] = 1.0
    decoded_absmax = (np.round(c / c_scale) * c_scale).reshape(-1)[:flat.size] + mean
    decoded_absmax = decoded_absmax.reshape(absmax.shape)
    normed = blocks / np.where(absmax == 0, 1.0, absmax)[:, None, :]
    codes = np.abs(normed[..., None] - NF4).argmin(axis=-1)  # nearest code book value
    out = (NF4[codes] * decoded_absmax[:, None, :]).reshape(-1, n)[:k]
    return out.astype(w.dtype)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="any model lj.load reads (default: SmolLM2-135M)")
    p.add_argument("--text", nargs="+", default=[str(REPO / "README.md"), str(REPO / "docs" / "architecture.md"),
                                                 str(REPO / "docs" / "tpu-pods.md")])
    p.add_argument("--window", type=int, default=512)
    a = p.parse_args()

    import jax
    import jax.numpy as jnp

    import llama_jax as lj
    from llama_jax import params as table
    from llama_jax.evaluate import perplexity
    from llama_jax.quantize import dequantize_params, quantize_params

    model = lj.load(a.model, dtype="float32", compute_dtype="float32")
    texts = [Path(t).read_text() for t in a.text]
    cfg, base = model.config, model.params

    def ppl(params) -> float:
        model.params = params
        scores = perplexity(model, texts, window=a.window)
        return float(np.exp(sum(s.nll for s in scores) / sum(s.tokens for s in scores)))

    def nf4(params):
        out = table.copy(params)
        for row in table.params_of(cfg):
            if row.quant_split is None or not row.stacked:
                continue
            w = np.asarray(table.get(params, row.path), np.float32)  # [layers, *in, *out]
            k = int(np.prod(w.shape[1:1 + row.quant_split]))
            decoded = np.stack([nf4_roundtrip(layer.reshape(k, -1)).reshape(layer.shape) for layer in w])
            table.set_(out, row.path, jnp.asarray(decoded))
        return out

    formats = {
        "float": (lambda prm: prm, 32.0),
        "int4-g64-zp": (lambda prm: dequantize_params(quantize_params(prm, cfg, bits=4, group=64, zero_point=True)),
                        4.5),
        "int4-g64-sym": (lambda prm: dequantize_params(quantize_params(prm, cfg, bits=4, group=64, zero_point=False)),
                         4.25),
        "nf4-g64": (lambda prm: dequantize_params(quantize_params(prm, cfg, bits=4, group=64, codebook="nf4")), 4.25),
        "nf4-g64-dq": (nf4, 4 + 8 / 64 + 32 / (64 * 256)),
    }
    reference = None
    for name, (transform, bits) in formats.items():
        value = ppl(transform(base))
        reference = reference or value
        print(json.dumps({"bench": "qlora_formats", "model": a.model or "SmolLM2-135M-Instruct", "format": name,
                          "bits_per_weight": round(bits, 3), "perplexity": round(value, 4),
                          "increase_pct": round(100 * (value / reference - 1), 2), "jax": jax.__version__}),
              flush=True)


if __name__ == "__main__":
    main()
