"""A training step never makes the host wait for the device: after the first batch of an epoch, no
callback, metric, augmentation or loader reads a tensor's value back to the host until the epoch
ends. On a GPU each such read (``.item()``, ``float(t)``, ``bool(t)``, ``.cpu()``, ``.tolist()``,
``.numpy()``) waits for every queued kernel, so the host stops queueing the next step's work while
the GPU computes. On the CPU nothing waits, so the test counts the reads themselves, during real fits
through the training door with the command line's progress bar, worker processes and augmentation.
(``bench/gpu.py`` checks the same on a GPU with ``torch.cuda.set_sync_debug_mode("error")``.)"""
from __future__ import annotations

import io
import traceback
import weakref

import pytest
import torch
from fastai.callback.core import Callback
from rich.console import Console
from torch.utils._python_dispatch import TorchDispatchMode

from hpa_fastai.config import TrainConfig

from .helpers import train

pytestmark = pytest.mark.slow

READ_METHODS = ("cpu", "numpy", "tolist")  # the reads that do not pass torch's dispatcher on a CPU tensor


def _where() -> str:
    """The innermost frames of the read outside this file and torch itself: who read."""
    frames = [f for f in traceback.extract_stack()[:-3] if "/torch/" not in f.filename and __file__ != f.filename]
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in frames[-6:][::-1])


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values by the host while ``active``: every ``_local_scalar_dense`` (what
    ``item``, ``bool``, ``float`` and ``int`` of a tensor run) and every ``cpu``, ``numpy`` and
    ``tolist`` call. A tensor that is the target of a non-blocking copy is a host buffer (on a GPU,
    page-locked memory the copy fills without stopping the host): reading it waits for nothing."""

    def __init__(self):
        super().__init__()
        self.active, self.phase, self.reads = False, "", []
        self._host_buffers: dict[int, weakref.ref] = {}
        self._saved = {}

    def _is_host_buffer(self, t) -> bool:
        ref = self._host_buffers.get(id(t))
        return ref is not None and ref() is t

    def _record(self, what: str, t) -> None:
        if self.active and not self._is_host_buffer(t):
            self.reads.append(f"{self.phase}: {what} at {_where()}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default and kwargs.get("non_blocking", args[2] if len(args) > 2 else False):
            self._host_buffers[id(args[0])] = weakref.ref(args[0])
        if func is torch.ops.aten._local_scalar_dense.default:
            self._record("item/bool/float", args[0])
        return func(*args, **kwargs)

    def __enter__(self):
        for name in READ_METHODS:
            real = self._saved[name] = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, _name=name, **k):
                self._record(_name, t)
                return _real(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
        return super().__exit__(*exc)


class _CountFrom(Callback):
    """Counts from the end of each epoch's first batch (of training and of validation) to the end of
    that pass: runs last after a batch, first after the pass."""

    order = 10_000

    def __init__(self, probe: HostReads):
        self.probe = probe

    def after_batch(self):
        if self.iter == 0:
            self.probe.active = True
            self.probe.phase = f"{'training' if self.training else 'validation'} epoch {self.epoch + 1}"


class _StopCounting(Callback):
    order = -10_000

    def __init__(self, probe: HostReads):
        self.probe = probe

    def after_train(self):
        self.probe.active = False

    def after_validate(self):
        self.probe.active = False


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_no_training_or_validation_batch_reads_the_device_after_the_first(make_hpa2018, tmp_path, precision):
    from hpa_fastai.cli.epochs import EpochProgress

    data = make_hpa2018(n=40, size=32)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "runs"), arch="cnn", epochs=2, bs=4, lr="1e-3",
                      pretrained=False, seed=0, workers=2, precision=precision, size=32)
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)  # the live bar, advanced every batch
    probe = HostReads()
    with probe:
        run_dir = train(cfg, cbs=[_CountFrom(probe), _StopCounting(probe), EpochProgress(terminal)])
    assert probe.reads == [], "\n".join(sorted(set(probe.reads)))
    assert (run_dir / "model.safetensors").is_file()
    assert "epoch 2" in terminal.file.getvalue()  # the bar was drawn, batch after batch


def test_the_probe_counts_what_fastais_own_callbacks_read(make_hpa2018, tmp_path):
    """fastai's Recorder, as it is, copies each training batch's loss to the host: the probe sees it."""
    from fastai.learner import AvgSmoothLoss

    from hpa_fastai.training import learner

    real = learner.create_learner

    def fastais_recorder(*args, **kwargs):
        learn, setup = real(*args, **kwargs)
        learn.recorder.smooth_loss = AvgSmoothLoss()
        return learn, setup

    data = make_hpa2018(n=24, size=32)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "runs"), arch="cnn", epochs=1, bs=4, lr="1e-3",
                      pretrained=False, seed=0, size=32)
    probe = HostReads()
    with pytest.MonkeyPatch.context() as mp, probe:
        mp.setattr(learner, "create_learner", fastais_recorder)
        train(cfg, cbs=[_CountFrom(probe), _StopCounting(probe)])
    training = [r for r in probe.reads if r.startswith("training")]
    assert training and all(": cpu at" in r and "learner.py" in r and "accumulate" in r for r in training), training[:5]
