"""The sources people have besides an ImageFolder: Hugging Face parquet shards in the
ILSVRC/imagenet-1k layout, the timm/imagenet-1k-wds tar layout, `pipe:` streams; sample indices that stay put
across runs and world sizes; the same ADM crop whichever source the bytes came from.

Parquet files are written here with pyarrow in the layout the `datasets` library writes (image = struct{bytes, path},
label = int64, -1 for an unlabeled split); expected keys and labels come from what was written, not from the source.
"""
from __future__ import annotations

import io
import json
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fixtures import (RES, SHARD, VENV_BIN, invoke, make_imagefolder, ok, rand_rgb, read_array, ref_adm_crop,
                      subprocess_env, tree, write_tar)
from repa_pipe.cache.sources import (BadImageError, ParquetSource, SourceOptions, WebDatasetSource, load_preprocessed,
                                     open_source)
from repa_pipe.encoding.runner import owned_shards
from repa_pipe.pipeline.errors import BadInputError


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def img_bytes(k: int, fmt: str = "PNG", size: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    rand_rgb(*(size or (20 + k % 7, 17 + k % 5)), seed=k).save(buf, format=fmt)
    return buf.getvalue()


def write_parquet(path: Path, images: list[bytes], labels: list[int | None] | None, row_group: int = 3,
                  **columns) -> Path:
    """A parquet file in the ILSVRC/imagenet-1k layout, `row_group` rows per row group."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    data = {"image": pa.array([{"bytes": b, "path": f"img_{k}.png"} for k, b in enumerate(images)], image_type)}
    if labels is not None:
        data["label"] = pa.array(labels, pa.int64())
    data.update(columns)
    pq.write_table(pa.table(data), path, row_group_size=row_group)
    return path


@pytest.fixture
def parquet_dir(tmp_path: Path) -> Path:
    """Two files written out of name order: 7 rows (row groups 3+3+1) and 4 rows (3+1)."""
    d = tmp_path / "data"
    write_parquet(d / "train-00001-of-00002.parquet", [img_bytes(k) for k in range(7, 11)], [4, 0, 2, 1])
    write_parquet(d / "train-00000-of-00002.parquet", [img_bytes(k) for k in range(7)], [3, 1, 0, 2, 2, 1, 0])
    return d


WANT_LABELS = [3, 1, 0, 2, 2, 1, 0, 4, 0, 2, 1]


# ------------------------------------------------------------------------------------------------ parquet
def test_parquet_folder_glob_brace_list_and_file_agree(parquet_dir: Path):
    a = open_source(parquet_dir)
    assert isinstance(a, ParquetSource) and a.kind == "parquet" and a.root == str(parquet_dir.resolve())
    want_keys = [f"train-00000-of-00002.parquet/{r}" for r in range(7)] + \
                [f"train-00001-of-00002.parquet/{r}" for r in range(4)]
    assert a.keys == want_keys and a.labels.tolist() == WANT_LABELS and a.num_classes == 5 and not a.known_bad
    specs = [str(parquet_dir / "train-*.parquet"), str(parquet_dir / "train-{00000..00001}-of-00002.parquet"),
             f"{parquet_dir}/train-00001-of-00002.parquet::{parquet_dir}/train-00000-of-00002.parquet"]
    for spec in specs:
        b = open_source(spec)
        assert isinstance(b, ParquetSource) and b.root == spec
        assert b.keys == a.keys and b.labels.tolist() == WANT_LABELS and a.dataset().same_images(b.dataset()) is None
    one = open_source(parquet_dir / "train-00001-of-00002.parquet")
    assert one.keys == want_keys[7:] and one.labels.tolist() == WANT_LABELS[7:]
    for i, k in enumerate(list(range(7)) + list(range(7, 11))):
        assert a.read_bytes(i) == img_bytes(k)
        np.testing.assert_array_equal(load_preprocessed(a, i, RES), ref_adm_crop(rand_rgb(20 + k % 7, 17 + k % 5, k),
                                                                                RES))
    assert a.where(8) == f"{parquet_dir.resolve()}/train-00001-of-00002.parquet row 1"


def test_parquet_reads_one_row_group_at_a_time(tmp_path: Path, monkeypatch):
    """Listing reads the label column only; a sample reads the image column of its own row group, once; the whole
    file is never read, and Arrow holds about one row group."""
    images = [img_bytes(k, size=(64, 64)) for k in range(20)]  # noise: PNG cannot shrink it, ~12 KB each
    path = write_parquet(tmp_path / "p" / "big.parquet", images, list(range(20)), row_group=5)
    calls = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        calls.append((i, tuple(columns or ())))
        return real(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    for whole in ("read", "iter_batches", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, whole, lambda *a, **k: pytest.fail(f"ParquetFile.{whole} called"))
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read_table called"))
    src = open_source(path)
    assert calls == [(g, ("label",)) for g in range(4)]
    calls.clear()
    assert src.read_bytes(12) == images[12]          # row group 2
    assert src.read_bytes(14) == images[14]          # same row group: not read again
    assert calls == [(2, ("image",))]
    # What the source keeps is one row group of four, not the file. (Measured on the kept array, not with
    # pa.total_allocated_bytes(): that counts the whole process's Arrow memory, which other work can move.)
    held = src._open[2].nbytes
    assert sum(map(len, images[10:15])) <= held < sum(map(len, images)) / 2, held
    assert src.read_bytes(3) == images[3] and calls[-1] == (0, ("image",))


def test_parquet_labels_unlabeled_split_and_bad_labels(tmp_path: Path):
    imgs = [img_bytes(k) for k in range(4)]
    test_split = write_parquet(tmp_path / "test" / "test-00000.parquet", imgs, [-1, -1, -1, -1])
    with pytest.raises(BadInputError, match=r"test-00000\.parquet: every row has label -1.*--unlabeled"):
        open_source(test_split)
    src = open_source(test_split, opts=SourceOptions(unlabeled=True))
    assert src.labels.tolist() == [0, 0, 0, 0] and src.num_classes == 1 and not src.known_bad
    assert src.read_bytes(2) == imgs[2]
    no_label_column = write_parquet(tmp_path / "nolab" / "x.parquet", imgs, None)
    with pytest.raises(BadInputError, match=r"x\.parquet: no integer 'label' column; pass --unlabeled"):
        open_source(no_label_column)
    assert open_source(no_label_column, opts=SourceOptions(unlabeled=True)).labels.tolist() == [0, 0, 0, 0]

    mixed = open_source(write_parquet(tmp_path / "mixed" / "m.parquet", imgs, [2, -1, None, 7]), num_classes=5)
    assert mixed.labels.tolist() == [2, -1, -1, -1]
    assert "label -1 (an unlabeled split; pass --unlabeled" in mixed.known_bad[1]
    assert mixed.known_bad[2] == "no label (null)" and mixed.known_bad[3].startswith("label 7 out of range [0, 5)")
    with pytest.raises(BadImageError, match=r"m\.parquet row 1: label -1"):
        mixed.read(1)


def test_parquet_damaged_or_foreign_files_name_their_path(tmp_path: Path, parquet_dir: Path):
    good = parquet_dir / "train-00000-of-00002.parquet"
    cut = tmp_path / "cut" / "train-00000.parquet"
    cut.parent.mkdir()
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BadInputError, match=rf"{cut}: no rows found.*not a readable parquet file"):
        open_source(cut)
    # Beside a good file, the damaged one is listed as damaged and contributes nothing.
    (cut.parent / "train-00001.parquet").write_bytes(good.read_bytes())
    src = open_source(cut.parent)
    assert list(src.damaged) == [str(cut)] and len(src) == 7 and src.shard_noun == "parquet file"
    assert any(str(cut) in n for n in src.dataset().notes)
    junk = tmp_path / "junk" / "a.parquet"
    junk.parent.mkdir()
    junk.write_bytes(b"PAR1 this is not parquet at all " * 20)
    with pytest.raises(BadInputError, match=str(junk)):
        open_source(junk)
    other = tmp_path / "other" / "o.parquet"
    other.parent.mkdir()
    pq.write_table(pa.table({"jpg": [b"x"], "cls": [1]}), other)
    with pytest.raises(BadInputError, match=rf"{other}: no 'image' column of struct"):
        open_source(other)
    with pytest.raises(BadInputError, match="both .tar and .parquet"):
        write_tar(parquet_dir / "x.tar", [("a.png", img_bytes(0)), ("a.cls", b"0")])
        open_source(parquet_dir)


def test_parquet_damaged_row_group_is_a_bad_sample_with_its_path(tmp_path: Path):
    """Footer intact, one row group's image data overwritten: its rows are bad samples, the others read."""
    images = [img_bytes(k, size=(48, 48)) for k in range(6)]
    path = write_parquet(tmp_path / "d" / "d.parquet", images, [0] * 6, row_group=3)
    meta = pq.ParquetFile(path).metadata
    col = next(c for c in range(meta.row_group(1).num_columns)
               if meta.row_group(1).column(c).path_in_schema == "image.bytes")
    chunk = meta.row_group(1).column(col)
    raw = bytearray(path.read_bytes())
    start = chunk.data_page_offset
    raw[start:start + 64] = b"\xff" * 64  # the page header of row group 1's image bytes
    path.write_bytes(bytes(raw))
    src = open_source(path)
    assert src.read_bytes(1) == images[1]
    with pytest.raises(BadImageError, match=rf"{path} row 4: unreadable row group 1"):
        src.read(4)


def test_parquet_byte_cap(tmp_path: Path):
    images = [img_bytes(k, size=(64, 64)) for k in range(3)]
    src = open_source(write_parquet(tmp_path / "c" / "c.parquet", images, [0, 1, 2], row_group=1),
                      opts=SourceOptions(max_bytes=1000))
    with pytest.raises(BadImageError, match=r"c\.parquet row 1: .*over the per-image cap.*--max-image-mb"):
        src.read(1)


# ------------------------------------------------------------------------------------------- tars and pipe:
def timm_wds(d: Path) -> Path:
    """The timm/imagenet-1k-wds layout: KEY.jpg + KEY.cls + KEY.json, keys like n01440764_10026."""
    for t in range(2):
        members = []
        for j in range(3):
            k = 3 * t + j
            key = f"n0144076{k}_{1000 + k}"
            members += [(f"{key}.jpg", img_bytes(k, "JPEG")), (f"{key}.cls", str(k % 4).encode()),
                        (f"{key}.json", json.dumps({"filename": f"{key}.JPEG", "label": k % 4}).encode())]
        write_tar(d / f"imagenet1k-train-{t:04d}.tar", members)
    return d


def test_timm_imagenet_wds_layout(tmp_path: Path):
    d = timm_wds(tmp_path / "wds")
    src = open_source(d)
    assert isinstance(src, WebDatasetSource) and len(src) == 6 and not src.known_bad
    assert src.keys[:2] == ["imagenet1k-train-0000.tar/n01440760_1000", "imagenet1k-train-0000.tar/n01440761_1001"]
    assert src.labels.tolist() == [0, 1, 2, 3, 0, 1]
    for i in range(6):
        assert src.read_bytes(i) == img_bytes(i, "JPEG")
    import webdataset as wds  # webdataset's own reader agrees on keys and labels

    theirs = [(s["__key__"], int(s["cls"])) for s in wds.WebDataset(str(d / "imagenet1k-train-{0000..0001}.tar"),
                                                                     shardshuffle=False, empty_check=False)]
    assert theirs == [(k.split("/", 1)[1], int(v)) for k, v in zip(src.keys, src.labels)]


def test_pipe_source_spools_each_shard_once(tmp_path: Path):
    d = timm_wds(tmp_path / "wds")
    local = open_source(d)
    spool = tmp_path / "spool"
    spec = f"pipe:cat {shlex.quote(str(d))}/imagenet1k-train-{{0000..0001}}.tar"
    src = open_source(spec, opts=SourceOptions(spool=str(spool)))
    assert isinstance(src, WebDatasetSource) and src.root == spec
    assert src.keys == local.keys and src.labels.tolist() == local.labels.tolist()
    assert src.dataset().same_images(local.dataset()) is None
    assert sorted(p.name for p in spool.glob("*/*.tar")) == ["imagenet1k-train-0000.tar", "imagenet1k-train-0001.tar"]
    for i in range(len(src)):
        assert src.read_bytes(i) == local.read_bytes(i)
    # Spooled tars are reused: the command is not run again (here it would now fail).
    stamp = {p.name: p.stat().st_mtime_ns for p in spool.glob("*/*.tar")}
    (d / "imagenet1k-train-0000.tar").unlink()
    again = open_source(spec, opts=SourceOptions(spool=str(spool)))
    assert again.keys == src.keys and stamp == {p.name: p.stat().st_mtime_ns for p in spool.glob("*/*.tar")}
    # A failing command names itself and its status; nothing half-written is left in the spool.
    with pytest.raises(BadInputError, match=r"pipe:cat .*imagenet1k-train-0000\.tar: the command exited with status 1"):
        open_source(f"pipe:cat {d}/imagenet1k-train-0000.tar", opts=SourceOptions(spool=str(tmp_path / "s2")))
    assert list((tmp_path / "s2").iterdir()) == []


def test_pipe_source_without_spool_uses_a_temporary_folder_removed_at_exit(tmp_path: Path):
    d = timm_wds(tmp_path / "wds")
    code = ("import sys; from repa_pipe.cache.sources import open_source; "
            f"s = open_source('pipe:cat {d}/imagenet1k-train-0001.tar'); "
            "print(s.tar_paths[0]); print(len(s), s.read_bytes(0)[:2].hex())")
    p = subprocess.run([str(VENV_BIN / "python"), "-c", code], capture_output=True, text=True,
                       env=subprocess_env(tmp_path), timeout=120)
    assert p.returncode == 0, p.stderr
    spooled, facts = p.stdout.splitlines()
    assert facts == "3 ffd8"  # three samples, JPEG bytes
    assert not Path(spooled).exists() and not Path(spooled).parent.parent.exists()  # spool/<command hash>/NAME.tar


# ---------------------------------------------------------------------------- one image, any source, one crop
def test_same_bytes_give_the_same_crop_from_folder_tar_and_parquet(tmp_path: Path):
    blobs = [img_bytes(1, "JPEG", (300, 211)), img_bytes(2, "PNG", (41, 97)), img_bytes(3, "WEBP", (64, 64))]
    exts = ["jpg", "png", "webp"]
    folder = tmp_path / "folder"
    for k, (b, e) in enumerate(zip(blobs, exts)):
        (folder / "c").mkdir(parents=True, exist_ok=True)
        (folder / "c" / f"{k}.{e}").write_bytes(b)
    tar = write_tar(tmp_path / "tars" / "s.tar", [m for k, (b, e) in enumerate(zip(blobs, exts))
                                                  for m in ((f"{k}.{e}", b), (f"{k}.cls", b"0"))])
    par = write_parquet(tmp_path / "pq" / "p.parquet", blobs, [0, 0, 0], row_group=2)
    sources = [open_source(folder), open_source(tar), open_source(par)]
    for i in range(3):
        crops = [load_preprocessed(s, i, 64) for s in sources]
        assert all(c.dtype == np.uint8 and c.shape == (64, 64, 3) for c in crops)
        for c in crops[1:]:
            np.testing.assert_array_equal(c, crops[0])
        np.testing.assert_array_equal(crops[0], ref_adm_crop(Image.open(io.BytesIO(blobs[i])), 64))


# ------------------------------------------------------------------------ indices stable across runs and ranks
def test_indices_do_not_depend_on_the_run_or_the_world_size(tmp_path: Path, parquet_dir: Path):
    """Every source lists the same keys in the same order each time; ranks split whole shards of that one order,
    so under world size 1 or 2 each index is written once, by one rank, from the same sample."""
    folder = make_imagefolder(tmp_path / "f", per_class=5)
    tars = timm_wds(tmp_path / "wds")
    for spec in (folder, tars, parquet_dir):
        first, second = open_source(spec), open_source(spec)
        assert first.keys == second.keys and first.labels.tolist() == second.labels.tolist()
        n, s = len(first), 4
        n_shards = -(-n // s)
        for world in (1, 2, 3):
            rows = [i for r in range(world) for k in owned_shards(n_shards, r, world)
                    for i in range(k * s, min((k + 1) * s, n))]
            assert sorted(rows) == list(range(n))  # each index once, none shifted


def encode_args(stage: str, src, cache, model: str, shard: int = 4) -> list[str]:
    opt = "--vae" if stage == "encode-latents" else "--encoder"
    return [stage, "--source", src, "--cache", cache, "--resolution", RES, "--shard-size", shard, "--workers", 0,
            "--batch-size", 3, opt, model]


def folder_as_parquet(folder: Path, out: Path, files: int = 2) -> Path:
    """The ImageFolder's images, bytes unchanged, in its canonical order and labels, as `files` parquet files."""
    src = open_source(folder)
    blobs = [src.read_bytes(i) for i in range(len(src))]
    cut = -(-len(blobs) // files)
    for f in range(files):
        write_parquet(out / f"train-{f:05d}-of-{files:05d}.parquet", blobs[f * cut:(f + 1) * cut],
                      src.labels[f * cut:(f + 1) * cut].tolist(), row_group=5)
    return out


def test_parquet_encodes_like_the_same_imagefolder(tmp_path: Path):
    folder = make_imagefolder(tmp_path / "imgs", classes=("a", "b"), per_class=6)
    par = folder_as_parquet(folder, tmp_path / "pq")
    ok(encode_args("encode-latents", folder, tmp_path / "c1", "pixel"))
    ok(encode_args("encode-latents", par, tmp_path / "c2", "pixel"))
    np.testing.assert_array_equal(read_array(tmp_path / "c1", "latents/pixel"),
                                  read_array(tmp_path / "c2", "latents/pixel"))
    ok(["cache", "verify", tmp_path / "c2"])


def test_damaged_parquet_stops_encode_with_its_path_unless_skip_bad(tmp_path: Path, parquet_dir: Path):
    bad = parquet_dir / "train-00001-of-00002.parquet"
    bad.write_bytes(bad.read_bytes()[:100])
    r = invoke(encode_args("encode-latents", parquet_dir, tmp_path / "c", "pixel"))
    assert r.exit_code == 1 and "Traceback" not in r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{bad}: damaged parquet file" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "c").exists()
    ok(encode_args("encode-latents", parquet_dir, tmp_path / "c", "pixel") + ["--skip-bad"])
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["dataset"]["n"] == 7 and any(str(bad) in n for n in m["dataset"]["notes"])


# slow: torchrun; test_encode_stages.py's 2-rank torchrun test covers the rank split of whole shards, and the
# in-process world-size test here covers parquet's indices under 1, 2 and 3 ranks
@pytest.mark.slow
def test_two_gloo_ranks_under_torchrun_encode_parquet_like_one_process(tmp_path: Path):
    folder = make_imagefolder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=5)
    par = folder_as_parquet(folder, tmp_path / "pq", files=3)
    one, two = tmp_path / "one", tmp_path / "two"
    ok(encode_args("encode-latents", par, one, "tiny", shard=SHARD // 2))
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "repa_pipe.cli",
           *map(str, encode_args("encode-latents", par, two, "tiny", shard=SHARD // 2))]
    p = subprocess.run(cmd, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 process(es)" in p.stderr
    assert tree(one, "cache.zarr/latents/tiny") == tree(two, "cache.zarr/latents/tiny")
    assert tree(one, "index") == tree(two, "index")


def test_pipe_source_encodes_like_the_local_tars_and_keeps_its_spool(tmp_path: Path):
    d = timm_wds(tmp_path / "wds")
    spool = tmp_path / "spool"
    spec = f"pipe:cat {d}/imagenet1k-train-{{0000..0001}}.tar"
    ok(encode_args("encode-latents", d, tmp_path / "local", "pixel"))
    ok(encode_args("encode-latents", spec, tmp_path / "piped", "pixel") + ["--spool", spool])
    np.testing.assert_array_equal(read_array(tmp_path / "local", "latents/pixel"),
                                  read_array(tmp_path / "piped", "latents/pixel"))
    assert tree(tmp_path / "local", "index") == tree(tmp_path / "piped", "index")
    assert sorted(p.name for p in spool.glob("*/*.tar")) == ["imagenet1k-train-0000.tar", "imagenet1k-train-0001.tar"]


def test_unlabeled_parquet_split_encodes_as_one_class(tmp_path: Path):
    src = write_parquet(tmp_path / "test" / "test-00000.parquet", [img_bytes(k) for k in range(5)], [-1] * 5)
    r = invoke(encode_args("encode-latents", src, tmp_path / "c", "pixel"))
    assert r.exit_code == 1 and "--unlabeled" in " ".join(r.output.split()) and not (tmp_path / "c").exists()
    ok(encode_args("encode-latents", src, tmp_path / "c", "pixel") + ["--unlabeled"])
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["dataset"]["num_classes"] == 1 and m["dataset"]["kind"] == "parquet"
    assert np.load(tmp_path / "c" / "index" / "labels.npy").tolist() == [0] * 5


def test_bad_parquet_image_stops_with_file_and_row_keeps_done_shards_and_skip_bad_records(tmp_path: Path):
    blobs = [img_bytes(k) for k in range(8)]
    blobs[5] = blobs[5][: len(blobs[5]) // 2]  # cut short
    path = write_parquet(tmp_path / "pq" / "p.parquet", blobs, [k % 2 for k in range(8)])
    cache = tmp_path / "c"
    r = invoke(encode_args("encode-latents", path, cache, "pixel"))
    said = " ".join(r.output.split())
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"{path} row 5: truncated image data" in said and "--skip-bad" in said, r.output
    assert (cache / "done" / "latents" / "pixel" / "000000.json").exists()  # shard 0 (rows 0-3) kept
    ok(encode_args("encode-latents", path, cache, "pixel") + ["--skip-bad"])
    bad = json.loads((cache / "manifest.json").read_text())["arrays"]["latents/pixel"]["bad"]
    assert [(b["index"], b["key"], b["path"]) for b in bad] == [(5, "p.parquet/5", f"{path} row 5")]
