"""Branch-out (Eq. 7), TargetNet assembly (Step 4), and the TargetNet as a block network."""
import math

import pytest
import torch

from pyamalgam import Amalgamator, TargetNet
from pyamalgam.amalgamation import decoder_candidates, select_branch_points
from pyamalgam._testing import tiny_net as tiny
from pyamalgam.models import count_parameters


def test_decoder_candidates():
    assert list(decoder_candidates(10)) == [6, 7, 8, 9, 10]
    assert list(decoder_candidates(6)) == [4, 5, 6]
    assert list(decoder_candidates(5)) == [3, 4, 5]


def test_eq7_is_the_argmin_over_decoder_blocks():
    table = {
        "seg": {1: 0.01, 2: 0.9, 3: 0.8, 4: 0.5, 5: 0.3, 6: 0.4},  # block 1 is lower but in the encoder
        "depth": {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.2, 5: 0.2, 6: 0.1},
        "normal": {4: 0.2, 5: 0.2, 6: 0.3},  # a tie: the earlier block, like argmin
        "nan": {4: math.nan, 5: 0.7, 6: math.nan},
    }
    assert select_branch_points(table, 6) == {"seg": 5, "depth": 6, "normal": 4, "nan": 5}
    assert select_branch_points({"seg": table["seg"]}, 6, candidates=range(1, 7)) == {"seg": 1}


def test_eq7_refuses_missing_or_all_nan_losses():
    with pytest.raises(ValueError, match=r"no recorded loss for 'seg' at block\(s\) \[6\]"):
        select_branch_points({"seg": {4: 1.0, 5: 1.0}}, 6)
    with pytest.raises(ValueError, match="all candidate losses of 'seg' are NaN"):
        select_branch_points({"seg": {4: math.nan, 5: math.nan, 6: math.nan}}, 6)


def test_branch_out_picks_the_argmin_of_a_crafted_loss_table(teachers):
    am = Amalgamator(teachers, progress=False)
    am.loss_table = {"seg": {4: 0.9, 5: 0.2, 6: 0.5}, "depth": {4: 0.1, 5: 0.4, 6: 0.3}}
    assert am.branch_out() == {"seg": 5, "depth": 4}
    assert am.target_net.points == {"seg": 5, "depth": 4}
    # forcing one teacher leaves the other to Eq. 7
    assert am.branch_out(points={"seg": 6}) == {"seg": 6, "depth": 4}


def test_target_net_shapes_and_parameter_count(teachers, images):
    am = Amalgamator(teachers, progress=False)
    am.branch_out(points={"seg": 6, "depth": 5})
    net = am.target_net
    with torch.no_grad():
        out = net.eval()(images)
    assert list(out) == ["seg", "depth"]
    assert out["seg"].shape == (2, 5, 32, 40) and out["depth"].shape == (2, 32, 40)
    expected = (
        sum(count_parameters(am.student.blocks[str(i)]) for i in range(1, 7))  # trunk up to the last point
        + count_parameters(am.codings["6"]["seg"]) + count_parameters(teachers["seg"].head)
        + count_parameters(am.codings["5"]["depth"])
        + count_parameters(teachers["depth"].blocks["6"]) + count_parameters(teachers["depth"].head)
    )
    assert count_parameters(net) == expected == am.parameter_report()["target_net"]
    assert am.parameter_report()["teachers_total"] == sum(count_parameters(t) for t in teachers.values())


def test_target_net_branch_is_coding_then_teacher_suffix_on_student_side_information(teachers, images):
    am = Amalgamator(teachers, progress=False)
    am.branch_out(points={"seg": 5, "depth": 4})
    with torch.no_grad():
        out = am.target_net.eval()(images)
        for key, p in am.branch_points.items():
            features, side = am.student.eval().forward_until(images, p)
            expected = teachers[key].forward_from(am.codings[str(p)][key](features), p, side)
            assert torch.equal(out[key], expected)


def test_decoder_bn_variants_shrink_as_the_branch_moves_later(teachers):
    am = Amalgamator(teachers, progress=False)
    sizes = []
    for b in decoder_candidates(am.num_blocks):
        am.branch_out(points={key: b for key in teachers})
        sizes.append(am.parameter_report()["target_net"])
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert sizes[-1] < am.parameter_report()["teachers_total"]


def test_target_net_speaks_the_block_protocol_exactly(teachers, images):
    am = Amalgamator(teachers, progress=False)
    am.branch_out(points={"seg": 6, "depth": 4})
    net = am.target_net.eval()
    with torch.no_grad():
        expected = net(images)
        for n in range(0, 7):
            features, side = net.forward_until(images, n)
            assert isinstance(features, dict) == (n > 4), n  # past depth's point the streams differ
            got = net.forward_from(features, n, side)
            assert all(torch.equal(got[k], expected[k]) for k in expected), n
            tail = net.tail(n)
            got = tail.forward_from(features, n, side)
            assert all(torch.equal(got[k], expected[k]) for k in expected), n
    assert isinstance(net, TargetNet) and set(net.tasks) == {"seg", "depth"}


def test_branch_out_refuses_bad_points(teachers):
    am = Amalgamator(teachers, progress=False)
    with pytest.raises(ValueError, match=r"points: unknown teacher 'normal'"):
        am.branch_out(points={"normal": 5})
    with pytest.raises(ValueError, match=r"points\['seg'\] must be a block in \[1, 6\], got 7"):
        am.branch_out(points={"seg": 7})
    with pytest.raises(ValueError, match=r"no recorded loss for 'depth'"):
        am.branch_out(points={"seg": 5})  # nothing trained yet for depth
