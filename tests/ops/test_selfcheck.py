"""``pyamalgam selfcheck`` covers every fused operator and fails when one disagrees with its reference."""
from pyamalgam import ops, selfcheck


def test_selfcheck_lists_and_passes_every_op(capsys):
    assert selfcheck.run("cpu")
    lines = capsys.readouterr().out.splitlines()
    checked = {line.split()[0] for line in lines}
    fused_ops = set(ops.__all__) - {"reference"}
    assert fused_ops <= checked, fused_ops - checked  # a new op must be added to the selfcheck
    assert {"channel_wise_loss", "pairwise_local_loss"} <= checked
    assert all(line.endswith("ok") for line in lines), lines


def test_selfcheck_reports_a_wrong_op(capsys, monkeypatch):
    """An op that is off by a little (here: the local pair-wise loss scaled by 1 + 1e-6) is a FAIL
    and makes the check fail, while the others still pass."""
    real = ops.pairwise_local_loss
    monkeypatch.setattr(ops, "pairwise_local_loss", lambda *a: real(*a) * (1 + 1e-6))
    assert not selfcheck.run("cpu")
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["pairwise_local_loss"].endswith("FAIL")
    assert lines["channel_wise_loss"].endswith("ok") and lines["pairwise_affinity_loss"].endswith("ok")
