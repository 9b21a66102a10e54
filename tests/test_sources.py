"""Tests for repa_pipe.cache.sources: ADM crop parity, ImageFolder / WebDataset listing, bad inputs, digits, loader."""
from __future__ import annotations

import ast
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from repa_pipe.cache.sources import (
    BadImageError,
    ImageFolderSource,
    PreprocessedImages,
    WebDatasetSource,
    adm_center_crop,
    collate_preprocessed,
    load_preprocessed,
    open_source,
)
from repa_pipe.demo.digits import write_digits_imagefolder
from repa_pipe.pipeline.errors import BadInputError

RNG = np.random.default_rng(1234)


def rand_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    """Noise plus a gradient: noise makes any resampling difference visible, the gradient gives structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], axis=-1)
    noise = rng.integers(-40, 41, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------- ADM center crop


def reference_center_crop(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Written straight from the REPA reference's `preprocessing/dataset_tools.py` center crop (ADM's;
    docs/numerics.md point 1), numpy crop at the end."""
    pil_image = pil_image.convert("RGB")
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


@pytest.mark.parametrize("size", [256, 32])
@pytest.mark.parametrize("wh", [(500, 375), (257, 1000), (64, 64), (20, 30), (1024, 769)])
def test_adm_crop_bit_exact(wh, size):
    img = rand_rgb(*wh, seed=wh[0] * 7 + wh[1])
    out = adm_center_crop(img, size)
    assert out.size == (size, size) and out.mode == "RGB"
    ref = reference_center_crop(img, size)
    assert ref.shape == (size, size, 3)
    np.testing.assert_array_equal(np.asarray(out), ref)
    np.testing.assert_array_equal(np.asarray(adm_center_crop(img, size)), np.asarray(out))  # deterministic


def test_adm_crop_small_image_is_upsampled_and_non_rgb_converted():
    img = rand_rgb(20, 30, seed=3)
    out = np.asarray(adm_center_crop(img, 32))
    # 20x30 -> BICUBIC to 32x48 (round(30*1.6)=48) -> rows 8..40: the same as resizing by hand.
    by_hand = np.asarray(img.resize((32, 48), resample=Image.BICUBIC))[8:40]
    np.testing.assert_array_equal(out, by_hand)
    p = img.convert("P")
    np.testing.assert_array_equal(np.asarray(adm_center_crop(p, 32)), reference_center_crop(p, 32))


# ---------------------------------------------------------------- ImageFolder


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    jpg, png, webp = (encode(rand_rgb(40, 30, s), f) for s, f in [(1, "JPEG"), (2, "PNG"), (3, "WEBP")])
    write(root / "n02_b" / "2.jpeg", jpg)
    write(root / "n02_b" / "1.jpg", jpg)
    write(root / "n01_a" / "y.Png", png)
    write(root / "n01_a" / "x.JPEG", jpg)
    write(root / "n01_a" / "sub" / "z.webp", webp)
    write(root / "n01_a" / "notes.txt", b"not an image, ignored")
    write(root / "n01_a" / ".hidden.jpg", b"macOS resource fork")
    (root / "n03_empty").mkdir()
    write(root / "n04_d" / "d.PNG", png)
    write(root / "README.md", b"stray file at the root")
    write(root / ".cache" / "junk.jpg", jpg)
    return root


def test_imagefolder_listing(folder: Path):
    src = open_source(str(folder))
    assert isinstance(src, ImageFolderSource) and src.kind == "imagefolder"
    assert src.root == str(folder.resolve())
    assert src.class_names == ["n01_a", "n02_b", "n03_empty", "n04_d"]
    assert src.keys == ["n01_a/sub/z.webp", "n01_a/x.JPEG", "n01_a/y.Png", "n02_b/1.jpg", "n02_b/2.jpeg",
                        "n04_d/d.PNG"]
    assert src.labels.dtype == np.int64 and src.labels.tolist() == [0, 0, 0, 1, 1, 3]  # empty class keeps index 2
    assert len(src) == 6 and src.num_classes == 4
    assert any("n03_empty" in w and "index 2" in w for w in src.warnings)
    assert any("non-image" in w for w in src.warnings) and any("directly under" in w for w in src.warnings)
    for i in range(len(src)):
        img = src.read(i)
        assert img.mode == "RGB" and img.size == (40, 30)
    d = src.dataset()
    assert d.kind == "imagefolder" and d.n == 6 and d.num_classes == 4
    assert len(d.file_list_sha256) == 64 and len(d.labels_sha256) == 64
    assert d == open_source(str(folder)).dataset()  # stable


