"""The real CPU engine: llama.cpp's `llama-server` and the model it serves, made here.

No model can be downloaded on the machines this project runs on, and none is
needed: what the tests and the live benchmark exercise is the engine's real
kernels and its real continuous batching, not what the text says. So the model
is generated, deterministically from a seed, with the `gguf` package's writer:
a small Llama-architecture network (8 layers, hidden 512, 8 query / 4 KV heads,
~24M parameters in F16, ~47 MB) with random weights, and a valid byte-level BPE
tokenizer. Requests set `ignore_eos: true`, so every answer is exactly
`max_tokens` tokens long whatever the weights say, which is what a benchmark
wants: output lengths under the workload's control.

The tokenizer's base tokens are the printable ASCII bytes plus tab, newline and
space (byte-level BPE spells space, tab and newline as the characters U+0120,
U+0109, U+010A). With all 256 bytes, random output would be invalid UTF-8 and
llama-server would hold chunks back until they decode, which breaks streaming;
with these, every token is one printable character. A few merges make it a
real BPE; prompts built from words outside them tokenize to one token per
character, which keeps prompt lengths predictable.

`llama-server` itself is built by scripts/build-llama-server into the cache.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Bumped whenever the generator's output changes, so a cached model is remade.
GENERATOR_VERSION = 1
SERVED_MODEL = "batchpilot-tiny-llama"
DEFAULT_SEED = 1234
_SETUP_FIX = "run scripts/dev-setup (it builds llama-server and generates the model)"


class EngineSetupError(RuntimeError):
    """The engine binary or its model is missing or unusable; the message names the file and the fix."""


@dataclass(frozen=True)
class ModelShape:
    layers: int = 8
    hidden: int = 512
    ffn: int = 1376
    heads: int = 8
    kv_heads: int = 4
    # The longest context the model claims; llama-server's --ctx-size may not exceed it.
    context: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet for the bytes we allow: tab, newline, space, printable ASCII."""
    allowed = [9, 10, *range(32, 127)]
    # GPT-2 maps printable bytes to themselves and the others to U+0100 + n, in
    # byte order; of ours, tab is the 10th such byte, newline the 11th, space the 33rd.
    remapped = {9: chr(0x109), 10: chr(0x10A), 32: chr(0x120)}
    return [remapped.get(b, chr(b)) for b in allowed]


# Frequent English pairs, so that the tokenizer's merge table is exercised.
_MERGES = ("t h", "i n", "e r", "a n", "o n", "r e", "\u0120 t", "\u0120 a", "e n", "a t")
BOS, EOS, EOT = "<|begin|>", "<|end|>", "<|eot|>"
# A trivial Jinja chat template: role, content, newline; llama-server applies it
# to /v1/chat/completions.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def vocabulary() -> tuple[list[str], list[str]]:
    """(tokens, merges): byte tokens, merged tokens, then the three special tokens."""
    base = _byte_chars()
    merged = [pair.replace(" ", "") for pair in _MERGES]
    return [*base, *merged, BOS, EOS, EOT], list(_MERGES)


def cache_key(shape: ModelShape, seed: int) -> str:
    text = repr((GENERATOR_VERSION, sorted(asdict(shape).items()), seed))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_model(path: Path, seed: int = DEFAULT_SEED, shape: ModelShape = ModelShape()) -> Path:
    """Write the random-weight Llama model to `path` (atomically); the same seed gives the same bytes."""
    # Imported when used: on the GPU machine, with no `gguf` installed,
    # bench/gpu_engine.py puts the llama.cpp tree's own gguf-py on the path
    # after importing this module.
    import gguf

    tokens, merges = vocabulary()
    rng = np.random.default_rng(seed)
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name(SERVED_MODEL)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    normal, control = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL
    writer.add_token_types([control if t in (BOS, EOS, EOT) else normal for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index(BOS))
    writer.add_eos_token_id(tokens.index(EOS))
    writer.add_eot_token_id(tokens.index(EOT))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def weight(*dims: int) -> np.ndarray:
        # Scaled like a trained model's init (std 1/sqrt(fan_in)) so activations
        # stay finite through every layer in F16.
        values: np.ndarray = rng.standard_normal(dims, dtype=np.float32) / np.sqrt(dims[-1])
        return values.astype(np.float16)

    def norm() -> np.ndarray:
        return np.ones(shape.hidden, dtype=np.float32)

    kv_width = shape.kv_heads * shape.head_dim
    writer.add_tensor("token_embd.weight", weight(len(tokens), shape.hidden))
    for layer in range(shape.layers):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", norm())
        writer.add_tensor(f"{prefix}.attn_q.weight", weight(shape.hidden, shape.hidden))
        writer.add_tensor(f"{prefix}.attn_k.weight", weight(kv_width, shape.hidden))
        writer.add_tensor(f"{prefix}.attn_v.weight", weight(kv_width, shape.hidden))
        writer.add_tensor(f"{prefix}.attn_output.weight", weight(shape.hidden, shape.hidden))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", norm())
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weight(shape.ffn, shape.hidden))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weight(shape.ffn, shape.hidden))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weight(shape.hidden, shape.ffn))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", weight(len(tokens), shape.hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, path)
    return path


