import pytest

from lrc_ray.atomic import atomic_write_path, write_json_atomic


def test_file_appears_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "sub" / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_write_path(target) as tmp:
            assert tmp.name.endswith("out.nii.gz"), "suffixes are kept for writers that read them"
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert list((tmp_path / "sub").iterdir()) == []
    with atomic_write_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and [p.name for p in target.parent.iterdir()] == ["out.nii.gz"]


def test_json_replaces_an_existing_file(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_json_atomic(tmp_path / "a.json", {"x": 2})
    assert (tmp_path / "a.json").read_text().strip() == '{\n  "x": 2\n}'
