"""FusionDistiller: several teachers fused per task (mean, fixed weights, CA-MKD confidence, learned gate)."""

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import HEADS, TASKS, conv_net, hook_step, quick_trainer, random_datamodule
from multimnist_teachers import GradProbe, fit_and_measure, mnist_net, mnist_teacher, single_thread  # noqa: F401
from test_cli_configs import SMALL_DATA
from torch import Tensor, nn

from lightning_mtkd import FusionDistiller, ModelOutputs, MultiTaskModule, Task
from lightning_mtkd.cli import main
from lightning_mtkd.losses.functional import (
    confidence_weights,
    fuse_binary_soft_targets,
    fuse_soft_targets,
    soft_target_kd,
)
from lightning_mtkd.models import ConvBackbone, MultiTaskNet

pytestmark = pytest.mark.usefixtures("single_thread")  # see multimnist_teachers.one_thread

T = 2.0


def reference_kd(student: Tensor, target_probs: Tensor) -> Tensor:
    """T² · KL(target ‖ softmax(student / T)), batch mean, through torch's own kl_div."""
    log_q = F.log_softmax(student / T, dim=1)
    return F.kl_div(log_q, target_probs, reduction="batchmean") * T**2


def tiny_batch():
    """Three teachers: two cover both tasks, ``solo`` only ``left``; labels for 4 samples, one missing."""
    torch.manual_seed(0)
    logits = {name: {t: torch.randn(4, 10) * 3 for t in HEADS} for name in ("a", "b")}
    logits["solo"] = {"left": torch.randn(4, 10) * 3}
    teachers = {name: ModelOutputs(out) for name, out in logits.items()}
    student = ModelOutputs({t: torch.randn(4, 10) for t in HEADS})
    targets = {"left": torch.tensor([1, 2, 3, -100]), "right": torch.tensor([4, 5, 6, 7])}
    return logits, teachers, student, {"input": None, "targets": targets}


def fusion_module(fusion: str, **kwargs) -> FusionDistiller:
    teachers = {"a": conv_net(), "b": conv_net(), "solo": conv_net()}
    return FusionDistiller(conv_net((2, 4), 8), teachers, TASKS, fusion=fusion, temperature=T, **kwargs)


def test_mean_fusion_matches_hand_computation_and_leaves_out_a_teacher_missing_the_task():
    logits, teachers, student, batch = tiny_batch()
    module = fusion_module("mean")
    step = hook_step(module, student, teachers, batch)
    terms = module.distillation_loss(step)
    p = {name: {t: F.softmax(z / T, dim=1) for t, z in out.items()} for name, out in logits.items()}
    left = (p["a"]["left"] + p["b"]["left"] + p["solo"]["left"]) / 3
    torch.testing.assert_close(terms["kd/left"], reference_kd(student.outputs["left"], left))
    # `solo` does not output `right`: right is the mean of a and b alone
    torch.testing.assert_close(terms["kd/right"], reference_kd(student.outputs["right"],
                                                               (p["a"]["right"] + p["b"]["right"]) / 2))
    assert {k for k in step.logs if k.startswith("right/")} == {"right/fusion_a", "right/fusion_b"}
    assert {k for k in step.logs if k.startswith("left/")} == {"left/fusion_a", "left/fusion_b", "left/fusion_solo"}
    # the fused target is the teacher target: also what the teacher metrics beside the student's measure
    torch.testing.assert_close(F.softmax(step.targets["right"] / T, dim=1), (p["a"]["right"] + p["b"]["right"]) / 2)


def test_fixed_weights_match_hand_computation_renormalised_per_task():
    logits, teachers, student, batch = tiny_batch()
    module = fusion_module("weights", weights=[3.0, 1.0, 4.0])
    step = hook_step(module, student, teachers, batch)
    terms = module.distillation_loss(step)
    p = {name: {t: F.softmax(z / T, dim=1) for t, z in out.items()} for name, out in logits.items()}
    left = (3 * p["a"]["left"] + 1 * p["b"]["left"] + 4 * p["solo"]["left"]) / 8
    right = (3 * p["a"]["right"] + 1 * p["b"]["right"]) / 4
    torch.testing.assert_close(terms["kd/left"], reference_kd(student.outputs["left"], left))
    torch.testing.assert_close(terms["kd/right"], reference_kd(student.outputs["right"], right))
    torch.testing.assert_close(torch.stack([step.logs["right/fusion_a"], step.logs["right/fusion_b"]]),
                               torch.tensor([0.75, 0.25]))


