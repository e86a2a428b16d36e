"""Vectorised per-task bookkeeping: equals torchmetrics per task, DDP-summed, logged once per run, no host sync."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import quick_trainer
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_mtkd import DistillationModule, MultiTaskModule, Task
from lightning_mtkd.bookkeeping import TaskGroupMetrics, TaskMetrics, TermMeans
from lightning_mtkd.data import MultiTaskDataModule, MultiTaskDataset
from lightning_mtkd.metrics import KIND_METRICS
from lightning_mtkd.models import MLPBackbone, MultiTaskNet

#: Every kind, several tasks per group, custom missing values, a task with no label at all, and two segmentation
#: tasks of one group at different resolutions (the per-task fallback of a group).
TASKS = [
    Task("a", num_classes=2),
    Task("b", num_classes=2),
    Task("c", num_classes=5),
    Task("d", num_classes=5, ignore_value=-1),
    Task("unlabelled", num_classes=5),
    Task("m1", kind="multilabel", num_classes=4),
    Task("m2", kind="multilabel", num_classes=4),
    Task("r1", kind="regression", num_classes=1),
    Task("r2", kind="regression", num_classes=3),
    Task("r3", kind="regression", num_classes=3),
    Task("r_none", kind="regression", num_classes=3),
    Task("s1", kind="segmentation", num_classes=3),
    Task("s2", kind="segmentation", num_classes=3),
    Task("s_bg", kind="segmentation", num_classes=3, ignore_value=0),
    Task("depth", kind="depth", num_classes=1),
    Task("normals", kind="normals", num_classes=3),
]
SMALL_MAPS = {"s2"}  # 2×2 instead of 4×4


def random_outputs_and_targets(task: Task, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random logits or values and labels with about a quarter missing (all of them for the unlabelled tasks)."""
    size = 2 if task.name in SMALL_MAPS else 4
    c = task.num_classes

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator)

    def missing(shape: tuple[int, ...]) -> Tensor:
        if task.name in ("unlabelled", "r_none"):
            return torch.ones(shape, dtype=torch.bool)
        return torch.rand(shape, generator=generator) < 0.25

    if task.kind == "classification":
        output, target = 3 * rand(batch, c), torch.randint(0, c, (batch,), generator=generator)
    elif task.kind == "multilabel":
        output, target = 3 * rand(batch, c), torch.randint(0, 2, (batch, c), generator=generator)
    elif task.kind == "regression":
        output, target = rand(batch, c), rand(batch, c) if c > 1 else rand(batch)  # a (B,) target for one output
    elif task.kind == "segmentation":
        output, target = 3 * rand(batch, c, size, size), torch.randint(0, c, (batch, size, size), generator=generator)
    elif task.kind == "depth":
        output, target = rand(batch, 1, size, size), rand(batch, size, size).abs() + 0.1  # no channel dim
    else:
        output, target = rand(batch, 3, size, size), rand(batch, 3, size, size)
    value = task.missing_value
    target = target.masked_fill(missing(tuple(target.shape)), value if math.isnan(value) else int(value))
    return output, target


