"""Researchers' own models and loaders, at every strategy's defaults, with no wrapper.

The matrix: 6 strategies × {a plain ``nn.Module`` with no ``backbone`` fed by plain ``DataLoader``s, a
Hugging Face BERT called with keyword inputs (``input_ids``, ``attention_mask``)}. Each is fitted,
tested after its teacher files moved away, reloaded from its checkpoint without passing the student,
resumed, and exported; the outputs of the reloaded and exported students are compared with the trained one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quick_trainer
from torch.utils.data import DataLoader
from user_models import BertMultiTask, OpaqueNet, PlainConvNet, TimmStyleViT, bert_config

from lightning_mtkd import (
    AdaptiveDistiller,
    AttentionDistiller,
    FusionDistiller,
    MultiTaskModule,
    SharedDistiller,
    Task,
    TaskSpecificDistiller,
    TransferDistiller,
)
from lightning_mtkd.data import MultiTaskDataset
from lightning_mtkd.export import export_checkpoint

IMAGE_TASKS = [Task("left", num_classes=10), Task("right", num_classes=10)]
TEXT_TASKS = [Task("topic", num_classes=4), Task("sentiment", num_classes=2)]
VOCAB, LENGTH = 40, 12


# ---------------------------------------------------------------------------------- data, as plain loaders
def image_data(n: int, seed: int) -> MultiTaskDataset:
    generator = torch.Generator().manual_seed(seed)
    targets = {task.name: torch.randint(0, 10, (n,), generator=generator) for task in IMAGE_TASKS}
    return MultiTaskDataset(torch.randn(n, 1, 12, 12, generator=generator), targets)


def text_data(n: int, seed: int) -> MultiTaskDataset:
    """Token sequences with right padding (``attention_mask`` 0 on pads); labels are functions of the tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=generator)
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=generator)
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    ids = ids * mask  # 0 is the padding token
    targets = {"topic": ids[:, 0] % 4, "sentiment": ((ids > VOCAB // 2).sum(1) > lengths // 2).long()}
    return MultiTaskDataset({"input_ids": ids, "attention_mask": mask}, targets)


def loaders(family: str) -> tuple[DataLoader, DataLoader, DataLoader]:
    make = image_data if family == "plain" else text_data
    train = DataLoader(make(48, 0), batch_size=16, shuffle=True)  # PyTorch's own default collate
    return train, DataLoader(make(16, 1), batch_size=8), DataLoader(make(16, 2), batch_size=8)


# ---------------------------------------------------------------------------------- models, as users bring them
def student(family: str, tasks: tuple[str, ...] | None = None) -> torch.nn.Module:
    if family == "plain":
        return PlainConvNet(width=2, hidden=8, tasks=tasks or ("left", "right"))
    sizes = {task.name: task.num_classes for task in TEXT_TASKS if tasks is None or task.name in tasks}
    return BertMultiTask(bert_config(hidden=8, layers=1, heads=2, vocab=VOCAB), sizes)


def teacher_network(family: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "plain":
        return PlainConvNet(width=4, hidden=16)
    return BertMultiTask(bert_config(hidden=16, layers=2, heads=2, vocab=VOCAB), {"topic": 4, "sentiment": 2})


def tasks_of(family: str) -> list[Task]:
    return IMAGE_TASKS if family == "plain" else TEXT_TASKS


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Per family, two briefly trained teachers saved as MultiTaskModule checkpoints (in a folder that moves)."""
    root = tmp_path_factory.mktemp("teachers")
    files: dict[str, dict[str, str]] = {}
    for family in ("plain", "hf"):
        train, val, _ = loaders(family)
        for name, seed in (("a", 0), ("b", 1)):
            module = MultiTaskModule(teacher_network(family, seed), tasks_of(family))
            trainer = quick_trainer(root, max_steps=2)
            trainer.fit(module, train, val)
            path = root / family / f"{name}.ckpt"
            trainer.save_checkpoint(path)
            files.setdefault(family, {})[name] = str(path)
    return files


def strategy(name: str, family: str, teachers: dict[str, str]) -> MultiTaskModule:
    """Each strategy at its documented defaults: only the student(s), the teacher(s) and the tasks."""
    tasks, first = tasks_of(family), teachers["a"]
    if name == "shared":
        return SharedDistiller(student(family), first, tasks)
    if name == "task_specific":
        return TaskSpecificDistiller(student(family), {task.name: first for task in tasks}, tasks)
    if name == "transfer":
        return TransferDistiller({task.name: student(family, (task.name,)) for task in tasks}, first, tasks)
    if name == "adaptive":
        return AdaptiveDistiller(student(family), first, tasks)
    if name == "attention":
        return AttentionDistiller(student(family), first, tasks)
    return FusionDistiller(student(family), {"a": first, "b": teachers["b"]}, tasks)


STRATEGIES = ["shared", "task_specific", "transfer", "adaptive", "attention", "fusion"]


def batch_inputs(loader: DataLoader):
    return next(iter(loader))["input"]


def outputs(network: torch.nn.Module, inputs) -> dict[str, torch.Tensor]:
    network.eval()
    with torch.no_grad():
        return network(**inputs) if isinstance(inputs, dict) else network(inputs)


@pytest.mark.parametrize("family", ["plain", "hf"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_fits_tests_reloads_resumes_and_exports_a_users_model(name, family, teacher_files, tmp_path):
    L.seed_everything(0)
    train, val, test = loaders(family)
    module = strategy(name, family, teacher_files[family])
    trainer = quick_trainer(tmp_path, max_epochs=1, limit_val_batches=1)
    trainer.fit(module, train, val)
    assert f"val/{tasks_of(family)[0].name}/teacher_acc" in trainer.callback_metrics  # the teachers ran
    path = str(tmp_path / "student.ckpt")
    trainer.save_checkpoint(path)
    expected = outputs(module.model, batch_inputs(test))

    # The teacher files move away: the student reloads from its checkpoint alone (no `student=` passed) and
    # tests and predicts on its own.
    folder = Path(teacher_files[family]["a"]).parent
    moved = folder.with_name(f"{folder.name}-moved")
    folder.rename(moved)
    try:
        reloaded = type(module).load_from_checkpoint(path, weights_only=True)
        with pytest.warns(UserWarning, match="evaluating the student alone"):
            metrics = quick_trainer(tmp_path).test(reloaded, test, verbose=False)[0]
        assert f"test/{tasks_of(family)[0].name}/acc" in metrics
        assert not any("teacher" in key for key in metrics)
        predictions = quick_trainer(tmp_path).predict(reloaded, test)
        assert set(predictions[0]) == {task.name for task in tasks_of(family)}
    finally:
        moved.rename(folder)
    for task, value in outputs(reloaded.model, batch_inputs(test)).items():
        torch.testing.assert_close(value, expected[task])

    # Resuming needs the teachers again (they are back) and continues from the checkpoint.
    resumed = quick_trainer(tmp_path, max_epochs=2, limit_val_batches=1)
    resumed.fit(strategy(name, family, teacher_files[family]), train, val, ckpt_path=path)
    assert resumed.current_epoch == 2

    # Export the student alone, with named inputs for the keyword-called model.
    shape = [1, 12, 12] if family == "plain" else {"input_ids": [LENGTH], "attention_mask": [LENGTH]}
    dtype = "float32" if family == "plain" else "int64"
    exported = str(tmp_path / "student.pt")
    if name == "transfer":  # one per-task student alone
        task = tasks_of(family)[0].name
        names = export_checkpoint(path, exported, shape, "torchscript", student=f"model.{task}", input_dtype=dtype)
        expected = {names[0]: expected[task]}
    else:
        names = export_checkpoint(path, exported, shape, "torchscript", input_dtype=dtype)
    scripted = torch.jit.load(exported)
    inputs = batch_inputs(test)
    got = scripted(*inputs.values()) if isinstance(inputs, dict) else scripted(inputs)
    for task in names:
        torch.testing.assert_close(got[task], expected[task], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- pieces of the above, alone
def test_a_plain_dataloader_over_multitask_dataset_collates_like_the_fast_path():
    dataset = text_data(10, 0)
    batch = next(iter(DataLoader(dataset, batch_size=4)))  # default_collate of single samples
    gathered = dataset.gather([0, 1, 2, 3])
    for key in ("input_ids", "attention_mask"):
        torch.testing.assert_close(batch["input"][key], gathered["input"][key])
    torch.testing.assert_close(batch["targets"]["topic"], gathered["targets"]["topic"])
    torch.testing.assert_close(batch["index"], gathered["index"])


def test_shared_feature_is_found_in_any_model():
    from lightning_mtkd.models.hooks import find_shared_feature

    image = torch.zeros(2, 1, 12, 12)
    tokens = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    assert find_shared_feature(PlainConvNet(), image) == "trunk"
    assert find_shared_feature(TimmStyleViT(), image) == "norm"  # pooled in forward: the last module before it
    assert find_shared_feature(BertMultiTask(bert_config(), {"topic": 4}), tokens) == "dropout"


def test_token_features_are_adapted_and_compared_on_real_tokens_only(teacher_files):
    """BERT hidden states (B, L, D) → a token adaptor; padded tokens never count."""
    module = SharedDistiller(
        student("hf"),
        teacher_files["hf"]["a"],
        TEXT_TASKS,
        student_feature="bert.encoder.layer.0",
        teacher_feature="bert.encoder.layer.1",
    )
    train, _, _ = loaders("hf")
    module.example_input_array = batch_inputs(train)
    module.setup("fit")
    assert module.adaptors["hint"].proj.in_features == 8 and module.adaptors["hint"].proj.out_features == 16
    batch = next(iter(train))
    step = module.forward_step(batch)
    hint = module.hint_terms(step)["hint"]
    # Changing the teacher's features on padded tokens changes nothing.
    mask = batch["input"]["attention_mask"].bool()
    noisy = step.teachers["teacher"].features["bert.encoder.layer.1"].clone()
    noisy[~mask] = 100.0
    step.teachers["teacher"].features["bert.encoder.layer.1"] = noisy
    torch.testing.assert_close(module.hint_terms(step)["hint"], hint)


def test_attention_is_read_from_hugging_face_and_timm_style_models():
    from lightning_mtkd.models.hooks import FeatureTap

    bert = BertMultiTask(bert_config(hidden=16, layers=2, heads=2), {"topic": 4}).eval()
    tokens = text_data(3, 0).gather([0, 1, 2])["input"]
    tap = FeatureTap(bert, [], attention_paths=["bert.encoder.layer.1.attention.self"])
    with torch.no_grad():
        bert(**tokens)
    weights = tap.pop()["bert.encoder.layer.1.attention.self"]
    assert weights.shape == (3, 2, LENGTH, LENGTH)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, LENGTH))
    assert (weights[~tokens["attention_mask"].bool()[:, None, None, :].expand_as(weights)] < 1e-6).all()  # no pads

    vit = TimmStyleViT().eval()
    image = torch.randn(2, 1, 12, 12)
    before = vit(image)["left"]
    tap = FeatureTap(vit, [], attention_paths=["blocks.0.attn"])
    after = vit(image)["left"]
    torch.testing.assert_close(after, before)  # the fused kernel stays on; outputs unchanged
    weights = tap.pop()["blocks.0.attn"]
    attention = vit.blocks[0].attn
    x = vit.blocks[0].norm1(vit.patch_embed(image).flatten(2).transpose(1, 2) + vit.pos_embed)
    q, k, _ = attention.qkv(x).reshape(2, 9, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
    torch.testing.assert_close(weights, torch.softmax(q @ k.transpose(-2, -1) * attention.scale, dim=-1))


def test_attention_distillation_of_timm_style_vits_at_defaults(tmp_path):
    teacher, small = TimmStyleViT(dim=16, depth=4, num_heads=4), TimmStyleViT(dim=8, depth=2, num_heads=2)
    module = AttentionDistiller(small, teacher, IMAGE_TASKS)
    train, val, _ = loaders("plain")
    trainer = quick_trainer(tmp_path, max_epochs=1, limit_val_batches=1)
    trainer.fit(module, train, val)
    assert [(p.student, p.teacher) for p in module.layers] == [("blocks.0.attn", "blocks.1.attn"),
                                                               ("blocks.1.attn", "blocks.3.attn")]
    assert module.kinds == ["weights", "weights"] and "train/attention" in trainer.callback_metrics


def test_padded_query_tokens_do_not_count_in_attention_distillation(teacher_files):
    module = AttentionDistiller(student("hf"), teacher_files["hf"]["a"], TEXT_TASKS)
    train, _, _ = loaders("hf")
    module.example_input_array = batch_inputs(train)
    module.setup("fit")
    batch = next(iter(train))
    step = module.forward_step(batch)
    loss = module.distillation_loss(step)["attention"]
    mask = batch["input"]["attention_mask"].bool()
    for pair in module.layers:
        rows = step.student.features[pair.student].clone()
        rows[~mask[:, None, :, None].expand_as(rows)] = 0.5  # the rows of padded queries change
        step.student.features[pair.student] = rows
    torch.testing.assert_close(module.distillation_loss(step)["attention"], loss)


# ---------------------------------------------------------------------------------- bad inputs, clear errors
def test_attention_weights_missing_say_how_to_get_them(tmp_path):
    sdpa = BertMultiTask(bert_config(eager=False), {"topic": 4, "sentiment": 2})
    module = AttentionDistiller(student("hf"), sdpa, TEXT_TASKS)
    train, val, _ = loaders("hf")
    with pytest.raises(RuntimeError, match="returned no attention weights.*attn_implementation='eager'"):
        quick_trainer(tmp_path, max_steps=1).fit(module, train, val)


def test_feature_paths_that_name_a_list_or_an_output_object_are_refused_with_the_selector_to_use(tmp_path):
    teacher = BertMultiTask(bert_config(), {"topic": 4, "sentiment": 2})
    module = SharedDistiller(student("hf"), teacher, TEXT_TASKS, student_feature="bert", teacher_feature="bert")
    train, val, _ = loaders("hf")
    with pytest.raises(TypeError, match=r"'bert' names a module that returns a BaseModelOutput.*'bert\[last_hidden"):
        quick_trainer(tmp_path, max_steps=1).fit(module, train, val)
    # The selector it suggests works.
    module = SharedDistiller(student("hf"), teacher, TEXT_TASKS, student_feature="bert[last_hidden_state]",
                             teacher_feature="bert[last_hidden_state]")
    quick_trainer(tmp_path, max_steps=1, limit_val_batches=1).fit(module, train, val)
    assert module.adaptors["hint"].proj.in_features == 8

    class Pyramid(torch.nn.Module):  # timm's features_only: a list of maps
        def forward(self, x):
            return [x, x[:, :, ::2, ::2]]

    from lightning_mtkd.models.hooks import feature_tensor

    with pytest.raises(TypeError, match=r"returns a list of 2 .*'stem\[0\]' or 'stem\[-1\]'"):
        feature_tensor(Pyramid()(torch.zeros(1, 1, 4, 4)), "stem")


def test_input_keys_the_model_does_not_take_are_named(tmp_path):
    dataset = text_data(16, 0)
    dataset.inputs["token_type_ids"] = torch.zeros_like(dataset.inputs["input_ids"])  # BertMultiTask takes none
    module = MultiTaskModule(student("hf"), TEXT_TASKS)
    with pytest.raises(TypeError, match=r"takes no input\(s\) \['token_type_ids'\].*unpack_inputs=False"):
        quick_trainer(tmp_path, max_steps=1).fit(module, DataLoader(dataset, batch_size=8))


def test_a_checkpoint_whose_model_cannot_be_rebuilt_says_what_to_pass(tmp_path):
    module = MultiTaskModule(OpaqueNet(hidden=12), IMAGE_TASKS)
    train, _, test = loaders("plain")
    trainer = quick_trainer(tmp_path, max_steps=1)
    trainer.fit(module, train)
    path = str(tmp_path / "opaque.ckpt")
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"user_models.OpaqueNet but not its constructor argument\(s\) \['hidden'\]"):
        MultiTaskModule.load_from_checkpoint(path, weights_only=True)
    reloaded = MultiTaskModule.load_from_checkpoint(path, weights_only=True, model=OpaqueNet(hidden=12))
    torch.testing.assert_close(outputs(reloaded.model, batch_inputs(test))["left"],
                               outputs(module.model, batch_inputs(test))["left"])
    # As a teacher: the error names the teacher and the fix.
    with pytest.raises(ValueError, match=r"teacher 'teacher'.*load_module\("):
        quick_trainer(tmp_path, max_steps=1).fit(SharedDistiller(PlainConvNet(), path, IMAGE_TASKS), train)


def test_a_checkpoint_whose_model_class_cannot_be_imported_is_named(tmp_path):
    module = MultiTaskModule(PlainConvNet(), IMAGE_TASKS)
    trainer = quick_trainer(tmp_path, max_steps=1)
    trainer.fit(module, loaders("plain")[0])
    path = tmp_path / "gone.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["model"]["class_path"] = "no_such_package.PlainConvNet"
    torch.save(checkpoint, path)
    with pytest.raises(ImportError, match=r"model: cannot import 'no_such_package'.*pass the object itself \(`model"):
        MultiTaskModule.load_from_checkpoint(path, weights_only=True)


def test_export_accepts_the_network_when_the_checkpoint_cannot_rebuild_it(tmp_path):
    from lightning_mtkd.cli import main

    module = MultiTaskModule(OpaqueNet(hidden=12), IMAGE_TASKS)
    trainer = quick_trainer(tmp_path, max_steps=1)
    trainer.fit(module, loaders("plain")[0])
    path = str(tmp_path / "opaque.ckpt")
    trainer.save_checkpoint(path)
    output = str(tmp_path / "opaque.pt")
    args = ["export", "--ckpt_path", path, "--format", "torchscript", "--output", output, "--input_shape=[1,12,12]"]
    with pytest.raises(ValueError, match=r"--model.class_path"):
        main(args)
    main([*args, "--model=user_models.OpaqueNet", "--model.hidden=12"])
    x = torch.randn(3, 1, 12, 12)
    torch.testing.assert_close(torch.jit.load(output)(x)["left"], outputs(module.model, x)["left"])


def test_multitasknet_reads_timm_num_features():
    from lightning_mtkd.models import MultiTaskNet

    class Features(torch.nn.Module):
        num_features = 6

        def forward(self, x):
            return x

    net = MultiTaskNet(Features(), {"a": 3})
    assert net.heads["a"].in_features == 6


def test_moved_teacher_files_never_break_evaluation(tmp_path, teacher_files):
    """The teacher-free check is a real one: an empty source list used to make it never true."""
    module = FusionDistiller(student("plain"), dict(teacher_files["plain"]), IMAGE_TASKS, fusion="learned")
    train, val, test = loaders("plain")
    trainer = quick_trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(module, train, val)
    path = str(tmp_path / "fusion.ckpt")
    trainer.save_checkpoint(path)
    copy = tmp_path / "teachers"
    shutil.copytree(Path(teacher_files["plain"]["a"]).parent, copy)
    moved = FusionDistiller.load_from_checkpoint(
        path, weights_only=True, teacher={"a": str(copy / "a.ckpt"), "b": str(tmp_path / "nowhere.ckpt")}
    )
    with pytest.warns(UserWarning, match=r"teacher\(s\) not available \(\{'b': \"no file at"):
        quick_trainer(tmp_path).test(moved, test, verbose=False)
    assert not moved.teachers.active


def test_heads_that_read_different_inputs_ask_for_the_feature_path():
    from lightning_mtkd.models.hooks import find_shared_feature

    class TwoTrunks(torch.nn.Module):  # each task with its own trunk: no one shared feature
        def __init__(self):
            super().__init__()
            self.trunk_a, self.trunk_b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
            self.head_a, self.head_b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

        def forward(self, x):
            return {"a": self.head_a(self.trunk_a(x)), "b": self.head_b(self.trunk_b(x))}

    with pytest.raises(ValueError, match=r"task heads \{'a': 'head_a', 'b': 'head_b'\} read different inputs.*"
                                         r"`student_feature`"):
        find_shared_feature(TwoTrunks(), torch.zeros(2, 4), owner="student")


def test_a_network_class_that_cannot_be_imported_again_asks_for_the_network(tmp_path):
    class Local(torch.nn.Module):  # defined in a function: no import path to rebuild it from
        def __init__(self):
            super().__init__()
            self.out = torch.nn.ModuleDict({t.name: torch.nn.Linear(144, 10) for t in IMAGE_TASKS})

        def forward(self, x):
            return {task: head(x.flatten(1)) for task, head in self.out.items()}

    module = SharedDistiller(Local(), PlainConvNet(), IMAGE_TASKS, hint_weight=0)
    trainer = quick_trainer(tmp_path, max_steps=1)
    trainer.fit(module, loaders("plain")[0])
    path = tmp_path / "local.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"student: this checkpoint does not record how to build the student.*"
                                         r"load_from_checkpoint\(path, student=my_model\)"):
        SharedDistiller.load_from_checkpoint(path, weights_only=True, teacher=PlainConvNet())
    reloaded = SharedDistiller.load_from_checkpoint(path, weights_only=True, teacher=PlainConvNet(), student=Local())
    assert set(reloaded.model.out) == {"left", "right"}


def test_the_teacher_cache_keys_dict_inputs_by_every_leaf(tmp_path, teacher_files):
    from lightning_mtkd.callbacks import TeacherCache
    from lightning_mtkd.callbacks.teacher_cache import dataset_fingerprint

    dataset = text_data(48, 0)
    changed = text_data(48, 0)
    changed.inputs["attention_mask"] = changed.inputs["attention_mask"].flip(0)  # one leaf differs
    assert dataset_fingerprint(dataset) != dataset_fingerprint(changed)

    losses = {}
    for cached in (False, True):
        L.seed_everything(0)
        module = SharedDistiller(student("hf"), teacher_files["hf"]["a"], TEXT_TASKS)
        cache = [TeacherCache(storage="memory")] if cached else []
        trainer = quick_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=cache)
        trainer.fit(module, DataLoader(dataset, batch_size=16))
        losses[cached] = trainer.callback_metrics["train/loss"]
        if cached:
            assert cache[0].counts["train"] == {"cached": 3, "computed": 3}  # the second epoch ran no teacher
    torch.testing.assert_close(losses[True], losses[False])


def hf_shared_module():
    """Module scope, so ddp_spawn can pickle it: a tiny BERT pair with keyword inputs."""
    torch.manual_seed(0)
    teacher = teacher_network("hf", 0)
    torch.manual_seed(1)
    return SharedDistiller(student("hf"), teacher, TEXT_TASKS)


@pytest.mark.ddp
def test_keyword_inputs_under_two_ddp_processes_match_one_process(tmp_path):
    module = hf_shared_module()
    data = text_data(32, 0)
    trainer = quick_trainer(tmp_path, max_epochs=1, strategy="ddp_spawn", devices=2)
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(text_data(16, 1), batch_size=8))
    synced = {k: v.clone() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    single = quick_trainer(tmp_path, devices=1)
    single.validate(module, DataLoader(text_data(16, 1), batch_size=8), verbose=False)
    for key in ("val/topic/acc", "val/sentiment/acc", "val/loss", "val/topic/teacher_acc"):
        torch.testing.assert_close(synced[key], single.callback_metrics[key], msg=key)
