import pytest
import torch
from torch import nn

from lightning_mtkd.config import build_module, to_config
from lightning_mtkd.models import Adaptor, ConvBackbone, FeatureTap, MLPBackbone, MultiTaskNet


@pytest.mark.parametrize(
    ("student", "teacher"),
    [((3, 8), (3, 32)), ((3, 32), (3, 8)), ((3, 4, 9, 9), (3, 64, 9, 9)), ((3, 4, 18, 18), (3, 16, 9, 9))],
)
def test_adaptor_maps_student_shape_to_teacher_shape(student, teacher):
    adaptor = Adaptor.between(student, teacher)
    assert tuple(adaptor(torch.randn(*student)).shape) == teacher


def test_adaptor_refuses_unbridgeable_shapes():
    with pytest.raises(ValueError, match="no adaptor maps"):
        Adaptor.between((2, 8), (2, 16, 4, 4))


def test_adaptor_rebuilds_from_its_state():
    adaptor = Adaptor.between((2, 4, 6, 6), (2, 8, 3, 3))
    rebuilt = Adaptor.from_state(adaptor.state_dict(prefix="a."), "a.")
    rebuilt.load_state_dict(adaptor.state_dict())
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(rebuilt(x), adaptor(x))


def test_feature_tap_reads_without_changing_outputs():
    torch.manual_seed(0)
    net = MultiTaskNet(ConvBackbone(widths=(4, 8), hidden=16), {"a": 3})
    x = torch.randn(2, 1, 12, 12)
    before = net(x)["a"]
    tap = FeatureTap(net, ["backbone", "backbone.features"])
    after = net(x)["a"]
    torch.testing.assert_close(before, after)
    features = tap.pop()
    assert tuple(features["backbone"].shape) == (2, 16)
    assert tuple(features["backbone.features"].shape) == (2, 8, 3, 3)
    assert tap.pop() == {}


def test_feature_tap_names_a_missing_path():
    net = MultiTaskNet(MLPBackbone(in_features=4, hidden=(8,)), {"a": 3})
    with pytest.raises(ValueError, match=r"'backbone.nope'.*backbone.layers"):
        FeatureTap(net, ["backbone.nope"], owner="student")


def test_models_round_trip_through_their_config():
    net = MultiTaskNet(ConvBackbone(widths=(2, 4), hidden=8, dropout=0.1), {"a": 3, "b": 1})
    config = to_config(net)
    assert config["init_args"]["backbone"]["init_args"]["widths"] == [2, 4]
    rebuilt = build_module(config)
    assert isinstance(rebuilt, MultiTaskNet)
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in net.parameters()]
    # A module whose arguments cannot all be found is recorded as its class alone, never guessed:
    # nn.Linear's `bias` attribute is a Parameter, not the bool it was built with.
    assert to_config(nn.Linear(2, 2)) == {"class_path": "torch.nn.modules.linear.Linear", "uncaptured": ["bias"]}
    with pytest.raises(ValueError, match=r"not its constructor argument\(s\) \['bias'\].*load_from_checkpoint"):
        build_module(to_config(nn.Linear(2, 2)))


def test_multitasknet_needs_a_width():
    with pytest.raises(ValueError, match="out_features"):
        MultiTaskNet(nn.Identity(), {"a": 2})


def test_conv_backbone_channels_last_changes_speed_not_results():
    """NHWC weights give the NCHW net's outputs and gradients, and keep their layout through a state-dict load
    (a checkpoint written by either layout) and a device move."""
    torch.manual_seed(0)
    nchw = MultiTaskNet(ConvBackbone(widths=(4, 8), hidden=16, channels_last=False), {"a": 3})
    nhwc = MultiTaskNet(ConvBackbone(widths=(4, 8), hidden=16, channels_last=True), {"a": 3})
    nhwc.load_state_dict(nchw.state_dict())
    nhwc.to("cpu")
    conv = nhwc.backbone.features[4].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert nchw.backbone.features[4].weight.is_contiguous()
    x = torch.randn(3, 1, 20, 20)
    torch.testing.assert_close(nhwc(x)["a"], nchw(x)["a"])
    nhwc(x)["a"].sum().backward(), nchw(x)["a"].sum().backward()
    torch.testing.assert_close(nhwc.backbone.features[0].weight.grad, nchw.backbone.features[0].weight.grad)
    nchw.load_state_dict(nhwc.state_dict())  # and back
    torch.testing.assert_close(nchw(x)["a"], nhwc(x)["a"])
