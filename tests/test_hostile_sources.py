"""Hostile inputs at the image source (links, special files, odd names, patterns, huge members, `pipe:` spools),
one test per case; each refusal is one line naming the path or option, exit 1, with nothing written. Read as the
list of cases (the number is that of the test names):

 5. symlink loops and escapes in an ImageFolder: no symlinked folder is followed unless --follow-links, and then
    no real folder twice; no link leads outside the source root unless --follow-links; each skip is said
 6. special files: a link to /dev/zero named .png, a FIFO named .png, a file swapped for a FIFO after listing are
    never read (checked before opening, opened non-blocking); a byte cap per image (--max-image-mb)
 8. names with \\n, \\r or U+2028 (file, class folder, tar member) are refused at listing, before anything is written
10. a non-UTF-8 file name is one line showing its bytes (\\xe9) and leaves nothing behind; an ImageFolder whose path
    holds '{' is a folder, and a missing one is "no such file or directory", not a pattern of no shards
11. a 2 GB (sparse) tar member is refused from its header, never read: one line naming the tar and the member
12. two `pipe:` commands that give the same tar name never reuse each other's spooled tar
"""
from __future__ import annotations

import io
import json
import os
import signal
import tarfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from fixtures import RES, invoke, make_imagefolder, ok, png_bytes, rand_rgb, write_tar
from repa_pipe.cache.sources import BadImageError, SourceOptions, open_source
from repa_pipe.pipeline.errors import BadInputError

