"""weighted_adapter against PyTorch PEFT's add_weighted_adapter (peft 0.21).

One tiny torch model (an embedding, Linear layers, a GPT-2 Conv1D) carries three
adapters of different ranks, alphas, targets and rsLoRA; the same A/B go into
lora_jax by hand (A = lora_A.T, B = lora_B.T). For every deterministic
combination type the merged weight deltas match PEFT's within 1e-5; the random
DARE types are checked statistically, on PEFT's result and on lora_jax's alike.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hf_oracle import quiet  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import lora_jax  # noqa: E402
from lora_jax import LoraConfig, weighted_adapter  # noqa: E402
from lora_jax.weighted import COMBINATION_TYPES  # noqa: E402

HIDDEN, VOCAB = 48, 80
# Every targeted kernel has min(in, out) = 48, so svd_rank=48 reconstructs a delta exactly.
FULL_RANK = 48
KERNELS = {  # JAX module name -> kernel shape (in, out)
    "embed": (VOCAB, HIDDEN),
    "layers.0.q": (HIDDEN, 64), "layers.0.k": (HIDDEN, HIDDEN), "layers.0.v": (HIDDEN, 64),
    "layers.0.c_fc": (HIDDEN, 96), "layers.1.q": (HIDDEN, 64),
}
# Names that are not substrings of PEFT's "lora_" prefix.
CONFIGS = {
    "one": dict(r=4, lora_alpha=8, target_modules=["q", "v", "c_fc"]),
    "two": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q", "k", "embed"], rank_pattern={"k": 6}),
    "three": dict(r=4, lora_alpha=6, target_modules=["q", "k", "c_fc"]),
}
EQUAL_RANK = ["one", "three"]  # both r=4
EQUAL_RANK_WEIGHTS = [0.7, -0.4]
ALL = ["one", "two", "three"]
ALL_WEIGHTS = [0.7, 0.5, -0.4]


class Block(torch.nn.Module):
    def __init__(self, full: bool):
        super().__init__()
        self.q = torch.nn.Linear(HIDDEN, 64)
        if full:
            self.k = torch.nn.Linear(HIDDEN, HIDDEN)
            self.v = torch.nn.Linear(HIDDEN, 64)
            self.c_fc = Conv1D(96, HIDDEN)  # weight (in, out): PEFT's fan_in_fan_out


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.layers = torch.nn.ModuleList([Block(True), Block(False)])

    def forward(self, ids):  # not used: the deltas are compared
        return self.embed(ids)


def lora_layers(peft_model):
    prefix = "base_model.model."
    for path, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and path.startswith(prefix):
            yield path.removeprefix(prefix), module


@pytest.fixture(scope="module")
def peft_model():
    torch.manual_seed(0)
    names = list(CONFIGS)
    model = quiet(peft.get_peft_model, Tiny(), peft.LoraConfig(**CONFIGS[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        quiet(model.add_adapter, name, peft.LoraConfig(**CONFIGS[name]))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def adapters(peft_model):
    """The three adapters in lora_jax, converted by hand: A = lora_A.T, B = lora_B.T."""
    out = {}
    for name, kwargs in CONFIGS.items():
        adapter = {}
        for path, module in lora_layers(peft_model):
            if name in module.lora_A:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
            elif name in module.lora_embedding_A:
                a, b = module.lora_embedding_A[name], module.lora_embedding_B[name]
            else:
                continue
            adapter[path] = {"lora_A": jnp.asarray(a.detach().numpy().T), "lora_B": jnp.asarray(b.detach().numpy().T)}
        out[name] = (adapter, LoraConfig(**kwargs))
    return out


@pytest.fixture(scope="module")
def params():
    leaves = {name: {"embedding" if name == "embed" else "kernel": jnp.zeros(shape)}
              for name, shape in KERNELS.items()}
    tree: dict = {}
    for name, leaf in leaves.items():
        node = tree
        *parents, last = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return {"params": tree}


def peft_deltas(peft_model, adapter_name: str) -> dict[str, np.ndarray]:
    """PEFT's merged-weight delta of each module, in lora_jax's (in, out) layout."""
    out = {}
    for path, module in lora_layers(peft_model):
        if adapter_name in module.lora_A or adapter_name in module.lora_embedding_A:
            delta = module.get_delta_weight(adapter_name).detach().numpy()
            # Linear deltas are (out, in); Conv1D (fan_in_fan_out) and Embedding ones are (in, out) already.
            out[path] = delta.T if isinstance(module.get_base_layer(), torch.nn.Linear) else delta
    return out


def jax_deltas(params, adapter, config) -> dict[str, np.ndarray]:
    """lora_jax's merged weights minus the base (the base is zero here)."""
    merged = lora_jax.merge(params, adapter, config)
    out = {}
    for _, module, _, leaf in lora_jax.tree.named_leaves(merged):
        if module in adapter:
            out[module] = np.asarray(leaf)
    return out


