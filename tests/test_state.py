"""The user's state after fmcheck is exactly what it was before, proven with a digest written here (not fmcheck's own
``state_digest``), on data loaders, private generators, held optimizer references and misbehaving plugin checks."""

from __future__ import annotations

import hashlib
import random
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fmcheck
import tiny
from conftest import run_cli
from fmcheck.api import Check, CheckDoc, Judgement
from fmcheck.config import Settings
from fmcheck.context import Context
from fmcheck.contract import coerce
from fmcheck.errors import PipelineError, UsageError
from fmcheck.registry import Registry
from fmcheck.runner import run
from fmcheck.verdict import ExitCode, Verdict

# -- an independent digest ---------------------------------------------------------------------------------------

GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks")


def _bytes(value) -> bytes:
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        return repr((tuple(data.shape), str(data.dtype), str(value.device))).encode() + raw
    if isinstance(value, np.ndarray):
        return value.tobytes()
    if isinstance(value, dict):
        return b"{" + b",".join(_bytes(k) + b":" + _bytes(v) for k, v in value.items()) + b"}"
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(_bytes(v) for v in value) + b"]"
    return repr(value).encode()


def _hash(value) -> str:
    return hashlib.sha256(_bytes(value)).hexdigest()[:16]


def _roots(pipeline: dict) -> dict[str, nn.Module]:
    trainable = pipeline["trainable"]
    roots = dict(trainable) if isinstance(trainable, dict) else {"model": trainable}
    roots.update({f"frozen:{k}": m for k, m in (pipeline.get("frozen") or {}).items()})
    return roots


