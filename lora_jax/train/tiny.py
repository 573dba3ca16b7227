"""A tiny random Llama and a BPE tokenizer trained on the data: smoke runs in seconds.

    tokenizer = tiny_tokenizer(texts_of(records))
    model = tiny_model(len(tokenizer))
    save_tiny(directory, model, tokenizer)   # then models.from_pretrained(directory) works

Nothing here is a useful language model; it exercises the whole fine-tuning
path (``lora-jax finetune --tiny``, the examples' ``--tiny`` flags, tests)
without the 135M-parameter download-free default.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lora_jax.train.records import Record

# ChatML, as SmolLM2 and Qwen2 use it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def texts_of(records: Iterable[Record]) -> list[str]:
    """Every string in ``records`` (texts, prompts, responses, message contents).

    Example:
        >>> texts_of([{"text": "a"}, {"prompt": "b", "response": "c"},
        ...           {"messages": [{"role": "user", "content": "d"}]}])
        ['a', 'b', 'c', 'd']
    """
    out = []
    for record in records:
        if "messages" in record:
            out.extend(m["content"] for m in record["messages"])
        elif "prompt" in record:
            out.extend((record["prompt"], record["response"]))
        else:
            out.append(record["text"])
    return out


def tiny_tokenizer(texts: Iterable[str], vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, with a ChatML chat template.

    Example:
        >>> tokenizer = tiny_tokenizer(["hello world", "hello there"], vocab_size=300)
        >>> tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        '<|im_start|>user\\nhi<|im_end|>\\n'
        >>> tokenizer.decode(tokenizer.encode("hello there"))
        'hello there'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token="<|im_start|>", chat_template=CHATML_TEMPLATE,
    )


def tiny_config(vocab_size: int, *, hidden_size: int = 64, layers: int = 2) -> dict[str, Any]:
    """A Hugging Face Llama ``config.json`` dict for a tiny model.

    Example:
        >>> config = tiny_config(320)
        >>> config["model_type"], config["hidden_size"], config["num_hidden_layers"]
        ('llama', 64, 2)
    """
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab_size,
        "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "hidden_act": "silu", "initializer_range": 0.02,
    }


def tiny_model(vocab_size: int, *, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Any:
    """A randomly initialised tiny Llama (``lora_jax.models.Model``).

    Example:
        >>> model = tiny_model(300, hidden_size=32, layers=1)
        >>> import lora_jax
        >>> lora_jax.module_names(model.params)[:2]
        ['model.embed_tokens', 'model.layers.0.mlp.down_proj']
    """
    from lora_jax import models

    return models.from_config(tiny_config(vocab_size, hidden_size=hidden_size, layers=layers), seed=seed)


def save_tiny(directory: str | Path, model: Any, tokenizer: Any) -> Path:
    """Write the model (``config.json`` + safetensors) and tokenizer as a Hugging Face directory.

    Example:
        >>> import tempfile
        >>> from lora_jax import models
        >>> tokenizer = tiny_tokenizer(["hello world"], vocab_size=280)
        >>> directory = save_tiny(tempfile.mkdtemp(), tiny_model(len(tokenizer), hidden_size=32, layers=1),
        ...                       tokenizer)
        >>> models.from_pretrained(directory).config["model_type"]
        'llama'
    """
    from lora_jax import models

    directory = Path(directory)
    config = dict(model.config, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    models.save_pretrained(directory, config, model.params)
    tokenizer.save_pretrained(str(directory))
    return directory
