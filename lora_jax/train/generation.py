"""Text in, text out: prompts through a causal LM with an unmerged LoRA adapter.

    generator = TextGenerator(model, tokenizer, lora_config)
    before = generator(["What is AI?"], adapter=fresh_adapter)   # B = 0: the base model
    after = generator(["What is AI?"], adapter=trained_adapter)  # same compiled program

The adapter is an argument of the compiled generation, not a constant in it,
so base-vs-adapter comparisons and repeated calls compile once per shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.train.step import with_leaves
from lora_jax.transform import lora


class TextGenerator:
    """Generate replies (or continuations) for a batch of prompts.

    Example:
        >>> import jax, lora_jax
        >>> from lora_jax.train.tiny import tiny_model, tiny_tokenizer
        >>> tokenizer = tiny_tokenizer(["Tell me a joke.", "Why did the chicken cross the road?"], vocab_size=300)
        >>> model = tiny_model(len(tokenizer), hidden_size=32, layers=1)
        >>> config = lora_jax.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
        >>> adapter = lora_jax.init(config, model.params, jax.random.key(0))    # B = 0: the base model
        >>> generator = TextGenerator(model, tokenizer, config, max_new_tokens=4)
        >>> generator(["Tell me a joke."], adapter=adapter) == generator(["Tell me a joke."])
        True

    Args:
        model: a ``lora_jax.models.Model`` causal LM.
        tokenizer: its transformers tokenizer.
        lora_config: the adapter's config; None generates with the base model only.
        chat: wrap each prompt as a user turn with the tokenizer's chat template
            (when it has one) and stop at its end-of-turn token.
        max_new_tokens: tokens generated per prompt.
    """

    def __init__(self, model: Any, tokenizer: Any, lora_config: LoraConfig | None = None, *,
                 chat: bool = True, max_new_tokens: int = 48) -> None:
        self.model, self.tokenizer, self.lora_config = model, tokenizer, lora_config
        self.chat = chat and bool(getattr(tokenizer, "chat_template", None))
        self.max_new_tokens = max_new_tokens
        self._apply_fn = None
        if lora_config is not None:
            lora_apply = lora(model.module.apply, lora_config)

            def apply_fn(variables: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
                inner = variables["params"]
                if "adapter_ids" in inner:  # a mixed-adapter batch: each row its own slot
                    kwargs["adapter_ids"] = inner["adapter_ids"]
                return lora_apply({"params": inner["base"]}, inner["adapter"], *args, **kwargs)

            self._apply_fn = apply_fn

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as the model sees it (chat-formatted when ``chat``).

        Example:
            >>> from lora_jax.train.tiny import tiny_model, tiny_tokenizer
            >>> tokenizer = tiny_tokenizer(["hi there"], vocab_size=270)
            >>> generator = TextGenerator(tiny_model(len(tokenizer), hidden_size=32, layers=1), tokenizer)
            >>> tokenizer.decode(generator.encode_prompt("hi"))
            '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
        """
        if self.chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(prompt, add_special_tokens=True))

    def __call__(self, prompts: Sequence[str], *, adapter: dict[str, Any] | None = None,
                 params: Any = None, trainable_params: dict[str, Any] | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 adapter_ids: Any = None) -> list[str]:
        """The generated text for each prompt (the prompt itself not included).

        ``params`` defaults to the model's; ``trainable_params`` (full-trained
        leaves by dotted name) are written into them; ``adapter`` needs the
        ``lora_config`` given at construction. With a stacked adapter
        (:func:`lora_jax.stack_adapters`, its ``config`` at construction) and
        ``adapter_ids`` (one slot per prompt, -1 = the base model), every prompt
        runs with its own adapter in one batch. See the class example.
        """
        from lora_jax import models

        params = self.model.params if params is None else params
        if trainable_params:
            params = with_leaves(params, trainable_params)
        encoded = [self.encode_prompt(p) for p in prompts]
        width = max(len(ids) for ids in encoded)
        pad = self.pad_id
        ids = np.full((len(encoded), width), pad, np.int32)
        mask = np.zeros((len(encoded), width), np.int32)
        for row, tokens in enumerate(encoded):  # left padding
            ids[row, width - len(tokens):] = tokens
            mask[row, width - len(tokens):] = 1
        stops = [t for t in {self.tokenizer.eos_token_id, *self._end_of_turn_ids()} if t is not None]
        kwargs = dict(max_new_tokens=self.max_new_tokens, attention_mask=mask, temperature=temperature,
                      top_p=top_p, stop_token_ids=stops, pad_token_id=pad, rng=jax.random.key(seed))
        if adapter is None:
            out = models.generate(self.model.module, params, ids, **kwargs)
        else:
            if self._apply_fn is None:
                raise ValueError("TextGenerator was built without a lora_config, so it cannot use an adapter.")
            variables = {"base": params, "adapter": adapter}
            if adapter_ids is not None:
                variables["adapter_ids"] = np.asarray(adapter_ids, np.int32)
            out = models.generate(self.model.module, variables, ids, apply_fn=self._apply_fn, **kwargs)
        new_tokens = np.asarray(out)[:, width:]
        texts = []
        for row in new_tokens:
            row = [int(t) for t in row]
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return texts

    @property
    def pad_id(self) -> int:
        """The tokenizer's padding id (its EOS when it has none, else 0).

        Example:
            >>> from lora_jax.train.tiny import tiny_model, tiny_tokenizer
            >>> tokenizer = tiny_tokenizer(["hi there"], vocab_size=270)
            >>> TextGenerator(tiny_model(len(tokenizer), hidden_size=32, layers=1), tokenizer).pad_id
            0
        """
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, name, None)
            if value is not None:
                return int(value)
        return 0

    def _end_of_turn_ids(self) -> list[int]:
        if not self.chat:
            return []
        ids = []
        for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != getattr(self.tokenizer, "unk_token_id", None):
                ids.append(tid)
        return ids