def test_confidence_fusion_matches_ca_mkd_by_hand():
    logits, teachers, student, batch = tiny_batch()
    module = fusion_module("confidence")
    step = hook_step(module, student, teachers, batch)
    terms = module.distillation_loss(step)
    for task, names in (("left", ["a", "b", "solo"]), ("right", ["a", "b"])):
        labels = batch["targets"][task]
        k = len(names)
        fused = torch.zeros(4, 10)
        for i in range(4):  # per sample, as in the paper: w_k = (1 - softmax_k(CE_k)) / (K - 1)
            if labels[i] < 0:
                w = [1 / k] * k  # no label: uniform
            else:
                ce = torch.tensor([-F.log_softmax(logits[n][task][i], dim=0)[labels[i]] for n in names])
                w = ((1 - ce.exp() / ce.exp().sum()) / (k - 1)).tolist()
            fused[i] = sum(wk * F.softmax(logits[n][task][i] / T, dim=0) for wk, n in zip(w, names, strict=True))
        torch.testing.assert_close(terms[f"kd/{task}"], reference_kd(student.outputs[task], fused))
    assert torch.isclose(step.logs["right/fusion_a"] + step.logs["right/fusion_b"], torch.tensor(1.0))


def test_learned_gate_weights_sum_to_one_and_learn_to_trust_the_right_teacher():
    torch.manual_seed(0)
    module = fusion_module("learned")
    module.extras["left"] = nn.Linear(20, 2)
    labels = torch.randint(0, 10, (64,))
    right = F.one_hot(labels, 10).float() * 4  # teacher 0 is always right, teacher 1 always wrong
    wrong = F.one_hot((labels + 1) % 10, 10).float() * 4
    stacked = torch.stack([right, wrong])
    optimizer = torch.optim.SGD(module.extras.parameters(), lr=0.5)
    for _ in range(30):
        weights, gate_loss = module.fusion_weights("left", ["a", "b"], stacked, labels)
        optimizer.zero_grad()
        gate_loss.backward()
        optimizer.step()
    torch.testing.assert_close(weights.sum(0), torch.ones(64))
    assert weights.shape == (2, 64) and (weights >= 0).all()
    assert weights[0].mean() > 0.9, "the gate should learn to trust the teacher that is right"


def test_learned_gates_sized_by_dry_run_trained_logged_and_reloaded(tmp_path, teacher_ckpt):
    L.seed_everything(0)
    solo = MultiTaskNet(ConvBackbone(widths=(4, 8), hidden=16), {"left": 10})
    module = FusionDistiller(conv_net((2, 4), 8), {"mt": teacher_ckpt, "solo": solo}, TASKS, fusion="learned",
                             teacher_trust=False, adaptor_lr=0.03)
    probe = GradProbe()
    trainer = quick_trainer(tmp_path, max_epochs=1, limit_val_batches=1, callbacks=[probe])
    trainer.fit(module, random_datamodule())
    assert {t: (g.in_features, g.out_features) for t, g in module.extras.items()} == {"left": (20, 2), "right": (10, 1)}
    assert probe.grads[id(module.extras["left"].weight)]
    assert {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}["adaptors"] == 0.03
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["val/left/fusion_mt"] + metrics["val/left/fusion_solo"], torch.tensor(1.0))
    assert "val/right/fusion_solo" not in metrics and metrics["val/right/fusion_mt"] == 1.0
    assert "train/left/gate" in metrics and "train/left/fusion_solo" in metrics
    assert "val/left/teacher_acc" in metrics  # of the fused target

    path = tmp_path / "fusion.ckpt"
    trainer.save_checkpoint(path)
    reloaded = FusionDistiller.load_from_checkpoint(path, weights_only=True)  # gates rebuilt from their tensors
    x = torch.randn(3, 20)
    torch.testing.assert_close(reloaded.extras["left"](x), module.extras["left"](x))


