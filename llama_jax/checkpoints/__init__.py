"""Models on disk, in and out: one module a job.

    orbax_io   the checkpoint layout (llama_jax.json + params/ + tokenizer files), writing it safely
    readers    released weights through checkpoints_convert's readers, checked as they are read
    convert    released weights -> a checkpoint, a checkpoint -> Hugging Face, the default model
    quantized  quantized checkpoints (`llama-jax quantize`) and GGUF files kept quantized
    training   training runs (TrainCheckpointer), and a run or step folder as a model
    adapters   LoRA runs' adapters: attached to or merged into a base, exported for Hugging Face PEFT
    load       `load`: any of the above, as a Loaded (config, params, tokenizer)
"""

from llama_jax.checkpoints.adapters import (attach_run, export_peft, is_lora_run, lora_run, merge_run, read_adapters,
                                            save_merged)
from llama_jax.checkpoints.convert import default_gguf, default_model, convert, export_hf, export_params_hf
from llama_jax.checkpoints.load import Loaded, load, run_tokenizer
from llama_jax.checkpoints.orbax_io import (CHECKPOINT_META, config_of, is_checkpoint, quiet_logs,
                                            read_checkpoint_info, staged_output)
from llama_jax.checkpoints.quantized import is_quantized_checkpoint, save_quantized
from llama_jax.checkpoints.readers import open_reader, params_from_reader, reader_for
from llama_jax.checkpoints.training import MetricsLog, TrainCheckpointer, is_train_checkpoint, run_config, run_meta, run_step

__all__ = [
    "CHECKPOINT_META", "Loaded", "MetricsLog", "TrainCheckpointer", "attach_run", "config_of", "convert", "default_gguf",
    "default_model", "export_hf", "export_params_hf", "export_peft", "is_checkpoint", "is_lora_run",
    "is_quantized_checkpoint", "is_train_checkpoint", "load", "lora_run", "merge_run", "open_reader",
    "params_from_reader", "quiet_logs", "read_adapters", "read_checkpoint_info", "reader_for", "run_config",
    "run_meta", "run_step", "run_tokenizer", "save_merged", "save_quantized", "staged_output",
]
