"""Outputs follow the umask, as a plain open or mkdir would, whatever wrote them (tempfile and
safetensors alone create private files); an output directory that cannot be used is named."""
import os
import stat

import pytest
import torch

from halforder.training.files import atomic_dir, atomic_file, check_writable_dir, write_json


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                      (0o002, 0o664, 0o775)])
def test_written_files_and_directories_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    from safetensors.torch import save_file

    umask(mask)
    with atomic_dir(str(tmp_path / "ck")) as tmp:
        save_file({"w": torch.zeros(2)}, os.path.join(tmp, "w.safetensors"))
        os.makedirs(os.path.join(tmp, "sub"))
        torch.save({}, os.path.join(tmp, "sub", "o.pt"))
    with atomic_file(str(tmp_path / "f.bin")) as tmp:
        save_file({"w": torch.zeros(2)}, tmp)
    write_json(str(tmp_path / "c.json"), {"a": 1})
    for f in ("ck/w.safetensors", "ck/sub/o.pt", "f.bin", "c.json"):
        assert _mode(tmp_path / f) == file_mode, f
    for d in ("ck", "ck/sub"):
        assert _mode(tmp_path / d) == dir_mode, d


def test_an_unusable_output_directory_is_named(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="'.*file' is a file, not a directory"):
        check_writable_dir(str(tmp_path / "file"))
    with pytest.raises(NotADirectoryError, match="'.*file/run' cannot be created: '.*file' is a file"):
        check_writable_dir(str(tmp_path / "file" / "run"))
    check_writable_dir(str(tmp_path / "new" / "run"))                   # creatable: no error, nothing made
    assert not (tmp_path / "new").exists()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if os.fspath(p) == str(tmp_path) else real(p, m))
    with pytest.raises(PermissionError, match="'.*new/run' is not writable"):
        check_writable_dir(str(tmp_path / "new" / "run"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_a_read_only_directory_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(PermissionError, match="is not writable"):
        check_writable_dir(str(ro / "run"))
