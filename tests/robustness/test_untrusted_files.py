"""Untrusted checkpoints, teacher files and caches: checked before anything acts on them.

Before: a checkpoint or teacher file whose metadata was a list, a number, 200 000-deep JSON or
missed a key raised a bare AttributeError / RecursionError / KeyError without the file's name;
``load_teacher`` built the network its JSON describes before comparing it with the weights; a
checkpoint claiming ``completed_blocks`` 1..998 was accepted; and a zero-byte stage checkpoint
made every later demo run exit 2 while other corrupt caches were rebuilt silently.
"""
import json
import re

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from pyamalgam import Amalgamator
from pyamalgam._testing import state_digest, tiny_teachers
from pyamalgam.engine import CorruptFileError, load_checkpoint, save_checkpoint
from pyamalgam.engine.schema import MAX_JSON_BYTES
from pyamalgam.teachers import TeacherRecord, build_teacher, load_teacher, save_teacher

DEEP = "[" * 200_000 + "]" * 200_000


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loader():
    images = torch.rand(4, 3, 32, 40, generator=torch.Generator().manual_seed(4))
    return DataLoader([{"image": x} for x in images], batch_size=4, shuffle=True,
                      generator=torch.Generator().manual_seed(5))


# ------------------------------------------------------------------------------ load_checkpoint

@pytest.mark.parametrize("meta, match", [
    ("[1, 2]", "its pyamalgam metadata must be a JSON object, got list"),
    ("42", "its pyamalgam metadata must be a JSON object, got int"),
    (DEEP, "JSON nested more than 64 levels deep"),
    ('{"format": 1, "x": "' + "a" * (MAX_JSON_BYTES + 1) + '"}', f"more than the {MAX_JSON_BYTES} pyamalgam reads"),
    ("{oops", "its pyamalgam metadata is not valid JSON"),
])
def test_checkpoint_metadata_that_is_not_an_object_or_too_deep_or_large_is_refused_by_name(tmp_path, meta, match):
    path = tmp_path / "last.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"pyamalgam": meta})
    with pytest.raises(CorruptFileError, match=match) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(str(path)) and err.value.path == path


@pytest.mark.parametrize("data, match", [
    (b"", "0 bytes, torn or empty"),
    ((10**9).to_bytes(8, "little") + b"{}", "torn or empty"),
    (len(b'{"a":' + DEEP.encode() + b"}").to_bytes(8, "little") + b'{"a":' + DEEP.encode() + b"}", "nested more than 64"),
])
def test_a_torn_empty_or_deep_safetensors_header_is_refused_by_name(tmp_path, data, match):
    path = tmp_path / "last.safetensors"
    path.write_bytes(data)
    with pytest.raises(CorruptFileError, match=match) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_a_checkpoint_that_could_not_be_read_back_is_not_written(tmp_path):
    with pytest.raises(ValueError, match="bytes of checkpoint metadata, more than"):
        save_checkpoint(tmp_path / "big.safetensors", {}, {"history": ["x" * MAX_JSON_BYTES]})
    assert not (tmp_path / "big.safetensors").exists()


