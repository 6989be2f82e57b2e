"""The pipeline's private random generators: finding them (a few references deep from the pipeline's fields and
modules), saving and restoring their states, and reseeding them from the run's seed."""

from __future__ import annotations

import collections
import copy
import functools
import hashlib
import itertools
import random
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from ..contract import Pipeline
from .records import _module_containers, named_modules


# -- private random generators ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FoundGenerator:
    """A random generator reachable from the pipeline, and where: ``batches.generator``, ``step.g``, ..."""

    name: str
    generator: Any


def _generator_kind(value: Any) -> Optional[str]:
    import torch

    if isinstance(value, torch.Generator):
        return "torch"
    if isinstance(value, random.Random) and not isinstance(value, random.SystemRandom):  # SystemRandom has no state
        return "python"
    module = type(value).__module__ or ""
    if module.startswith("numpy.random"):
        import numpy as np

        if isinstance(value, np.random.Generator):
            return "numpy"
        if isinstance(value, np.random.RandomState):
            return "numpy-legacy"
    return None


def is_generator(value: Any) -> bool:
    """A torch.Generator, random.Random or numpy Generator/RandomState: what fmcheck can save, restore and reseed."""
    return _generator_kind(value) is not None


def _global_generators() -> set[int]:
    """The process-wide generators, which the snapshot covers as the global RNGs."""
    import numpy as np
    import torch

    ids = {id(torch.default_generator), id(random._inst), id(np.random.mtrand._rand)}  # type: ignore[attr-defined]
    ids.update(id(g) for g in getattr(torch.cuda, "default_generators", ()))
    return ids


_ATOMS = (str, bytes, int, float, complex, bool, type(None), type, types.ModuleType)
_CONTAINER_LIMIT = 64  # a list of ten thousand batches is not walked past its head


def find_generators(pipeline: Pipeline) -> list[FoundGenerator]:
    """The private random generators reachable from the pipeline, in a fixed order.

    Looked for, a few references deep and never through python modules or tensors: the explicit ``generators``
    field; ``batches`` (a DataLoader's ``generator``, its sampler's and batch sampler's, its dataset's attributes, or a
    batch factory's closure); the closure cells, defaults, named globals and bound object of ``step``, ``encode``,
    ``decode`` and ``pixels``; and the attributes of every module the pipeline names. A generator inside an object
    reached only through deeper or opaque references is not found: declare it in ``generators``.
    """
    import torch

    found: dict[int, FoundGenerator] = {}
    skip = _global_generators()

    def add(name: str, value: Any) -> None:
        if id(value) not in skip and id(value) not in found:
            found[id(value)] = FoundGenerator(name, value)

    declared = pipeline.generators
    items = declared.items() if isinstance(declared, Mapping) else enumerate(declared or ())
    for key, generator in items:
        add(f"generators[{key!r}]", generator)
    roots = [("batches", pipeline.batches, 3)]  # loader -> batch_sampler -> sampler -> generator
    roots += [(field, getattr(pipeline, field), 3) for field in ("step", "encode", "decode", "pixels")]
    roots += [(name, module, 2) for name, module in named_modules(pipeline)]
    visited: dict[int, int] = {}  # id -> the most depth left it was searched with
    for root in roots:
        # Breadth first, so that each generator is named by its shortest path ("batches.generator").
        queue = collections.deque([root])
        while queue:
            name, value, depth = queue.popleft()
            if _generator_kind(value) is not None:
                add(name, value)
                continue
            if depth <= 0 or isinstance(value, _ATOMS) or isinstance(value, torch.Tensor) \
                    or visited.get(id(value), -1) >= depth:
                continue
            visited[id(value)] = depth
            for child_name, child, cost in _references(name, value):
                if cost:
                    queue.append((child_name, child, depth - cost))
                else:
                    queue.appendleft((child_name, child, depth))
    return list(found.values())


def _references(name: str, value: Any) -> Iterator[tuple[str, Any, int]]:
    """What ``value`` refers to, for the generator search: (name, object, 1), or 0 for the same thing seen closer."""
    import torch

    if isinstance(value, types.FunctionType):
        code = value.__code__
        for var, cell in zip(code.co_freevars, value.__closure__ or ()):
            if _cell_filled(cell):
                yield f"{name}.{var}", cell.cell_contents, 1
        for index, default in enumerate(value.__defaults__ or ()):
            yield f"{name}.<default {index}>", default, 1
        for key, default in (value.__kwdefaults__ or {}).items():
            yield f"{name}.{key}", default, 1
        for global_name in _global_names(code):  # module-level objects the function names
            if global_name in value.__globals__:
                yield f"{name}.{global_name}", value.__globals__[global_name], 1
    elif isinstance(value, types.MethodType):
        yield name, value.__func__, 0
        yield name, value.__self__, 1
    elif isinstance(value, functools.partial):
        yield name, value.func, 0
        for index, arg in enumerate(value.args):
            yield f"{name}.<arg {index}>", arg, 1
        for key, arg in value.keywords.items():
            yield f"{name}.{key}", arg, 1
    elif isinstance(value, dict):  # plain containers only: a custom Mapping's items() may load data
        for key, item in itertools.islice(value.items(), _CONTAINER_LIMIT):
            yield f"{name}[{key!r}]", item, 1
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(itertools.islice(value, _CONTAINER_LIMIT)):
            yield f"{name}[{index}]", item, 1
    else:
        attributes = getattr(value, "__dict__", None)
        if isinstance(attributes, dict):
            # a module's own attributes, not its parameters, buffers, submodules or hooks
            internal = _module_containers() if isinstance(value, torch.nn.Module) else ()
            kept = ((k, v) for k, v in attributes.items() if k not in internal)
            for key, item in itertools.islice(kept, _CONTAINER_LIMIT):
                yield f"{name}.{key}", item, 1
        call = getattr(type(value), "__call__", None)
        if isinstance(call, types.FunctionType) and not isinstance(value, torch.nn.Module):
            yield name, call, 1  # a callable object: what its __call__ closes over


def _global_names(code: types.CodeType) -> list[str]:
    """The names a function's code looks up, its comprehensions' and nested functions' included."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += [n for n in _global_names(const) if n not in names]
    return names


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell: the variable is not assigned yet
        return False
    return True


def _rng_state(generator: Any) -> Any:
    kind = _generator_kind(generator)
    if kind == "torch":
        return generator.get_state()
    if kind == "python":
        return generator.getstate()
    if kind == "numpy":
        return copy.deepcopy(generator.bit_generator.state)
    return generator.get_state()


def _set_rng_state(generator: Any, state: Any) -> None:
    kind = _generator_kind(generator)
    if kind == "torch":
        generator.set_state(state)
    elif kind == "python":
        generator.setstate(state)
    elif kind == "numpy":
        generator.bit_generator.state = copy.deepcopy(state)
    else:
        generator.set_state(state)


def derived_seed(seed: int, salt: int, index: int) -> int:
    """A seed for the index-th private generator, a pure function of the run's seed and the salt."""
    digest = hashlib.blake2b(f"{seed}:{salt}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # non-negative and below 2**63


def reseed(generator: Any, seed: int) -> None:
    """Seed any generator :func:`find_generators` returns."""
    kind = _generator_kind(generator)
    if kind == "torch":
        generator.manual_seed(seed)
    elif kind == "python":
        generator.seed(seed)
    elif kind == "numpy":
        generator.bit_generator.state = type(generator.bit_generator)(seed).state
    else:
        generator.seed(seed % 2**32)