_counter = iter(range(10**6))


def run_peft(peft_model, names, weights, combination_type, **options) -> tuple[str, dict[str, np.ndarray]]:
    new = f"mix{next(_counter)}"
    quiet(peft_model.add_weighted_adapter, list(names), list(weights), new, combination_type=combination_type,
          **options)
    return new, peft_deltas(peft_model, new)


def assert_deltas_match(got: dict, want: dict, atol: float = 1e-5):
    assert sorted(got) == sorted(want)
    for module in want:
        np.testing.assert_allclose(got[module], want[module], rtol=0, atol=atol, err_msg=module)


def combine(adapters, names, weights, combination_type, **options):
    return weighted_adapter({n: adapters[n] for n in names}, weights, combination_type, **options)


# -- deterministic types: merged deltas equal PEFT's ------------------------------------------

DETERMINISTIC = [
    ("linear", EQUAL_RANK, EQUAL_RANK_WEIGHTS, {}),
    ("ties", EQUAL_RANK, EQUAL_RANK_WEIGHTS, {"density": 0.5}),
    ("ties", EQUAL_RANK, EQUAL_RANK_WEIGHTS, {"density": 0.3, "majority_sign_method": "frequency"}),
    ("magnitude_prune", EQUAL_RANK, EQUAL_RANK_WEIGHTS, {"density": 0.4}),
    ("cat", ALL, ALL_WEIGHTS, {}),
    ("svd", ALL, ALL_WEIGHTS, {}),
    ("svd", ALL, ALL_WEIGHTS, {"svd_rank": 6}),
    ("svd", ALL, ALL_WEIGHTS, {"svd_rank": 5, "svd_clamp": 0.9}),
    ("svd", ALL, ALL_WEIGHTS, {"svd_rank": 6, "svd_full_matrices": False}),
    ("ties_svd", ALL, ALL_WEIGHTS, {"density": 0.5, "svd_rank": 10}),
    ("ties_svd", ALL, ALL_WEIGHTS, {"density": 0.7, "majority_sign_method": "frequency"}),
    ("magnitude_prune_svd", ALL, ALL_WEIGHTS, {"density": 0.5, "svd_rank": 8}),
]


@pytest.mark.parametrize(("combination_type", "names", "weights", "options"), DETERMINISTIC,
                         ids=[f"{t}-{'-'.join(map(str, o.values())) or 'default'}" for t, _, _, o in DETERMINISTIC])
def test_merged_delta_matches_peft(peft_model, adapters, params, combination_type, names, weights, options):
    new, want = run_peft(peft_model, names, weights, combination_type, **options)
    adapter, config = combine(adapters, names, weights, combination_type, params=params, **options)
    assert_deltas_match(jax_deltas(params, adapter, config), want)
    # The result's rank and scaling are PEFT's (r = lora_alpha = the new rank, scaling 1).
    assert config.r == config.lora_alpha == peft_model.peft_config[new].r
    assert not config.use_rslora
    for module, pair in adapter.items():
        peft_module = dict(lora_layers(peft_model))[module]
        assert peft_module.scaling[new] == 1.0
        assert find_rank(peft_module, new) == pair["lora_A"].shape[-1], module


def find_rank(module, name) -> int:
    a = module.lora_A[name].weight if name in module.lora_A else module.lora_embedding_A[name]
    return a.shape[0]


