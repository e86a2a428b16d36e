"""Teachers in bf16 / fp16 and on their own device: outputs near fp32, weights cast once, clear errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import TASKS, conv_net, quick_trainer, random_datamodule
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_mtkd import DistillationModule, SharedDistiller
from lightning_mtkd.callbacks import TeacherCache
from lightning_mtkd.teachers import Teachers

#: Largest error relative to the largest |fp32 output| (logits of a random conv net, and its trunk feature).
#: bf16 keeps 8 bits of mantissa (2^-8 ≈ 4e-3 per rounding), fp16 11 bits (≈ 5e-4), through a few layers.
TOLERANCE = {"bf16": 3e-2, "16": 4e-3}


def teacher_net(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return conv_net((8, 16), 32).eval()


def relative_error(value: Tensor, reference: Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_low_precision_outputs_and_features_are_float32_and_near_the_fp32_ones(precision):
    x = torch.randn(16, 1, 12, 12)
    reference = Teachers(teacher_net(), loader=None)
    reference.tap("teacher", ["backbone"])
    low = Teachers(teacher_net(), loader=None, precision=precision)
    low.tap("teacher", ["backbone"])
    assert all(p.dtype == low.dtype for p in low["teacher"].parameters())

    (ref_out, ref_features), (out, features) = reference.run(x)["teacher"], low.run(x)["teacher"]
    for task in ("left", "right"):
        assert out[task].dtype == torch.float32 and not out[task].is_inference()
        assert relative_error(out[task], ref_out[task]) < TOLERANCE[precision], task
        assert relative_error(out[task], ref_out[task]) > 0  # it did run in the lower precision
    assert features["backbone"].dtype == torch.float32
    assert relative_error(features["backbone"], ref_features["backbone"]) < TOLERANCE[precision]


class CopiesOf(TorchDispatchMode):
    """Counts the dtype/device copies (`_to_copy`) made of the given tensors."""

    def __init__(self, tensors: list[Tensor]) -> None:
        super().__init__()
        self.pointers = {t.data_ptr() for t in tensors}
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.pointers:
            self.copies += 1
        return func(*args, **(kwargs or {}))


class Watched(SharedDistiller):
    def setup(self, stage):
        super().setup(stage)
        self.counter = CopiesOf(list(self.teacher.parameters()))

    def training_step(self, batch, batch_idx):
        with self.counter:
            return super().training_step(batch, batch_idx)


def test_teacher_weights_are_cast_once_not_per_step(tmp_path):
    L.seed_everything(0)
    module = Watched(conv_net((2, 4), 8), teacher_net(), TASKS, teacher_precision="bf16")
    weights = {name: p for name, p in module.teacher.named_parameters()}
    assert {p.dtype for p in weights.values()} == {torch.bfloat16}
    pointers = {name: p.data_ptr() for name, p in weights.items()}
    quick_trainer(tmp_path, max_epochs=2).fit(module, random_datamodule())
    assert module.counter.copies == 0  # 8 steps, no copy of a teacher weight
    assert {name: p.data_ptr() for name, p in module.teacher.named_parameters()} == pointers
    assert all(p.dtype == torch.float32 for p in module.model.parameters())
    module.double()  # a move of the module leaves the teacher in its own dtype
    assert {p.dtype for p in module.teacher.parameters()} == {torch.bfloat16}
    assert module.hparams["teacher_precision"] == "bf16"


def test_low_precision_teacher_trains_a_student_close_to_the_fp32_one(tmp_path):
    def fit(precision):
        L.seed_everything(0)
        module = DistillationModule(conv_net((2, 4), 8), teacher_net(), TASKS, teacher_precision=precision)
        trainer = quick_trainer(tmp_path, max_epochs=1)
        trainer.fit(module, random_datamodule())
        return trainer.callback_metrics

    reference, low = fit("32"), fit("bf16")
    for key in ("train/left/kd", "val/left/kd", "val/loss"):
        torch.testing.assert_close(low[key], reference[key], rtol=2e-2, atol=2e-3, msg=key)
    assert low["val/left/teacher_acc"] == reference["val/left/teacher_acc"]


class DistanceNet(nn.Module):
    """A teacher that uses `torch.cdist`, which has no float16 kernel on CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.randn(10, 144))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        distances = torch.cdist(x.flatten(1), self.centres)
        return {"left": -distances, "right": -distances}


def test_an_op_without_a_float16_kernel_fails_with_an_error_naming_the_option(tmp_path):
    teachers = Teachers(DistanceNet(), loader=None, precision="16")
    with pytest.raises(RuntimeError, match=r"teacher_precision='16'.*cdist.*use teacher_precision='bf16' or '32'"):
        teachers.run(torch.randn(2, 1, 12, 12))
    out, _ = Teachers(DistanceNet(), loader=None, precision="32").run(torch.randn(2, 1, 12, 12))["teacher"]
    assert out["left"].dtype == torch.float32
    with pytest.raises(ValueError, match="teacher_precision must be one of"):
        Teachers(DistanceNet(), loader=None, precision="fp8")  # type: ignore[arg-type]


def test_a_teacher_on_its_own_device_stays_there_and_answers_on_the_inputs_device():
    """No second device here: a pinned teacher ignores the module's moves; outputs come back where inputs are."""
    module = DistillationModule(conv_net((2, 4), 8), teacher_net(), TASKS, teacher_device="cpu")
    module.double()
    assert {p.dtype for p in module.teacher.parameters()} == {torch.float32}
    assert {p.device.type for p in module.teacher.parameters()} == {"cpu"}
    inputs = torch.randn(4, 1, 12, 12, dtype=torch.float64)
    outputs = module.run_teachers({"input": inputs})["teacher"].outputs
    assert outputs["left"].dtype == torch.float32 and outputs["left"].device == inputs.device


def test_cache_files_of_fp32_and_bf16_teachers_are_kept_apart(tmp_path):
    directory = tmp_path / "cache"
    for precision in ("32", "bf16", "bf16"):
        L.seed_everything(0)
        module = DistillationModule(conv_net((2, 4), 8), teacher_net(), TASKS, teacher_precision=precision)
        cache = TeacherCache(storage="disk", cache_dir=str(directory), splits=["train"])
        quick_trainer(tmp_path, max_epochs=1, callbacks=[cache]).fit(module, random_datamodule())
    # One file per precision (the bf16 weights hash differently); the second bf16 run reused its file.
    assert len(list(directory.glob("train-*.bin"))) == 2
    assert cache.counts["train"] == {"cached": 4, "computed": 0}


def test_tapped_features_of_a_bf16_teacher_in_a_strategy_are_float32(tmp_path):
    L.seed_everything(0)
    module = SharedDistiller(conv_net((2, 4), 8), teacher_net(), TASKS, teacher_precision="bf16")
    quick_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(module, random_datamodule())
    teachers = module.run_teachers({"input": torch.randn(4, 1, 12, 12)})["teacher"]
    assert teachers.outputs["left"].dtype == torch.float32
    assert [f.dtype for f in teachers.features.values()] == [torch.float32]  # the hint's trunk feature
