"""`lightning-mtkd export`: the student alone, dynamic batch, named outputs, same numbers as PyTorch."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from conftest import TASKS, conv_net, quick_trainer, random_datamodule

from lightning_mtkd import MultiTaskModule, SharedDistiller
from lightning_mtkd.cli import main
from lightning_mtkd.export import export_checkpoint


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory):
    """A SharedDistiller (with a hint adaptor) trained a few steps from a checkpointed teacher; path and module."""
    tmp_path = tmp_path_factory.mktemp("export")
    L.seed_everything(0)
    teacher = MultiTaskModule(conv_net((8, 16), 32), TASKS)
    trainer = quick_trainer(tmp_path, max_steps=2)
    trainer.fit(teacher, random_datamodule())
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    module = SharedDistiller(conv_net(), str(tmp_path / "teacher.ckpt"), TASKS)
    trainer = quick_trainer(tmp_path, max_steps=3)
    trainer.fit(module, random_datamodule())
    path = str(tmp_path / "student.ckpt")
    trainer.save_checkpoint(path)
    assert len(module.adaptors) == 1  # a training-only part that must stay out of the export
    return path, module.eval()


def _weights_in(path: str, module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s parameters whose raw bytes appear in the file at ``path``."""
    data = open(path, "rb").read()  # noqa: SIM115 - one read
    return [name for name, p in module.named_parameters() if p.detach().cpu().numpy().tobytes() in data]


def test_onnx_matches_pytorch_and_holds_only_the_student(student_ckpt, tmp_path):
    import onnxruntime

    path, module = student_ckpt
    output = str(tmp_path / "student.onnx")
    main(["export", "--ckpt_path", path, "--format", "onnx", "--output", output, "--input_shape=[1,12,12]"])
    session = onnxruntime.InferenceSession(output, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["left", "right"]
    for batch in (1, 5, 9):  # the batch axis is dynamic
        x = torch.randn(batch, 1, 12, 12)
        got = dict(zip(["left", "right"], session.run(None, {"input": x.numpy()}), strict=True))
        with torch.no_grad():
            expected = module.model(x)
        for task in ("left", "right"):
            np.testing.assert_allclose(got[task], expected[task].numpy(), rtol=1e-4, atol=1e-5)
    assert _weights_in(output, module.teacher) == []
    assert _weights_in(output, module.adaptors) == []
    assert {"heads.left.bias", "heads.right.bias"} <= set(_weights_in(output, module.model))  # the check can fail


def test_torchscript_matches_pytorch_and_holds_only_the_student(student_ckpt, tmp_path):
    path, module = student_ckpt
    output = str(tmp_path / "student.pt")
    names = export_checkpoint(path, output, [1, 12, 12], format="torchscript")
    assert names == ["left", "right"]
    loaded = torch.jit.load(output)
    for batch in (1, 7):
        x = torch.randn(batch, 1, 12, 12)
        got = loaded(x)
        with torch.no_grad():
            expected = module.model(x)
        assert set(got) == {"left", "right"}
        for task in ("left", "right"):
            torch.testing.assert_close(got[task], expected[task])
    state = loaded.state_dict()
    assert sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked")) == sum(
        v.numel() for k, v in module.model.state_dict().items() if not k.endswith("num_batches_tracked")
    )
    assert _weights_in(output, module.teacher) == [] and _weights_in(output, module.adaptors) == []
    assert "heads.left.weight" in _weights_in(output, module.model)


def test_a_sub_network_exports_alone_named_after_its_path(student_ckpt, tmp_path):
    """How a per-task student (e.g. of a transfer strategy) is exported: by its dotted path."""
    import onnxruntime

    path, module = student_ckpt
    output = str(tmp_path / "left.onnx")
    names = export_checkpoint(path, output, [16], format="onnx", student="model.heads.left")
    assert names == ["left"]
    session = onnxruntime.InferenceSession(output, providers=["CPUExecutionProvider"])
    x = torch.randn(4, 16)
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, module.model.heads.left(x).numpy(), rtol=1e-4, atol=1e-5)
    assert _weights_in(output, module.model.heads.right) == []


def test_export_errors_name_the_fix(student_ckpt, tmp_path, capsys):
    path, _ = student_ckpt
    with pytest.raises(ValueError, match="no submodule 'students.left'.*children are \\['model'"):
        export_checkpoint(path, str(tmp_path / "x.onnx"), [1, 12, 12], student="students.left")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_checkpoint(str(tmp_path / "missing.ckpt"), str(tmp_path / "x.onnx"), [1, 12, 12])
    with pytest.raises(ValueError, match="without the batch axis"):
        export_checkpoint(path, str(tmp_path / "x.onnx"), [])
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", path, "--format", "tflite", "--output", "x", "--input_shape=[1,12,12]"])
    assert "tflite" in capsys.readouterr().err