def test_cat_keeps_peft_factor_layout(peft_model, adapters, params):
    """cat puts the rows of the adapters that target a module first and zero-pads the rest, as PEFT."""
    new, _ = run_peft(peft_model, ALL, ALL_WEIGHTS, "cat")
    adapter, config = combine(adapters, ALL, ALL_WEIGHTS, "cat")
    assert config.r == 16
    for path, module in lora_layers(peft_model):
        if new in module.lora_A:
            a, b = module.lora_A[new].weight, module.lora_B[new].weight
        else:
            a, b = module.lora_embedding_A[new], module.lora_embedding_B[new]
        np.testing.assert_allclose(adapter[path]["lora_A"], a.detach().numpy().T, atol=1e-6, err_msg=path)
        np.testing.assert_allclose(adapter[path]["lora_B"], b.detach().numpy().T, atol=1e-6, err_msg=path)


def test_svd_driver_gesvd_gives_peft_delta(peft_model, adapters, params):
    # torch takes a driver only on CUDA; the decomposition is the same, so compare with PEFT's default.
    _, want = run_peft(peft_model, ALL, ALL_WEIGHTS, "svd", svd_rank=6)
    adapter, config = combine(adapters, ALL, ALL_WEIGHTS, "svd", svd_rank=6, svd_driver="gesvd")
    assert_deltas_match(jax_deltas(params, adapter, config), want)


def test_rslora_first_adapter_result_has_scaling_one(peft_model, adapters, params):
    """PEFT 0.21 copies use_rslora from the first adapter, so its result is sqrt(r) too large
    (peft#3449); lora_jax's result has PEFT's factors with scaling 1."""
    names, weights = ["two", "one", "three"], [0.5, 0.7, -0.4]
    for combination_type, options in (("cat", {}), ("svd", {"svd_rank": 6})):
        new, peft_delta = run_peft(peft_model, names, weights, combination_type, **options)
        adapter, config = combine(adapters, names, weights, combination_type, **options)
        peft_scaling = math.sqrt(peft_model.peft_config[new].r)
        assert dict(lora_layers(peft_model))["layers.0.q"].scaling[new] == pytest.approx(peft_scaling)
        want = {m: d / peft_scaling for m, d in peft_delta.items()}
        assert_deltas_match(jax_deltas(params, adapter, config), want)


def test_single_adapter_is_combined_linearly_as_in_peft(peft_model, adapters, params):
    new, want = run_peft(peft_model, ["three"], [-0.6], "svd", svd_rank=2)
    with pytest.warns(UserWarning, match="combined linearly"):
        adapter, config = combine(adapters, ["three"], [-0.6], "svd", svd_rank=2)
    assert_deltas_match(jax_deltas(params, adapter, config), want)
    assert adapter["layers.0.q"]["lora_A"].shape[-1] == 4  # not truncated: PEFT ignores svd_rank here


def test_stacked_layers_combine_per_layer_like_peft_modules(peft_model, adapters):
    """A scanned kernel (leading layer axis) is pruned, elected and factored per layer, as PEFT
    treats each layer's module on its own."""
    stacked_params = {"params": {"layers": {"q": {"kernel": jnp.zeros((2, HIDDEN, 64))}}}}

    def stacked(name):
        adapter, config = adapters[name]
        pair = {k: jnp.stack([adapter[f"layers.{i}.q"][k] for i in range(2)]) for k in ("lora_A", "lora_B")}
        kwargs = {**CONFIGS[name], "target_modules": ["q"], "stacked_modules": ["q"], "rank_pattern": {}}
        return {"layers.q": pair}, LoraConfig(**kwargs)

    cases = [("magnitude_prune", EQUAL_RANK, EQUAL_RANK_WEIGHTS, {"density": 0.4}),
             ("ties_svd", ALL, ALL_WEIGHTS, {"density": 0.5, "svd_rank": 5, "svd_clamp": 0.8})]
    for combination_type, names, weights, options in cases:
        _, want = run_peft(peft_model, names, weights, combination_type, **options)
        pairs = {n: stacked(n) for n in names}
        adapter, config = weighted_adapter(pairs, weights, combination_type, params=stacked_params, **options)
        assert config.is_stacked("layers.q")
        got = jax_deltas(stacked_params, adapter, config)["layers.q"]
        for i in range(2):
            np.testing.assert_allclose(got[i], want[f"layers.{i}.q"], rtol=0, atol=1e-5)


