"""segmentation-models-pytorch teachers in the block protocol (pyamalgam.models.from_smp, issue 13).

Every smp test builds its models with ``encoder_weights=None`` (nothing is downloaded) and skips
when smp is not installed, except the one that simulates its absence.
"""
import math

import pytest
import torch
from torch.utils.data import DataLoader

from pyamalgam._testing import hide_package, torch_threads
from pyamalgam.models import BlockNetwork, BlockTrunk, block_shapes, from_smp, missing_members
from pyamalgam.models.protocol import count_parameters


@pytest.fixture(scope="module")
def smp():
    return pytest.importorskip("segmentation_models_pytorch")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def unet(smp, classes=5, encoder="resnet18", depth=3, seed=0, **kwargs):
    torch.manual_seed(seed)
    channels = (16, 8, 8, 8, 8)[:depth]
    return smp.Unet(encoder, encoder_weights=None, encoder_depth=depth, decoder_channels=channels, classes=classes,
                    **kwargs).eval()


# (constructor, kwargs, input shape, number of blocks); W is an odd multiple of the divisor
ARCHITECTURES = {
    "unet-d3": ("Unet", dict(encoder_depth=3, decoder_channels=(16, 8, 8)), (1, 3, 32, 40), 6),
    "unet-d5": ("Unet", dict(encoder_depth=5, decoder_channels=(16, 8, 8, 8, 8)), (2, 3, 32, 96), 10),
    "fpn-d5": ("FPN", dict(encoder_depth=5, decoder_pyramid_channels=16, decoder_segmentation_channels=32),
               (1, 3, 64, 96), 9),
    "fpn-cat": ("FPN", dict(encoder_depth=5, decoder_pyramid_channels=16, decoder_segmentation_channels=32,
                            decoder_merge_policy="cat"), (1, 3, 64, 64), 9),
    "deeplabv3plus": ("DeepLabV3Plus", dict(encoder_depth=5, decoder_channels=32), (1, 3, 32, 48), 7),
    "deeplabv3": ("DeepLabV3", dict(encoder_depth=4, decoder_channels=32), (1, 3, 32, 40), 5),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_cut_reproduces_the_smp_model_bit_for_bit(smp, arch):
    cls, kwargs, shape, blocks = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = getattr(smp, cls)("resnet18", encoder_weights=None, classes=5, **kwargs).eval()
    net = from_smp(model).eval()
    assert net.num_blocks == blocks and not missing_members(net, BlockNetwork)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(net(x), expected)
        for n in range(net.num_blocks + 1):
            features, side = net.forward_until(x, n)
            assert torch.equal(net.forward_from(features, n, side), expected), f"block {n}"
            assert torch.equal(net.tail(n).forward_from(features, n, side), expected), f"tail {n}"


def test_blocks_share_the_models_modules_and_shapes_follow_the_stages(smp):
    model = unet(smp)
    net = from_smp(model)
    assert net.blocks["1"].stage[0] is model.encoder.conv1  # wrapped, not copied
    unused = count_parameters(model.encoder.layer3) + count_parameters(model.encoder.layer4)  # past depth 3
    assert count_parameters(net) == count_parameters(model) - unused
    x = torch.rand(1, 3, 32, 40)
    shapes = block_shapes(net, x)
    # encoder stages at H/2, H/4, H/8; decoder blocks back up to H/4, H/2, H
    assert shapes == [(64, 16, 20), (64, 8, 10), (128, 4, 5), (16, 8, 10), (8, 16, 20), (8, 32, 40)]
    assert shapes == BlockNetwork.feature_shapes(net.eval(), x)
    assert net.side_keys(x) == {"skip1", "skip2"} and net.size_divisor == 8


def test_the_trunk_is_a_student_template(smp):
    net = from_smp(unet(smp))
    trunk = net.as_trunk()
    assert not missing_members(trunk, BlockTrunk) and trunk.head is None
    assert all(trunk.block(n) is not None for n in range(1, net.num_blocks + 1))
    assert trunk.blocks["1"].stage[0].weight is not net.blocks["1"].stage[0].weight  # a copy


def test_depth_is_decoded_by_eq2_against_a_float64_reference(smp):
    model = unet(smp, classes=8)
    net = from_smp(model, "depth", max_depth=4.0).eval()
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(x).double()
        got = net(x)
    bins = torch.arange(1, 9, dtype=torch.float64).view(1, -1, 1, 1)
    expected = (0.5 * bins * torch.softmax(logits, dim=1)).sum(dim=1)  # l = 4 / 8
    assert got.shape == (1, 32, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert 0.5 <= got.min() and got.max() <= 4.0
    assert set(net.tasks) == {"depth"}


def test_normals_are_unit_vectors_against_a_float64_reference(smp):
    model = unet(smp, classes=3, depth=4)
    net = from_smp(model, "normals").eval()
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        raw = model(x).double()
        got = net(x)
    torch.testing.assert_close(got.double(), raw / raw.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert set(net.tasks) == {"normal"}


def test_gradients_through_a_depth_suffix_pass_gradcheck(smp):
    net = from_smp(unet(smp, classes=4), "depth").double().eval()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        features, side = net.forward_until(x, 4)  # after the first decoder block
    features.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: net.forward_from(f, 4, side), (features,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"activation": "sigmoid"}, "applies the activation Sigmoid .* activation=None"),
    ({"aux_params": {"classes": 3}}, "classification head .* without aux_params"),
])
def test_bad_heads_are_refused(smp, kwargs, message):
    with pytest.raises(ValueError, match=message):
        from_smp(unet(smp, **kwargs))


