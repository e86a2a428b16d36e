"""AttentionDistiller: attention maps by hand, the losses' behaviour, reading transformer attention, errors."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import HEADS, TASKS, conv_net, quick_trainer, random_datamodule
from torch import nn

from lightning_mtkd import AttentionDistiller, AttentionPair
from lightning_mtkd.losses.functional import attention_map, attention_probability_loss, attention_transfer_loss
from lightning_mtkd.models import FeatureTap, MultiTaskNet, PatchTransformerBackbone, request_attention_weights

CONV_LAYERS = [{"student": "backbone.features.3", "teacher": "backbone.features.3"},
               {"student": "backbone.features.7", "teacher": "backbone.features.7"}]


def vit(dim=8, depth=2, heads=2):
    return MultiTaskNet(PatchTransformerBackbone(image_size=12, patch_size=4, dim=dim, depth=depth, heads=heads), HEADS)


# ------------------------------------------------------------------------------ conv attention maps
def test_attention_map_by_hand():
    feature = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]], [[2.0, 0.0], [1.0, -1.0]]]])  # (1, 2, 2, 2)
    assert attention_map(feature).tolist() == [[[5.0, 4.0], [1.0, 10.0]]]  # sum_c |A_c|^2
    assert attention_map(feature, p=1).tolist() == [[[3.0, 2.0], [1.0, 4.0]]]


def test_attention_transfer_loss_by_hand_zero_for_identical_and_growing():
    student = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # q = (1, 0, 0, 0)
    teacher = torch.tensor([[[[0.0, 2.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])[:1]  # q = (0, 4, 0, 0)
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(2.0)  # |(1,0)-(0,1)|^2
    torch.manual_seed(0)
    t = torch.randn(3, 8, 4, 4)
    assert attention_transfer_loss(t.clone(), t).item() == pytest.approx(0.0, abs=1e-7)
    # any channel count: only the spatial map matters, and it is scale free
    assert attention_transfer_loss(torch.cat([t, t], dim=1) * 3, t).item() == pytest.approx(0.0, abs=1e-6)
    noise = torch.randn_like(t)
    losses = [attention_transfer_loss(t + eps * noise, t).item() for eps in (0.1, 0.5, 1.0, 3.0)]
    assert losses == sorted(losses) and losses[0] > 0


def test_attention_transfer_resizes_the_student_map():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 2, 2), torch.randn(2, 5, 4, 4)
    q_s = F.interpolate(student.pow(2).sum(1, keepdim=True), size=(4, 4), mode="bilinear", align_corners=False)
    by_hand = (F.normalize(q_s.flatten(1), dim=1) - F.normalize(teacher.pow(2).sum(1).flatten(1), dim=1)).pow(2).sum(1)
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(by_hand.mean().item(), rel=1e-6)


# ------------------------------------------------------------------------------ transformer attention probabilities
def test_attention_probability_losses_by_hand():
    uniform = torch.tensor([[[[0.5, 0.5]]]])  # (B=1, heads=1, queries=1, keys=2)
    peaked = torch.tensor([[[[1.0, 0.0]]]])
    assert attention_probability_loss(uniform, peaked, "kl").item() == pytest.approx(math.log(2))
    assert attention_probability_loss(uniform, peaked, "mse").item() == pytest.approx(0.25)
    assert attention_probability_loss(peaked, peaked, "kl").item() == pytest.approx(0.0, abs=1e-7)
    # 2 teacher heads (1,0) and (0,1) average to the student's one uniform head
    two_heads = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    assert attention_probability_loss(uniform, two_heads, "kl").item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="attention shapes differ"):
        attention_probability_loss(torch.full((1, 1, 3, 3), 1 / 3), torch.full((1, 1, 2, 2), 0.5))


class CallsWithoutWeights(nn.Module):
    """Calls its attention the way nn.TransformerEncoderLayer does: need_weights=False."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_attention_weights_are_read_as_computed_by_hand_and_outputs_do_not_change():
    torch.manual_seed(0)
    model, x = CallsWithoutWeights().eval(), torch.randn(2, 3, 4)
    before = model(x)
    tap = FeatureTap(model, ["attn"])
    request_attention_weights(model.attn)
    request_attention_weights(model.attn)  # idempotent
    after = model(x)
    assert torch.allclose(before, after, atol=1e-6)
    weights = tap.pop()["attn"][1]
    q, k, _ = F.linear(x, model.attn.in_proj_weight, model.attn.in_proj_bias).chunk(3, dim=-1)
    q, k = (t.reshape(2, 3, 2, 2).transpose(1, 2) for t in (q, k))  # (B, heads, L, head_dim)
    by_hand = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(2), dim=-1)
    assert weights.shape == (2, 2, 3, 3)
    assert torch.allclose(weights, by_hand, atol=1e-6)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_distiller_reads_transformer_attention_without_changing_outputs(mode):
    torch.manual_seed(0)
    student, teacher = vit(depth=1, heads=2), vit(dim=16, depth=2, heads=4)
    x = torch.randn(4, 1, 12, 12)
    student.train(mode == "train")
    with torch.no_grad():
        before = student(x)["left"], teacher(x)["left"]
    layers = [{"student": "backbone.encoder.layers.0.self_attn", "teacher": "backbone.encoder.layers.1.self_attn"}]
    module = AttentionDistiller(student, teacher, TASKS, layers=layers)
    module.setup("fit")
    assert module.kinds == ["weights"]
    module.model.train(mode == "train")
    with torch.no_grad():  # the teacher runs under inference mode, where a fused kernel would skip the hooks
        step = module.forward_step({"input": x, "targets": {}})
    assert torch.allclose(step.student.outputs["left"], before[0], atol=1e-6)
    assert torch.allclose(step.teachers["teacher"].outputs["left"], before[1], atol=1e-6)
    assert step.teachers["teacher"].features["backbone.encoder.layers.1.self_attn"].shape == (4, 4, 9, 9)
    terms = module.distillation_loss(step)
    assert set(terms) == {"kd/left", "kd/right", "attention"} and terms["attention"].item() > 0