def test_combined_adapter_exports_to_peft(peft_model, adapters, params, tmp_path):
    new, want = run_peft(peft_model, ALL, ALL_WEIGHTS, "ties_svd", density=0.6, svd_rank=7)
    adapter, config = combine(adapters, ALL, ALL_WEIGHTS, "ties_svd", density=0.6, svd_rank=7, params=params)
    lora_jax.save_peft(tmp_path / "mix", adapter, config, params)
    loaded = quiet(peft.PeftModel.from_pretrained, Tiny(), str(tmp_path / "mix"))
    got = peft_deltas(loaded, "default")
    for module in want:
        np.testing.assert_allclose(got[module], want[module], rtol=0, atol=1e-5, err_msg=module)


def test_result_works_under_lora_and_merge(adapters, params):
    """The result is an ordinary pair: lora() on it equals the plain function on merge()d params."""
    adapter, config = combine(adapters, ALL, ALL_WEIGHTS, "svd", svd_rank=4, params=params)

    def apply(p, x):
        layer = p["params"]["layers"]["0"]
        return jnp.concatenate([x @ layer["q"]["kernel"], x @ layer["c_fc"]["kernel"]], axis=-1)

    x = jax.random.normal(jax.random.key(0), (3, HIDDEN))
    out = lora_jax.lora(apply, config)(params, adapter, x)
    np.testing.assert_allclose(out, apply(lora_jax.merge(params, adapter, config), x), atol=1e-5)


# -- DARE: random masks, checked statistically -----------------------------------------------

def dare_outcomes(parts: list[np.ndarray], weights: list[float], density: float, ties: bool,
                  majority_sign_method: str = "total") -> np.ndarray:
    """Every value an entry can take, one per keep/drop pattern (float64 reference):
    ``(2**n, *shape)``, pattern index ``sum(kept_i << i)``."""
    outcomes = []
    for pattern in range(2 ** len(parts)):
        kept = [(pattern >> i) & 1 for i in range(len(parts))]
        pruned = np.stack([p * k / density for p, k in zip(parts, kept)])
        w = np.asarray(weights).reshape((-1,) + (1,) * parts[0].ndim)
        if not ties:
            outcomes.append((pruned * w).sum(0))
            continue
        signs = np.sign(pruned)
        votes = pruned.sum(0) if majority_sign_method == "total" else signs.sum(0)
        agrees = signs == np.where(votes >= 0, 1.0, -1.0)
        outcomes.append((pruned * w * agrees).sum(0) / np.maximum(agrees.sum(0), 1))
    return np.stack(outcomes)


class PatternTally:
    """Observed vs expected frequency of each keep/drop pattern of a DARE merge.

    An entry is *consistent* with a pattern when its value is the one that pattern
    gives. Several patterns can give the same value (in TIES a kept entry of the
    losing sign adds nothing), so for each pattern the expected number of consistent
    entries sums, entry by entry, the probability of every pattern with an equal
    outcome; each entry keeps each adapter's part with probability ``density``.
    """

    def __init__(self, num_parts: int, density: float):
        self.num_parts, self.density = num_parts, density
        kept = np.array([bin(p).count("1") for p in range(2 ** num_parts)])
        self.prob = density ** kept * (1 - density) ** (num_parts - kept)
        self.observed = np.zeros(2 ** num_parts)
        self.expected = np.zeros(2 ** num_parts)
        self.variance = np.zeros(2 ** num_parts)
        self.entries = self.unmatched = 0

    def add(self, value: np.ndarray, outcomes: np.ndarray, atol: float):
        value, outcomes = value.ravel(), outcomes.reshape(len(outcomes), -1)
        close = np.abs(outcomes - value[None]) <= atol + 1e-5 * np.abs(outcomes)
        same = np.abs(outcomes[:, None] - outcomes[None, :]) <= atol + 1e-5 * np.abs(outcomes[None, :])
        chance = np.einsum("q,pqe->pe", self.prob, same)  # P(an entry is consistent with p)
        self.observed += close.sum(1)
        self.expected += chance.sum(1)
        self.variance += (chance * (1 - chance)).sum(1)
        self.entries += value.size
        self.unmatched += int((~close.any(0)).sum())

    def check(self, who: str, max_unmatched: float = 0.0):
        assert self.entries >= 800, (who, self.entries)
        # Every entry is one of the outcomes: survivors rescaled by 1/density, nothing else.
        assert self.unmatched <= max_unmatched * self.entries, (who, self.unmatched, self.entries)
        slack = 5 * np.sqrt(self.variance) + self.unmatched + 1e-9
        assert (np.abs(self.observed - self.expected) <= slack).all(), (who, self.observed, self.expected)