# ------------------------------------------------------------------------ the Amalgamator's resume

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(blocks checkpoint, done checkpoint) of one tiny run: 6 blocks of one step, one fine-tune step."""
    root = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    am = Amalgamator(tiny_teachers(), checkpoint_dir=root, progress=False)
    torch.manual_seed(0)
    am.fit(_loader(), 1)
    blocks = load_checkpoint(root / "last.safetensors")
    am.branch_out()
    am.finetune(_loader(), 1)
    return blocks, load_checkpoint(root / "last.safetensors")


def _resume(tmp_path, tensors, meta, *, finetune=False):
    """A fresh Amalgamator resuming from (tensors, meta): (error, Amalgamator, its student before)."""
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, tensors, {k: v for k, v in meta.items() if k != "format"})
    am = Amalgamator(tiny_teachers(), progress=False)
    before = state_digest(am.student)
    with pytest.raises(CorruptFileError) as err:
        (am.finetune if finetune else am.fit)(_loader(), 1, resume=path)
    assert str(path) in str(err.value) and err.value.path == path
    return err.value, am, before


@pytest.mark.parametrize("change, match", [
    ({"completed_blocks": list(range(1, 999))}, r"meta\['completed_blocks'\] must be a list of at most 6 items"),
    ({"completed_blocks": [1, 2, 2, 3, 4, 5]}, r"meta\['completed_blocks'\] must be a list without repeats"),
    ({"completed_blocks": [1, 2, 3, 4, 6]}, r"meta\['loss_table'\]\['seg'\] has losses for blocks \[1, 2, 3, 4, 5, 6\], "
                                           r"but the completed blocks are \[1, 2, 3, 4, 6\]"),
    ({"completed_blocks": [1, 2, 3, 4, 5]}, r"block 6 is not listed in meta\['completed_blocks'\]"),
    ({"completed_blocks": None}, r"meta lacks \['completed_blocks'\]"),
    ({"loss_table": [1, 2]}, r"meta\['loss_table'\] must be an object, got a list of 2"),
    ({"loss_table": {"seg": {"1": "low"}}}, r"meta\['loss_table'\]\['seg'\]\['1'\] must be a finite number"),
    ({"loss_table": {"normal": {}}}, r"meta\['loss_table'\] key 'normal' must be one of \['seg', 'depth'\]"),
    ({"phase": "warmup"}, r"meta\['phase'\] must be one of \['blocks', 'finetune', 'done'\]"),
    ({"block": 0}, r"meta\['block'\] must be an int in \[1, 7\]"),
    ({"history": 7}, r"meta\['history'\] must be a list"),
    ({"history": [[]]}, r"meta\['history'\]\[0\] must be an object"),
    ({"config": 3}, r"meta\['config'\] must be an object"),
    ({"step": -1}, r"meta\['step'\] must be an int in \[0, None\]"),
    ({"step": 1, "total": 3}, r"inside a phase \(step 1\) lacks \['epoch_rng', 'optimizer', 'scheduler', 'sums'\]"),
    ({"rng": [1, 2]}, r"meta\['rng'\] must hold a mapping"),
    ({"rng": {"__tensor__": "nowhere"}}, r"refers to a tensor 'nowhere' that the file does not hold"),
])
def test_a_blocks_checkpoint_whose_meta_does_not_fit_is_refused_before_anything_changes(tmp_path, checkpoints,
                                                                                       change, match):
    tensors, meta = checkpoints[0]
    meta = {k: v for k, v in {**meta, **change}.items() if k not in change or v is not None}  # None: drop the key
    err, am, before = _resume(tmp_path, tensors, meta)
    assert re.search(match, str(err)), str(err)
    assert state_digest(am.student) == before and am.completed_blocks == set() and am.history == []


@pytest.mark.parametrize("change, match", [
    ({"branch_points": {"seg": 99, "depth": 4}}, r"meta\['branch_points'\]\['seg'\] must be an int in \[1, 6\]"),
    ({"branch_points": {"seg": 4}}, r"a 'done' checkpoint needs meta\['block'\] = 7 and a branch point per teacher"),
    ({"branch_points": None}, r"a 'done' checkpoint needs"),
    ({"step": 2, "total": 3}, r"lacks \['epoch_rng'"),
])
def test_a_done_checkpoint_whose_meta_does_not_fit_is_refused(tmp_path, checkpoints, change, match):
    tensors, meta = checkpoints[1]
    err, am, before = _resume(tmp_path, tensors, {**meta, **change}, finetune=True)
    assert re.search(match, str(err)), str(err)
    assert am.target_net is None and am.branch_points is None


def test_tensors_of_the_wrong_shape_are_refused_before_any_weight_is_copied(tmp_path, checkpoints):
    tensors, meta = checkpoints[0]
    name = next(k for k in tensors if k.startswith("student/") and k.endswith("weight"))
    err, am, before = _resume(tmp_path, {**tensors, name: torch.zeros(3, 2)}, meta)
    assert f"the student: {name[len('student/'):]!r} has shape [3, 2]" in str(err)
    assert state_digest(am.student) == before  # load_state_dict would have copied the tensors that fit
    missing = {k: v for k, v in tensors.items() if not k.startswith("codings/1.")}
    err, _, _ = _resume(tmp_path, missing, meta)
    assert "the codings: " in str(err) and "missing" in str(err)


def test_a_corrupt_rng_or_optimizer_state_is_refused_by_name(tmp_path, checkpoints):
    tensors, meta = checkpoints[0]
    err, _, _ = _resume(tmp_path, {**tensors, "rng/0": torch.zeros(3, dtype=torch.uint8)}, meta)
    assert "the torch RNG state does not apply" in str(err)


def test_an_explicit_resume_file_that_is_corrupt_is_an_error_naming_it(tmp_path):
    path = tmp_path / "mine.safetensors"
    path.write_bytes(b"")
    am = Amalgamator(tiny_teachers(), progress=False)
    with pytest.raises(CorruptFileError, match=f"{path} is not a safetensors file"):
        am.fit(_loader(), 1, resume=path)


# ------------------------------------------------------------------------------ load_teacher

CONFIG = {"task": "depth", "width": 0.0625, "depth": 3, "num_classes": 5, "num_bins": 8}


@pytest.fixture
def teacher(tmp_path):
    path = tmp_path / "t.safetensors"
    save_teacher(build_teacher(**CONFIG), path, TeacherRecord(config=CONFIG))
    return path


def _sidecar(path, doc):
    path.with_suffix(".json").write_text(doc if isinstance(doc, str) else json.dumps(doc))


@pytest.mark.parametrize("doc, match", [
    ([1, 2], "is not a pyamalgam-teacher v1 checkpoint"),
    (7, "is not a pyamalgam-teacher v1 checkpoint"),
    (DEEP, "JSON nested more than 64 levels deep"),
    ({"format": "pyamalgam-teacher", "version": 1}, r"meta lacks \['config'\]"),
    ({"format": "pyamalgam-teacher", "version": 1, "config": [1]}, r"meta\['config'\] must be an object"),
    ({"format": "pyamalgam-teacher", "version": 1, "config": {**CONFIG, "width": "wide"}},
     r"meta\['config'\]\['width'\] must be a positive finite number <= 4"),
    ({"format": "pyamalgam-teacher", "version": 1, "config": {**CONFIG, "depth": 10**6}},
     r"meta\['config'\]\['depth'\] must be an int in \[1, 5\]"),
    ({"format": "pyamalgam-teacher", "version": 1, "config": {**CONFIG, "layers": 3}},
     r"meta\['config'\] has an unknown field 'layers'"),
    ({"format": "pyamalgam-teacher", "version": 1, "config": CONFIG, "train": [3]}, r"meta\['train'\] must be an object"),
    ({"format": "pyamalgam-teacher", "version": 1, "config": CONFIG, "train": {"steps": "many"}},
     r"meta\['train'\]\['steps'\] must be an int"),
    ({"format": "pyamalgam-teacher", "version": 1, "config": CONFIG, "losses": {"a": 1}}, r"meta\['losses'\] must be a list"),
])
def test_a_teacher_sidecar_that_does_not_fit_its_schema_is_refused_by_name(teacher, doc, match):
    _sidecar(teacher, doc)
    with pytest.raises(CorruptFileError, match=match) as err:
        load_teacher(teacher)
    assert str(teacher.with_suffix(".json")) in str(err.value)


def test_an_oversized_sidecar_is_refused_without_reading_it(teacher):
    teacher.with_suffix(".json").write_bytes(b" " * (MAX_JSON_BYTES + 1))
    with pytest.raises(CorruptFileError, match=f"bytes, more than the {MAX_JSON_BYTES} pyamalgam reads as JSON"):
        load_teacher(teacher)


def test_a_config_is_compared_with_the_weights_before_the_network_is_allocated(teacher, monkeypatch):
    """A 1 KB weights file whose JSON claims a full-width network: refused on the meta device."""
    import pyamalgam.teachers as teachers

    save_file({"w": torch.zeros(4)}, str(teacher))  # ~100 bytes of weights
    _sidecar(teacher, {"format": "pyamalgam-teacher", "version": 1, "config": {**CONFIG, "width": 1.0}})
    built = []
    real = teachers.build_teacher
    monkeypatch.setattr(teachers, "build_teacher", lambda **kw: built.append(torch.empty(()).device.type) or real(**kw))
    with pytest.raises(CorruptFileError, match=r"t.safetensors \(the weights of config .*'width': 1.0.*\): .* missing"):
        load_teacher(teacher)
    assert built == ["meta"]  # never built for real: 30 M parameters (gigabytes at width 4) not allocated


def test_weights_of_another_shape_are_refused_by_name(teacher):
    save_teacher(build_teacher(**{**CONFIG, "width": 0.125}), teacher.with_name("wide"), TeacherRecord(config=CONFIG))
    with pytest.raises(CorruptFileError, match=r"wide.safetensors \(the weights of config .*\): '.*' has shape"):
        load_teacher(teacher.with_name("wide"))


# ------------------------------------------------------------------------------ the demo's caches

def _tiny_cfg():
    from pyamalgam.demo import demo_config

    return demo_config(False, "cpu", resolution=(32, 32), width=1 / 16, depth=3, num_bins=8, train_size=4,
                       unlabelled_size=8, test_size=2, batch_size=4, teacher_steps=2, block_steps=2, finetune_steps=2,
                       probe_images=4, eval_batch=4, figure_samples=1)


def _stage(out):
    from pyamalgam.demo.stages import _Amalgamation

    images = [{"image": x} for x in torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(7))]
    stage = _Amalgamation("tn2", tiny_teachers(), {"seg": ["seg"], "depth": ["depth"]}, _tiny_cfg(), images, ["up"],
                          out, "cpu", 0, False)
    stage.fit()
    return stage


@pytest.mark.parametrize("damage", ["empty", "torn", "foreign"])
def test_a_corrupt_stage_checkpoint_is_rebuilt_with_a_warning_as_a_fresh_fit(tmp_path, capsys, damage):
    first = _stage(tmp_path)
    reference = (state_digest(first.am.student), state_digest(first.am.codings), first.am.loss_table)
    checkpoint = tmp_path / "stages" / "tn2" / "last.safetensors"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes({"empty": b"", "torn": data[: len(data) // 2], "foreign": data[:8] + b"[" * 64}[damage])
    del first
    capsys.readouterr()
    again = _stage(tmp_path)  # before: ValueError (the demo exited 2 on every later run)
    err = capsys.readouterr().err
    assert f"[demo] warning: {checkpoint}" in err and "the block-wise fit of tn2 runs again" in err
    assert (state_digest(again.am.student), state_digest(again.am.codings), again.am.loss_table) == reference
    assert load_checkpoint(checkpoint)[1]["completed_blocks"] == [1, 2, 3, 4, 5, 6]  # a whole checkpoint again


def test_every_other_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, capsys):
    from pyamalgam.demo.stages import cached_stage

    path = tmp_path / "stage.safetensors"
    path.write_bytes(b"\x00" * 3)
    assert cached_stage(path, "k") is None
    assert f"[demo] warning: {path} is unreadable" in capsys.readouterr().err
    save_checkpoint(path, {"w": torch.ones(1)}, {"key": "other"})
    assert cached_stage(path, "k") is None
    assert capsys.readouterr().err == ""  # stale (other settings), not corrupt: rebuilt silently
