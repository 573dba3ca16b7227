"""Every ``Example:`` block in lora_jax's docstrings runs as a doctest.

A docstring that shows an example writes it as ``>>>`` lines that run on their own
(tiny shapes, no files outside a temporary directory, no network), so the examples
cannot drift from the code.
"""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import lora_jax

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(lora_jax.__path__, prefix="lora_jax.")
    if not info.name.endswith("__main__")
)


def _docstrings(module):
    """(qualified name, docstring) for the module and everything defined in it."""
    yield module.__name__, module.__doc__ or ""
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            yield f"{module.__name__}.{name}", obj.__doc__ or ""
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    member = getattr(member, "__func__", member)
                    if inspect.isfunction(member) or isinstance(member, property):
                        yield f"{module.__name__}.{name}.{attr}", member.__doc__ or ""


@pytest.mark.parametrize("module_name", MODULES)
def test_examples_run_as_doctests(module_name):
    module = importlib.import_module(module_name)
    not_runnable = [name for name, doc in _docstrings(module)
                    if "Example:" in doc and ">>>" not in doc]
    assert not not_runnable, f"Example blocks without >>> lines (they would never run): {not_runnable}"
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name):  # each example sees a copy of its module's globals
        runner.run(test)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, f"{failed} of {attempted} doctest examples in {module_name} failed (see output above)"
