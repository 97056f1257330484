"""The student backend is read from the checkpoint's own files, and bad folders are one-line errors."""

import json

import pytest

from proxytune.backends import students
from proxytune.errors import ProxytuneError


def _folder(tmp_path, name, files):
    folder = tmp_path / name
    folder.mkdir()
    for file, content in files.items():
        (folder / file).write_text(json.dumps(content))
    return str(folder)


@pytest.mark.parametrize(
    "files, backend",
    [
        ({"proxytune_student.json": {"image_size": 64}}, "llamagen"),  # older folders carry no "backend"
        ({"proxytune_student.json": {"backend": "llamagen", "image_size": 256}}, "llamagen"),
        ({"config.json": {"model_type": "janus"}}, "janus"),
        ({"config.json": {"model_type": "chameleon"}}, "lumina-mgpt"),
        # the explicit backend wins over config.json (a Lumina folder carries both)
        ({"config.json": {"model_type": "chameleon"}, "proxytune_student.json": {"backend": "lumina-mgpt"}}, "lumina-mgpt"),
    ],
)
def test_backend_comes_from_the_checkpoint_files(tmp_path, files, backend):
    assert students.detect(_folder(tmp_path, "ckpt", files), "ref") == backend


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "neither proxytune_student.json nor config.json"),
        ({"config.json": {"model_type": "llama"}}, "model_type 'llama' is not an AR student"),
        ({"proxytune_student.json": {"backend": "var"}}, "unknown backend 'var'"),
    ],
)
def test_unknown_folders_are_one_line_errors(tmp_path, files, message):
    folder = _folder(tmp_path, "ckpt", files)
    with pytest.raises(ProxytuneError, match=message) as err:
        students.load_student(folder)
    assert "\n" not in str(err.value)


def test_unknown_name_lists_the_builtins():
    with pytest.raises(ProxytuneError, match="tiny-janus.*tiny-llamagen.*tiny-lumina-mgpt"):
        students.load_student("tiny-var")