# ------------------------------------------------------------------------------ end to end
def test_conv_attention_distillation_fits_trains_student_only_and_reloads(tmp_path, teacher_ckpt):
    L.seed_everything(0)
    layers = [*CONV_LAYERS, {"student": "backbone.features.3", "teacher": "backbone.features.3", "task": "left"}]
    module = AttentionDistiller(conv_net((2, 4), 8), teacher_ckpt, TASKS, layers=layers, attention_weight=10.0)
    trainer = quick_trainer(tmp_path, max_steps=3, limit_val_batches=1)
    trainer.fit(module, random_datamodule())
    for key in ("train/attention", "train/left/attention", "train/left/kd"):
        assert key in trainer.callback_metrics
    assert all(not p.requires_grad for p in module.teacher.parameters())
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    reloaded = AttentionDistiller.load_from_checkpoint(path, weights_only=True)
    assert reloaded.layers == [AttentionPair(**pair) for pair in layers]


def test_attention_term_falls_when_training_on_it_alone():
    torch.manual_seed(0)
    teacher = conv_net((8, 16), 32)
    module = AttentionDistiller(conv_net((2, 4), 8), teacher, TASKS, layers=CONV_LAYERS[:1], alpha=1.0)
    module.setup("fit")
    x = torch.randn(8, 1, 12, 12)
    optimizer = torch.optim.Adam(module.model.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        terms = module.distillation_loss(module.forward_step({"input": x, "targets": {}}))
        optimizer.zero_grad()
        terms["attention"].backward()
        optimizer.step()
        losses.append(terms["attention"].item())
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------------------ errors
def build(teacher, layers, **kwargs):
    module = AttentionDistiller(conv_net((2, 4), 8) if teacher is None else teacher[0], teacher[1] if teacher else
                                conv_net((8, 16), 32), TASKS, layers=layers, **kwargs)
    module.setup("fit")
    return module


def test_a_path_that_names_no_module_fails_clearly():
    with pytest.raises(ValueError, match=r"student: no submodule at feature path 'backbone.nope'"):
        build(None, [{"student": "backbone.nope", "teacher": "backbone.features.3"}])


def test_a_module_that_yields_no_attention_fails_clearly():
    module = build(None, [{"student": "backbone.neck", "teacher": "backbone.features.3"}])
    x = torch.randn(2, 1, 12, 12)
    with pytest.raises(ValueError, match=r"student layer 'backbone.neck' yields no attention map.*\(2, 8\)"):
        module.distillation_loss(module.forward_step({"input": x, "targets": {}}))


def test_a_mismatched_layer_map_fails_clearly():
    with pytest.raises(ValueError, match=r"student 'backbone.features.3' \(MaxPool2d\) is paired with teacher"):
        build((conv_net((2, 4), 8), vit()), [{"student": "backbone.features.3",
                                              "teacher": "backbone.encoder.layers.0.self_attn"}])
    with pytest.raises(ValueError, match=r"no submodule at feature path 'backbone.encoder.layers.3.self_attn'"):
        build((vit(depth=2), vit(depth=2)), [{"student": "backbone.encoder.layers.3.self_attn",
                                              "teacher": "backbone.encoder.layers.1.self_attn"}])
    other_patching = MultiTaskNet(PatchTransformerBackbone(image_size=12, patch_size=6, dim=8, depth=1), HEADS)
    module = build((vit(), other_patching), [{"student": "backbone.encoder.layers.0.self_attn",
                                              "teacher": "backbone.encoder.layers.0.self_attn"}])
    x = torch.randn(2, 1, 12, 12)
    with pytest.raises(ValueError, match=r"attention shapes differ: student \(2, 2, 9, 9\) vs teacher \(2, 2, 4, 4\)"):
        module.distillation_loss(module.forward_step({"input": x, "targets": {}}))


def test_an_attention_layer_that_returns_no_weights_fails_clearly():
    from lightning_mtkd.models.hooks import _MultiheadWeights
    from lightning_mtkd.strategies.attention import _attention_input

    record = _MultiheadWeights({}, "encoder.self_attn", "student")
    with pytest.raises(RuntimeError, match=r"attention layer 'encoder.self_attn' yielded no per-head attention"):
        record(nn.Identity(), (), (torch.zeros(2, 9, 8), None))  # what need_weights=False leaves
    with pytest.raises(RuntimeError, match="recorded nothing in the forward pass"):
        _attention_input({}, "encoder.self_attn", "weights", "teacher")


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="names task 'middle'"):
        AttentionDistiller(conv_net(), conv_net(), TASKS, layers=[{"student": "a", "teacher": "b", "task": "middle"}])
    with pytest.raises(ValueError, match="attention_weight must be >= 0"):
        AttentionDistiller(conv_net(), conv_net(), TASKS, layers=CONV_LAYERS, attention_weight=-1)
    with pytest.raises(ValueError, match="`layers` is empty"):
        AttentionDistiller(conv_net(), conv_net(), TASKS, layers=[])
