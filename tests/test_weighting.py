"""Weighting plug-ins: each against its paper's update worked by hand, its state across save/load, and a fit."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TASKS, conv_net, quick_trainer, random_datamodule

from lightning_mtkd import MultiTaskModule
from lightning_mtkd.models import MLPBackbone, MultiTaskNet
from lightning_mtkd.tasks import as_tasks
from lightning_mtkd.weighting import (
    DynamicWeightAverage,
    GradNorm,
    StaticWeighting,
    TeacherAnnealing,
    UncertaintyWeighting,
    dwa_weights,
    gradnorm_targets,
)


def ready(weighting):
    weighting.setup_tasks(as_tasks(TASKS))
    return weighting


def t(x):
    return torch.tensor(float(x))


def test_uncertainty_loss_formula_by_hand():
    weighting = ready(UncertaintyWeighting())
    with torch.no_grad():
        weighting.log_variance.copy_(torch.tensor([0.0, math.log(2.0)]))
    # per task: left = .5*3 + .5*1 = 2, right = .5*1 + .5*1 = 1; shared: .5*2 = 1
    total = weighting.combine({"left": t(3), "right": t(1)}, {"kd/left": t(1), "kd/right": t(1), "hint": t(2)}, 0.5)
    by_hand = (0.5 * 1 * 2 + 0.5 * 0) + (0.5 * 0.5 * 1 + 0.5 * math.log(2.0)) + 1
    assert total.item() == pytest.approx(by_hand)
    total.backward()
    # d/ds_t = -1/2 e^{-s_t} L_t + 1/2: left -1 + .5, right -.25 + .5
    assert weighting.log_variance.grad.tolist() == pytest.approx([-0.5, 0.25])
    assert {k: v.item() for k, v in weighting.current_weights().items()} == pytest.approx({"left": 0.5, "right": 0.25})


def test_uncertainty_parameters_are_in_the_optimizer():
    module = MultiTaskModule(conv_net(), TASKS, weighting=UncertaintyWeighting())
    groups = {g["name"]: g["params"] for g in module.param_groups()}
    assert groups["weighting"] == [module.weighting.log_variance]


def test_dwa_weights_by_hand_from_two_epochs_of_losses():
    weighting = ready(DynamicWeightAverage(temperature=2.0)).train()
    epochs = [[(1.0, 3.0), (3.0, 5.0)], [(1.0, 3.6), (1.0, 3.6)]]  # averages: (2, 4), then (1, 3.6)
    for epoch, steps in enumerate(epochs):
        for left, right in steps:
            weighting.combine({"left": t(left), "right": t(right)}, {}, 0.0)
        weighting.on_train_epoch_end()
        if epoch == 0:  # epochs 1 and 2 of the paper use w = 1
            assert weighting.weights.tolist() == [1.0, 1.0]
    # r = (1/2, 3.6/4) = (.5, .9); w_k = 2 exp(r_k/2) / sum_i exp(r_i/2)
    z = math.exp(0.25) + math.exp(0.45)
    expected = [2 * math.exp(0.25) / z, 2 * math.exp(0.45) / z]
    assert weighting.weights.tolist() == pytest.approx(expected)
    assert dwa_weights(torch.tensor([1.0, 3.6]), torch.tensor([2.0, 4.0])).tolist() == pytest.approx(expected)
    assert expected[1] > expected[0]  # the task whose loss fell less gets more weight
    # the weights now apply: 0.9003 * 1 + 1.0997 * 2
    weighting.eval()
    total = weighting.combine({"left": t(1), "right": t(2)}, {}, 0.0)
    assert total.item() == pytest.approx(expected[0] + 2 * expected[1])


def test_dwa_ignores_validation_losses():
    weighting = ready(DynamicWeightAverage()).eval()
    weighting.combine({"left": t(1), "right": t(1)}, {}, 0.0)
    assert weighting.epoch_steps.item() == 0


def test_gradnorm_targets_by_hand():
    # G = (1, 3), L(t) = (1, 2), L(0) = (2, 2): L~ = (.5, 1), r = (2/3, 4/3), mean G = 2
    targets = gradnorm_targets(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]), 1.5)
    assert targets.tolist() == pytest.approx([2 * (2 / 3) ** 1.5, 2 * (4 / 3) ** 1.5])
    # alpha = 0 pulls every norm to the mean
    zero = gradnorm_targets(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]), 0.0)
    assert zero.tolist() == [2.0, 2.0]


def gradnorm_setup():
    torch.manual_seed(0)
    model = MultiTaskNet(MLPBackbone(in_features=3, hidden=(4,)), {"left": 10, "right": 10})
    weighting = ready(GradNorm(alpha=1.5, shared_layer="backbone")).train()
    weighting.attach_model(model)
    x = torch.randn(6, 3)
    y = {"left": torch.randint(0, 10, (6,)), "right": torch.randint(0, 10, (6,))}
    return model, weighting, x, y


def test_gradnorm_step_updates_weights_toward_target_norms_and_trains_model_on_weighted_sum():
    model, weighting, x, y = gradnorm_setup()
    assert weighting.shared_layer_name == "backbone.layers.1"
    W = model.backbone.layers[1].weight
    with torch.no_grad():
        weighting.task_weights.copy_(torch.tensor([1.0, 3.0]))  # renormalised to sum 2: (.5, 1.5)
    out = model(x)
    losses = {name: F.cross_entropy(out[name], y[name]) for name in y}
    total = weighting.combine(losses, {}, 0.0)
    assert weighting.task_weights.tolist() == pytest.approx([0.5, 1.5])
    w = [0.5, 1.5]
    assert total.item() == pytest.approx(w[0] * losses["left"].item() + w[1] * losses["right"].item(), rel=1e-6)
    assert weighting.initial_losses.tolist() == pytest.approx([losses["left"].item(), losses["right"].item()])

    g = [torch.linalg.vector_norm(torch.autograd.grad(losses[n], W, retain_graph=True)[0]).item() for n in y]
    total.backward()
    # first step: L(t) = L(0), so r = 1 and each target is the mean of G_i = w_i g_i
    G = [w[0] * g[0], w[1] * g[1]]
    target = sum(G) / 2
    expected_grad = [math.copysign(g[i], G[i] - target) for i in range(2)]
    assert weighting.task_weights.grad.tolist() == pytest.approx(expected_grad, rel=1e-5)
    # the network's gradient is that of sum_i w_i L_i alone (the balance term only trains the weights)
    from_gradnorm = W.grad.clone()
    model.zero_grad()
    out = model(x)
    (w[0] * F.cross_entropy(out["left"], y["left"]) + w[1] * F.cross_entropy(out["right"], y["right"])).backward()
    assert torch.allclose(from_gradnorm, W.grad, atol=1e-6)


def test_gradnorm_needs_a_shared_layer_with_parameters():
    model = MultiTaskNet(MLPBackbone(in_features=3, hidden=(4,)), {"left": 10, "right": 10})
    with pytest.raises(ValueError, match="no submodule at feature path 'trunk'"):
        ready(GradNorm(shared_layer="trunk")).attach_model(model)
    with pytest.raises(ValueError, match="has no parameters"):
        ready(GradNorm(shared_layer="backbone.layers.2")).attach_model(model)  # a ReLU
    unattached = ready(GradNorm()).train()
    loss = torch.ones((), requires_grad=True)
    with pytest.raises(RuntimeError, match="attach_model"):
        unattached.combine({"left": loss, "right": loss}, {}, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        GradNorm(alpha=-1)


def test_teacher_annealing_mix_by_hand():
    weighting = ready(TeacherAnnealing(total_steps=4)).eval()
    sup, kd = {"left": t(2), "right": t(4)}, {"kd/left": t(1), "kd/right": t(3)}
    assert weighting.combine(sup, kd, 0.5).item() == pytest.approx(1 + 3)  # progress 0: the teacher alone
    weighting.train()
    weighting.combine(sup, kd, 0.5)  # one training step: progress 1/4
    weighting.eval()
    assert weighting.progress.item() == 0.25
    assert weighting.combine(sup, kd, 0.5).item() == pytest.approx(0.25 * (2 + 4) + 0.75 * (1 + 3))
    weighting.steps_taken.fill_(10)  # past the end: the gold label alone
    assert weighting.combine(sup, kd, 0.5).item() == pytest.approx(2 + 4)
    weighting.steps_taken.zero_()
    assert weighting.combine(sup, {}, 0.0).item() == pytest.approx(2 + 4)  # no teacher: supervised


def test_static_weighting_unchanged_by_the_split_helper():
    weighting = ready(StaticWeighting())
    sup, kd = {"left": t(2), "right": t(4)}, {"kd/left": t(1), "kd/right": t(3), "hint": t(5)}
    per_task, shared = weighting.task_terms(sup, kd, 0.25)
    assert {k: v.item() for k, v in per_task.items()} == {"left": 0.75 * 2 + 0.25, "right": 0.75 * 4 + 0.75}
    assert shared.item() == 1.25
    assert weighting.combine(sup, kd, 0.25).item() == pytest.approx(sum(v.item() for v in per_task.values()) + 1.25)


PLUGINS = [
    ("uncertainty", lambda: UncertaintyWeighting(init_log_variance=0.5), ["log_variance"]),
    ("dwa", lambda: DynamicWeightAverage(temperature=3.0), ["weights", "history", "epochs_seen"]),
    ("gradnorm", lambda: GradNorm(alpha=1.0), ["task_weights", "initial_losses", "initialised"]),
    ("annealing", lambda: TeacherAnnealing(), ["steps_taken", "steps_total"]),
]


@pytest.mark.parametrize(("name", "make", "state"), PLUGINS, ids=[p[0] for p in PLUGINS])
def test_plugin_state_survives_checkpoint_and_weights_are_logged(name, make, state, tmp_path):
    L.seed_everything(0)
    module = MultiTaskModule(conv_net(), TASKS, weighting=make(), optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    trainer = quick_trainer(tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, random_datamodule(n=32, shape=(1, 12, 12)))
    assert "train/left/weight" in trainer.callback_metrics
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    reloaded = MultiTaskModule.load_from_checkpoint(path, weights_only=True)
    assert type(reloaded.weighting) is type(module.weighting)
    assert reloaded.weighting.init_config == module.weighting.init_config
    for key in state:
        before, after = getattr(module.weighting, key), getattr(reloaded.weighting, key)
        assert torch.equal(before, after), key
    changed = {
        "uncertainty": lambda w: not torch.equal(w.log_variance, torch.full((2,), 0.5)),
        "dwa": lambda w: w.epochs_seen.item() == 3 and not torch.equal(w.weights, torch.ones(2)),
        "gradnorm": lambda w: bool(w.initialised) and not torch.equal(w.task_weights, torch.ones(2)),
        "annealing": lambda w: w.steps_taken.item() == 6 and w.steps_total.item() == 6,
    }[name]
    assert changed(reloaded.weighting), "the fit should have moved the plug-in's state"


def test_dwa_running_sums_survive_a_mid_epoch_save_and_load():
    weighting = ready(DynamicWeightAverage()).train()
    weighting.combine({"left": t(1.5), "right": t(2.5)}, {}, 0.0)
    state = weighting.state_dict()
    fresh = ready(DynamicWeightAverage())
    fresh.load_state_dict(state)
    assert fresh.epoch_loss_sum.tolist() == [1.5, 2.5] and fresh.epoch_steps.item() == 1


class RecordsEpochLossesAcrossRanks(L.Callback):
    """Averages the per-task losses every rank saw in the epoch, to check DWA's averages against."""

    def __init__(self) -> None:
        self.seen, self.averages = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen.append(torch.stack([outputs["left/loss"], outputs["right/loss"]]).detach())

    def on_train_epoch_end(self, trainer, module):  # called before the module's own hook
        gathered = module.all_gather(torch.stack(self.seen))  # (ranks, steps, tasks)
        self.averages.append(gathered.reshape(-1, 2).mean(0))
        self.seen = []

    def on_train_end(self, trainer, module):
        weighting = module.weighting
        if isinstance(weighting, DynamicWeightAverage):
            assert torch.allclose(weighting.history[1], self.averages[-1], atol=1e-6), "not the average of all ranks"
            assert torch.allclose(weighting.history[0], self.averages[-2], atol=1e-6)
        for key, value in weighting.state_dict().items():
            if isinstance(value, torch.Tensor):
                gathered = module.all_gather(value)
                assert torch.equal(gathered[0], gathered[1]), f"{key} differs between ranks"


@pytest.mark.parametrize("make", [DynamicWeightAverage, GradNorm], ids=["dwa", "gradnorm"])
def test_weighting_state_agrees_across_two_ddp_processes(make, tmp_path):
    L.seed_everything(0)
    module = MultiTaskModule(conv_net(), TASKS, weighting=make())
    trainer = quick_trainer(tmp_path, devices=2, strategy="ddp_spawn", max_epochs=2, limit_train_batches=3,
                            limit_val_batches=0, callbacks=[RecordsEpochLossesAcrossRanks()])
    trainer.fit(module, random_datamodule(n=64))