def factor_parts(adapters, names, weights, module, side):
    """The weighted A or B of each adapter on ``module``, as PEFT weights the factors."""
    parts, w = [], []
    for name, weight in zip(names, weights):
        adapter, config = adapters[name]
        if module not in adapter:
            continue
        product = weight * config.scaling(module)
        w.append(math.sqrt(abs(product)) * (1 if product >= 0 or side == "lora_B" else -1))
        parts.append(np.asarray(adapter[module][side], np.float64))
    return parts, w


def delta_parts(adapters, names, weights, module):
    parts, w = [], []
    for name, weight in zip(names, weights):
        adapter, config = adapters[name]
        if module in adapter:
            pair = adapter[module]
            parts.append(config.scaling(module) * np.asarray(pair["lora_A"], np.float64)
                         @ np.asarray(pair["lora_B"], np.float64))
            w.append(weight)
    return parts, w


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties"])
def test_dare_factors_keep_density_and_rescale_like_peft(peft_model, adapters, combination_type):
    density, names, weights = 0.4, EQUAL_RANK, EQUAL_RANK_WEIGHTS
    new, _ = run_peft(peft_model, names, weights, combination_type, density=density)
    adapter, _ = combine(adapters, names, weights, combination_type, density=density, key=jax.random.key(3))
    peft_layers = dict(lora_layers(peft_model))
    tallies = {"peft": {}, "lora_jax": {}}
    for module in adapter:
        peft_a = peft_layers[module].lora_A[new].weight.detach().numpy().T
        peft_b = peft_layers[module].lora_B[new].weight.detach().numpy().T
        for side, peft_value in (("lora_A", peft_a), ("lora_B", peft_b)):
            parts, w = factor_parts(adapters, names, weights, module, side)
            outcomes = dare_outcomes(parts, w, density, ties=combination_type == "dare_ties")
            for who, value in (("peft", peft_value), ("lora_jax", np.asarray(adapter[module][side]))):
                tally = tallies[who].setdefault(len(parts), PatternTally(len(parts), density))
                tally.add(value, outcomes, atol=1e-6)
    for who, by_parts in tallies.items():
        assert sum(t.entries for t in by_parts.values()) > 2000
        for tally in by_parts.values():
            tally.check(who)


@pytest.mark.parametrize(("combination_type", "majority_sign_method"),
                         [("dare_linear_svd", "total"), ("dare_ties_svd", "frequency")])
def test_dare_svd_deltas_keep_density_and_rescale_like_peft(peft_model, adapters, params, combination_type,
                                                             majority_sign_method):
    # svd_rank = min(in, out) of every module: the SVD is exact and the pruned delta shows through.
    density, options = 0.5, {"svd_rank": FULL_RANK}
    if combination_type == "dare_ties_svd":
        options["majority_sign_method"] = majority_sign_method
    _, want = run_peft(peft_model, ALL, ALL_WEIGHTS, combination_type, density=density, **options)
    adapter, config = combine(adapters, ALL, ALL_WEIGHTS, combination_type, density=density,
                              key=jax.random.key(5), **options)
    got = jax_deltas(params, adapter, config)
    tallies = {"peft": {}, "lora_jax": {}}
    for module in want:
        parts, w = delta_parts(adapters, ALL, ALL_WEIGHTS, module)
        outcomes = dare_outcomes(parts, w, density, ties=combination_type == "dare_ties_svd",
                                 majority_sign_method=majority_sign_method)
        for who, value in (("peft", want[module]), ("lora_jax", got[module])):
            tally = tallies[who].setdefault(len(parts), PatternTally(len(parts), density))
            tally.add(value, outcomes, atol=2e-5)  # the float32 SVD round trip
    for who, by_parts in tallies.items():
        assert sum(t.entries for t in by_parts.values()) > 2000
        for tally in by_parts.values():
            tally.check(who, max_unmatched=1e-3)