def test_imagefolder_errors(tmp_path: Path):
    with pytest.raises(BadInputError, match="no such"):
        open_source(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    (empty / "cls_a").mkdir(parents=True)
    write(empty / "cls_b" / "readme.txt", b"x")
    with pytest.raises(BadInputError, match=str(empty)):
        open_source(str(empty))
    with pytest.raises(BadInputError, match="no images"):
        ImageFolderSource(tmp_path)  # holds only the 'empty' folder
    with pytest.raises(BadInputError, match="not a folder"):
        open_source(str(write(tmp_path / "x.jpg", b"1")))


# ---------------------------------------------------------------- WebDataset


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    d = tmp_path / "shards"
    d.mkdir()
    imgs = {k: encode(rand_rgb(24 + k, 20, k), "PNG" if k % 2 else "JPEG") for k in range(6)}
    # Written in reverse name order: the source must sort tar names.
    write_tar(d / "shard-000001.tar", [("s3.png", imgs[3]), ("s3.cls", b"7"), ("s4.jpg", imgs[4]),
                                        ("s4.cls", b"1\n"), ("s5.png", imgs[5])])  # s5 has no label
    write_tar(d / "shard-000000.tar", [("s0.JPEG", imgs[0]), ("s0.cls", b"2"), ("s0.json", b"{}"),
                                        ("dir/s1.png", imgs[1]), ("dir/s1.cls", b"0"),
                                        ("s2.cls", b"5"), ("s2.Jpg", imgs[2])])
    return d


def test_webdataset_folder_pattern_single(shards: Path):
    a = open_source(str(shards))
    b = open_source(str(shards / "shard-{000000..000001}.tar"))
    assert isinstance(a, WebDatasetSource) and isinstance(b, WebDatasetSource) and a.kind == "webdataset"
    assert b.root == str(shards / "shard-{000000..000001}.tar")
    want_keys = ["shard-000000.tar/s0", "shard-000000.tar/dir/s1", "shard-000000.tar/s2",
                 "shard-000001.tar/s3", "shard-000001.tar/s4", "shard-000001.tar/s5"]
    assert a.keys == b.keys == want_keys
    assert a.labels.tolist() == b.labels.tolist() == [2, 0, 5, 7, 1, -1]
    assert a.class_names is None and a.num_classes == 8
    for i in range(5):
        ia, ib = a.read(i), b.read(i)
        assert ia.mode == "RGB" and ia.size == (24 + i, 20)
        np.testing.assert_array_equal(np.asarray(ia), np.asarray(ib))
    da, db = a.dataset(), b.dataset()
    assert da.same_images(db) is None and (da.num_classes, da.notes) == (db.num_classes, db.notes)
    single = open_source(str(shards / "shard-000001.tar"))
    assert single.keys == want_keys[3:] and single.labels.tolist() == [7, 1, -1]
    np.testing.assert_array_equal(np.asarray(single.read(0)), np.asarray(a.read(3)))


def test_webdataset_unlabeled_member_is_bad(shards: Path):
    src = open_source(str(shards))
    assert src.labels[5] == -1 and src.known_bad == {5: "no .cls label"}
    with pytest.raises(BadInputError, match=r"shard-000001\.tar/s5\.png: no \.cls label"):
        src.read(5)
    with pytest.raises(BadInputError, match="no .cls label"):
        load_preprocessed(src, 5, 16)


def test_webdataset_matches_webdataset_reader(shards: Path):
    """Our keys and labels agree with webdataset's own streaming reader (adjacent members there)."""
    import webdataset as wds

    ds = wds.WebDataset(str(shards / "shard-{000000..000001}.tar"), shardshuffle=False, empty_check=False)
    theirs = [(s["__key__"], int(s["cls"]) if "cls" in s else -1) for s in ds]
    src = open_source(str(shards))
    ours = [(k.split("/", 1)[1], int(l)) for k, l in zip(src.keys, src.labels)]
    assert ours == theirs


def test_webdataset_errors(tmp_path: Path, shards: Path):
    with pytest.raises(BadInputError, match="shard-000002.tar does not exist"):
        open_source(str(shards / "shard-{000000..000002}.tar"))
    bad = write_tar(tmp_path / "bad.tar", [("a.png", b""), ("a.cls", b"x1"), ("b.jpg", b"1"), ("b.png", b"2"),
                                           ("b.cls", b"1"), ("c.cls", b"3")])
    src = open_source(str(bad))
    assert src.keys == ["bad.tar/a", "bad.tar/b"] and src.labels.tolist() == [-1, 1]
    assert "bad .cls label" in src.known_bad[0] and "several image members" in src.known_bad[1]
    assert any("no image member" in w for w in src.warnings)
    write(tmp_path / "junk.tar", b"this is not a tar archive at all" * 40)
    with pytest.raises(BadInputError, match="junk.tar"):
        open_source(str(tmp_path / "junk.tar"))


# ---------------------------------------------------------------- bad inputs and modes


def test_bad_images_raise_with_path(tmp_path: Path):
    img = rand_rgb(64, 48, 9)
    jpg, png = encode(img, "JPEG"), encode(img, "PNG")
    broken_png = bytearray(png)
    broken_png[len(png) // 2:len(png) // 2 + 64] = b"\x00" * 64
    cases = {
        "trunc.jpg": (jpg[: len(jpg) // 2], "truncated"),
        "trunc.png": (png[: len(png) // 2], "truncated"),
        "corrupt.png": (bytes(broken_png), "corrupt"),
        "zero.png": (b"", "empty file"),
        "text.jpg": (b"hello, I am a text file with an image extension\n" * 3, "not a decodable image"),
        "ok.jpg": (jpg, None),
    }
    for name, (data, _) in cases.items():
        write(tmp_path / "root" / "c" / name, data)
    src = open_source(str(tmp_path / "root"))
    for i, key in enumerate(src.keys):
        data, reason = cases[key.split("/")[-1]]
        path = os.path.join(src.root, key)
        if reason is None:
            assert load_preprocessed(src, i, 32).shape == (32, 32, 3)
            continue
        with pytest.raises(BadInputError) as e:
            src.read(i)
        assert str(e.value).startswith(path + ": ") and reason in str(e.value)
        assert isinstance(e.value, BadImageError) and e.value.where == path and e.value.reason.startswith(reason)
        again = pickle.loads(pickle.dumps(e.value))  # crosses process boundaries intact
        assert (again.where, again.reason, str(again)) == (e.value.where, e.value.reason, str(e.value))
        with pytest.raises(BadInputError, match=reason):
            load_preprocessed(src, i, 32)


def test_truncated_member_in_tar(tmp_path: Path):
    jpg = encode(rand_rgb(64, 48, 4), "JPEG")
    src = open_source(str(write_tar(tmp_path / "t.tar", [("k.jpg", jpg[:400]), ("k.cls", b"0")])))
    with pytest.raises(BadInputError, match=r"t\.tar/k\.jpg: truncated"):
        src.read(0)


def test_load_truncated_images_must_stay_off(tmp_path: Path, monkeypatch):
    write(tmp_path / "r" / "c" / "a.png", encode(rand_rgb(8, 8), "PNG"))
    src = open_source(str(tmp_path / "r"))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        src.read(0)


def test_modes_convert_to_rgb(tmp_path: Path):
    rgb = rand_rgb(50, 40, 5)
    a = np.asarray(rgb)
    rgba = Image.fromarray(np.dstack([a, a[..., 0]]))
    pal = rgb.convert("P")
    pal.info["transparency"] = 0
    gray16 = np.repeat(np.arange(40, dtype=np.uint16)[:, None] * 1600, 50, axis=1)  # up to 62400
    files = {
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "l.png": encode(rgb.convert("L"), "PNG"),
        "la.png": encode(rgb.convert("LA"), "PNG"),
        "i16.png": encode(Image.fromarray(gray16), "PNG"),
        "rgba.webp": encode(rgba, "WEBP", lossless=True, exact=True),  # exact: keep RGB under alpha 0
        "rgba.png": encode(rgba, "PNG"),
        "p.png": encode(pal, "PNG", transparency=0),
        "one.png": encode(rgb.convert("1"), "PNG"),
    }
    for name, data in files.items():
        write(tmp_path / "m" / "c" / name, data)
    src = open_source(str(tmp_path / "m"))
    modes = {}
    for i, key in enumerate(src.keys):
        name = key.split("/")[-1]
        modes[name] = Image.open(io.BytesIO(files[name])).mode
        img = src.read(i)
        assert img.mode == "RGB" and img.size == (50, 40), name
        arr = load_preprocessed(src, i, 32)
        assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8, name
        out = np.asarray(img)
        if name == "i16.png":
            np.testing.assert_array_equal(out, np.repeat((gray16 >> 8).astype(np.uint8)[..., None], 3, axis=2))
            assert out.max() == 62400 >> 8  # not clipped to 255 as convert('RGB') would
        if name in ("rgba.png", "rgba.webp"):
            np.testing.assert_array_equal(out, a)  # alpha dropped, colours kept (reference convert('RGB'))
        if name == "l.png":
            assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert modes["cmyk.jpg"] == "CMYK" and modes["i16.png"] == "I;16" and modes["la.png"] == "LA"
    assert modes["p.png"] == "P" and modes["rgba.png"] == "RGBA" and modes["l.png"] == "L"


# ---------------------------------------------------------------- digits demo dataset


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    return write_digits_imagefolder(tmp_path_factory.mktemp("digits") / "digits", size=32)


def test_digits_imagefolder(digits_dir: Path):
    from sklearn.datasets import load_digits

    target = load_digits().target
    src = open_source(str(digits_dir))
    assert len(src) == 1797 and src.class_names == [str(c) for c in range(10)] and src.warnings == []
    idx = np.array([int(Path(k).stem) for k in src.keys])
    assert sorted(idx.tolist()) == list(range(1797))
    np.testing.assert_array_equal(src.labels, target[idx])
    for i in (0, 500, 1796):
        img = src.read(i)
        assert img.mode == "RGB" and img.size == (32, 32)
        assert np.asarray(img).max() > 128  # a real digit, not a blank


def test_digits_idempotent(digits_dir: Path):
    files = sorted(digits_dir.rglob("*.png"))
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    desc = open_source(str(digits_dir)).dataset()
    assert write_digits_imagefolder(digits_dir, size=32) == digits_dir
    assert sorted(digits_dir.rglob("*.png")) == files
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files} == before
    (files[3]).unlink()  # an interrupted run: the missing file is written again, byte-identical
    write_digits_imagefolder(digits_dir, size=32)
    assert files[3].read_bytes() == before[files[3]][1]
    assert open_source(str(digits_dir)).dataset() == desc


# ---------------------------------------------------------------- DataLoader helper


def test_preprocessed_images_dataloader(tmp_path: Path, shards: Path):
    import torch

    root = tmp_path / "dl"
    for k in range(7):
        write(root / f"c{k % 3}" / f"{k}.png", encode(rand_rgb(30 + 3 * k, 41, k), "PNG"))
    write(root / "c1" / "broken.jpg", b"\xff\xd8\xff garbage")
    for src in (open_source(str(root)), open_source(str(shards))):
        src2 = pickle.loads(pickle.dumps(src))
        assert src2.keys == src.keys
        bad = [i for i in range(len(src)) if "broken" in src.keys[i] or i in src.known_bad]
        assert len(bad) == 1
        indices = list(range(len(src)))[::-1]
        ds = PreprocessedImages(src, indices, 16)
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_preprocessed)
        batches = list(loader)
        got_idx = np.concatenate([b.indices for b in batches])
        assert got_idx.tolist() == indices
        images = np.concatenate([b.images for b in batches])
        valid = np.concatenate([b.valid for b in batches])
        reasons = sum((b.reasons for b in batches), [])
        with pytest.raises(BadImageError) as e:
            src.read(bad[0])
        for j, i in enumerate(indices):
            if i in bad:
                assert not valid[j] and (images[j] == 0).all() and reasons[j] == e.value.reason
            else:
                assert valid[j] and reasons[j] is None
                np.testing.assert_array_equal(images[j], load_preprocessed(src, i, 16))
        item = ds[indices.index(bad[0])]
        assert item == (bad[0], None, e.value.reason)
        everything = PreprocessedImages(src, None, 16)  # None = all samples, item j is sample j
        assert len(everything) == len(src) and everything[bad[0]] == item
        good = next(j for j, i in enumerate(indices) if i not in bad)
        np.testing.assert_array_equal(everything[indices[good]][1], images[good])


def test_cache_sources_do_not_import_models():
    cache_dir = Path(__file__).resolve().parents[1] / "repa_pipe" / "cache"
    for f in sorted(cache_dir.glob("sources*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.startswith(("repa_pipe.models", "models")) for n in names), f