FOLLOW = SourceOptions(follow_links=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


@contextmanager
def no_hang(seconds: int = 20):
    """Fail instead of hanging (the old code blocked for ever opening a FIFO)."""
    def boom(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def encode(src, cache: Path, *extra) -> list:
    return ["encode-latents", "--source", src, "--cache", cache, "--resolution", RES, "--shard-size", 4,
            "--workers", 0, "--batch-size", 2, "--vae", "pixel", *map(str, extra)]


def refused(args, *must: str) -> str:
    """The command exits 1 with exactly one `error:` line holding every string of `must`; no traceback."""
    with no_hang():
        r = invoke(args)
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.output
    flat = " ".join(r.output[r.output.index("error:"):].split())  # rich wraps long lines off a terminal
    for s in must:
        assert " ".join(s.split()) in flat, (s, r.output)
    return flat


def flat_output(r) -> str:
    return " ".join(r.output.split())


def nothing_written(cache: Path) -> None:
    assert not cache.exists() or not any(cache.iterdir()), sorted(cache.rglob("*"))


# ------------------------------------------------------------------------------------ 5. loops and escapes
def test_5_symlink_loop_is_not_followed_and_is_reported(tmp_path: Path):
    root = make_imagefolder(tmp_path / "imgs", classes=("a", "b"), per_class=2)
    os.symlink("..", root / "a" / "up")        # a loop through the root
    os.symlink(".", root / "b" / "self")       # a loop onto itself
    os.symlink("../b", root / "a" / "other")   # another class's folder: would mislabel its images
    src = open_source(root)
    assert src.keys == ["a/img_000.png", "a/img_001.png", "b/img_000.png", "b/img_001.png"]
    assert src.labels.tolist() == [0, 0, 1, 1]
    said = " ".join(src.warnings)
    assert "3 symbolic link(s) to folders (pass --follow-links to follow them) skipped" in said, src.warnings
    # --follow-links follows them, but lists no real folder twice: a loop is cut, b's images stay b's.
    followed = open_source(root, opts=FOLLOW)
    assert followed.keys == src.keys and followed.labels.tolist() == [0, 0, 1, 1]
    assert "3 folder(s) reached a second time through a symbolic link skipped" in " ".join(followed.warnings)
    r = ok(encode(root, tmp_path / "cache"))
    assert "symbolic link(s) to folders" in flat_output(r) and "--follow-links" in flat_output(r)
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["dataset"]["n"] == 4


def test_5_links_out_of_the_root_are_skipped_unless_asked(tmp_path: Path):
    root = make_imagefolder(tmp_path / "imgs", classes=("a",), per_class=2)
    outside = make_imagefolder(tmp_path / "elsewhere", classes=("x",), per_class=3)
    os.symlink(outside / "x", root / "a" / "more")                      # a folder outside
    os.symlink(outside / "x" / "img_000.png", root / "a" / "zz.png")   # a file outside
    os.symlink(root / "a" / "img_000.png", root / "a" / "copy.png")    # a file inside: fine
    src = open_source(root)
    assert src.keys == ["a/copy.png", "a/img_000.png", "a/img_001.png"]
    said = " ".join(src.warnings)
    assert "2 symbolic link(s) leading outside the source folder (pass --follow-links to follow them) skipped" in said
    wide = open_source(root, opts=FOLLOW)
    assert wide.keys == ["a/copy.png", "a/img_000.png", "a/img_001.png", "a/more/img_000.png", "a/more/img_001.png",
                         "a/more/img_002.png", "a/zz.png"]
    assert wide.read_bytes(6) == (outside / "x" / "img_000.png").read_bytes()


# ------------------------------------------------------------------------------------------ 6. special files
def test_6_link_to_dev_zero_is_never_read(tmp_path: Path):
    root = make_imagefolder(tmp_path / "imgs", classes=("a",), per_class=2)
    os.symlink("/dev/zero", root / "a" / "zero.png")
    src = open_source(root)
    assert "zero.png" not in " ".join(src.keys)  # leads outside the root: skipped by default, and said
    assert any("outside the source folder" in w for w in src.warnings)
    wide = open_source(root, opts=FOLLOW)
    i = wide.keys.index("a/zero.png")
    assert wide.known_bad[i] == "not a regular file (a character device)"
    with no_hang(), pytest.raises(BadImageError, match=r"zero\.png: not a regular file \(a character device\)"):
        wide.read(i)
    refused(encode(root, tmp_path / "c", "--follow-links"), f"{root}/a/zero.png: not a regular file",
            "--skip-bad")


def test_6_fifo_named_png_is_refused_not_waited_on(tmp_path: Path):
    root = make_imagefolder(tmp_path / "imgs", classes=("a",), per_class=3)
    os.mkfifo(root / "a" / "img_001b.png")
    src = open_source(root)
    i = src.keys.index("a/img_001b.png")
    assert src.known_bad == {i: "not a regular file (a FIFO)"}  # found at listing, index kept
    with no_hang(), pytest.raises(BadImageError, match="not a regular file"):
        src.read(i)
    refused(encode(root, tmp_path / "c"), f"{root}/a/img_001b.png: not a regular file (a FIFO)")
    with no_hang():
        ok(encode(root, tmp_path / "c2", "--skip-bad"))
    bad = json.loads((tmp_path / "c2" / "manifest.json").read_text())["arrays"]["latents/pixel"]["bad"]
    assert [(b["index"], b["reason"]) for b in bad] == [(i, "not a regular file (a FIFO)")]


def test_6_file_swapped_for_a_fifo_after_listing_is_not_waited_on(tmp_path: Path):
    root = make_imagefolder(tmp_path / "imgs", classes=("a",), per_class=2)
    src = open_source(root)
    path = root / "a" / "img_001.png"
    path.unlink()
    os.mkfifo(path)
    with no_hang(), pytest.raises(BadImageError, match=r"img_001\.png: not a regular file \(a FIFO\)"):
        src.read_bytes(1)


def test_6_byte_cap_per_image(tmp_path: Path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "a" / "big.png").write_bytes(png_bytes(rand_rgb(100, 100, 1)))  # noise: ~30 KB
    (root / "a" / "small.png").write_bytes(png_bytes(rand_rgb(8, 8, 2)))
    size = (root / "a" / "big.png").stat().st_size
    refused(encode(root, tmp_path / "c", "--max-image-mb", "0.01"),
            f"{root}/a/big.png: {size} bytes, over the per-image cap of 10000 bytes (--max-image-mb)")
    refused(encode(root, tmp_path / "c", "--max-image-mb", "0"), "--max-image-mb must be a positive number")
    refused(encode(root, tmp_path / "c", "--max-megapixels", "inf"), "--max-megapixels must be a positive number")
    assert open_source(root).opts.max_bytes == 256_000_000  # the default: 4 bytes per pixel of 64 Mpx


# --------------------------------------------------------------------------------------- 8. line breaks
@pytest.mark.parametrize("name", ["a\nb.png", "a\rb.png", "a\u2028b.png"])
def test_8_file_name_with_a_line_break_is_refused_before_anything_is_written(tmp_path: Path, name: str):
    root = make_imagefolder(tmp_path / "imgs", classes=("a",), per_class=2)
    (root / "a" / name).write_bytes(png_bytes(rand_rgb(9, 9, 3)))
    with pytest.raises(BadInputError, match="holds a line break"):
        open_source(root)
    escaped = ascii(name)[1:-1]
    refused(encode(root, tmp_path / "c"), f"{root}/a/{escaped}: the file or folder name holds a line break")
    nothing_written(tmp_path / "c")


def test_8_class_folder_and_tar_member_with_a_line_break_are_refused(tmp_path: Path):
    root = make_imagefolder(tmp_path / "imgs", classes=("a", "b\u2028c"), per_class=1)
    with pytest.raises(BadInputError, match=r"b\\u2028c: the class folder name holds a line break"):
        open_source(root)
    tar = write_tar(tmp_path / "t" / "s.tar", [("x\ny.png", png_bytes(rand_rgb(9, 9, 4))), ("x\ny.cls", b"0")])
    refused(encode(tar, tmp_path / "c"), r"s.tar/x\ny: the tar member name holds a line break")
    nothing_written(tmp_path / "c")


# ----------------------------------------------------------------------------- 10. odd names and braces
def test_10_non_utf8_file_name_is_one_line_and_leaves_nothing_behind(tmp_path: Path):
    root = make_imagefolder(tmp_path / "imgs", classes=("a",), per_class=2)
    with open(os.path.join(os.fsencode(root / "a"), b"caf\xe9.png"), "wb") as f:
        f.write(png_bytes(rand_rgb(9, 9, 5)))
    cache = tmp_path / "cache"
    line = refused(encode(root, cache), f"{root}/a/caf\\xe9.png: the file or folder name is not valid UTF-8")
    assert "udce9" not in line  # the byte as it is on disk, not Python's surrogate escape
    nothing_written(cache)
    assert not (cache / "locks").exists()


def test_10_imagefolder_path_with_a_brace_is_a_folder(tmp_path: Path):
    root = make_imagefolder(tmp_path / "imgs{1}", classes=("a", "b"), per_class=2)
    src = open_source(str(root))
    assert src.kind == "imagefolder" and len(src) == 4
    ok(encode(root, tmp_path / "cache"))
    tars = tmp_path / "t{x}"
    write_tar(tars / "s.tar", [("k.png", png_bytes(rand_rgb(9, 9, 6))), ("k.cls", b"0")])
    assert open_source(str(tars)).kind == "webdataset" and open_source(str(tars / "s.tar")).keys == ["s.tar/k"]


@pytest.mark.parametrize("name", ["imgs{1}", "my{imgs", "my{imgs}/sub"])
def test_10_a_missing_path_with_a_brace_is_no_such_file(tmp_path: Path, name: str):
    missing = tmp_path / name
    with pytest.raises(BadInputError, match=r"no such file or directory"):
        open_source(str(missing))
    refused(encode(missing, tmp_path / "c"), f"{missing}: no such file or directory")
    nothing_written(tmp_path / "c")


def test_10_a_pattern_matching_nothing_says_so(tmp_path: Path):
    with pytest.raises(BadInputError, match=r"no such file or directory, and as a pattern it matches no file"):
        open_source(str(tmp_path / "{train,val}"))
    (tmp_path / "a.jpg").write_bytes(png_bytes(rand_rgb(9, 9, 1)))  # a pattern of files that are not shards
    with pytest.raises(BadInputError, match=r"a pattern must name only \.tar files or only \.parquet files"):
        open_source(str(tmp_path / "*.jpg"))


# ------------------------------------------------------------------------------------ 11. huge tar member
def sparse_tar_with_huge_member(path: Path, size: int) -> Path:
    """A tar whose member `big.png` declares `size` bytes, the file itself sparse (no disk, no memory), then
    `big.cls` and a good sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    big = tarfile.TarInfo("big.png")
    big.size = size
    with open(path, "wb") as f:
        f.write(big.tobuf(format=tarfile.GNU_FORMAT))
        f.seek(size + (-size) % tarfile.BLOCKSIZE, io.SEEK_CUR)  # a hole where the member's data would be
        for name, data in (("big.cls", b"0"), ("ok.png", png_bytes(rand_rgb(9, 9, 7))), ("ok.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            f.write(info.tobuf(format=tarfile.GNU_FORMAT) + data + b"\0" * ((-len(data)) % tarfile.BLOCKSIZE))
        f.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    return path


def test_11_a_2gb_tar_member_is_refused_from_its_header(tmp_path: Path):
    tar = sparse_tar_with_huge_member(tmp_path / "t" / "s.tar", 2 * 1024 ** 3)
    src = open_source(tar)
    assert src.keys == ["s.tar/big", "s.tar/ok"] and not src.damaged
    assert src.known_bad[0] == ("tar member of 2147483648 bytes, over the per-image cap of 256000000 bytes "
                                "(--max-image-mb)")
    with pytest.raises(BadImageError, match=r"s\.tar/big\.png: tar member of 2147483648 bytes"):
        src.read(0)  # from the header: nothing is read
    assert np.asarray(src.read(1)).shape == (9, 9, 3)
    refused(encode(tar, tmp_path / "c"), f"{tar}/big.png: tar member of 2147483648 bytes, over the per-image cap")


# ------------------------------------------------------------------------------------ 12. pipe: spool
@pytest.mark.parametrize("tail", ["shard-0000.tar", "shard-0000.ta[r]"])  # the second has no .tar word: pipe-000000.tar
def test_12_two_pipe_commands_with_one_tar_name_never_share_a_spooled_tar(tmp_path: Path, tail: str):
    spool = tmp_path / "spool"
    images = {}
    for k, bucket in enumerate(("a", "b")):  # two buckets holding a shard of the same name and member names
        images[bucket] = [png_bytes(rand_rgb(9, 9, 10 * k + j)) for j in range(2)]
        write_tar(tmp_path / bucket / "shard-0000.tar",
                  [(f"{j}.png", b) for j, b in enumerate(images[bucket])] + [(f"{j}.cls", b"0") for j in range(2)])
    for bucket in ("a", "b"):
        src = open_source(f"pipe:cat {tmp_path / bucket}/{tail}", opts=SourceOptions(spool=str(spool)))
        assert [src.read_bytes(i) for i in range(len(src))] == images[bucket], bucket
    assert len(list(spool.glob("*/*.tar"))) == 2