def check_model(path: Path) -> Path:
    """Raise EngineSetupError naming `path` and the fix unless it is a readable Llama GGUF file."""
    import gguf  # when used, for the reason write_model gives

    if not path.is_file():
        raise EngineSetupError(f"model file {path} is missing: {_SETUP_FIX}")
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.get_field("general.architecture")
        architecture = field.contents() if field is not None else None
    except (ValueError, OSError, KeyError, IndexError) as err:
        raise EngineSetupError(
            f"model file {path} is corrupt ({err}): delete it and {_SETUP_FIX}"
        ) from err
    if architecture != "llama":
        raise EngineSetupError(
            f"model file {path} is not a Llama GGUF model (architecture {architecture!r}): "
            f"delete it and {_SETUP_FIX}"
        )
    return path


def cached_model(
    cache_dir: Path, seed: int = DEFAULT_SEED, shape: ModelShape = ModelShape()
) -> Path:
    """The cached model for (seed, shape), written on first use and checked on every use."""
    path = cache_dir / "models" / f"{SERVED_MODEL}-{cache_key(shape, seed)}.gguf"
    if not path.exists():
        write_model(path, seed, shape)
    return check_model(path)


def server_path(cache_dir: Path) -> Path:
    """The llama-server binary scripts/build-llama-server put in the cache."""
    path = cache_dir / "bin" / "llama-server"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise EngineSetupError(f"llama-server not found at {path}: {_SETUP_FIX}")
    return path


@dataclass(frozen=True)
class ServerOptions:
    """llama-server's startup flags that matter to batching: its ceilings."""

    # Slots: the most sequences decoded at once (the engine's max_num_seqs).
    parallel: int = 16
    # KV cache in tokens, shared by all slots (--kv-unified).
    ctx_size: int = 16384
    # One thread per server: with other load on two cores it is far steadier than two.
    threads: int = 1
    # Tokens per forward pass (prefill chunk per step) and per physical micro-batch.
    batch_size: int = 2048
    ubatch_size: int = 512


DEFAULT_SERVER_OPTIONS = ServerOptions()


def server_argv(
    binary: Path,
    model: Path,
    host: str,
    port: int,
    options: ServerOptions,
    *,
    slot_dir: Path | None = None,
) -> list[str]:
    """The command line; `slot_dir` enables the /slots actions, which erasing a slot needs."""
    slot_actions = [] if slot_dir is None else ["--slot-save-path", str(slot_dir)]
    return [
        str(binary),
        "--model", str(model),
        "--alias", SERVED_MODEL,
        "--host", host,
        "--port", str(port),
        "--parallel", str(options.parallel),
        "--cont-batching",
        "--ctx-size", str(options.ctx_size),
        "--kv-unified",
        "--batch-size", str(options.batch_size),
        "--ubatch-size", str(options.ubatch_size),
        "--threads", str(options.threads),
        "--threads-batch", str(options.threads),
        "--metrics",
        "--slots",
        "--no-webui",
        # No prompt cache in RAM: each request is prefilled from scratch, as the
        # simulator and the benchmark assume.
        "--cache-ram", "0",
        *slot_actions,
    ]  # fmt: skip


def main() -> None:
    """`python -m batchpilot.sim.llamacpp CACHE_DIR`: make (or check) the cached model, print its path."""
    if len(sys.argv) != 2:
        sys.exit("usage: python -m batchpilot.sim.llamacpp CACHE_DIR")
    try:
        print(cached_model(Path(sys.argv[1])))
    except EngineSetupError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