def test_dare_linear_preserves_the_mean(adapters):
    """Averaged over keys, DARE's rescaled survivors give back the linear combination."""
    density, names, weights = 0.5, EQUAL_RANK, EQUAL_RANK_WEIGHTS
    linear, _ = combine(adapters, names, weights, "linear")
    draws = 100
    total = jnp.zeros_like(linear["layers.0.c_fc"]["lora_B"])
    for i in range(draws):
        adapter, _ = combine(adapters, names, weights, "dare_linear", density=density, key=jax.random.key(i))
        total = total + adapter["layers.0.c_fc"]["lora_B"]
    mean = np.asarray(total / draws)
    target = np.asarray(linear["layers.0.c_fc"]["lora_B"])
    # Each part is 0 or part/density with equal odds: per-entry std of the mean is |part| / sqrt(draws).
    parts, w = factor_parts(adapters, names, weights, "layers.0.c_fc", "lora_B")
    std = np.sqrt(sum((wi * p) ** 2 for wi, p in zip(w, parts)) * (1 - density) / density / draws)
    z = (mean - target) / std
    assert abs(z.mean()) < 5 / math.sqrt(z.size)  # no bias
    assert 0.8 < z.std() < 1.2


def test_dare_is_reproducible_from_its_key(adapters):
    one, _ = combine(adapters, ALL, ALL_WEIGHTS, "dare_ties_svd", density=0.5, key=jax.random.key(1))
    again, _ = combine(adapters, ALL, ALL_WEIGHTS, "dare_ties_svd", density=0.5, key=jax.random.key(1))
    other, _ = combine(adapters, ALL, ALL_WEIGHTS, "dare_ties_svd", density=0.5, key=jax.random.key(2))
    for module in one:
        np.testing.assert_array_equal(one[module]["lora_A"], again[module]["lora_A"])
        assert not np.allclose(one[module]["lora_B"], other[module]["lora_B"])


# -- bad input -----------------------------------------------------------------------------------

def test_unknown_combination_type_lists_the_known_ones(adapters):
    with pytest.raises(ValueError, match="Unknown combination_type 'average'; known: svd, linear, cat") as info:
        combine(adapters, ALL, ALL_WEIGHTS, "average")
    assert all(t in str(info.value) for t in COMBINATION_TYPES)


def test_weight_count_must_match_adapter_count(adapters):
    with pytest.raises(ValueError, match=r"Got 2 weights for 3 adapters \(one, two, three\)"):
        combine(adapters, ALL, [1.0, 1.0], "cat")
    with pytest.raises(ValueError, match="weight of adapter 'two' must be a finite number"):
        combine(adapters, ALL, [1.0, float("nan"), 1.0], "cat")


