"""llama-jax: the LLaMA family in JAX / Flax NNX.

    import llama_jax as lj
    cfg = lj.PRESETS["llama2-7b"]
    params = lj.init_params(cfg, jax.random.key(0), mesh=None)
    logits = lj.forward(params, tokens, cfg)
    model = lj.load("path/to/checkpoint_or.gguf")
    lj.generate(model, ["prompt"], max_new_tokens=64)

Note: `lj.generate` is the function; the module is `llama_jax.generate` (`from llama_jax.generate import ...`).
"""

from llama_jax.config import PRESETS, LlamaConfig, RopeScaling, from_gguf, from_hf_config, from_params_json
from llama_jax.model import KVCache, abstract_params, forward, init_params, logical_axes, param_count
from llama_jax.checkpoints import Loaded, load
from llama_jax.generate import generate, generate_tokens, stream
from llama_jax.tokenizer import alpaca_prompt, load_tokenizer

__all__ = [
    "PRESETS", "LlamaConfig", "RopeScaling", "from_gguf", "from_hf_config", "from_params_json",
    "KVCache", "abstract_params", "forward", "init_params", "logical_axes", "param_count",
    "Loaded", "load", "generate", "generate_tokens", "stream", "alpaca_prompt", "load_tokenizer",
]