def test_distillation_term_falls_on_multimnist(tmp_path):
    L.seed_everything(0)
    teachers = {"multitask": mnist_teacher(), "left": mnist_teacher(("left",), 32),
                "right": mnist_teacher(("right",), 48)}
    module = FusionDistiller(mnist_net((2, 4), 16), teachers, TASKS, fusion="confidence", alpha=1.0, temperature=2.0,
                             teacher_trust=False)
    before, after = fit_and_measure(module, tmp_path)
    for task in ("left", "right"):
        assert after[f"val/{task}/kd"] < 0.8 * before[f"val/{task}/kd"], (before, after)
        assert after[f"val/{task}/fusion_multitask"] > 0 and after[f"val/{task}/fusion_{task}"] > 0


def test_cli_fits_fusion_yaml_for_one_step(tmp_path):
    paths = {}
    for name, heads in (("multitask", HEADS), ("left", {"left": 10}), ("right", {"right": 10})):
        teacher = MultiTaskModule(MultiTaskNet(ConvBackbone(widths=(4, 8), hidden=16), heads),
                                  [t for t in TASKS if t.name in heads])
        trainer = quick_trainer(tmp_path, max_steps=1)
        trainer.fit(teacher, random_datamodule(n=32, shape=(1, 36, 36)))
        paths[name] = tmp_path / f"{name}.ckpt"
        trainer.save_checkpoint(paths[name])
    config = Path(__file__).parents[1] / "configs" / "multimnist" / "fusion.yaml"
    teachers = "--model.init_args.teacher={" + ", ".join(f"{k}: {v}" for k, v in paths.items()) + "}"
    cli = main(["fit", "--config", str(config), teachers, "--trainer.fast_dev_run=1",
                "--model.init_args.teacher_trust=false",
                f"--trainer.default_root_dir={tmp_path}", *SMALL_DATA])
    metrics = cli.trainer.callback_metrics
    assert {"train/left/kd", "train/left/fusion_multitask", "train/left/fusion_left"} <= set(metrics)
    assert "train/right/fusion_left" not in metrics


# ------------------------------------------------------------------------------ bad input
def test_unknown_fusion_mode_fails_at_config_parse(capsys):
    config = Path(__file__).parents[1] / "configs" / "multimnist" / "fusion.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--model.init_args.fusion=median"], run=False)
    assert "median" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown fusion 'median'"):
        fusion_module("median")


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([1.0, 2.0], r"`weights` has 2 value\(s\) for 3 teacher\(s\) \['a', 'b', 'solo'\]"),
        ([1.0, -1.0, 1.0], r"must be finite and >= 0; got \{'b': -1.0\}"),
        ([0.0, 0.0, 0.0], "all zero"),
        (None, "fusion='weights' needs `weights`"),
    ],
)
def test_bad_fixed_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        fusion_module("weights", weights=weights)


def test_weights_without_weights_mode():
    with pytest.raises(ValueError, match="only used with fusion='weights'"):
        fusion_module("mean", weights=[1.0, 1.0, 1.0])


def test_task_whose_only_teachers_weigh_zero(tmp_path):
    teachers = {"mt": conv_net(), "solo": MultiTaskNet(ConvBackbone(widths=(4, 8), hidden=16), {"right": 10})}
    module = FusionDistiller(conv_net(), teachers, [t for t in TASKS if t.name == "right"], fusion="weights",
                             weights=[0.0, 1.0], teacher_trust=False)
    quick_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, random_datamodule())  # right: solo only
    module = FusionDistiller(conv_net(), {"mt": conv_net(), "solo": teachers["solo"]}, TASKS, fusion="weights",
                             weights=[0.0, 1.0], teacher_trust=False)
    with pytest.raises(ValueError, match=r"task 'left' is output only by teacher\(s\) \['mt'\], whose fixed"):
        quick_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, random_datamodule())