@pytest.mark.parametrize("combination_type", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_unequal_ranks_are_refused_for_stacking_types(adapters, combination_type):
    density = None if combination_type == "linear" else 0.5
    with pytest.raises(ValueError, match=r"same rank, got 'one': r=4, 'two': r=8, 'three': r=4"):
        combine(adapters, ALL, ALL_WEIGHTS, combination_type, density=density, key=jax.random.key(0))


def test_svd_rank_out_of_range_is_refused(adapters):
    with pytest.raises(ValueError, match=r"svd_rank=49 exceeds min\(in, out\) = min\(48, 64\) of module 'layers.0.q'"):
        combine(adapters, ALL, ALL_WEIGHTS, "svd", svd_rank=49)
    with pytest.raises(ValueError, match="svd_rank must be a positive integer, got 0"):
        combine(adapters, ALL, ALL_WEIGHTS, "svd", svd_rank=0)
    with pytest.raises(ValueError, match="svd_rank applies only to the svd combination types"):
        combine(adapters, ALL, ALL_WEIGHTS, "cat", svd_rank=4)
    with pytest.raises(ValueError, match=r"svd_clamp is a quantile and must be in \[0, 1\]"):
        combine(adapters, ALL, ALL_WEIGHTS, "svd", svd_clamp=2)


def test_density_is_required_and_checked(adapters):
    with pytest.raises(ValueError, match="'ties_svd' needs density"):
        combine(adapters, ALL, ALL_WEIGHTS, "ties_svd")
    with pytest.raises(ValueError, match=r"density must be a number in \[0, 1\], got 1.5"):
        combine(adapters, EQUAL_RANK, EQUAL_RANK_WEIGHTS, "ties", density=1.5)
    with pytest.raises(ValueError, match="density applies to the ties, dare and magnitude_prune types"):
        combine(adapters, ALL, ALL_WEIGHTS, "svd", density=0.5)
    with pytest.raises(ValueError, match="density=0 with a dare combination type"):
        combine(adapters, ALL, ALL_WEIGHTS, "dare_linear_svd", density=0.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="draws random masks: pass key"):
        combine(adapters, EQUAL_RANK, EQUAL_RANK_WEIGHTS, "dare_ties", density=0.5)
    with pytest.raises(ValueError, match="majority_sign_method must be one of total, frequency"):
        combine(adapters, EQUAL_RANK, EQUAL_RANK_WEIGHTS, "ties", density=0.5, majority_sign_method="mean")


def test_cat_beyond_the_kernel_rank_is_refused():
    params = {"q": {"kernel": jnp.zeros((8, 6))}}
    config = LoraConfig(r=4, target_modules=["q"])
    pair = (lora_jax.init(config, params, jax.random.key(0)), config)
    with pytest.raises(ValueError, match=r"The result rank 8 \('cat' adds the adapters' ranks\) exceeds "
                                         r"min\(in, out\) = min\(8, 6\) of module 'q'"):
        weighted_adapter({"a": pair, "b": pair}, [1, 1], "cat")


def test_adapters_for_different_bases_are_named(adapters, params):
    adapter, config = adapters["three"]
    other_base = dict(adapter)
    other_base["layers.0.k"] = {"lora_A": jnp.zeros((32, 4)), "lora_B": jnp.zeros((4, 48))}
    with pytest.raises(ValueError, match=r"Adapters 'two' and 'other' do not fit the same kernel 'layers.0.k': "
                                         r"'two''s factors make a kernel of shape \(48, 48\), 'other''s one of "
                                         r"shape \(32, 48\)"):
        weighted_adapter({"one": adapters["one"], "two": adapters["two"], "other": (other_base, config)},
                         ALL_WEIGHTS, "cat")
    with pytest.raises(ValueError, match=r"Adapter 'other' does not fit these params \(an adapter for another base "
                                         r"model\?\): adapter\['layers.0.k'\]\['lora_A'\] has shape \(32, 4\)"):
        weighted_adapter({"one": adapters["one"], "other": (other_base, config)}, [1, 1], "cat", params=params)


def test_malformed_pairs_are_named(adapters):
    adapter, config = adapters["one"]
    with pytest.raises(TypeError, match=r"adapters\['bad'\] must be an \(adapter, LoraConfig\) pair"):
        weighted_adapter({"one": adapters["one"], "bad": adapter}, [1, 1], "cat")
    dora = {**adapter, "layers.0.v": {**adapter["layers.0.v"], "lora_magnitude": jnp.ones(64)}}
    with pytest.raises(ValueError, match=r"adapter 'dora', module 'layers.0.v' has \['lora_magnitude'\]"):
        weighted_adapter({"one": adapters["one"], "dora": (dora, config)}, [1, 1], "cat")
    with pytest.raises(ValueError, match="Adapter 'dora' is a DoRA adapter"):
        weighted_adapter({"one": adapters["one"], "dora": (adapter, config.replace(use_dora=True))}, [1, 1], "cat")
    with pytest.raises(ValueError, match="needs at least one adapter"):
        weighted_adapter({}, [], "cat")


# -- lora_jax-only layouts, against the dense float64 formula -----------------------------------

def test_nd_kernels_combine_on_the_flattened_matrix():
    """A DenseGeneral kernel (heads, head_dim, d) with in_axes=2 combines as the torch Linear it
    exports to: the (heads * head_dim, d) matrix."""
    params = {"out": {"kernel": jnp.zeros((4, 6, 10))}, "up": {"kernel": jnp.zeros((10, 12))}}
    configs = [LoraConfig(r=3, lora_alpha=5, target_modules=["out", "up"], in_axes={"out": 2},
                          init_lora_weights=False),
               LoraConfig(r=2, lora_alpha=2, use_rslora=True, target_modules=["out"], in_axes={"out": 2},
                          init_lora_weights=False)]
    pairs = {f"a{i}": (lora_jax.init(c, params, jax.random.key(i)), c) for i, c in enumerate(configs)}
    weights = [0.8, -1.5]

    def dense(pair, module):
        adapter, config = pair
        a = np.asarray(adapter[module]["lora_A"], np.float64)
        b = np.asarray(adapter[module]["lora_B"], np.float64)
        return config.scaling(module) * a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1)

    want = sum(w * dense(p, "out") for w, p in zip(weights, pairs.values()))
    for combination_type, options in (("cat", {}), ("svd", {"svd_rank": 5})):
        adapter, config = weighted_adapter(pairs, weights, combination_type, params=params, **options)
        assert config.num_in_axes("out") == 2 and adapter["out"]["lora_A"].shape == (4, 6, 5)
        got = np.asarray(lora_jax.merge(params, adapter, config)["out"]["kernel"]).reshape(24, 10)
        np.testing.assert_allclose(got, want, atol=1e-5)
        up = np.asarray(lora_jax.merge(params, adapter, config)["up"]["kernel"])
        np.testing.assert_allclose(up, weights[0] * dense(pairs["a0"], "up"), atol=1e-5)


