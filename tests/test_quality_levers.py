"""The quality levers: consistent batch augmentation, unlabelled splits, teacher trust and the KD search."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import TASKS, quick_trainer
from torch import Tensor, nn

from lightning_mtkd import FusionDistiller, MultiTaskModule, SharedDistiller, Task, TaskSpecificDistiller
from lightning_mtkd.callbacks import KDSearch, TeacherCache, TeacherTrust, rank_candidates, trusted_teachers
from lightning_mtkd.data import BatchAugment, MultiMNISTDataModule, MultiTaskDataModule, MultiTaskDataset
from lightning_mtkd.data.augment import _beta, _gamma, mixup_inputs, random_shift
from lightning_mtkd.data.base import join_unlabelled


# ------------------------------------------------------------------------------ tiny models and data
class Recorder(nn.Module):
    """A linear two-task net that records every input it sees (teacher or student)."""

    def __init__(self, features: int = 20, seen: list | None = None) -> None:
        super().__init__()
        self.net = nn.Linear(features, 20)
        self.seen = seen if seen is not None else []

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        self.seen.append(x.detach().clone())
        out = self.net(x.flatten(1))
        return {"left": out[:, :10], "right": out[:, 10:]}


class Oracle(nn.Module):
    """Reads the label off the input (it is the argmax of the first 10 / next 10 features); ``wrong`` shifts it."""

    def __init__(self, tasks: tuple[str, ...] = ("left", "right"), wrong: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.tasks, self.wrong = tasks, wrong
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = x.flatten(1)
        out = {"left": self.scale * x[:, :10], "right": self.scale * x[:, 10:20]}
        out = {name: out[name].roll(1, dims=1) if name in self.wrong else out[name] for name in self.tasks}
        return out


def oracle_data(n: int, seed: int) -> MultiTaskDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 20, generator=generator)
    return MultiTaskDataset(x, {"left": x[:, :10].argmax(1), "right": x[:, 10:].argmax(1)})


def oracle_datamodule(**kwargs) -> MultiTaskDataModule:
    return MultiTaskDataModule(oracle_data(64, 0), oracle_data(32, 1), oracle_data(32, 2), batch_size=16, **kwargs)


# ------------------------------------------------------------------------------ augmentation maths
def test_random_shift_matches_a_per_sample_reference():
    x = torch.rand(6, 2, 5, 7)
    generator = torch.Generator().manual_seed(3)
    shifted = random_shift(x, 2, generator)
    offsets = torch.randint(0, 5, (2, 6), generator=torch.Generator().manual_seed(3)) - 2
    for b in range(6):  # the reference: pad, then slice at the offset, one sample at a time
        padded = nn.functional.pad(x[b], (2, 2, 2, 2))
        dy, dx = int(offsets[0, b]) + 2, int(offsets[1, b]) + 2
        assert torch.equal(shifted[b], padded[:, dy : dy + 5, dx : dx + 7])
    assert random_shift(x, 0, generator) is x
    with pytest.raises(ValueError, match="shift augments images"):
        random_shift(torch.rand(4, 3), 1, generator)


def test_beta_and_gamma_draws_have_their_moments():
    generator = torch.Generator().manual_seed(0)
    for shape in (0.4, 2.0):
        draws = _gamma(shape, 20_000, generator)
        assert draws.min() > 0 and abs(draws.mean().item() - shape) < 0.05 * shape + 0.02
    beta = _beta(0.5, 20_000, generator)
    assert beta.min() >= 0 and beta.max() <= 1
    assert abs(beta.mean().item() - 0.5) < 0.02 and abs(beta.var().item() - 0.125) < 0.01  # Beta(a, a): 1/(8a + 4)


def test_mixup_mixes_the_given_fraction_convexly():
    x = torch.eye(8)
    mixed_x, mixed = mixup_inputs(x, 1.0, 0.5, torch.Generator().manual_seed(1))
    assert int(mixed.sum()) == 4
    assert torch.equal(mixed_x[~mixed], x[~mixed])
    assert torch.allclose(mixed_x.sum(1), torch.ones(8)) and (mixed_x >= 0).all()


def test_batch_augment_marks_mixed_labels_missing_and_is_a_function_of_step_and_rank():
    batch = {
        "input": torch.rand(8, 1, 6, 6),
        "targets": {"a": torch.arange(8), "b": torch.rand(8, 1)},
        "index": torch.arange(8),
    }
    augment = BatchAugment(shift=1, noise=0.1, mixup=1.0, mixup_fraction=0.25)
    out = augment(batch, step=5)
    missing = out["targets"]["a"] == -100
    assert int(missing.sum()) == 2 and torch.equal(out["targets"]["b"].isnan().squeeze(1), missing)
    assert torch.equal(out["input"], augment(batch, step=5)["input"])
    assert not torch.equal(out["input"], augment(batch, step=6)["input"])
    assert not torch.equal(out["input"], augment(batch, step=5, rank=1)["input"])
    assert torch.equal(batch["targets"]["a"], torch.arange(8))  # the batch passed in is left as it was
    for bad in ({"shift": -1}, {"noise": -0.1}, {"mixup": -1.0}, {"mixup_fraction": 1.5}):
        with pytest.raises(ValueError):
            BatchAugment(**bad)


def test_appended_mixup_keeps_every_labelled_sample_and_adds_unlabelled_blends():
    batch = {
        "input": torch.eye(8).reshape(8, 1, 2, 4),
        "targets": {"a": torch.arange(8), "b": torch.rand(8, 1)},
        "index": torch.arange(10, 18),
    }
    augment = BatchAugment(mixup=1.0, mixup_fraction=0.5, mixup_mode="append")
    out = augment(batch, step=3)
    assert out["input"].shape == (12, 1, 2, 4) and torch.equal(out["input"][:8], batch["input"])
    assert torch.equal(out["targets"]["a"][:8], batch["targets"]["a"]) and (out["targets"]["a"][8:] == -100).all()
    assert out["targets"]["b"][8:].isnan().all() and not out["targets"]["b"][:8].isnan().any()
    blends = out["input"][8:].flatten(1)
    assert torch.allclose(blends.sum(1), torch.ones(4)) and (blends >= 0).all()
    sources = out["index"][8:] - 10  # each blend's index is its first source's: that one-hot sample is in it
    assert (blends[torch.arange(4), sources] > 0).all()
    assert torch.equal(out["input"], augment(batch, step=3)["input"])
    with pytest.raises(ValueError, match="mixup_mode"):
        BatchAugment(mixup=1.0, mixup_mode="extra")


# ------------------------------------------------------------------------------ augmentation in a fit
def test_teachers_and_student_see_the_same_augmented_view_and_evaluation_is_not_augmented(tmp_path):
    seen_teacher: list[Tensor] = []
    seen_student: list[Tensor] = []
    teacher, student = Recorder(seen=seen_teacher), Recorder(seen=seen_student)
    dm = oracle_datamodule(augment=BatchAugment(noise=0.5))
    module = SharedDistiller(student, teacher, TASKS, hint_weight=0.0)
    quick_trainer(tmp_path, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0).fit(module, dm)
    # Training: two steps, each the same (augmented) view for both; then one validation batch, not augmented.
    assert len(seen_teacher) == len(seen_student) == 3
    for t, s in zip(seen_teacher, seen_student, strict=True):
        assert torch.equal(t, s)
    first = dm.splits["train"].inputs
    assert not any(torch.equal(seen_student[0], first[i : i + 16]) for i in range(0, 64, 16))
    assert torch.equal(seen_student[2], dm.splits["val"].inputs[:16])


def test_a_teacher_cache_of_the_training_split_is_refused_when_batches_are_augmented(tmp_path):
    dm = oracle_datamodule(augment=BatchAugment(noise=0.1))
    module = SharedDistiller(Recorder(), Recorder(), TASKS, hint_weight=0.0)
    with pytest.raises(RuntimeError, match=r"TeacherCache\(splits=\['val'\]\)"):
        quick_trainer(tmp_path, max_steps=1, callbacks=[TeacherCache(storage="memory")]).fit(module, dm)
    cache = TeacherCache(storage="memory", splits=["val"])
    quick_trainer(tmp_path, max_steps=1, limit_val_batches=1, callbacks=[cache]).fit(module, dm)
    assert "train" not in cache.counts and cache.counts["val"]["computed"] >= 1


# ------------------------------------------------------------------------------ unlabelled data
def test_unlabelled_samples_reach_the_distillation_terms_only():
    train = oracle_data(4, 0)
    joined = join_unlabelled(train, oracle_data(4, 1))
    assert len(joined) == 8 and (joined.targets["left"][4:] == -100).all()
    batch = joined.gather(list(range(4, 8)))  # unlabelled samples only
    module = SharedDistiller(Recorder(), Oracle(), TASKS, hint_weight=0.0)
    step = module.forward_step(batch)
    for name, task in module.tasks.items():
        assert task.supervised_loss(step.student.outputs[name], step.labels[name]).item() == 0.0
    kd = module.distillation_loss(step)
    assert all(value.item() > 0 for value in kd.values())
    with pytest.raises(TypeError, match="MultiTaskDatasets"):
        join_unlabelled(train, [1, 2])  # type: ignore[arg-type]


def test_multimnist_unlabelled_pool_is_disjoint_and_leaves_the_labelled_splits_unchanged():
    plain = MultiMNISTDataModule(num_train=50, num_val=20, num_test=20)
    plain.setup()
    extra = MultiMNISTDataModule(num_train=50, num_val=20, num_test=20, num_unlabelled=30, unlabelled_digits=500)
    extra.setup()
    assert extra.num_unlabelled == 30 and len(extra.splits["train"]) == 80
    for split in ("val", "test"):
        assert torch.equal(plain.splits[split].inputs, extra.splits[split].inputs)
    assert torch.equal(plain.splits["train"].inputs, extra.splits["train"].inputs[:50])
    assert (extra.splits["train"].targets["left"][50:] == -100).all()
    pools = extra._digit_pools()
    seen = {bytes(img) for split in ("train", "val", "test") for img in pools[split][0]}
    assert not any(bytes(img) in seen for img in pools["unlabelled"][0][:100])
    extra.setup()  # a second setup (fit, then test) joins nothing twice
    assert len(extra.splits["train"]) == 80
    with pytest.raises(ValueError, match="5,000 digits"):
        MultiMNISTDataModule(unlabelled_digits=3000)


def test_a_training_cache_serves_the_samples_and_the_teachers_label_only_the_appended_blends(tmp_path):
    """Appended blends leave the batch's own samples unchanged, so their cached outputs hold: after the first
    epoch the teacher runs on the blends alone, and the fit ends where an uncached one does."""

    def fit(cache: bool) -> tuple[SharedDistiller, list[Tensor]]:
        L.seed_everything(3)
        seen: list[Tensor] = []
        module = SharedDistiller(Recorder(), Recorder(seen=seen), TASKS, hint_weight=0.0)
        dm = oracle_datamodule(augment=BatchAugment(mixup=1.0, mixup_fraction=0.5, mixup_mode="append"))
        callbacks = [TeacherCache(storage="memory", splits=["train"])] if cache else []
        trainer = quick_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=callbacks)
        trainer.fit(module, dm)
        return module, seen

    cached, seen_cached = fit(cache=True)
    plain, seen_plain = fit(cache=False)
    # 4 steps an epoch of 16 samples and 8 blends: uncached the teacher sees 24 a step; cached, 16 + 8 while
    # the cache fills (epoch 1), then the 8 blends only.
    assert [len(x) for x in seen_plain] == [24] * 8
    assert [len(x) for x in seen_cached[1:]] == [16, 8] * 4 + [8] * 4  # [0]: the cache's probe of the outputs' layout
    for name, value in cached.state_dict().items():
        torch.testing.assert_close(value, plain.state_dict()[name], msg=name)
    shifted = oracle_datamodule(augment=BatchAugment(noise=0.1, mixup=1.0, mixup_mode="append"))
    with pytest.raises(RuntimeError, match="TeacherCache"):
        module = SharedDistiller(Recorder(), Recorder(), TASKS, hint_weight=0.0)
        quick_trainer(tmp_path, max_steps=1, callbacks=[TeacherCache(storage="memory")]).fit(module, shifted)


# ------------------------------------------------------------------------------ teacher trust
def test_trusted_teachers_keeps_those_within_the_tolerance_of_the_best():
    scores = {"a": {"x": 0.90, "y": 0.95}, "mae": {"x": 1.0, "y": 1.2}}
    higher = {"a": True, "mae": False}
    assert trusted_teachers(scores, higher, 0.0) == {"a": ["y"], "mae": ["x"]}
    assert trusted_teachers(scores, higher, 0.25) == {"a": ["y", "x"], "mae": ["x", "y"]}
    # Within two standard errors of the paired difference: not clearly worse, kept.
    errors = {"a": {"x": 0.03, "y": 0.0}, "mae": {"y": 0.11}}
    assert trusted_teachers(scores, higher, 0.0, errors, z=2.0) == {"a": ["y", "x"], "mae": ["x", "y"]}
    assert trusted_teachers(scores, higher, 0.0, errors, z=1.0) == {"a": ["y"], "mae": ["x"]}


def test_task_specific_distils_a_task_from_the_multitask_teacher_when_its_own_is_worse(tmp_path):
    teachers = {"left": Oracle(("left",), wrong=("left",)), "right": Oracle(("right",)), "multitask": Oracle()}
    module = TaskSpecificDistiller(Recorder(), teachers, TASKS, feature_weight=0.0)
    trainer = quick_trainer(tmp_path, max_steps=1, limit_val_batches=2)
    trainer.fit(module, oracle_datamodule())
    trust = next(c for c in trainer.callbacks if isinstance(c, TeacherTrust))  # added by the strategy itself
    assert trust.scores["left"]["left"] < 0.2 and trust.scores["left"]["multitask"] == 1.0
    assert trust.standard_errors["left"] == {"left": 0.0, "multitask": 0.0}  # always wrong: no spread, no doubt
    assert module.task_teachers == {"left": "multitask", "right": "right"}  # right: a tie, it keeps its own teacher
    assert "left" not in module.teachers.names  # a teacher that teaches nothing no longer runs
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert saved["teacher_trust"]["choice"]["left"] == ["multitask"]
    with pytest.raises(KeyError, match="teacher_trust=True"):
        TaskSpecificDistiller(Recorder(), teachers, TASKS, teacher_trust=False)


def test_fusion_fuses_only_the_trusted_teachers_and_a_trainer_callback_wins(tmp_path):
    teachers = {"multitask": Oracle(), "left": Oracle(("left",), wrong=("left",)), "right": Oracle(("right",))}
    module = FusionDistiller(Recorder(), teachers, TASKS)
    mine = TeacherTrust(tolerance=0.0, z=0.0, max_batches=1)
    trainer = quick_trainer(tmp_path, max_steps=1, limit_val_batches=1, callbacks=[mine])
    trainer.fit(module, oracle_datamodule())
    assert [c for c in trainer.callbacks if isinstance(c, TeacherTrust)] == [mine]
    assert module.trusted["left"] == ["multitask"] and set(module.trusted["right"]) == {"multitask", "right"}
    step = module.forward_step(oracle_data(4, 3).gather([0, 1, 2, 3]))
    assert set(step.logs) == {"left/fusion_multitask", "right/fusion_multitask", "right/fusion_right"}
    off = FusionDistiller(Recorder(), teachers, TASKS, teacher_trust=False)
    quick_trainer(tmp_path, max_steps=1, limit_val_batches=1).fit(off, oracle_datamodule())
    assert off.trusted == {}


class Signs(nn.Module):
    """A multi-label teacher reading the 4 labels off the signs of the input's first 4 features; ``label``
    is read wrong on every ``flip_every``-th sample from ``offset`` on."""

    def __init__(self, flip_every: int = 0, label: int = 0, offset: int = 0) -> None:
        super().__init__()
        self.flip_every, self.label, self.offset = flip_every, label, offset
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        logits = self.scale * x[:, :4]
        if self.flip_every:
            wrong = logits[self.offset :: self.flip_every, self.label]
            logits[self.offset :: self.flip_every, self.label] = -wrong
        return {"tags": logits}


def test_trust_weighs_multilabel_teachers_by_their_per_sample_spread(tmp_path):
    """Two teachers wrong on a few different samples each: the second best stays (its shortfall is within two
    standard errors of the paired per-sample difference); one wrong everywhere is dropped. Without per-sample
    values for multi-label tasks the standard errors were 0 and only the best stayed."""
    tags = [Task("tags", kind="multilabel", num_classes=4)]

    def split(n: int, seed: int) -> MultiTaskDataset:
        x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
        return MultiTaskDataset(x, {"tags": (x[:, :4] > 0).float()})

    dm = MultiTaskDataModule(split(64, 0), split(128, 1), split(32, 2), batch_size=32)
    teachers = {"a": Signs(32, label=0), "b": Signs(32, label=1, offset=1), "wrong": Signs(1, label=2)}
    student = nn.Sequential(nn.Linear(8, 4))
    module = FusionDistiller(_TagsHead(student), teachers, tags)
    trust = TeacherTrust()
    quick_trainer(tmp_path, max_steps=1, limit_val_batches=4, callbacks=[trust]).fit(module, dm)
    scores = trust.scores["tags"]
    assert scores["wrong"] < min(scores["a"], scores["b"]) < max(scores["a"], scores["b"]) < 1.0
    assert min(trust.standard_errors["tags"]["a"], trust.standard_errors["tags"]["b"]) == 0.0  # the best's own
    assert max(trust.standard_errors["tags"]["a"], trust.standard_errors["tags"]["b"]) > 0.0
    assert sorted(module.trusted["tags"]) == ["a", "b"]


class _TagsHead(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"tags": self.net(x)}


def test_any_strategy_takes_the_trust_choice_through_the_base_hook(tmp_path):
    """Teacher trust is the base's mechanism (DistillationModule.trust_teachers, configure_callbacks): a strategy
    that does not override either, given several teachers and the callback, distils each task from the teacher
    named after it while trust keeps it, else from the best one kept."""
    from lightning_mtkd import AdaptiveDistiller

    teachers = {"left": Oracle(("left",), wrong=("left",)), "right": Oracle(("right",)), "multitask": Oracle()}
    module = AdaptiveDistiller(Recorder(), teachers, TASKS)
    assert not module.teacher_trust  # off by default where the strategy does not choose among teachers
    trainer = quick_trainer(tmp_path, max_steps=1, limit_val_batches=2, callbacks=[TeacherTrust()])
    trainer.fit(module, oracle_datamodule())
    assert module.trusted["left"] == ["multitask"] and "right" in module.trusted["right"]
    step = module.forward_step(oracle_data(4, 3).gather([0, 1, 2, 3]))
    torch.testing.assert_close(step.targets["left"], step.teachers["multitask"].outputs["left"])
    torch.testing.assert_close(step.targets["right"], step.teachers["right"].outputs["right"])


# ------------------------------------------------------------------------------ KD search
def test_rank_candidates_averages_ranks_over_tasks_and_directions():
    scores = [{"acc": 0.9, "mae": 2.0}, {"acc": 0.8, "mae": 1.0}, {"acc": 0.9, "mae": 3.0}]
    assert rank_candidates(scores, {"acc": True, "mae": False}) == [0.75, 1.0, 1.25]


def _fit_shared(tmp_path, callbacks, **kwargs) -> SharedDistiller:
    L.seed_everything(7)
    module = SharedDistiller(Recorder(), Oracle(), TASKS, hint_weight=0.0, **kwargs)
    quick_trainer(tmp_path, max_epochs=2, limit_val_batches=2, callbacks=callbacks).fit(module, oracle_datamodule())
    return module


def test_kd_search_leaves_the_fit_exactly_as_if_its_choice_had_been_given(tmp_path):
    search = KDSearch(temperatures=[2.0], alphas=[0.3], epochs=1)
    searched = _fit_shared(tmp_path, [search])
    by_hand = _fit_shared(tmp_path, [], temperature=2.0, alpha=0.3)
    assert search.chosen == {"temperature": 2.0, "alpha": 0.3}
    tensors = {k: v for k, v in searched.state_dict().items() if isinstance(v, Tensor)}
    assert tensors and tensors.keys() == {k for k, v in by_hand.state_dict().items() if isinstance(v, Tensor)}
    for name, value in tensors.items():
        assert torch.equal(value, by_hand.state_dict()[name]), name


def test_kd_search_choice_is_saved_and_restored_without_searching_again(tmp_path):
    search = KDSearch(temperatures=[1.0, 8.0], alphas=[0.0, 1.0], epochs=1, max_batches=2)
    L.seed_everything(0)
    module = SharedDistiller(Recorder(), Oracle(), TASKS, hint_weight=0.0)
    trainer = quick_trainer(tmp_path, max_epochs=1, limit_val_batches=2, callbacks=[search])
    trainer.fit(module, oracle_datamodule())
    assert len(search.results) == 4 and all(math.isfinite(r["rank"]) for r in search.results)
    # The oracle teacher is always right: learning only from it (alpha 1) is never ranked below learning without it.
    assert search.chosen["alpha"] == 1.0
    assert (module.temperature, module.distillation_alpha) == (search.chosen["temperature"], 1.0)
    path = tmp_path / "searched.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert saved["hyper_parameters"]["alpha"] == 1.0 and saved["kd_search"]["chosen"] == search.chosen
    resumed = KDSearch(temperatures=[3.0], alphas=[0.5], epochs=1)
    module = SharedDistiller(Recorder(), Oracle(), TASKS, hint_weight=0.0)
    trainer = quick_trainer(tmp_path, max_epochs=2, limit_val_batches=2, callbacks=[resumed])
    trainer.fit(module, oracle_datamodule(), ckpt_path=str(path))
    assert resumed.chosen == search.chosen and resumed.results == search.results  # restored, not searched
    assert module.distillation_alpha == 1.0
    with pytest.raises(TypeError, match="distillation module"):
        quick_trainer(tmp_path, max_steps=1, callbacks=[KDSearch()]).fit(
            MultiTaskModule(Recorder(), TASKS), oracle_datamodule()
        )
    with pytest.raises(ValueError, match="alphas"):
        KDSearch(alphas=[1.5])


@pytest.mark.parametrize("limits", [(2, 1), (0.5, 0.5)])
def test_kd_search_trial_fits_keep_to_the_trainers_batch_limits(tmp_path, limits):
    """4 training and 2 validation batches per epoch; with the limits each trial reads 2 and 1."""
    seen: list[Tensor] = []
    module = SharedDistiller(Recorder(seen=seen), Oracle(), TASKS, hint_weight=0.0)
    search = KDSearch(temperatures=[1.0, 4.0], alphas=[0.5], epochs=1)
    train, val = limits
    trainer = quick_trainer(
        tmp_path, max_epochs=1, limit_train_batches=train, limit_val_batches=val, num_sanity_val_steps=0,
        callbacks=[search],
    )  # fmt: skip
    trainer.fit(module, oracle_datamodule())
    trials = 2 * (2 + 1)  # two candidates, each 2 training batches and 1 scoring batch
    assert len(seen) == trials + 2 + 1  # then the fit itself: 2 training batches, 1 validation batch


# ------------------------------------------------------------------------------ DDP
class RecordChoices(L.Callback):
    """Writes, on every rank, the soft-target settings and the teachers each task distils from."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import json
        import os

        choice = {"T": pl_module.temperature, "alpha": pl_module.distillation_alpha, "trusted": pl_module.trusted}
        with open(os.path.join(self.folder, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(choice, f, sort_keys=True)


@pytest.mark.ddp
def test_every_ddp_rank_distils_with_the_same_search_and_trust_choices(tmp_path):
    """Each rank's trial fits see only its own shard, so their rankings may differ: rank 0's choice is broadcast.
    Trust reads the whole validation loader on every rank, so every rank makes the same choice."""
    teachers = {"multitask": Oracle(), "left": Oracle(("left",), wrong=("left",)), "right": Oracle(("right",))}
    module = FusionDistiller(Recorder(), teachers, TASKS)
    search = KDSearch(temperatures=[1.0, 4.0], alphas=[0.2, 0.8], epochs=1, max_batches=1)
    trainer = quick_trainer(
        tmp_path, max_epochs=1, limit_val_batches=1, strategy="ddp_spawn", devices=2,
        callbacks=[search, TeacherTrust(z=0.0), RecordChoices(str(tmp_path))],
    )  # fmt: skip
    trainer.fit(module, oracle_datamodule())
    ranks = [(tmp_path / f"rank{r}.json").read_text() for r in (0, 1)]
    assert ranks[0] == ranks[1] and '"left": ["multitask"]' in ranks[0]


# ------------------------------------------------------------------------------ the configs
@pytest.mark.parametrize(
    "name",
    [
        "shared_consistent.yaml",
        "shared_mix.yaml",
        "shared_unlabelled.yaml",
        "shared_kd_search.yaml",
        "task_specific_trust.yaml",
    ],
)
def test_lever_configs_fit_one_step_through_the_cli(name, tmp_path):
    from pathlib import Path

    from conftest import random_datamodule

    from lightning_mtkd.cli import main
    from lightning_mtkd.models import ConvBackbone, MultiTaskNet

    paths = {}
    for teacher_name, tasks in (("teacher", TASKS), ("teacher_left", TASKS[:1]), ("teacher_right", TASKS[1:])):
        net = MultiTaskNet(ConvBackbone(widths=(4, 8), hidden=16), {t.name: 10 for t in tasks})
        trainer = quick_trainer(tmp_path, max_steps=1)
        trainer.fit(MultiTaskModule(net, tasks), random_datamodule(shape=(1, 36, 36)))
        paths[teacher_name] = tmp_path / f"{teacher_name}.ckpt"
        trainer.save_checkpoint(paths[teacher_name])
    config = Path(__file__).parents[1] / "configs" / "multimnist" / name
    teacher = (
        f"--model.init_args.teacher={{left: {paths['teacher_left']}, right: {paths['teacher_right']}, "
        f"multitask: {paths['teacher']}}}"
        if name.startswith("task_specific")
        else f"--model.init_args.teacher={paths['teacher']}"
    )
    small = [f"--data.init_args.{k}={v}" for k, v in (("num_train", 64), ("num_val", 32), ("num_test", 32))]
    small += ["--data.init_args.batch_size=16"]
    if name == "shared_unlabelled.yaml":
        small += ["--data.init_args.num_unlabelled=32"]
    cli = main(["fit", "--config", str(config), teacher, "--trainer.fast_dev_run=1", *small,
                f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    assert "train/left/kd" in cli.trainer.callback_metrics
    if name == "shared_kd_search.yaml":
        search = next(c for c in cli.trainer.callbacks if isinstance(c, KDSearch))
        assert len(search.results) == 6 and cli.model.temperature == search.chosen["temperature"]
    if name == "shared_unlabelled.yaml":
        assert cli.datamodule.num_unlabelled == 32


def test_a_resumed_fit_draws_the_same_augmented_views_as_an_uninterrupted_one(tmp_path):
    def fit(epochs: int, ckpt: str | None = None) -> tuple[SharedDistiller, L.Trainer]:
        L.seed_everything(5)
        module = SharedDistiller(Recorder(), Oracle(), TASKS, hint_weight=0.0)
        dm = oracle_datamodule(augment=BatchAugment(noise=0.3, mixup=1.0, mixup_fraction=0.5, seed=2))
        trainer = quick_trainer(tmp_path, max_epochs=epochs, limit_val_batches=1)
        trainer.fit(module, dm, ckpt_path=ckpt)
        return module, trainer

    whole, _ = fit(2)
    _, first = fit(1)
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed, _ = fit(2, str(tmp_path / "half.ckpt"))
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_fixed_fusion_weights_are_not_second_guessed_by_default(tmp_path):
    teachers = {"multitask": Oracle(), "left": Oracle(("left",), wrong=("left",)), "right": Oracle(("right",))}
    module = FusionDistiller(Recorder(), teachers, TASKS, fusion="weights", weights=[1.0, 2.0, 2.0])
    trainer = quick_trainer(tmp_path, max_steps=1, limit_val_batches=1)
    trainer.fit(module, oracle_datamodule())
    assert module.trusted == {} and not any(isinstance(c, TeacherTrust) for c in trainer.callbacks)