def batches(count: int, batch: int = 8, seed: int = 0) -> list[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(count):
        pairs = {task.name: random_outputs_and_targets(task, batch, generator) for task in TASKS}
        result.append(({n: o for n, (o, _) in pairs.items()}, {n: t for n, (_, t) in pairs.items()}))
    return result


def torchmetrics_reference(data, stage: str = "val", skip: dict[int, set[str]] | None = None) -> dict[str, Tensor]:
    """Each task's torchmetrics metrics (``Task.make_metrics``, fed ``Task.metric_inputs``), one task at a time."""
    expected = {}
    for task in TASKS:
        metrics = task.make_metrics()
        for i, (outputs, targets) in enumerate(data):
            if skip and task.name in skip.get(i, set()):
                continue
            for metric in metrics.values():
                metric.update(*task.metric_inputs(outputs[task.name], targets[task.name]))
        for name, metric in metrics.items():
            expected[f"{stage}/{task.name}/{name}"] = metric.compute()
    return expected


def assert_metrics_equal(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value.float(), rtol=1e-5, atol=1e-6, equal_nan=True, msg=key)


def test_every_kind_names_the_metrics_its_task_makes():
    for kind, names in KIND_METRICS.items():
        num_classes = {"depth": 1, "normals": 3}.get(kind, 3)
        assert set(names) == set(Task("t", kind=kind, num_classes=num_classes).make_metrics()), kind


def test_grouped_metrics_equal_torchmetrics_per_task_on_random_data():
    data = batches(5)
    metrics = TaskMetrics({t.name: t for t in TASKS}, "val")
    # Same kind, width and missing value: one group (segmentation tasks of two resolutions included).
    assert [group.names for group in metrics.groups if group.kind == "classification"] == [
        ["a", "b"],
        ["c", "unlabelled"],
        ["d"],
    ]
    assert [group.names for group in metrics.groups if group.kind == "segmentation"] == [["s1", "s2"], ["s_bg"]]
    for outputs, targets in data:
        metrics.update(outputs, targets)
    expected = torchmetrics_reference(data)
    assert_metrics_equal(metrics.compute(), expected)
    # The edge cases agree too: no label at all gives accuracy 0 and a NaN mean error, as torchmetrics.
    assert expected["val/unlabelled/acc"] == 0 and math.isnan(expected["val/r_none/mae"])
    # Per task and metric, as a MetricCollection (what AdaptiveDistiller reads after validation).
    assert metrics["c"]["acc"].update_called
    torch.testing.assert_close(metrics["c"]["acc"].compute(), expected["val/c/acc"])
    torch.testing.assert_close(metrics["m1"].compute()["val/m1/f1"], expected["val/m1/f1"])


def test_tasks_left_out_of_some_batches_count_only_where_given():
    """A teacher's targets may cover some tasks only: those rows are updated, the others keep their counts."""
    data = batches(4, seed=1)
    skip = {0: {"b", "m2", "r1"}, 2: {"a", "s1", "normals"}}
    metrics = TaskMetrics({t.name: t for t in TASKS}, "test", who="teacher_")
    for i, (outputs, targets) in enumerate(data):
        metrics.update({n: o for n, o in outputs.items() if n not in skip.get(i, set())}, targets)
    expected = torchmetrics_reference(data, "test", skip)
    teacher_keys = {"/teacher_".join(key.rsplit("/", 1)): value for key, value in expected.items()}
    assert_metrics_equal(metrics.compute(), teacher_keys)


def test_updates_never_write_into_the_state_tensors_in_place():
    """A module sent to ddp_spawn's processes shares its tensors' memory with them: the state must be replaced,
    not added to in place, or every process would count into the parent's (and each other's) tensors."""
    metrics = TaskMetrics({t.name: t for t in TASKS}, "val")
    before = {id(group): group.counts for group in metrics.groups}
    terms_before = metrics.terms.sums
    outputs, targets = batches(1)[0]
    metrics.update(outputs, targets)
    metrics.update({"a": outputs["a"]}, targets)  # a subset: the index_add path
    metrics.update_terms({"a": torch.tensor(1.0)}, {}, {}, 4)
    for group in metrics.groups:
        assert group.counts is not before[id(group)] and int(before[id(group)].sum()) == 0
    assert metrics.terms.sums is not terms_before


def test_term_means_are_batch_size_weighted_and_grow_with_new_terms():
    means = TermMeans()
    means.update(("x", "y"), [torch.tensor(1.0), torch.tensor(3.0)], 4)
    means.update(("y", "z"), [torch.tensor(5.0), torch.tensor(7.0)], 2)  # x absent here, z new
    means.update(("x", "y", "z"), [torch.tensor(2.0), torch.tensor(1.0), torch.tensor(1.0)], 2)
    assert means.names == ["x", "y", "z"]
    torch.testing.assert_close(
        means.compute(), torch.tensor([(4 * 1 + 2 * 2) / 6, (4 * 3 + 2 * 5 + 2 * 1) / 8, (2 * 7 + 2 * 1) / 4])
    )
    means.reset()
    means.update(("x", "y", "z"), [torch.tensor(1.0)] * 3, 1)
    torch.testing.assert_close(means.compute(), torch.ones(3))


# ---------------------------------------------------------------------------------- DDP: two gloo processes
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _update_on_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One of two processes: add its own batches (and terms) and compute, which sums the states over both."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        metrics = TaskMetrics({t.name: t for t in TASKS}, "val")
        for outputs, targets in batches(6)[rank::world_size]:
            metrics.update(outputs, targets)
        metrics.update_terms({"a": torch.tensor(1.0 + rank)}, {"kd/a": torch.tensor(2.0)}, {}, 8 + 8 * rank)
        computed = metrics.compute()
        terms = metrics.terms.compute()
        # Computing syncs a copy and keeps the process's own state, so accumulation could go on.
        local = metrics.groups[0].counts.clone()
        torch.save({"metrics": computed, "terms": terms, "local": local}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_gloo_processes_compute_what_one_process_computes_from_all_batches(tmp_path):
    mp.spawn(_update_on_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = torchmetrics_reference(batches(6))
    single = TaskMetrics({t.name: t for t in TASKS}, "val")
    for outputs, targets in batches(6)[0::2]:
        single.update(outputs, targets)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert_metrics_equal(result["metrics"], expected)
        # Terms: (8·1 + 16·2) / 24 for the loss of `a`, 2 for its KD term.
        torch.testing.assert_close(result["terms"], torch.tensor([40 / 24, 2.0]))
    torch.testing.assert_close(torch.load(tmp_path / "rank0.pt")["local"], single.groups[0].counts)


# ---------------------------------------------------------------------------------- in a Trainer
def binary_tasks(count: int) -> list[Task]:
    return [Task(f"t{i}", num_classes=2) for i in range(count)]


def binary_datamodule(tasks: list[Task], n: int = 64, batch_size: int = 16) -> MultiTaskDataModule:
    generator = torch.Generator().manual_seed(0)

    def split(size: int) -> MultiTaskDataset:
        targets = {t.name: torch.randint(0, 2, (size,), generator=generator) for t in tasks}
        return MultiTaskDataset(torch.randn(size, 12, generator=generator), targets)

    return MultiTaskDataModule(split(n), split(n // 2), batch_size=batch_size)


def binary_net(tasks: list[Task]) -> MultiTaskNet:
    return MultiTaskNet(MLPBackbone(in_features=12, hidden=(8,)), {t.name: 2 for t in tasks})


class CountingLogs(MultiTaskModule):
    """Records how many `log` calls each step made."""

    def setup(self, stage):
        super().setup(stage)
        self.calls: dict[str, list[int]] = {"train": [], "val": []}
        self._current: list[int] | None = None

    def log(self, *args, **kwargs):
        if self._current is not None:
            self._current[0] += 1
        return super().log(*args, **kwargs)

    def shared_step(self, batch, stage):
        self._current = [0]
        try:
            return super().shared_step(batch, stage)
        finally:
            self.calls[stage].append(self._current[0])
            self._current = None


@pytest.mark.parametrize("count", [1, 14])
def test_a_step_makes_one_log_call_whatever_the_number_of_tasks(tmp_path, count):
    tasks = binary_tasks(count)
    module = CountingLogs(binary_net(tasks), tasks)
    trainer = quick_trainer(tmp_path, max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(module, binary_datamodule(tasks))
    # The first step of each loop run hands Lightning the per-task keys (accuracy and loss per task), then one
    # call per step: the total loss.
    first = 1 + 2 * count
    assert module.calls["train"] == [first, 1, 1, 1] * 2
    assert module.calls["val"] == [first, 1] * 2
    keys = {f"{stage}/t{i}/{m}" for stage in ("train", "val") for i in range(count) for m in ("acc", "loss")}
    assert keys <= set(trainer.callback_metrics)


class RecordTerms(Callback):
    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, float]]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1:
            self.steps.append((len(batch["index"]), {k: float(v) for k, v in module.step_terms.items()}))


def test_logged_terms_are_the_batch_weighted_means_of_the_epoch(tmp_path):
    tasks = binary_tasks(3)
    teacher = binary_net(tasks)
    module = DistillationModule(binary_net(tasks), teacher, tasks)
    record = RecordTerms()
    trainer = quick_trainer(tmp_path, max_epochs=2, callbacks=[record])
    trainer.fit(module, binary_datamodule(tasks, n=70))  # batches of 16, 16, 16, 16 and 6
    assert [size for size, _ in record.steps] == [16, 16, 16, 16, 6]
    total = sum(size for size, _ in record.steps)
    for term, key in [("t0/loss", "train/t0/loss"), ("kd/t2", "train/t2/kd"), ("loss", "train/loss_epoch")]:
        mean = sum(size * values[term] for size, values in record.steps) / total
        assert float(trainer.callback_metrics[key]) == pytest.approx(mean, rel=1e-6), key


class Crash(Exception):
    pass


class CrashAt(Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 2:
            raise Crash  # the loop never reaches its epoch end, where Lightning would reset the metrics


class CountAtEpochEnd(Callback):
    def on_train_epoch_end(self, trainer, module):
        self.labelled = int(module.train_metrics.groups[0].counts[:, 1].sum())


def test_a_module_reused_after_an_interrupted_run_drops_that_runs_partial_state(tmp_path):
    tasks = binary_tasks(2)
    module = MultiTaskModule(binary_net(tasks), tasks)
    with pytest.raises(Crash):
        quick_trainer(tmp_path, max_epochs=1, callbacks=[CrashAt()]).fit(module, binary_datamodule(tasks))
    assert int(module.train_metrics.groups[0].counts[:, 1].sum()) == 2 * 2 * 16  # two batches of two tasks
    count = CountAtEpochEnd()
    trainer = quick_trainer(tmp_path, max_epochs=1, callbacks=[count])
    trainer.fit(module, binary_datamodule(tasks))
    assert count.labelled == 2 * 64  # this run's epoch only
    assert {"train/t0/acc", "val/t1/acc", "train/t1/loss"} <= set(trainer.callback_metrics)


# ---------------------------------------------------------------------------------- no host sync in a step
ALL_KINDS = [
    Task("cls", num_classes=3),
    Task("ml", kind="multilabel", num_classes=4),
    Task("reg", kind="regression", num_classes=2),
    Task("seg", kind="segmentation", num_classes=3),
    Task("depth", kind="depth", num_classes=1),
    Task("normals", kind="normals", num_classes=3),
]


class AllKindsNet(nn.Module):
    """A conv trunk, pooled for the per-sample heads, 1×1 convolutions for the dense ones."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.trunk = nn.Conv2d(1, width, 3, padding=1)
        self.heads = nn.ModuleDict(
            {
                "cls": nn.Linear(width, 3),
                "ml": nn.Linear(width, 4),
                "reg": nn.Linear(width, 2),
                "seg": nn.Conv2d(width, 3, 1),
                "depth": nn.Conv2d(width, 1, 1),
                "normals": nn.Conv2d(width, 3, 1),
            }
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.trunk(x).relu()
        pooled = features.mean((2, 3))
        return {name: head(pooled if isinstance(head, nn.Linear) else features) for name, head in self.heads.items()}


def all_kinds_datamodule(n: int = 32) -> MultiTaskDataModule:
    generator = torch.Generator().manual_seed(0)

    def split(size: int) -> MultiTaskDataset:
        targets = {}
        for task in ALL_KINDS:
            _, target = random_outputs_and_targets(task, size, generator)
            targets[task.name] = target
        return MultiTaskDataset(torch.randn(size, 1, 4, 4, generator=generator), targets)

    return MultiTaskDataModule(split(n), split(n), batch_size=8)


#: Ops that make the host wait for the device: reading a value, or a result whose size depends on the data.
SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.bincount.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_dim.default,
    torch.ops.aten.unique_consecutive.default,
}
BOOL_INDEXING_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default}


class SyncCounter(TorchDispatchMode):
    """Counts the ops that would sync the host with a GPU: `.item()`, `nonzero`, boolean-mask indexing, …"""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func in BOOL_INDEXING_OPS and any(
            isinstance(i, Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        )
        if func in SYNC_OPS or boolean_index:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


class Watched(DistillationModule):
    def setup(self, stage):
        super().setup(stage)
        self.counters = {(epoch, stage): SyncCounter() for epoch in range(2) for stage in ("train", "val")}

    def shared_step(self, batch, stage):
        if self.trainer.sanity_checking:
            return super().shared_step(batch, stage)
        with self.counters[(self.current_epoch, stage)]:
            return super().shared_step(batch, stage)


def test_bookkeeping_of_every_kind_never_syncs_the_host_after_the_first_batch(tmp_path):
    """The first batch of a stage checks the labels (a sync); after that a step — losses, metrics of every kind,
    teacher metrics, logged terms — has no op that waits for a GPU."""
    torch.manual_seed(0)
    module = Watched(AllKindsNet(4), AllKindsNet(8), ALL_KINDS)
    trainer = quick_trainer(tmp_path, max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(module, all_kinds_datamodule())
    assert module.counters[(0, "train")].syncs  # the first batch's label checks: the counter sees them
    assert module.counters[(1, "train")].syncs == []
    assert module.counters[(1, "val")].syncs == []
    for task in ALL_KINDS:
        for metric in KIND_METRICS[task.kind]:
            assert torch.isfinite(trainer.callback_metrics[f"val/{task.name}/teacher_{metric}"])


def test_group_rejects_direct_view_updates_and_reads_single_task_results():
    group = TaskGroupMetrics("regression", 1, math.nan, ["only"])
    group.update([torch.tensor([[1.0], [2.0]])], [torch.tensor([1.5, math.nan])])
    torch.testing.assert_close(group.compute()["mae"], torch.tensor(0.5))  # one task: torchmetrics squeezes it
    metrics = TaskMetrics({"only": Task("only", kind="regression", num_classes=1)}, "val")
    metrics.update({"only": torch.tensor([[1.0], [2.0]])}, {"only": torch.tensor([1.5, math.nan])})
    torch.testing.assert_close(metrics["only"]["mae"].compute(), torch.tensor(0.5))
    with pytest.raises(RuntimeError, match="updated through its TaskMetrics"):
        metrics["only"]["mae"].update(torch.zeros(1), torch.zeros(1))
