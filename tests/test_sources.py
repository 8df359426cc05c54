"""Source readers on data sets generated here: each format with valid and bad samples (exact skip counts and
surviving keys), validation splits (folders, val_path, a stable val_fraction), shards (brace patterns,
directories, truncated and unreadable tars, ``pipe:``), and the BPE caption corpus."""

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.files.decode import load_image
from datamodules.files.records import ImageRef, Record, Skips
from datamodules.files.sources import (
    UNIT_SIZE,
    RecordsUnit,
    ShardUnit,
    SourceConfig,
    Unit,
    caption_corpus,
    in_val,
    read_source,
)


def png(color=(255, 0, 0), size=(12, 12), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def jline(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def write_lines(path: Path, lines: list) -> Path:
    """A jsonl file: dicts/lists are dumped, bytes written as they are (one line each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line if isinstance(line, bytes) else jline(line) for line in lines))
    return path


def read(cfg: SourceConfig, split: str = "train") -> tuple[list[Record], Skips, list[Unit]]:
    """Scan + read every unit of one split: (records, skips of scan and read together, units)."""
    skips = Skips()
    units = read_source(cfg, split, skips)
    records = [r for u in units for r in u.records(skips)]
    return records, skips, units


def keys(records: list[Record]) -> list[str]:
    return [r.key for r in records]


def counts(skips: Skips) -> dict:
    return dict(+skips.counts)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def pair_members(prefix: str, n: int, start: int = 0) -> list[tuple[str, bytes]]:
    out = []
    for i in range(start, start + n):
        out += [(f"{prefix}{i:04d}.png", png((i % 256, 0, 0))), (f"{prefix}{i:04d}.txt", f"caption {i}".encode())]
    return out


# ============================================================================================== imagefolder


def imagefolder_train(folder: Path) -> None:
    """train/ of the imagefolder fixture: 2 good samples and 9 bad ones (3 malformed, 1 non-UTF-8, 3 empty,
    1 missing, 1 duplicate) and a blank line."""
    (folder / "imgs").mkdir(parents=True)
    for name in ("a.png", "imgs/b.png", "d.png", "e.png", "f.png", "g.png"):
        (folder / name).write_bytes(png())
    write_lines(folder / "metadata.jsonl", [
        {"file_name": "a.png", "text": "  a red   square "},
        {"file_name": "imgs/b.png", "text": ["  first ", "", None, "second"]},  # empty entries dropped
        b'{"file_name": "c.png", "text": \n',  # not JSON
        [1, 2],  # not an object
        {"text": "no file name"},
        b'{"file_name": "d.png", "text": "caf\xe9"}\n',  # latin-1 byte: not UTF-8
        {"file_name": "e.png", "text": "   "},
        {"file_name": "f.png"},  # no caption field
        {"file_name": "g.png", "text": ["", " \t"]},
        {"file_name": "missing.png", "text": "x"},
        {"file_name": "a.png", "text": "the same file again"},
        b"\n",
    ])


def test_imagefolder_train_and_validation_folder(tmp_path):
    root = tmp_path / "ds"
    imagefolder_train(root / "train")
    (root / "validation").mkdir()
    (root / "validation" / "v.png").write_bytes(png((0, 0, 255)))
    write_lines(root / "validation" / "metadata.jsonl", [{"file_name": "v.png", "text": "a blue square"}])
    cfg = SourceConfig(name="shapes", kind="imagefolder", path=str(root), val_fraction=0.5)  # folder wins

    records, skips, units = read(cfg)
    assert keys(records) == ["a.png", "imgs/b.png"]
    assert counts(skips) == {"malformed_json": 3, "non_utf8_caption": 1, "empty_caption": 3, "missing_file": 1,
                             "duplicate_file_name": 1}
    a, b = records
    assert a.kind == "pair" and a.captions == ["a red square"]
    assert b.captions == ["first", "second"]
    ref = b.segments[0]
    assert isinstance(ref, ImageRef) and ref.data is None
    assert Path(ref.path).is_absolute() and Path(ref.path) == (root / "train" / "imgs" / "b.png").resolve()
    assert load_image(ref, 8).shape == (8, 8, 3)
    assert all(isinstance(u, RecordsUnit) and u.split == "train" and u.source == "shapes" for u in units)
    assert any("missing.png" in w for w in skips.examples["missing_file"])

    val, vskips, _ = read(cfg, "val")
    assert keys(val) == ["v.png"] and not vskips


@pytest.mark.parametrize("folders, used", [(["val"], "val"), (["test"], "test"), (["test", "val"], "val"),
                                           (["val", "validation"], "validation")])
def test_imagefolder_validation_folder_names(tmp_path, folders, used):
    imagefolder_train(tmp_path / "train")
    for f in folders:
        (tmp_path / f).mkdir()
        (tmp_path / f / f"{f}.png").write_bytes(png())
        write_lines(tmp_path / f / "metadata.jsonl", [{"file_name": f"{f}.png", "text": f"from {f}"}])
    val, _, _ = read(SourceConfig(name="s", kind="imagefolder", path=str(tmp_path)), "val")
    assert keys(val) == [f"{used}.png"]


def test_imagefolder_no_validation(tmp_path):
    imagefolder_train(tmp_path / "train")
    cfg = SourceConfig(name="s", kind="imagefolder", path=str(tmp_path))
    assert read_source(cfg, "val", Skips()) == []
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.png").write_bytes(png())
    write_lines(flat / "metadata.jsonl", [{"file_name": "x.png", "text": "x"}])
    assert read_source(SourceConfig(name="f", kind="imagefolder", path=str(flat)), "val", Skips()) == []


def test_imagefolder_caption_column_and_val_path(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.png").write_bytes(png())
    write_lines(flat / "metadata.jsonl", [{"file_name": "x.png", "caption": "custom column", "text": "other"}])
    held = tmp_path / "held"
    held.mkdir()
    (held / "h.png").write_bytes(png())
    write_lines(held / "metadata.jsonl", [{"file_name": "h.png", "caption": "held out"}])
    cfg = SourceConfig(name="s", kind="imagefolder", path=str(flat), caption_column="caption", val_path=str(held),
                       val_fraction=0.9)  # val_path wins: the train split keeps everything
    train, _, _ = read(cfg)
    assert [r.captions for r in train] == [["custom column"]]
    val, _, _ = read(cfg, "val")
    assert [r.captions for r in val] == [["held out"]]
    # the metadata file itself as the path
    records, _, _ = read(SourceConfig(name="s", kind="imagefolder", path=str(flat / "metadata.jsonl")))
    assert keys(records) == ["x.png"]


def flat_imagefolder(root: Path, n: int, bad: int = 0) -> None:
    """n good samples (one image file each) and ``bad`` lines naming missing files."""
    root.mkdir(parents=True, exist_ok=True)
    data = png()
    lines = []
    for i in range(n):
        (root / f"{i:04d}.png").write_bytes(data)
        lines.append({"file_name": f"{i:04d}.png", "text": f"caption {i}"})
    lines += [{"file_name": f"gone{i}.png", "text": "x"} for i in range(bad)]
    lines += [b"not json\n"] * 3  # no key: counted with train
    write_lines(root / "metadata.jsonl", lines)


def test_imagefolder_val_fraction_stable_and_disjoint(tmp_path):
    flat_imagefolder(tmp_path, 400, bad=40)
    cfg = SourceConfig(name="s", kind="imagefolder", path=str(tmp_path), val_fraction=0.25)
    train, tskips, units = read(cfg)
    val, vskips, _ = read(cfg, "val")
    assert not set(keys(train)) & set(keys(val))
    assert sorted(keys(train) + keys(val)) == [f"{i:04d}.png" for i in range(400)]
    assert 60 <= len(val) <= 140  # ~100
    assert keys(read(cfg)[0]) == keys(train) and keys(read(cfg, "val")[0]) == keys(val)  # same split every call
    assert all(in_val(k, 0.25) for k in keys(val)) and not any(in_val(k, 0.25) for k in keys(train))
    # each bad line counted once over both splits; keyless ones with train
    assert tskips.counts["missing_file"] + vskips.counts["missing_file"] == 40
    assert tskips.counts["malformed_json"] == 3 and vskips.counts["malformed_json"] == 0
    # units of at most UNIT_SIZE records, in order
    sizes = [len(u) for u in units]
    assert len(sizes) == 2 and sizes[0] == UNIT_SIZE and sum(sizes) == len(train)


# ============================================================================================== webdataset

OBELICS = {"texts": ["  intro  text ", None, "", None, "outro"], "images": [None, "0.png", None, "1.JPG", None]}


def good_and_bad_shard(path: Path) -> Path:
    """4 good samples (3 pairs, 1 interleaved) and 8 bad ones (2 missing, 2 empty, 1 non-UTF-8, 2 malformed,
    1 duplicate key)."""
    img, jpg = png(), png(fmt="JPEG")
    return write_tar(path, [
        ("s0.jpg", jpg), ("s0.txt", b"a  cat"),
        ("s1.png", img), ("s1.json", json.dumps({"text": ["one", " ", "two"], "other": 1}).encode()),
        ("s2.JPEG", jpg), ("s2.TXT", b"upper-case extensions"),
        ("s3.json", json.dumps(OBELICS).encode()), ("s3.0.png", img), ("s3.1.jpg", jpg),
        ("s4.txt", b"caption without an image"),  # missing_file
        ("s5.jpg", jpg),  # empty_caption: no caption at all
        ("s6.jpg", jpg), ("s6.txt", b"  \n "),  # empty_caption
        ("s7.jpg", jpg), ("s7.txt", b"caf\xe9"),  # non_utf8_caption
        ("s8.jpg", jpg), ("s8.json", b"{not json"),  # malformed_json
        ("s9.json", json.dumps({"texts": ["t", None], "images": [None, "0.png"]}).encode()),  # missing_file
        ("s10.json", json.dumps({"texts": ["t"], "images": [None, "0.png"]}).encode()),  # malformed_json
        ("s0.jpg", jpg), ("s0.txt", b"the same key again"),  # duplicate_file_name
    ])


def test_webdataset_samples_and_reasons(tmp_path):
    shard = good_and_bad_shard(tmp_path / "000000.tar")
    cfg = SourceConfig(name="wds", kind="webdataset", path=str(shard))
    records, skips, units = read(cfg)
    assert len(units) == 1 and isinstance(units[0], ShardUnit)
    assert keys(records) == ["000000.tar:s0", "000000.tar:s1", "000000.tar:s2", "000000.tar:s3"]
    assert counts(skips) == {"missing_file": 2, "empty_caption": 2, "non_utf8_caption": 1, "malformed_json": 2,
                             "duplicate_file_name": 1}
    s0, s1, s2, s3 = records
    assert s0.kind == "pair" and s0.captions == ["a cat"]
    assert s0.segments[0].name == "000000.tar:s0.jpg" and s0.segments[0].path is None
    assert s1.captions == ["one", "two"] and s1.segments[0].data == png()
    assert s2.captions == ["upper-case extensions"] and s2.segments[0].name == "000000.tar:s2.jpeg"
    assert s3.kind == "interleaved" and s3.captions == []
    assert [type(s).__name__ for s in s3.segments] == ["str", "ImageRef", "ImageRef", "str"]
    assert s3.segments[0] == "intro text" and s3.segments[3] == "outro"
    assert [s.name for s in s3.segments[1:3]] == ["000000.tar:s3.0.png", "000000.tar:s3.1.jpg"]
    for r in (s0, s1, s2):
        assert load_image(r.segments[0], 8).shape == (8, 8, 3)
    assert load_image(s3.segments[2], 8).shape == (8, 8, 3)


def test_webdataset_scan_reads_no_tar_content(tmp_path):
    """read_source only lists shards: a shard that is not a tar is found out (and counted) when read."""
    (tmp_path / "000000.tar").write_bytes(b"not a tar file " * 100)
    good_and_bad_shard(tmp_path / "000001.tar")
    skips = Skips()
    units = read_source(SourceConfig(name="wds", kind="webdataset", path=str(tmp_path)), "train", skips)
    assert len(units) == 2 and not skips  # a directory of shards, nothing read yet
    assert list(units[0].records(skips)) == [] and counts(skips) == {"unreadable_tar_member": 1}
    assert "000000.tar" in skips.examples["unreadable_tar_member"][0]
    assert len(list(units[1].records(skips))) == 4


def test_webdataset_brace_expansion_and_missing_shard(tmp_path):
    for s in range(4):
        write_tar(tmp_path / "data" / f"{s:06d}.tar", pair_members(f"s{s}_", 3))
    pattern = f"{tmp_path}/data/{{000000..000003}}.tar"
    records, skips, units = read(SourceConfig(name="w", kind="webdataset", path=pattern))
    assert [u.shard_name for u in units] == [f"{s:06d}.tar" for s in range(4)]
    assert keys(records) == [f"{s:06d}.tar:s{s}_{i:04d}" for s in range(4) for i in range(3)]
    assert not skips
    # a shard of the pattern that does not exist: one count, named; the others come through
    records, skips, _ = read(SourceConfig(name="w", kind="webdataset", path=f"{tmp_path}/data/{{000002..000004}}.tar"))
    assert len(records) == 6 and counts(skips) == {"unreadable_tar_member": 1}
    assert "000004.tar" in skips.examples["unreadable_tar_member"][0]


def test_webdataset_truncated_tar(tmp_path):
    """A shard cut inside sample 3's image: samples 0-2 come through, one unreadable count, the torn sample is
    dropped, and the next shard is read as usual."""
    full = write_tar(tmp_path / "full.tar", pair_members("k", 6, start=0)).read_bytes()
    # members are 512-byte headers + data padded to 512: find sample 3's image data and cut inside it
    with tarfile.open(tmp_path / "full.tar") as tf:
        m = tf.getmember("k0003.png")
    (tmp_path / "000000.tar").write_bytes(full[: m.offset_data + m.size // 2])
    write_tar(tmp_path / "000001.tar", pair_members("n", 2))
    records, skips, _ = read(SourceConfig(name="w", kind="webdataset", path=f"{tmp_path}/{{000000,000001}}.tar"))
    assert keys(records) == ["000000.tar:k0000", "000000.tar:k0001", "000000.tar:k0002",
                             "000001.tar:n0000", "000001.tar:n0001"]
    assert counts(skips) == {"unreadable_tar_member": 1}
    assert skips.examples["unreadable_tar_member"][0].startswith("000000.tar")


def test_webdataset_val_fraction(tmp_path):
    members = pair_members("k", 120)
    members += [("k0000.png", png()), ("k0000.txt", b"duplicate")]  # one bad sample: counted in one split only
    write_tar(tmp_path / "000000.tar", members)
    (tmp_path / "000001.tar").write_bytes(b"\0garbage" * 64)  # unreadable: counted once, with train
    cfg = SourceConfig(name="w", kind="webdataset", path=f"{tmp_path}/{{000000..000001}}.tar", val_fraction=0.3)
    train, tskips, tunits = read(cfg)
    val, vskips, vunits = read(cfg, "val")
    assert len(tunits) == len(vunits) == 2 and all(u.split == "val" for u in vunits)
    assert not set(keys(train)) & set(keys(val))
    assert sorted(keys(train) + keys(val)) == [f"000000.tar:k{i:04d}" for i in range(120)]
    assert 15 <= len(val) <= 60  # ~36
    assert keys(read(cfg)[0]) == keys(train) and keys(read(cfg, "val")[0]) == keys(val)
    both = Skips().merge(tskips).merge(vskips)
    assert counts(both) == {"duplicate_file_name": 1, "unreadable_tar_member": 1}
    assert tskips.counts["unreadable_tar_member"] == 1


def test_webdataset_val_path_and_no_val(tmp_path):
    write_tar(tmp_path / "train" / "000000.tar", pair_members("t", 2))
    write_tar(tmp_path / "val" / "000000.tar", pair_members("v", 1))
    cfg = SourceConfig(name="w", kind="webdataset", path=str(tmp_path / "train" / "000000.tar"),
                       val_path=str(tmp_path / "val"))
    assert keys(read(cfg)[0]) == ["000000.tar:t0000", "000000.tar:t0001"]
    assert keys(read(cfg, "val")[0]) == ["000000.tar:v0000"]
    assert read_source(SourceConfig(name="w", kind="webdataset", path=cfg.path), "val", Skips()) == []


def test_webdataset_pipe_and_gzip(tmp_path):
    shard = write_tar(tmp_path / "000000.tar", pair_members("k", 2))
    records, skips, _ = read(SourceConfig(name="w", kind="webdataset", path=f"pipe:cat {shard}"))
    assert keys(records) == ["000000.tar:k0000", "000000.tar:k0001"] and not skips
    gz = tmp_path / "gz" / "000000.tar.gz"
    gz.parent.mkdir()
    with tarfile.open(gz, "w:gz") as out, tarfile.open(shard) as src:
        for m in src.getmembers():
            out.addfile(m, src.extractfile(m))
    records, skips, _ = read(SourceConfig(name="w", kind="webdataset", path=str(gz.parent)))
    assert keys(records) == ["000000.tar.gz:k0000", "000000.tar.gz:k0001"] and not skips


# ============================================================================================== interleaved


def interleaved_fixture(folder: Path) -> Path:
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "a.png").write_bytes(png())
    (folder / "img" / "b.png").write_bytes(png((0, 255, 0)))
    return write_lines(folder / "docs.jsonl", [
        {"texts": ["Intro  text", None, "  ", None, "The end."],
         "images": [None, "img/a.png", None, "img/b.png", None]},
        {"texts": ["just text,\n\n\n  two paragraphs"], "images": [None]},  # no image: still interleaved
        b"{broken\n",  # malformed_json
        {"texts": ["no images list"]},  # malformed_json
        {"texts": ["a", None], "images": [None]},  # malformed_json: unequal lengths
        {"texts": ["a"], "images": ["img/a.png"]},  # malformed_json: both at one position
        {"texts": [None], "images": [None]},  # malformed_json: neither
        {"texts": ["text", None], "images": [None, "img/nope.png"]},  # missing_file
        b'{"texts": ["caf\xe9", null], "images": [null, "img/a.png"]}\n',  # non_utf8_caption
        {"texts": ["", None, " "], "images": [None, "img/a.png", None]},  # empty_caption
        b"   \n",  # blank: ignored
    ])


def test_interleaved(tmp_path):
    fixture = interleaved_fixture(tmp_path / "inter")
    records, skips, units = read(SourceConfig(name="obelics", kind="interleaved", path=str(fixture)))
    assert keys(records) == ["docs.jsonl:1", "docs.jsonl:2"]
    assert counts(skips) == {"malformed_json": 5, "missing_file": 1, "non_utf8_caption": 1, "empty_caption": 1}
    doc, text_only = records
    assert doc.kind == text_only.kind == "interleaved"
    assert doc.segments[0] == "Intro text" and doc.segments[3] == "The end."
    assert [Path(s.path).name for s in doc.segments[1:3]] == ["a.png", "b.png"]
    assert all(Path(s.path).is_file() and Path(s.path).is_absolute() for s in doc.segments[1:3])
    assert text_only.segments == ["just text,\n\ntwo paragraphs"]
    assert skips.examples["missing_file"][0].endswith("nope.png")
    assert isinstance(units[0], RecordsUnit)


def test_interleaved_directory_and_val_fraction(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png())
    for name in ("b.jsonl", "a.jsonl"):
        write_lines(tmp_path / name, [{"texts": [f"doc {i}", None], "images": [None, "img/a.png"]} for i in range(60)])
    (tmp_path / "notes.txt").write_text("not a jsonl file")
    cfg = SourceConfig(name="i", kind="interleaved", path=str(tmp_path), val_fraction=0.2)
    train, _, _ = read(cfg)
    val, _, _ = read(cfg, "val")
    assert not set(keys(train)) & set(keys(val)) and len(train) + len(val) == 120
    assert sorted(keys(train) + keys(val)) == sorted(f"{f}:{i}" for f in ("a.jsonl", "b.jsonl") for i in range(1, 61))
    assert keys(train)[0].startswith("a.jsonl")  # files in sorted order
    assert keys(read(cfg, "val")[0]) == keys(val)
    assert read_source(SourceConfig(name="i", kind="interleaved", path=str(tmp_path)), "val", Skips()) == []


# ============================================================================================== text


def test_text_lines(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_bytes(b"\xef\xbb\xbffirst doc\n\n  second   doc  \nbad \xff line\nthird\r\n   \n")  # BOM, CRLF
    records, skips, _ = read(SourceConfig(name="t", kind="text", path=str(f)))
    assert keys(records) == ["corpus.txt:1", "corpus.txt:3", "corpus.txt:5"]
    assert [r.segments for r in records] == [["first doc"], ["second doc"], ["third"]]
    assert all(r.kind == "text" and r.captions == [] for r in records)
    assert counts(skips) == {"non_utf8_caption": 1}  # empty lines are separators, not skips


def test_text_paragraphs(tmp_path):
    f = tmp_path / "book.txt"
    f.write_bytes(b"\xef\xbb\xbfpara one, line a\npara one,   line b\n\npara two\n\n\n\nbad \xff para\nstill bad\n"
                  b"\nlast para\n")
    records, skips, _ = read(SourceConfig(name="t", kind="text", path=str(f), text_split="paragraph"))
    assert keys(records) == ["book.txt:1", "book.txt:4", "book.txt:11"]
    assert records[0].segments == ["para one, line a\npara one, line b"]
    assert records[2].segments == ["last para"]
    assert counts(skips) == {"non_utf8_caption": 1}


def test_text_jsonl_and_directory(tmp_path):
    write_lines(tmp_path / "b.jsonl", [
        {"body": "  a   document "},
        {"body": ""},  # empty_caption
        {"text": "no body field"},  # empty_caption
        b"not json\n",  # malformed_json
        {"body": 5},  # malformed_json
        ["body"],  # malformed_json
        b'{"body": "caf\xe9"}\n',  # non_utf8_caption
        b'{"body": "lone \\ud800 surrogate"}\n',  # non_utf8_caption (an escaped lone surrogate)
    ])
    (tmp_path / "a.txt").write_text("from the txt file\n")
    (tmp_path / "ignored.md").write_text("not a corpus file\n")
    records, skips, _ = read(SourceConfig(name="t", kind="text", path=str(tmp_path), text_column="body"))
    assert keys(records) == ["a.txt:1", "b.jsonl:1"]
    assert records[1].segments == ["a document"]
    assert counts(skips) == {"empty_caption": 2, "malformed_json": 3, "non_utf8_caption": 2}


def test_text_val_path_and_fraction(tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"doc {i}\n" for i in range(200)))
    (tmp_path / "val.txt").write_text("held out\n")
    cfg = SourceConfig(name="t", kind="text", path=str(tmp_path / "train.txt"), val_path=str(tmp_path / "val.txt"))
    assert len(read(cfg)[0]) == 200 and keys(read(cfg, "val")[0]) == ["val.txt:1"]
    cfg = SourceConfig(name="t", kind="text", path=str(tmp_path / "train.txt"), val_fraction=0.1)
    train, val = read(cfg)[0], read(cfg, "val")[0]
    assert len(train) + len(val) == 200 and not set(keys(train)) & set(keys(val)) and 5 <= len(val) <= 40


# ============================================================================================== API


@pytest.mark.parametrize("kind", ["imagefolder", "webdataset", "interleaved", "text"])
def test_missing_path_names_source(tmp_path, kind):
    path = str(tmp_path / "does-not-exist" / ("{000..002}.tar" if kind == "webdataset" else "x.jsonl"))
    with pytest.raises(FileNotFoundError) as e:
        read_source(SourceConfig(name="my-source", kind=kind, path=path), "train", Skips())
    assert "my-source" in str(e.value) and "does-not-exist" in str(e.value)


def test_webdataset_empty_directory_names_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="'shards'.*no .tar"):
        read_source(SourceConfig(name="shards", kind="webdataset", path=str(tmp_path)), "train", Skips())


def test_missing_val_path_names_source(tmp_path):
    (tmp_path / "c.txt").write_text("doc\n")
    cfg = SourceConfig(name="corpus", kind="text", path=str(tmp_path / "c.txt"), val_path=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="corpus.*val_path"):
        read_source(cfg, "val", Skips())


def test_config_validation():
    with pytest.raises(ValueError, match="kind"):
        SourceConfig(name="x", kind="csv", path=".")
    with pytest.raises(ValueError, match="val_fraction"):
        SourceConfig(name="x", kind="text", path=".", val_fraction=1.0)
    with pytest.raises(ValueError, match="split"):
        read_source(SourceConfig(name="x", kind="text", path="."), "test", Skips())


def test_units_and_config_pickle(tmp_path):
    imagefolder_train(tmp_path / "if" / "train")
    shard = good_and_bad_shard(tmp_path / "000000.tar")
    for cfg in (SourceConfig(name="a", kind="imagefolder", path=str(tmp_path / "if")),
                SourceConfig(name="b", kind="webdataset", path=str(shard), val_fraction=0.5)):
        cfg2 = pickle.loads(pickle.dumps(cfg))
        assert cfg2 == cfg
        for split in ("train", "val"):
            units = read_source(cfg, split, Skips())
            clones = pickle.loads(pickle.dumps(units))
            assert [keys(u.records(Skips())) for u in clones] == [keys(u.records(Skips())) for u in units]


def test_caption_corpus(tmp_path):
    imagefolder_train(tmp_path / "if" / "train")
    assert list(caption_corpus(SourceConfig(name="a", kind="imagefolder", path=str(tmp_path / "if")))) == [
        "a red square", "first", "second"]
    shard = good_and_bad_shard(tmp_path / "000000.tar")
    wds = SourceConfig(name="b", kind="webdataset", path=str(shard))
    assert list(caption_corpus(wds)) == ["a cat", "one", "two", "upper-case extensions", "intro text", "outro"]
    assert list(caption_corpus(wds, limit=2)) == ["a cat", "one"]
    inter = interleaved_fixture(tmp_path / "inter")
    assert list(caption_corpus(SourceConfig(name="c", kind="interleaved", path=str(inter)))) == [
        "Intro text", "The end.", "just text,\n\ntwo paragraphs"]
    (tmp_path / "t.txt").write_text("one\ntwo\n")
    assert list(caption_corpus(SourceConfig(name="d", kind="text", path=str(tmp_path / "t.txt")), limit=5)) == [
        "one", "two"]
    # the train split only
    flat_imagefolder(tmp_path / "flat", 50)
    cfg = SourceConfig(name="e", kind="imagefolder", path=str(tmp_path / "flat"), val_fraction=0.5)
    assert sorted(caption_corpus(cfg)) == sorted(c for r in read(cfg)[0] for c in r.captions)


def test_in_val_is_a_stable_fraction():
    ks = [f"file{i}.png" for i in range(4000)]
    frac = np.mean([in_val(k, 0.1) for k in ks])
    assert 0.08 < frac < 0.12
    assert not any(in_val(k, 0.0) for k in ks)
    assert in_val("caf\udce9", 0.5) in (True, False) and in_val("lone \ud800", 0.5) in (True, False)
