"""Embedding tables that train outside LoRA: trainable tokens, and trained copies of tables.

Two kinds of adapter entry replace rows of a frozen table in the input lookup:

* **Trainable tokens** (``LoraConfig.trainable_token_indices``, PEFT's
  ``TrainableTokensLayer``): only the listed rows train. The entry
  ``{"trainable_tokens": rows}`` holds their values, shape ``(n, dim)`` in the
  order of the indices (PEFT's ``trainable_tokens_delta`` holds the same: the rows
  themselves, not a difference). They start as the table's rows.
* **A trained copy** of a ``modules_to_save`` embedding table when
  ``ensure_weight_tying`` is False (PEFT's default): the entry ``{"embedding": copy}``.
  PEFT trains a copy of the table for the lookup while a tied output head keeps the
  original; in a pure params transform the copy has to live beside the frozen table,
  so it lives in the adapter and ``trainable_mask`` leaves the table itself frozen.

Where the table is also a tied output head (a dot contracting its embedding axis),
trainable tokens are followed by the head (PEFT ties them) and a trained copy is not
(``ensure_weight_tying=False``). With ``ensure_weight_tying=True`` a
``modules_to_save`` table trains in the params, so lookup and head both follow it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.config import LoraConfig, matches
from lora_jax.quantize import is_quantized
from lora_jax.tree import Adapter, KeyPath, Target, named_leaves

TOKENS = "trainable_tokens"
TABLE = "embedding"
# Names of an input embedding, in the order tried for a plain list of token ids
# (PEFT asks the model for its input embeddings, falling back to "embed_tokens").
INPUT_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared")


@dataclasses.dataclass(frozen=True)
class TableTarget:
    """A params leaf whose lookup rows an adapter entry replaces.

    ``token_axis`` is the leaf's axis indexed by token id: 0 for an embedding table
    ``(vocab, dim)``, the last for a Dense kernel ``(dim, vocab)`` (an untied LM head).
    ``indices`` are the trainable tokens, or None for a trained copy of the whole table.

    Example:
        >>> t = TableTarget("lm_head", (), "kernel", (4, 10), token_axis=1, indices=(2, 5))
        >>> t.key, t.entry_shape
        ('trainable_tokens', (2, 4))
    """

    module_name: str
    path: KeyPath
    leaf_name: str
    shape: tuple[int, ...]
    token_axis: int
    indices: tuple[int, ...] | None

    @property
    def key(self) -> str:
        """The adapter entry's key: ``"trainable_tokens"`` or the table's leaf name."""
        return TOKENS if self.indices is not None else self.leaf_name

    @property
    def entry_shape(self) -> tuple[int, ...]:
        if self.indices is None:
            return self.shape
        dim = self.shape[1 - self.token_axis] if len(self.shape) == 2 else None
        return (len(self.indices), dim)


def _leaves_by_module(params: Any) -> dict[str, list[tuple[KeyPath, str, Any]]]:
    out: dict[str, list[tuple[KeyPath, str, Any]]] = {}
    for path, module, leaf_name, leaf in named_leaves(params):
        out.setdefault(module, []).append((path, leaf_name, leaf))
    return out


def _table_leaf(module: str, leaves: list[tuple[KeyPath, str, Any]], where: str) -> tuple[KeyPath, str, Any, int]:
    by_name = {leaf_name: (path, leaf) for path, leaf_name, leaf in leaves}
    for leaf_name, axis in (("embedding", 0), ("kernel", -1)):
        if leaf_name in by_name:
            path, leaf = by_name[leaf_name]
            shape = tuple(np.shape(leaf))
            if len(shape) != 2:
                raise ValueError(f"{where}: {module}.{leaf_name} has shape {shape}; trainable tokens need a 2-D table.")
            return path, leaf_name, leaf, axis % 2
    raise ValueError(f"{where}: module {module!r} has no 'embedding' or 'kernel' leaf (leaves: {sorted(by_name)}).")


def _input_embedding(modules: dict[str, Any]) -> str:
    tables = [m for m, leaves in modules.items() if any(n == TABLE for _, n, _ in leaves)]
    for name in INPUT_EMBEDDING_NAMES:
        found = [m for m in tables if m == name or m.endswith("." + name)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            break
    raise ValueError(
        "trainable_token_indices is a list of token ids, which applies to the input embedding, but lora_jax "
        f"cannot tell which table that is (embedding tables: {tables[:8]}); give a dict "
        "{embedding module name: [token ids]}."
    )


def token_targets(config: LoraConfig, params: Any, lora_targets: dict[str, Target] | None = None
                  ) -> dict[str, TableTarget]:
    """The tables ``config.trainable_token_indices`` names, with their token ids.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax import LoraConfig
        >>> params = {"model": {"embed_tokens": {"embedding": jnp.zeros((10, 4))}, "q": {"kernel": jnp.zeros((4, 4))}}}
        >>> config = LoraConfig(target_modules=["q"], r=2, trainable_token_indices=[3, 7])
        >>> t = token_targets(config, params)["model.embed_tokens"]
        >>> t.indices, t.entry_shape
        ((3, 7), (2, 4))

    A list applies to the input embedding (a module named ``embed_tokens``,
    ``wte``, ``word_embeddings``, ...); a dict maps module names (matched like a
    ``target_modules`` list) to token ids. A dict key ``lm_head`` on a model with no
    ``lm_head`` module (its head is the tied input embedding) must repeat the
    embedding's ids: the tied head follows the embedding's tokens, as in PEFT.
    """
    spec = config.trainable_token_indices
    if spec is None:
        return {}
    modules = _leaves_by_module(params)
    named = {_input_embedding(modules): spec} if not isinstance(spec, dict) else dict(spec)
    out: dict[str, TableTarget] = {}
    for key, ids in named.items():
        found = [m for m in modules if matches((key,), m)]
        if not found and key.rsplit(".", 1)[-1] == "lm_head" and "lm_head" not in modules:
            tied = [t for t in named if t != key and any(matches((t,), m) for m in modules)]
            if tied and all(tuple(named[t]) == tuple(ids) for t in tied):
                continue  # the tied head: it follows the input embedding's rows
            raise ValueError(
                f"trainable_token_indices[{key!r}]: the model has no {key} module (its output head is the tied "
                "input embedding), so the head's tokens must be the embedding's: "
                f"{ {t: list(named[t]) for t in tied} }."
            )
        if len(found) != 1:
            what = "matches no module" if not found else f"matches several modules {found[:6]}"
            raise ValueError(f"trainable_token_indices key {key!r} {what}; name one embedding table.")
        module = found[0]
        path, leaf_name, leaf, axis = _table_leaf(module, modules[module], f"trainable_token_indices[{key!r}]")
        if lora_targets and module in lora_targets:
            raise ValueError(
                f"trainable_token_indices names {module!r}, which target_modules also adapts with LoRA; PEFT "
                "refuses both on one layer. Drop it from one of them."
            )
        if config.modules_to_save and any(matches((m,), module) for m in config.modules_to_save):
            raise ValueError(
                f"trainable_token_indices names {module!r}, which modules_to_save trains in full; "
                "use one of them (PEFT refuses both)."
            )
        size = np.shape(leaf)[axis]
        bad = [i for i in ids if i >= size]
        if bad:
            raise ValueError(
                f"trainable_token_indices for {module!r}: token ids {bad[:8]} are beyond its {size} rows."
            )
        out[module] = TableTarget(module, path, leaf_name, tuple(np.shape(leaf)), axis, tuple(ids))
    return out


def copy_targets(config: LoraConfig, params: Any) -> dict[str, TableTarget]:
    """``modules_to_save`` embedding tables that train as a copy in the adapter.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax import LoraConfig
        >>> params = {"embed": {"embedding": jnp.zeros((10, 4))}, "q": {"kernel": jnp.zeros((4, 4))}}
        >>> sorted(copy_targets(LoraConfig(target_modules=["q"], modules_to_save=["embed"]), params))
        ['embed']
        >>> copy_targets(LoraConfig(target_modules=["q"], modules_to_save=["embed"], ensure_weight_tying=True), params)
        {}

    Only with ``ensure_weight_tying=False``: then the lookup uses the copy and a tied
    output head the frozen table, as in PEFT.
    """
    if not config.modules_to_save or config.ensure_weight_tying:
        return {}
    out = {}
    for path, module, leaf_name, leaf in named_leaves(params):
        if leaf_name != TABLE or not _in_saved(config.modules_to_save, module):
            continue
        out[module] = TableTarget(module, path, leaf_name, tuple(np.shape(leaf)), 0, None)
    return out


def _in_saved(saved: Any, module: str) -> bool:
    parts = module.split(".")
    return any(matches(tuple(saved), ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def table_targets(config: LoraConfig, params: Any, lora_targets: dict[str, Target] | None = None
                  ) -> dict[str, TableTarget]:
    """Every table an adapter entry replaces rows of: :func:`token_targets` and :func:`copy_targets`.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax import LoraConfig
        >>> params = {"wte": {"embedding": jnp.zeros((10, 4))}, "wpe": {"embedding": jnp.zeros((6, 4))},
        ...           "q": {"kernel": jnp.zeros((4, 4))}}
        >>> config = LoraConfig(target_modules=["q"], modules_to_save=["wpe"], trainable_token_indices=[1])
        >>> {name: t.key for name, t in table_targets(config, params).items()}
        {'wpe': 'embedding', 'wte': 'trainable_tokens'}
    """
    return {**copy_targets(config, params), **token_targets(config, params, lora_targets)}


def initial_entries(tables: dict[str, TableTarget], params: Any, dtype: Any) -> Adapter:
    """The starting entries: the listed rows of each table, or a copy of the whole table.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax import LoraConfig
        >>> params = {"embed_tokens": {"embedding": jnp.arange(12.0).reshape(6, 2)}, "q": {"kernel": jnp.ones((2, 2))}}
        >>> config = LoraConfig(target_modules=["q"], trainable_token_indices=[4, 1])
        >>> initial_entries(token_targets(config, params), params, jnp.float32)["embed_tokens"]["trainable_tokens"].tolist()
        [[8.0, 9.0], [2.0, 3.0]]
    """
    by_path = {t.path: t for t in tables.values()}
    out: Adapter = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        target = by_path.get(path)
        if target is None:
            continue
        if is_quantized(leaf):
            leaf = leaf.dequantize()
        if isinstance(leaf, jax.ShapeDtypeStruct) or not hasattr(leaf, "dtype"):
            raise ValueError(
                f"init needs the values of {target.module_name}.{target.leaf_name} to start its "
                f"{'trainable tokens' if target.indices is not None else 'trained copy'} from them; got "
                f"{type(leaf).__name__}."
            )
        table = jnp.asarray(leaf)
        if target.indices is None:
            value = table
        else:
            value = jnp.take(table, jnp.asarray(target.indices), axis=target.token_axis)
            if target.token_axis == 1:
                value = value.T
        out[target.module_name] = {target.key: value.astype(dtype)}
    return out


def split_adapter(adapter: Adapter, lora_names: Any) -> tuple[Adapter, Adapter]:
    """``(LoRA entries, table entries)``: the entries of ``lora_names`` and the rest.

    Example:
        >>> split_adapter({"q": {"lora_A": 1, "lora_B": 2}, "embed": {"trainable_tokens": 3}}, ["q"])
        ({'q': {'lora_A': 1, 'lora_B': 2}}, {'embed': {'trainable_tokens': 3}})
    """
    if not isinstance(adapter, dict):
        return adapter, {}
    names = set(lora_names)
    lora_part = {k: v for k, v in adapter.items() if k in names or not _is_table_entry(v)}
    return lora_part, {k: v for k, v in adapter.items() if k not in lora_part}


def _is_table_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)) in (TOKENS, TABLE)


def check_tables(tables: dict[str, TableTarget], entries: Adapter) -> None:
    """Raise ``ValueError`` unless ``entries`` hold exactly the tables' entries, each of the right shape.

    Example:
        >>> import jax.numpy as jnp
        >>> from lora_jax import LoraConfig
        >>> params = {"embed_tokens": {"embedding": jnp.zeros((10, 4))}, "q": {"kernel": jnp.zeros((4, 4))}}
        >>> tables = token_targets(LoraConfig(target_modules=["q"], trainable_token_indices=[1, 2]), params)
        >>> check_tables(tables, {"embed_tokens": {"trainable_tokens": jnp.zeros((3, 4))}})
        Traceback (most recent call last):
        ...
        ValueError: adapter['embed_tokens']['trainable_tokens'] has shape (3, 4); embed_tokens.embedding of shape (10, 4) needs (2, 4).
    """
    missing = sorted(set(tables) - set(entries))
    extra = sorted(set(entries) - set(tables))
    if missing:
        t = tables[missing[0]]
        why = "trainable_token_indices" if t.indices is not None else "modules_to_save (ensure_weight_tying=False)"
        raise ValueError(
            f"adapter has no entry for {missing[0]!r}, which the config's {why} trains; expected "
            f"{{{t.key!r}: array of shape {t.entry_shape}}} (lora_jax.init creates it)."
        )
    if extra:
        raise ValueError(
            f"adapter entries {extra[:8]} are neither LoRA targets nor tables the config trains "
            "(trainable_token_indices, modules_to_save)."
        )
    for name, t in tables.items():
        entry = entries[name]
        if set(entry) != {t.key}:
            raise ValueError(f"adapter[{name!r}] has keys {sorted(entry)}; expected exactly {[t.key]}.")
        got = tuple(np.shape(entry[t.key]))
        if got != t.entry_shape:
            raise ValueError(f"adapter[{name!r}][{t.key!r}] has shape {got}; {name}.{t.leaf_name} of shape "
                             f"{t.shape} needs {t.entry_shape}.")


def with_rows(table: Any, rows: jax.Array, indices: tuple[int, ...] | None, token_axis: int) -> jax.Array:
    """The dense table the lookup sees: ``table`` with ``rows`` written at ``indices`` (or ``rows`` itself).

    Example:
        >>> import jax.numpy as jnp
        >>> with_rows(jnp.zeros((4, 2)), jnp.ones((1, 2)), (2,), 0).tolist()
        [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    """
    table = jnp.asarray(table)
    if indices is None:
        return rows.astype(table.dtype)
    rows = rows.astype(table.dtype)
    index = jnp.asarray(indices)
    if token_axis == 0:
        return table.at[index].set(rows)
    return table.at[:, index].set(rows.T)


@dataclasses.dataclass(frozen=True)
class AdapterFit:
    """What an adapter holds for a params tree, checked: its LoRA targets and entries, and
    its table entries (trainable tokens, table copies) with their tables."""

    targets: dict[str, Target]
    lora_part: Adapter
    table_part: Adapter
    tables: dict[str, TableTarget]


def fit_adapter(config: LoraConfig, params: Any, adapter: Adapter) -> AdapterFit:
    """Check ``adapter`` against ``params`` and ``config`` (LoRA shapes, DoRA magnitudes,
    table rows), raising ``ValueError`` naming the module that does not fit.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax import LoraConfig, init
        >>> params = {"embed_tokens": {"embedding": jnp.zeros((10, 4))}, "q": {"kernel": jnp.zeros((4, 4))}}
        >>> config = LoraConfig(r=2, target_modules=["q"], trainable_token_indices=[1, 2])
        >>> fit = fit_adapter(config, params, init(config, params, jax.random.key(0)))
        >>> list(fit.targets), list(fit.tables)
        (['q'], ['embed_tokens'])
    """
    from lora_jax import dora
    from lora_jax.tree import check_adapter, find_targets

    lora_part, table_part = split_adapter(adapter, ())
    targets = find_targets(config, params, lora_part)
    check_adapter(targets, lora_part)
    dora.check_magnitudes(targets, lora_part, config.use_dora)
    found = table_targets(config, params, targets)
    check_tables(found, table_part)
    return AdapterFit(targets, lora_part, table_part, found)