def digest(pipeline: dict, generators=()) -> dict[str, str]:
    """One hash per kind of state, so that a failure names what changed."""
    parts: dict[str, list] = {k: [] for k in ("weights", "identity", "grads", "flags", "modes", "hooks", "attributes",
                                              "optimizer", "param_groups", "python", "numpy", "torch", "cuda",
                                              "generators", "global_hooks")}
    for root, module in _roots(pipeline).items():
        for name, p in module.named_parameters(remove_duplicate=False):
            parts["weights"].append((root, name, p))
            parts["identity"].append((root, name, id(p)))
            parts["grads"].append((root, name, None if p.grad is None else (id(p.grad), p.grad)))
            parts["flags"].append((root, name, p.requires_grad))
            parts["hooks"].append((root, name, list(p._backward_hooks or ())))
        for name, b in module.named_buffers(remove_duplicate=False):
            parts["weights"].append((root, name, b))
            parts["identity"].append((root, name, id(b)))
        for name, m in module.named_modules(remove_duplicate=False):
            parts["modes"].append((root, name, m.training))
            parts["identity"].append((root, name, id(m), type(m).__name__))
            parts["attributes"].append((root, name, sorted(vars(m))))
            parts["hooks"].append((root, name, [(k, list(v)) for k, v in sorted(vars(m).items())
                                                if "hook" in k and isinstance(v, dict)]))
    optimizer = pipeline.get("optimizer")
    if optimizer is not None:
        parts["param_groups"].append(id(optimizer.param_groups))
        for group in optimizer.param_groups:
            parts["param_groups"].append((id(group), id(group["params"]), [id(p) for p in group["params"]]))
            parts["optimizer"].append({k: v for k, v in group.items() if k != "params"})
        for param, state in optimizer.state.items():
            parts["optimizer"].append((id(param), id(state), {k: (id(v), v) if torch.is_tensor(v) else v
                                                             for k, v in state.items()}))
    parts["python"].append(random.getstate())
    parts["numpy"].append(list(np.random.get_state()))
    parts["torch"].append(torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        parts["cuda"].append(torch.cuda.get_rng_state_all())
    parts["generators"] = [g.get_state() for g in generators]
    home = sys.modules["torch.nn.modules.module"]
    parts["global_hooks"] = [list(getattr(home, name)) for name in GLOBAL_HOOKS]
    return {kind: _hash(values) for kind, values in parts.items()}


def changed(before: dict, after: dict) -> list[str]:
    return [kind for kind in before if before[kind] != after[kind]]


# -- pipelines -----------------------------------------------------------------------------------------------------

def collate(items):
    return {"q": torch.stack([q for q, _ in items]), "x1": torch.stack([x1 for _, x1 in items])}


def with_loader(generator=None) -> dict:
    """tiny's pipeline reading its data through DataLoader(shuffle=True), the most common data source."""
    pipeline = tiny.build()
    q = torch.cat([b["q"] for b in pipeline["batches"]])
    x1 = torch.cat([b["x1"] for b in pipeline["batches"]])
    pipeline["batches"] = DataLoader(TensorDataset(q, x1), batch_size=32, shuffle=True, generator=generator,
                                     collate_fn=collate)
    return pipeline


def with_private_generator(generator: torch.Generator) -> dict:
    """A step that draws its t and noise from a torch.Generator in its closure, not from the global RNG."""
    pipeline = tiny.build()
    pipeline["step"] = make_step(pipeline["trainable"]["head"], pipeline["trainable"]["velocity"], generator)
    return pipeline


def make_step(head: nn.Module, velocity: nn.Module, generator=None):
    def step(batch, step_index):
        mu, logvar = head(batch["q"])
        logvar = logvar.clamp(-6, 6)
        eps = torch.randn(mu.shape, generator=generator)
        x0 = mu + torch.exp(0.5 * logvar) * eps
        t = torch.rand(x0.shape[0], generator=generator)
        xt = (1 - t[:, None]) * x0 + t[:, None] * batch["x1"]
        v_target = (batch["x1"] - x0).detach()
        v_pred = velocity(xt, t, batch["q"])
        fm_loss = ((v_pred - v_target) ** 2).mean()
        return {"loss": fm_loss, "x0": x0, "x1": batch["x1"], "t": t, "xt": xt, "v_target": v_target,
                "v_pred": v_pred, "fm_loss": fm_loss}

    return step


def trained_a_little(pipeline: dict, steps: int = 2) -> dict:
    """Optimizer state and gradients exist, as they do in a script that calls fmcheck mid-way."""
    for index, batch in enumerate(pipeline["batches"]):
        if index >= steps:
            break
        pipeline["optimizer"].zero_grad()
        pipeline["step"](batch, index)["loss"].backward()
        pipeline["optimizer"].step()
    return pipeline


def seed_globals(seed: int = 123) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- checks that misbehave, and one that looks ---------------------------------------------------------------------

DOC = CheckDoc(what="test", why="test", bug_example="test", fix="test")


def _misbehave(ctx) -> None:
    """Everything the runner must undo: trained weights, modes, flags, lr, every RNG, a swapped Parameter, a hook."""
    pipeline = ctx.pipeline
    velocity = pipeline.trainable["velocity"]
    with torch.no_grad():
        for p in velocity.parameters():
            p.mul_(2)
    velocity.eval()
    for p in pipeline.trainable["head"].parameters():
        p.requires_grad_(False)
        p.grad = torch.ones_like(p)
    pipeline.optimizer.param_groups[0]["lr"] = 123.0
    random.random(), np.random.rand(), torch.rand(3)
    velocity.net[2].weight = nn.Parameter(torch.zeros_like(velocity.net[2].weight))
    velocity.net.register_forward_hook(lambda module, args, output: output * 0)
    velocity.net.scratch = "left here"


class Misbehaves(Check):
    id, title, purpose, doc, order = "t_misbehave", "misbehaves (test)", "test-only check that leaves a mess", DOC, 1
    requires = ("optimizer",)

    def measure(self, ctx):
        _misbehave(ctx)
        return 1.0

    def judge(self, obs, th):
        return Judgement([], "all fine, says the plugin")


class Observes(Check):
    """Runs after another check and records what it sees: the user's modules must be as built."""

    id, title, purpose, doc, order = "t_observe", "observes (test)", "test-only check that looks at the state", DOC, 9
    pipeline_dict: dict = {}  # set by the test: the user's pipeline dict, for the digest
    seen: dict = {}  # what measure() saw, for the test to read

    def measure(self, ctx):
        velocity = ctx.pipeline.trainable["velocity"]
        with torch.no_grad():
            out = velocity.net(torch.ones(2, velocity.net[0].in_features))
        return {"digest": digest(Observes.pipeline_dict), "output_sum": float(out.abs().sum()),
                "hooks": len(velocity.net._forward_hooks)}

    def judge(self, obs, th):
        Observes.seen = obs
        return Judgement([], "looked")


def _failing(name: str, error):
    class Failing(Check):
        id, title, purpose, doc, order = name, name, "test-only check that misbehaves then stops", DOC, 2
        requires = ("optimizer",)

        def measure(self, ctx):
            _misbehave(ctx)
            error()

        def judge(self, obs, th):  # pragma: no cover - never reached
            return Judgement([], "unreachable")

    return Failing


def _hang():
    while True:  # ends only when the runner's --timeout fires
        torch.rand(1)


def _raise(exc):
    def raiser():
        raise exc
    return raiser


Raises = _failing("t_mess_raise", _raise(RuntimeError("plugin bug")))
Hangs = _failing("t_mess_hang", _hang)
Interrupted = _failing("t_mess_interrupt", _raise(KeyboardInterrupt()))


class GlobalHook(Check):
    id, title, purpose, doc, order = "t_global_hook", "global hook (test)", "leaves global hooks and switches", DOC, 3

    def measure(self, ctx):
        nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
        ctx.pipeline.trainable["head"].net[0].weight.register_hook(lambda grad: grad * 0)
        torch.set_grad_enabled(False)
        torch.set_default_dtype(torch.float64)
        return 1.0

    def judge(self, obs, th):
        return Judgement([], "fine")


class Casts(Check):
    id, title, purpose, doc, order = "t_cast", "casts (test)", "casts the model to float64 and back to half", DOC, 4

    def measure(self, ctx):
        ctx.pipeline.trainable["velocity"].double()
        ctx.pipeline.trainable["head"].half()
        return 1.0

    def judge(self, obs, th):
        return Judgement([], "fine")


def registry_of(*checks) -> Registry:
    registry = Registry()
    for cls in checks:
        registry.add(cls, name=cls.id, target=f"test_state:{cls.__name__}", distribution="tests")
    return registry


# -- the digest itself ---------------------------------------------------------------------------------------------

def test_the_digest_sees_every_kind_of_change():
    """Every equality below is only as good as this digest: each mutation must show in its own part."""
    gen = torch.Generator().manual_seed(0)
    pipeline = trained_a_little(tiny.build())
    velocity, optimizer = pipeline["trainable"]["velocity"], pipeline["optimizer"]
    param = velocity.net[0].weight
    mutations = {
        "weights": lambda: param.data.add_(1e-7),
        "identity": lambda: setattr(velocity.net[2], "weight", nn.Parameter(velocity.net[2].weight.detach().clone())),
        "grads": lambda: setattr(param, "grad", param.grad.clone()),
        "flags": lambda: param.requires_grad_(False),
        "modes": lambda: velocity.net[1].eval(),
        "hooks": lambda: velocity.net.register_forward_pre_hook(lambda module, args: None),
        "attributes": lambda: setattr(velocity, "note", 1),
        "optimizer": lambda: optimizer.param_groups[0].__setitem__("lr", 0.5),
        "param_groups": lambda: optimizer.load_state_dict(optimizer.state_dict()),
        "python": lambda: random.random(),
        "numpy": lambda: np.random.rand(),
        "torch": lambda: torch.rand(1),
        "generators": lambda: torch.rand(1, generator=gen),
        "global_hooks": lambda: nn.modules.module.register_module_forward_pre_hook(lambda module, args: None),
    }
    handles = []
    for kind, mutate in mutations.items():
        before = digest(pipeline, [gen])
        handles.append(mutate())
        assert kind in changed(before, digest(pipeline, [gen])), kind
    handles[-1].remove()
    # the optimizer's per-parameter state too
    before = digest(pipeline, [gen])
    next(iter(optimizer.state.values()))["exp_avg"].add_(1)
    assert changed(before, digest(pipeline, [gen])) == ["optimizer"]


# -- nothing is drawn before the snapshot --------------------------------------------------------------------------

def test_validation_draws_nothing_from_a_shuffled_loader():
    gen = torch.Generator().manual_seed(3)
    for generator in (None, gen):
        pipeline = with_loader(generator)
        seed_globals()
        before = digest(pipeline, [gen])
        coerce(pipeline)
        assert changed(before, digest(pipeline, [gen])) == []


def test_an_iterator_is_still_refused_without_being_started():
    started = []

    def batches():
        started.append(True)
        yield tiny.build()["batches"][0]

    pipeline = tiny.build()
    pipeline["batches"] = batches()
    with pytest.raises(PipelineError, match="iterator, which is exhausted"):
        coerce(pipeline)
    assert not started


# -- the audit's cases, through the public API ---------------------------------------------------------------------

def test_shuffled_data_loader_leaves_every_rng_as_it_was():
    pipeline = trained_a_little(with_loader())
    seed_globals()
    before = digest(pipeline)
    report = fmcheck.run(pipeline, ["norms", "target"])
    assert {c.verdict for c in report.checks} == {Verdict.PASS}
    assert changed(before, digest(pipeline)) == []


def test_a_data_loaders_own_generator_is_restored_and_reported():
    gen = torch.Generator().manual_seed(7)
    pipeline = trained_a_little(with_loader(gen))
    seed_globals()
    before = digest(pipeline, [gen])
    report = fmcheck.run(pipeline, ["norms", "target"])
    assert report.generators == ["batches.generator"]
    assert changed(before, digest(pipeline, [gen])) == []


def test_a_generator_in_the_steps_closure_is_restored_and_reported():
    gen = torch.Generator().manual_seed(11)
    pipeline = trained_a_little(with_private_generator(gen))
    seed_globals()
    before = digest(pipeline, [gen])
    report = fmcheck.run(pipeline, ["norms", "target"])
    assert report.generators == ["step.generator"]
    assert changed(before, digest(pipeline, [gen])) == []


def test_preflight_at_the_top_of_a_training_script_changes_nothing_the_script_does_next():
    """The end-to-end form of the promise: training after preflight is bit-identical to training without it."""
    def script(call_preflight: bool):
        seed_globals(5)
        gen = torch.Generator().manual_seed(9)
        pipeline = with_private_generator(gen)
        pipeline["batches"] = with_loader(torch.Generator().manual_seed(4))["batches"]
        if call_preflight:
            fmcheck.preflight(pipeline, ["norms"])
        trained_a_little(pipeline, steps=3)
        return [p.detach().clone() for m in pipeline["trainable"].values() for p in m.parameters()], gen.get_state()

    with_check, without = script(True), script(False)
    assert all(torch.equal(a, b) for a, b in zip(with_check[0], without[0]))
    assert torch.equal(with_check[1], without[1])


def test_a_held_param_group_stays_the_optimizers():
    pipeline = trained_a_little(tiny.build())
    optimizer = pipeline["optimizer"]
    group, params = optimizer.param_groups[0], optimizer.param_groups[0]["params"]
    first = params[0]
    exp_avg = optimizer.state[first]["exp_avg"]
    before = digest(pipeline)
    run(coerce(pipeline), registry=registry_of(Misbehaves))
    assert changed(before, digest(pipeline)) == []
    assert optimizer.param_groups[0] is group and group["params"] is params
    assert optimizer.state[first]["exp_avg"] is exp_avg
    # The user's training loop writes through its reference: the optimizer must obey.
    group["lr"] = 0.0
    weights = [p.detach().clone() for p in params]
    optimizer.zero_grad()
    pipeline["step"](pipeline["batches"][0], 0)["loss"].backward()
    optimizer.step()
    assert all(torch.equal(w, p) for w, p in zip(weights, params))


def test_a_misbehaving_plugin_is_an_error_naming_what_it_left_and_the_next_check_sees_clean_state():
    pipeline = trained_a_little(tiny.build())
    Observes.pipeline_dict = pipeline
    seed_globals()
    before = digest(pipeline)
    velocity = pipeline["trainable"]["velocity"]
    with torch.no_grad():
        clean_output = float(velocity.net(torch.ones(2, velocity.net[0].in_features)).abs().sum())
    seed_globals()
    report = run(coerce(pipeline), registry=registry_of(Misbehaves, Observes))
    mess = report.check("t_misbehave")
    assert mess.verdict is Verdict.ERROR
    assert "left a forward hook on velocity.net" in mess.summary
    assert "replaced parameter velocity.net.2.weight" in mess.summary
    assert "added attribute velocity.net.scratch" in mess.summary
    assert mess.summary.endswith("restored")
    assert "its own verdict was PASS" in mess.hint
    assert report.exit_code == ExitCode.ERROR
    # the next check saw the modules as built: same weights, same objects, no hook (the RNGs are fmcheck's to seed)
    seen = Observes.seen
    assert report.check("t_observe").verdict is Verdict.PASS
    assert seen["hooks"] == 0 and seen["output_sum"] == clean_output
    assert {k: v for k, v in seen["digest"].items() if k not in ("python", "numpy", "torch")} == \
        {k: v for k, v in before.items() if k not in ("python", "numpy", "torch")}
    assert changed(before, digest(pipeline)) == []


@pytest.mark.parametrize("check, settings, summary", [
    (Raises, Settings(), "check crashed: RuntimeError: plugin bug"),
    (Hangs, Settings(timeout=0.3), "timed out after 0.3 s"),
    (Interrupted, Settings(), "interrupted"),
], ids=["raises", "times-out", "interrupted"])
def test_a_check_that_misbehaves_then_fails_is_undone(check, settings, summary):
    pipeline = trained_a_little(tiny.build())
    Observes.pipeline_dict = pipeline
    seed_globals()
    before = digest(pipeline)
    Observes.seen = None
    report = run(coerce(pipeline), settings, registry=registry_of(check, Observes))
    result = report.check(check.id)
    assert result.verdict is Verdict.ERROR and result.summary.startswith(summary)
    assert changed(before, digest(pipeline)) == []
    if check is Interrupted:
        assert report.interrupted and report.check("t_observe").verdict is Verdict.SKIP
    else:
        assert Observes.seen["hooks"] == 0


def test_global_hooks_tensor_hooks_and_torch_switches_are_named_and_undone():
    pipeline = tiny.build()
    before = digest(pipeline)
    report = run(coerce(pipeline), registry=registry_of(GlobalHook))
    result = report.check("t_global_hook")
    assert result.verdict is Verdict.ERROR
    left = result.details["left_behind"]
    assert "left a global forward hook (torch.nn.modules.module)" in left
    assert "left a gradient hook on parameter head.net.0.weight" in left
    assert "changed the torch setting autograd from True to False" in left
    assert "changed the torch setting default dtype from torch.float32 to torch.float64" in left
    assert changed(before, digest(pipeline)) == []
    assert torch.is_grad_enabled() and torch.get_default_dtype() == torch.float32


def test_a_cast_is_undone_bit_for_bit():
    pipeline = trained_a_little(tiny.build())
    before = digest(pipeline)
    report = run(coerce(pipeline), registry=registry_of(Casts))
    assert report.check("t_cast").verdict is Verdict.PASS  # casting in place swaps no object
    assert changed(before, digest(pipeline)) == []
    assert all(p.dtype == torch.float32 for m in pipeline["trainable"].values() for p in m.parameters())


class LazyCache(nn.Module):
    """Builds a cache attribute and a buffer on its first forward, as rotary embeddings and masks often do."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, xt, t, q):
        if not hasattr(self, "cache"):
            self.cache = torch.ones(1)
            self.register_buffer("table", torch.arange(3.0), persistent=False)
        return self.inner(xt, t, q)


def test_what_the_users_own_forward_builds_is_not_blamed_on_a_check():
    pipeline = tiny.build()
    head, lazy = pipeline["trainable"]["head"], LazyCache(pipeline["trainable"]["velocity"])
    pipeline.update(trainable={"head": head, "velocity": lazy}, velocity=lazy, step=make_step(head, lazy))
    lazy.inner.register_forward_pre_hook(lambda module, args: None)  # the user's own hook stays
    before = digest(pipeline)
    report = fmcheck.run(pipeline, ["norms", "target", "structure"])
    assert Verdict.ERROR not in {c.verdict for c in report.checks}, [c.summary for c in report.checks]
    assert changed(before, digest(pipeline)) == []


def test_built_in_checks_leave_nothing_behind():
    pipeline = trained_a_little(tiny.build())
    seed_globals()
    before = digest(pipeline)
    report = fmcheck.run(pipeline, ["norms", "target", "kl", "structure"])
    assert Verdict.ERROR not in {c.verdict for c in report.checks}, [c.summary for c in report.checks]
    assert changed(before, digest(pipeline)) == []


# -- private generators: declared, reseeded, out of reach ----------------------------------------------------------

class Box:
    """An object fmcheck does not look into (no __dict__): the documented limit of the search."""

    __slots__ = ("generator",)

    def __init__(self, generator):
        self.generator = generator


def boxed_pipeline(box: Box) -> dict:
    pipeline = tiny.build()
    step = pipeline["step"]

    def boxed_step(batch, index):
        torch.rand(1, generator=box.generator)
        return step(batch, index)

    pipeline["step"] = boxed_step
    return pipeline


def test_a_generator_fmcheck_cannot_see_is_advanced_unless_declared():
    gen = torch.Generator().manual_seed(1)
    pipeline = boxed_pipeline(Box(gen))
    before = gen.get_state()
    report = fmcheck.run(pipeline, ["norms"])
    assert report.generators == [] and not torch.equal(before, gen.get_state())  # the limit docs/reliability.md states

    gen = torch.Generator().manual_seed(1)
    pipeline = boxed_pipeline(Box(gen))
    pipeline["generators"] = {"noise": gen}
    before = digest(pipeline, [gen])
    report = fmcheck.run(pipeline, ["norms"])
    assert report.generators == ["generators['noise']"]
    assert changed(before, digest(pipeline, [gen])) == []


@pytest.mark.parametrize("value, message", [
    (3, "'generators': expected a mapping"),
    ({"noise": 3}, "'generators['noise']': expected a torch.Generator"),
    ([torch.Generator(), "x"], "'generators[1]': expected a torch.Generator"),
])
def test_the_generators_field_is_validated(value, message):
    pipeline = tiny.build()
    pipeline["generators"] = value
    with pytest.raises(PipelineError) as info:
        coerce(pipeline)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_seed_everything_reseeds_each_private_generator_with_its_own_seed():
    first, second = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    py, npg = random.Random(0), np.random.default_rng(0)
    pipeline = tiny.build()
    step = pipeline["step"]
    pipeline["step"] = lambda batch, index: step(batch, index) if (first, second, py, npg) else None
    pipeline = coerce(pipeline)
    ctx = Context(pipeline, Settings(seed=3), torch.device("cpu"))
    assert sorted(f.name for f in ctx.private_generators) == ["step.first", "step.npg", "step.py", "step.second"]

    def draws():
        return (torch.rand(4, generator=first), torch.rand(4, generator=second), py.random(), npg.random())

    ctx.seed_everything(salt=5)
    a = draws()
    ctx.seed_everything(salt=5)
    b = draws()
    ctx.seed_everything(salt=6)
    c = draws()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]  # replayed
    assert not torch.equal(a[0], c[0]) and a[2] != c[2]  # another salt, other numbers
    assert not torch.equal(a[0], a[1])  # two generators, two streams


def test_torchs_queued_cuda_seed_is_left_as_the_user_set_it():
    """On a machine where CUDA is not initialised, torch.manual_seed queues the CUDA seed for later: keep the user's."""
    tracker = torch.cuda._lazy_seed_tracker
    if torch.cuda.is_initialized():
        pytest.skip("CUDA is initialised: nothing is queued")
    pipeline = tiny.build()
    torch.manual_seed(42)
    queued = tracker.manual_seed_all_cb
    fmcheck.run(pipeline, ["norms"])
    assert tracker.manual_seed_all_cb is queued


# -- modules fmcheck cannot run on: one line, exit code 2 ----------------------------------------------------------

def test_a_module_on_the_meta_device_is_one_line_naming_it():
    pipeline = tiny.build()
    pipeline["trainable"]["velocity"].to("meta")
    with pytest.raises(PipelineError) as info:
        fmcheck.run(pipeline, ["norms"])
    message = str(info.value)
    assert "module 'velocity.net.0' is on the meta device" in message and "\n" not in message


def test_mps_where_there_is_none_is_one_line():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(UsageError, match="--device mps: MPS is not available on this machine"):
        fmcheck.run(tiny.build(), ["norms"], device="mps")


@pytest.mark.parametrize("source, args, message", [
    ("import tiny\ndef build():\n    d = tiny.build()\n    d['trainable']['velocity'].to('meta')\n    return d",
     [], "is on the meta device"),
    ("import tiny\ndef build():\n    return tiny.build()", ["--device", "mps"], "MPS is not available"),
], ids=["meta", "mps"])
def test_the_cli_says_it_in_one_line_with_exit_code_2(tmp_path, source, args, message):
    if "mps" in args and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    (tmp_path / "devices_case.py").write_text(textwrap.dedent(source) + "\n")
    done = run_cli("norms", "--module", "devices_case:build", *args, cwd=tmp_path)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, output
    assert message in output and "Traceback" not in output and len(output.splitlines()) == 1, output


def test_the_console_report_names_the_generators_it_restored(tmp_path):
    (tmp_path / "loader_case.py").write_text(textwrap.dedent("""
        import torch
        from test_state import with_loader

        def build():
            return with_loader(torch.Generator().manual_seed(0))
    """))
    done = run_cli("norms", "--module", "loader_case:build", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "random generators restored batches.generator" in done.stdout


def test_restores_during_a_run_go_into_the_buffers_a_device_move_created():
    """Moving a module (--device) re-creates its buffers: the restores between checks write into those, and the
    final restore, after the move back, puts the user's own buffer objects back."""
    from fmcheck.state import StateSnapshot

    pipeline = tiny.build()
    norm = nn.BatchNorm1d(4)
    norm(torch.randn(16, 4))  # running statistics that are not the initial ones
    pipeline["frozen"] = {"norm": norm}
    before = digest(pipeline)
    original = norm.running_mean
    snapshot = StateSnapshot(coerce(pipeline))
    norm._apply(lambda t: t.clone())  # what module.to(another device) does to buffers
    moved = norm.running_mean
    assert moved is not original
    during = snapshot.rebound()
    norm(torch.randn(16, 4))  # a check runs the module in train mode: statistics move
    during.restore()
    assert norm.running_mean is moved and torch.equal(moved, original)
    snapshot.restore()
    assert norm.running_mean is original
    assert changed(before, digest(pipeline)) == []


def test_what_the_step_does_outside_the_modules_is_not_undone(tmp_path):
    """The limits docs/reliability.md states: a list the step appends to, a file it writes, stay as the step left them."""
    pipeline = tiny.build()
    step, log = pipeline["step"], []

    def logging_step(batch, index):
        log.append(index)
        (tmp_path / "step.log").write_text(f"{index}\n")
        return step(batch, index)

    pipeline["step"] = logging_step
    fmcheck.run(pipeline, ["norms"])
    assert log and (tmp_path / "step.log").exists()


GLOBAL_NOISE = torch.Generator().manual_seed(2)


class Trainer:
    def __init__(self, pipeline):
        self.inner = pipeline["step"]
        self.rng = np.random.default_rng(0)

    def step(self, batch, index):
        return self.inner(batch, index)


def test_where_fmcheck_looks_for_generators():
    """The places docs/reliability.md lists; the process-wide generators and SystemRandom are not private ones."""
    import functools

    from fmcheck.state import find_generators

    pipeline = tiny.build()
    velocity = pipeline["trainable"]["velocity"]
    velocity.dropout_rng = torch.Generator().manual_seed(3)  # a module attribute
    trainer = Trainer(pipeline)
    pipeline["step"] = trainer.step  # a bound method: its object's attributes
    pipeline["encode"] = functools.partial(lambda x, generator: x, generator=random.Random(1))

    def decode(z):
        return [torch.rand(1, generator=GLOBAL_NOISE) for _ in range(2)]  # a module-level name, in a comprehension

    pipeline["decode"] = decode
    pipeline["pixels"] = lambda batch, g=torch.default_generator, s=random.SystemRandom(): batch["x1"]
    names = [found.name for found in find_generators(coerce(pipeline))]
    assert names == ["step.rng", "encode.generator", "decode.GLOBAL_NOISE", "velocity.dropout_rng"]
