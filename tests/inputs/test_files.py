"""Input files are read defensively: regular files only, strict JSON, every failure one ``InputError``."""

import os

import pytest

from geomaudit.errors import InputError
from geomaudit.io.files import parse_json, read_bytes, read_json, read_text, regular_file


def test_only_regular_files_are_read(tmp_path):
    (tmp_path / "f.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "f.json")
    assert read_json(tmp_path / "link.json") == {}  # a link to a regular file is followed
    os.mkfifo(tmp_path / "fifo")
    for path, phrase in ((tmp_path / "none", "does not exist"), (tmp_path, "is a folder: expected a regular file"),
                         ("/dev/zero", "is not a regular file"), (tmp_path / "fifo", "is not a regular file"),
                         (tmp_path / ("x" * 300), "File name too long")):
        with pytest.raises(InputError, match=phrase):
            read_json(path, "report")


def test_a_regular_file_that_cannot_be_read():
    with pytest.raises(InputError, match="cannot read data /proc/self/mem"):
        read_bytes("/proc/self/mem", "data")  # regular to stat, unreadable from offset 0
    assert regular_file("/proc/self/mem").name == "mem"


def test_text_is_utf8_and_a_byte_order_mark_is_dropped(tmp_path):
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf[1]")
    assert read_json(tmp_path / "bom.json") == [1]
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(InputError, match="latin.txt is not UTF-8 text"):
        read_text(tmp_path / "latin.txt", "data")


@pytest.mark.parametrize("text, phrase", [
    ("{oops", "is not valid JSON \\(Expecting property name"),
    ("[" * 100_000, "nested too deeply"),
    ('{"a": NaN}', "NaN is not a JSON number"),
    ("[-Infinity]", "-Infinity is not a JSON number"),
    ("[1e999]", "1e999 is too large for a float"),
    ("1" * 5000, "is not valid JSON \\(Exceeds the limit"),
])
def test_json_is_strict(text, phrase):
    with pytest.raises(InputError, match="^x.json is not valid JSON") as caught:
        parse_json(text, "x.json")
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300
    assert phrase.replace("\\", "") in str(caught.value)


def test_nan_is_read_where_asked_for():
    """The Trainer writes NaN for a diverged step into trainer_state.json."""
    assert str(parse_json('[NaN, 1e999]', "state", allow_nan=True)) == "[nan, inf]"
