"""Snapshot and exact restore of the user's training state, around the whole run and around each check.

The runner takes one :class:`StateSnapshot` before anything touches the pipeline and puts it back after the probe,
after every check (whatever happened inside it) and at the end of the run. What it holds:

- Every module the pipeline names (``trainable``, ``frozen``, ``vae``, ``velocity``) and all their submodules:
  parameter and buffer values, restored in place into the same tensor objects (a dtype or shape a check changed is put
  back too); gradients, into the same ``.grad`` tensors; ``requires_grad`` flags; hooks on the parameters themselves
  (``Tensor.register_hook``, post-accumulate-grad hooks). And, shallowly, each module object: its class, which
  attributes it has and which objects they hold, which Parameter, buffer and submodule objects it holds, its hook
  dicts (forward, backward, state-dict, ... as the installed torch has them) and its train/eval mode.
- torch's global module hooks and global optimizer hooks, and its process-wide switches (autograd on or off, the
  default dtype, deterministic algorithms, anomaly detection, float32 matmul precision, cuDNN and TF32 flags).
- The optimizer: the same ``param_groups`` list holding the same group dicts (values restored into them, the same
  ``params`` lists), so a group a user holds stays the optimizer's; ``defaults``; the per-parameter ``state``, into the
  same dicts and tensors; its hooks and attributes.
- Objects the pipeline names that have ``state_dict`` / ``load_state_dict`` (:data:`EXTRA_STATEFUL`).
- The python, numpy and torch global RNGs; CUDA's (when CUDA is in use); the seeds torch queues for CUDA/XPU
  devices it has not initialised yet; and the private random generators :func:`find_generators` reaches from the
  pipeline (torch.Generator, random.Random, numpy Generator/RandomState).

Tensors are copied to host memory, so a snapshot costs no accelerator memory; the structure (identities, key sets)
is recorded by reference and costs next to nothing. Not captured, and said so in docs/reliability.md: generators
fmcheck cannot reach, the contents of the user's own containers held as attributes (lists, dicts), files the step
writes, CUDA graphs, data-loader worker processes and streams that keep their own position.

:meth:`StateSnapshot.leftovers` names what a check left behind that a check must not (a hook, a swapped Parameter or
submodule, an added or removed attribute): the runner turns that check's result into ERROR.
"""

from .digest import state_digest
from .generators import FoundGenerator, derived_seed, find_generators, is_generator, reseed
from .records import named_modules
from .snapshot import EXTRA_STATEFUL, StateSnapshot

__all__ = ["EXTRA_STATEFUL", "FoundGenerator", "StateSnapshot", "derived_seed", "find_generators", "is_generator",
           "named_modules", "reseed", "state_digest"]