def test_bad_tasks_for_the_heads_output_are_refused(smp):
    with pytest.raises(ValueError, match="N_d >= 2 bin logits .* classes=1: build it with classes=num_bins"):
        from_smp(unet(smp, classes=1), "depth")
    with pytest.raises(ValueError, match="normals teacher predicts 3 channels .* classes=4"):
        from_smp(unet(smp, classes=4), "normals")
    with pytest.raises(ValueError, match="max_depth must be > 0"):
        from_smp(unet(smp, classes=8), "depth", max_depth=0.0)
    with pytest.raises(ValueError, match="unknown task 'albedo'"):
        from_smp(unet(smp), "albedo")
    with pytest.raises(TypeError, match="model must be a segmentation_models_pytorch model"):
        from_smp("resnet18")


def test_unsupported_architectures_and_encoders_say_why(smp):
    plus = smp.UnetPlusPlus("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 8))
    with pytest.raises(ValueError, match="not UnetPlusPlus: its nested decoder nodes .* a grid, not a chain"):
        from_smp(plus)
    mobile = smp.Unet("mobilenet_v2", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 8))
    with pytest.raises(ValueError, match="cannot split the encoder MobileNetV2Encoder into stages"):
        from_smp(mobile)


def test_without_smp_the_error_says_how_to_install_it(monkeypatch):
    hide_package(monkeypatch, "segmentation_models_pytorch")
    with pytest.raises(ImportError, match=r'needs segmentation-models-pytorch: pip install "pyamalgam\[smp\]"'):
        from_smp(torch.nn.Conv2d(3, 3, 1))


# ---------------------------------------------------------------- end to end


def _train(net, data, task, steps=40, lr=3e-3):
    """A small supervised loop (train_teacher builds only the in-house VGG teachers)."""
    from pyamalgam.losses import depth_loss, segmentation_loss

    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    net.train()
    step = 0
    while step < steps:
        for batch in loader:
            pred = net(batch["image"])
            if task == "seg":
                loss = segmentation_loss(pred, batch["seg"])
            else:
                loss = depth_loss(pred, batch["depth"], batch["mask"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return net.eval()


def _agreement(net, teachers, images):
    """Per output: the task loss of ``net``'s prediction against the teacher's (Eq. 1, Eq. 3)."""
    with torch.no_grad():
        out = net.eval()(images)
        return {k: float(t.task.loss(out[k], t.task.target(t(images)))) for k, t in teachers.items()}


@pytest.mark.slow  # about 15 s on two loaded cores
def test_two_smp_unet_teachers_are_amalgamated_into_one_target_net(smp):
    from pyamalgam import Amalgamator
    from pyamalgam.data import SyntheticScenes

    train = SyntheticScenes("train", size=32, resolution=(32, 32))
    seg = from_smp(unet(smp, classes=train.num_classes, seed=1), "segmentation")
    depth = from_smp(unet(smp, classes=16, encoder="resnet34", seed=2), "depth", max_depth=train.max_depth)
    teachers = {"seg": _train(seg, train, "seg"), "depth": _train(depth, train, "depth")}
    pool = SyntheticScenes("unlabelled", size=32, resolution=(32, 32))
    loader = DataLoader(pool, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    held_out = torch.stack([SyntheticScenes("test", size=8, resolution=(32, 32))[i]["image"] for i in range(8)])

    torch.manual_seed(0)
    untrained = Amalgamator(teachers, init="random", progress=False)._build_target({"seg": 4, "depth": 4})
    before = _agreement(untrained, teachers, held_out)
    am = Amalgamator(teachers, optimizer="adam", lr=1e-3, progress=False)  # Step 1: a copy of the seg teacher
    am.fit(loader, 1, final_loss_images=8)  # 4 steps per block
    # branch at the first decoder block; Eq. 7 on 4 steps per block would pick by noise
    assert am.branch_out(points={"seg": 4, "depth": 4}) == {"seg": 4, "depth": 4}
    net = am.finetune(loader, 8)  # 32 steps
    after = _agreement(net, teachers, held_out)
    assert all(math.isfinite(v) for v in after.values())
    for name in after:  # measured: about 0.2x on this machine
        assert after[name] < 0.5 * before[name], (name, before, after)
    out = net(held_out[:1])
    assert out["seg"].shape == (1, train.num_classes, 32, 32) and out["depth"].shape == (1, 32, 32)
    report = am.parameter_report()
    assert report["target_net"] < report["teachers_total"]