def test_result_keeps_the_first_adapters_dtype():
    params = {"q": {"kernel": jnp.zeros((8, 6))}}
    config = LoraConfig(r=2, target_modules=["q"], init_lora_weights=False)
    low = lora_jax.init(config, params, jax.random.key(0), dtype=jnp.bfloat16)
    high = lora_jax.init(config, params, jax.random.key(1))
    adapter, _ = weighted_adapter([(low, config), (high, config)], [1.0, 1.0], "svd")
    assert adapter["q"]["lora_A"].dtype == adapter["q"]["lora_B"].dtype == jnp.bfloat16


# -- named adapters: a plain dict of (adapter, config) pairs ----------------------------------

def test_named_adapters_take_load_peft_pairs_and_name_the_misfit(adapters, params, tmp_path):
    adapter, config = adapters["two"]
    lora_jax.save_peft(tmp_path / "two", adapter, config, params)
    named = {"one": adapters["one"], "two": lora_jax.load_peft(tmp_path / "two", params)}
    targets = lora_jax.check_adapters(named, params)
    assert sorted(targets["two"]) == sorted(adapter) and targets["two"]["layers.0.k"].rank == 6
    assert targets["two"]["layers.0.q"].scaling == pytest.approx(16 / math.sqrt(8))  # its own rsLoRA
    mix, _ = weighted_adapter(named, [1.0, 1.0], "cat", params=params)
    assert sorted(mix) == sorted(set(adapters["one"][0]) | set(adapter))

    smaller = {"params": {**params["params"], "embed": {"embedding": jnp.zeros((VOCAB, 32))}}}
    with pytest.raises(ValueError, match=r"Adapter 'two' does not fit these params \(an adapter for another "
                                         r"base model\?\): adapter\['embed'\]\['lora_B'\] has shape \(8, 48\)"):
        lora_jax.check_adapters(named, smaller)
    with pytest.raises(TypeError, match=r"adapters\['one'\]: the adapter must be a dict"):
        lora_jax.check_adapters({"one": (list(adapter.values()), config)}, params)


def test_check_adapters_accepts_dora_token_and_converted_adapters():
    params = {"embed_tokens": {"embedding": jnp.ones((10, 4))}, "q": {"kernel": jnp.ones((4, 4))}}
    dora = lora_jax.LoraConfig(r=2, target_modules=["q"], use_dora=True, trainable_token_indices=[1, 3])
    adapter = lora_jax.init(dora, params, jax.random.key(0))
    assert list(lora_jax.check_adapters({"d": (adapter, dora)}, params)["d"]) == ["q"]
    broken = {**adapter, "embed_tokens": {"trainable_tokens": jnp.ones((3, 4))}}  # 3 rows for 2 token ids
    with pytest.raises(ValueError, match="Adapter 'd' does not fit these params"):
        lora_jax.check_adapters({"d": (broken, dora)}, params)