def test_teacher_covering_no_task(tmp_path):
    colour = MultiTaskNet(ConvBackbone(widths=(4, 8), hidden=16), {"colour": 3})
    module = FusionDistiller(conv_net(), {"mt": conv_net(), "colour": colour}, TASKS)
    with pytest.raises(KeyError, match=r"teacher 'colour' outputs \['colour'\], none of the tasks"):
        quick_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, random_datamodule())


def test_task_no_teacher_covers(tmp_path):
    solo = MultiTaskNet(ConvBackbone(widths=(4, 8), hidden=16), {"left": 10})
    module = FusionDistiller(conv_net(), {"solo": solo}, TASKS)
    with pytest.raises(KeyError, match=r"no teacher outputs task 'right'"):
        quick_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, random_datamodule())


# ------------------------------------------------------------------------------ the pure functions underneath
def test_fused_soft_target_is_the_mixture_and_its_gradient_that_of_the_weighted_teacher_losses():
    torch.manual_seed(0)
    z = torch.randn(3, 5, 7) * 2
    w = torch.softmax(torch.randn(3, 5), dim=0)
    fused = fuse_soft_targets(z, w, T)
    torch.testing.assert_close(F.softmax(fused / T, dim=1), (w.unsqueeze(-1) * F.softmax(z / T, dim=2)).sum(0))
    student = torch.randn(5, 7, requires_grad=True)
    (grad_fused,) = torch.autograd.grad(soft_target_kd(student, fused, T), student)
    # Σ_k w_kb KL(p_kb ‖ q_b), per sample: CA-MKD's weighted multi-teacher loss
    weighted = sum((w[k] * F.kl_div(F.log_softmax(student / T, 1), F.softmax(z[k] / T, 1), reduction="none").sum(1))
                   for k in range(3)).mean() * T**2
    (grad_weighted,) = torch.autograd.grad(weighted, student)
    torch.testing.assert_close(grad_fused, grad_weighted)


def test_fusion_of_multilabel_and_regression_outputs():
    torch.manual_seed(0)
    z, w = torch.randn(2, 4, 3), torch.tensor([[0.25] * 4, [0.75] * 4])
    multilabel = Task("tags", kind="multilabel", num_classes=3)
    fused = multilabel.fuse_teacher_outputs(z, w, T)
    mixture = 0.25 * torch.sigmoid(z[0] / T) + 0.75 * torch.sigmoid(z[1] / T)
    torch.testing.assert_close(torch.sigmoid(fused / T), mixture)
    torch.testing.assert_close(fuse_binary_soft_targets(z, w, T), fused)
    regression = Task("age", kind="regression", num_classes=3)
    torch.testing.assert_close(regression.fuse_teacher_outputs(z, w, T), 0.25 * z[0] + 0.75 * z[1])


def test_confidence_weights_closed_form():
    losses = torch.tensor([[0.1, 2.0], [1.0, 2.0]])  # 2 teachers, 2 samples
    weights = confidence_weights(losses, torch.tensor([True, False]))
    e = torch.tensor([0.1, 1.0]).exp()
    torch.testing.assert_close(weights[:, 0], 1 - e / e.sum())  # K - 1 = 1
    torch.testing.assert_close(weights[:, 1], torch.tensor([0.5, 0.5]))  # label missing: uniform
    torch.testing.assert_close(confidence_weights(losses[:1], torch.tensor([True, True])), torch.ones(1, 2))


@pytest.mark.parametrize("kind", ["classification", "multilabel", "regression"])
def test_per_sample_loss_averages_to_the_supervised_loss(kind):
    torch.manual_seed(0)
    task = Task("t", kind=kind, num_classes=4)
    output = torch.randn(6, 4)
    if kind == "classification":
        target = torch.tensor([0, 1, -100, 3, 2, 1])
    elif kind == "multilabel":
        target = torch.randint(0, 2, (6, 4))
        target[2] = -100
    else:
        target = torch.randn(6, 4)
        target[2] = float("nan")
    per_sample, present = task.per_sample_loss(output, target)
    assert per_sample.shape == (6,) and present.tolist() == [True, True, False, True, True, True]
    torch.testing.assert_close(per_sample[present].mean(), task.supervised_loss(output, target))
