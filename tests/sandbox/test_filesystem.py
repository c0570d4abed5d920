"""Zip extraction refuses every escape before writing; staging merges layers in order, within the limit."""

from __future__ import annotations

import os
import re
import stat
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lambdabox.core.errors import LayerError
from lambdabox.core.model import FunctionConfig, LayerConfig
from lambdabox.sandbox import codecache, filesystem
from lambdabox.sandbox.filesystem import MAX_UNZIPPED_BYTES, StagedCode, extract_zip, stage_function

Entry = tuple[str, bytes | str, int]  # name, data (str: symlink target), mode (0 for a symlink)


def make_zip(path: Path, entries: list[Entry]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            if isinstance(data, str):
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, data.encode())
            elif name.endswith("/"):
                info.external_attr = (stat.S_IFDIR | mode) << 16
                zf.writestr(info, b"")
            else:
                info.external_attr = (stat.S_IFREG | mode) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, data)
    return path


def tree(root: Path) -> dict[str, str]:
    """Everything under root: files by content, symlinks by target, directories as '/'."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = str(full.relative_to(root))
            if full.is_symlink():
                out[rel] = "-> " + os.readlink(full)
            elif full.is_dir():
                out[rel] = "/"
            else:
                out[rel] = full.read_bytes().decode("latin-1")
    return out


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- extract_zip -----------------------------------------------------------------------------------


def test_extract_writes_files_dirs_and_returns_bytes(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "code.zip",
        [("pkg/", b"", 0o755), ("pkg/mod.py", b"x = 1\n", 0o644), ("./top.txt", b"hello", 0o644)],
    )
    written = extract_zip(archive, tmp_path / "out")
    assert written == len(b"x = 1\n") + len(b"hello")
    assert tree(tmp_path / "out") == {"pkg": "/", "pkg/mod.py": "x = 1\n", "top.txt": "hello"}


def test_extract_keeps_permission_bits(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "ext.zip",
        [
            ("extensions/my-ext", b"#!/bin/sh\n", 0o755),
            ("data.txt", b"d", 0o644),
            ("secret.txt", b"s", 0o640),
            ("bin/", b"", 0o750),
        ],
    )
    out = tmp_path / "out"
    extract_zip(archive, out)
    assert mode_of(out / "extensions" / "my-ext") == 0o755
    assert os.access(out / "extensions" / "my-ext", os.X_OK)
    assert mode_of(out / "data.txt") == 0o644
    assert mode_of(out / "secret.txt") == 0o640
    assert mode_of(out / "bin") == 0o750


def test_extract_without_unix_modes_gets_readable_defaults(tmp_path: Path) -> None:
    archive = tmp_path / "dos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("a.txt")
        info.external_attr = 0x20  # MS-DOS "archive" attribute, no Unix mode
        zf.writestr(info, b"a")
    extract_zip(archive, tmp_path / "out")
    assert mode_of(tmp_path / "out" / "a.txt") == 0o644


def test_extract_creates_symlinks_that_stay_inside(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "layer.zip",
        [
            ("lib/libfoo.so.1", b"elf", 0o755),
            ("lib/libfoo.so", "libfoo.so.1", 0),
            ("nodejs/node_modules/x/bin.js", b"js", 0o755),
            ("nodejs/node_modules/.bin/x", "../x/bin.js", 0),
            ("here", ".", 0),
        ],
    )
    out = tmp_path / "out"
    extract_zip(archive, out)
    assert os.readlink(out / "lib" / "libfoo.so") == "libfoo.so.1"
    assert (out / "lib" / "libfoo.so").read_text() == "elf"
    assert (out / "nodejs" / "node_modules" / ".bin" / "x").read_text() == "js"
    assert os.readlink(out / "here") == "."


ESCAPES: dict[str, list[Entry]] = {
    "dotdot": [("../x", b"evil", 0o644)],
    "nested-dotdot": [("a/../../x", b"evil", 0o644)],
    "absolute": [("/abs/x", b"evil", 0o644)],
    "drive-letter": [("C:/x", b"evil", 0o644)],
    "backslash": [("a\\..\\..\\x", b"evil", 0o644)],
    "symlink-absolute": [("passwd", "/etc/passwd", 0)],
    "symlink-dotdot": [("sub/link", "../../x", 0)],
    "symlink-through-symlink": [("s", ".", 0), ("d/t", "../s/..", 0)],
    "symlink-chain": [("a", "b/..", 0), ("b", "c/..", 0), ("c", "..", 0)],
    "entry-inside-symlink": [("s", "sub", 0), ("s/x", b"evil", 0o644)],
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_extract_refuses_escapes_before_writing_anything(tmp_path: Path, name: str) -> None:
    zips = tmp_path / "zips"
    zips.mkdir()
    entries = [("aaa-first.txt", b"benign", 0o644), *ESCAPES[name], ("zzz-last.txt", b"benign", 0o644)]
    archive = make_zip(zips / f"{name}.zip", entries)
    work = tmp_path / "work"
    target = work / "deep" / "out"
    before = tree(tmp_path)
    with pytest.raises(LayerError) as caught:
        extract_zip(archive, target)
    message = str(caught.value)
    assert str(archive) in message
    bad = ESCAPES[name][-1][0]
    assert repr(bad) in message or repr(ESCAPES[name][0][0]) in message
    assert not work.exists()  # nothing at all, not even the target
    assert tree(tmp_path) == before  # and nothing outside
    assert not Path("/abs").exists()


def test_extract_refuses_a_file_that_is_not_a_zip(tmp_path: Path) -> None:
    bogus = tmp_path / "code.zip"
    bogus.write_text("not a zip")
    with pytest.raises(LayerError, match="not a zip file") as caught:
        extract_zip(bogus, tmp_path / "out")
    assert str(bogus) in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_extract_refuses_a_missing_archive(tmp_path: Path) -> None:
    with pytest.raises(LayerError, match="no such file"):
        extract_zip(tmp_path / "nope.zip", tmp_path / "out")


def test_extract_refuses_over_the_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filesystem, "MAX_UNZIPPED_BYTES", 1000)
    archive = make_zip(tmp_path / "big.zip", [("zeros", bytes(1001), 0o644)])
    with pytest.raises(LayerError, match="1001 bytes") as caught:
        extract_zip(archive, tmp_path / "out")
    assert str(archive) in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_extract_merges_over_existing_and_later_wins(tmp_path: Path) -> None:
    out = tmp_path / "out"
    extract_zip(make_zip(tmp_path / "1.zip", [("a.txt", b"one", 0o644), ("keep.txt", b"k", 0o644)]), out)
    extract_zip(make_zip(tmp_path / "2.zip", [("a.txt", b"two", 0o600)]), out)
    assert tree(out) == {"a.txt": "two", "keep.txt": "k"}
    assert mode_of(out / "a.txt") == 0o600


def test_extract_replaces_an_existing_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    extract_zip(make_zip(tmp_path / "1.zip", [("real.txt", b"real", 0o644), ("a.txt", "real.txt", 0)]), out)
    extract_zip(make_zip(tmp_path / "2.zip", [("a.txt", b"new", 0o644)]), out)
    assert (out / "real.txt").read_text() == "real"
    assert not (out / "a.txt").is_symlink()
    assert (out / "a.txt").read_text() == "new"


def test_extract_refuses_a_link_that_makes_an_earlier_link_escape(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # d/t -> ../s/.. is inside while s is a plain directory ...
    extract_zip(make_zip(tmp_path / "1.zip", [("s/x", b"x", 0o644), ("d/t", "../s/..", 0)]), out)
    before = tree(out)
    # ... but not once s becomes a link to "." (d/t would then lead to out's parent)
    with pytest.raises(LayerError, match="'d/t'"):
        extract_zip(make_zip(tmp_path / "2.zip", [("ok.txt", b"ok", 0o644), ("s", ".", 0)]), out)
    assert tree(out) == before


def test_extract_refuses_writing_through_an_earlier_link_that_now_escapes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "up").symlink_to("..")  # as if an earlier, unchecked source had left it
    with pytest.raises(LayerError, match="outside"):
        extract_zip(make_zip(tmp_path / "x.zip", [("up/evil.txt", b"evil", 0o644)]), out)
    assert not (tmp_path / "evil.txt").exists()


# --- stage_function --------------------------------------------------------------------------------


def function(code: Path, *layers: Path) -> FunctionConfig:
    return FunctionConfig(
        logical_id="Fn",
        function_name="my-fn",
        runtime="python3.12",
        handler="app.handler",
        code=code,
        layers=tuple(LayerConfig(name=p.name, content=p) for p in layers),
    )


def code_dir(tmp_path: Path) -> Path:
    code = tmp_path / "src"
    code.mkdir(parents=True)
    (code / "app.py").write_text("def handler(e, c): return e\n")
    return code


def test_stage_uses_a_code_directory_in_place(tmp_path: Path) -> None:
    code = code_dir(tmp_path)
    staged = stage_function(function(code), tmp_path / "work")
    assert staged == StagedCode(task=code, opt=tmp_path / "work" / "opt")
    assert not (tmp_path / "work" / "task").exists()
    assert staged.opt.is_dir()
    assert list(staged.opt.iterdir()) == []


def test_stage_extracts_a_code_zip(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "code.zip", [("app.py", b"code", 0o644), ("bootstrap", b"#!", 0o755)])
    staged = stage_function(function(archive), tmp_path / "work")
    assert staged.task == tmp_path / "work" / "task"
    assert tree(staged.task) == {"app.py": "code", "bootstrap": "#!"}
    assert mode_of(staged.task / "bootstrap") == 0o755


def test_stage_merges_layers_in_order_later_wins(tmp_path: Path) -> None:
    first = make_zip(
        tmp_path / "first.zip",
        [("python/shared.py", b"first", 0o644), ("python/only_first.py", b"1", 0o644)],
    )
    second = tmp_path / "second"
    (second / "python").mkdir(parents=True)
    (second / "python" / "shared.py").write_text("second")
    (second / "extensions").mkdir()
    (second / "extensions" / "ext").write_text("#!/bin/sh\n")
    (second / "extensions" / "ext").chmod(0o755)
    (second / "python" / "alias.py").symlink_to("shared.py")
    staged = stage_function(function(code_dir(tmp_path), first, second), tmp_path / "work")
    assert tree(staged.opt) == {
        "python": "/",
        "python/shared.py": "second",
        "python/only_first.py": "1",
        "python/alias.py": "-> shared.py",
        "extensions": "/",
        "extensions/ext": "#!/bin/sh\n",
    }
    assert mode_of(staged.opt / "extensions" / "ext") == 0o755
    assert (staged.opt / "python" / "alias.py").read_text() == "second"


def test_stage_keeps_modification_times_of_a_directory_layer(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "mod.py").write_text("x")
    os.utime(layer / "mod.py", ns=(1_000_000_000, 2_000_000_000))
    staged = stage_function(function(code_dir(tmp_path), layer), tmp_path / "work")
    assert (staged.opt / "mod.py").stat().st_mtime_ns == 2_000_000_000


def test_stage_refuses_a_directory_layer_with_an_escaping_symlink(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "ok.txt").write_text("ok")
    (layer / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(LayerError, match="/etc/passwd") as caught:
        stage_function(function(code_dir(tmp_path), layer), tmp_path / "work")
    assert str(layer) in str(caught.value)
    assert not (tmp_path / "work" / "opt").exists()


def test_stage_refuses_a_bad_layer_and_leaves_nothing_behind(tmp_path: Path) -> None:
    good = make_zip(tmp_path / "good.zip", [("good.txt", b"g", 0o644)])
    bad = make_zip(tmp_path / "bad.zip", [("../evil", b"e", 0o644)])
    code = make_zip(tmp_path / "code.zip", [("app.py", b"a", 0o644)])
    with pytest.raises(LayerError, match=re.escape("'../evil'")):
        stage_function(function(code, good, bad), tmp_path / "work")
    assert not (tmp_path / "work" / "task").exists()
    assert not (tmp_path / "work" / "opt").exists()
    assert not (tmp_path / "work" / "evil").exists()


def test_stage_refuses_over_the_unzipped_limit_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filesystem, "MAX_UNZIPPED_BYTES", 10_000)
    code = code_dir(tmp_path)
    (code / "big.bin").write_bytes(bytes(6000))
    layer = make_zip(tmp_path / "layer.zip", [("zeros", bytes(5000), 0o644)])
    size = 6000 + 5000 + len("def handler(e, c): return e\n")
    with pytest.raises(LayerError) as caught:
        stage_function(function(code, layer), tmp_path / "work")
    message = str(caught.value)
    assert "my-fn" in message
    assert f"{size} bytes" in message
    assert "10000" in message
    assert not (tmp_path / "work").exists()


def test_stage_limit_is_250_mb_and_a_real_zip_of_zeros_is_refused(tmp_path: Path) -> None:
    assert MAX_UNZIPPED_BYTES == 250 * 1024 * 1024
    archive = tmp_path / "zeros.zip"
    chunk = bytes(1024 * 1024)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for i in range(2):  # two entries of 126 MB: more than the limit together
            with zf.open(f"zeros{i}", "w", force_zip64=True) as out:
                for _ in range(126):
                    out.write(chunk)
    assert archive.stat().st_size < 2 * 1024 * 1024
    size = 252 * 1024 * 1024 + len("def handler(e, c): return e\n")
    with pytest.raises(LayerError, match=f"{size} bytes; Lambda allows at most {MAX_UNZIPPED_BYTES} bytes"):
        stage_function(function(code_dir(tmp_path), archive), tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_stage_starts_from_a_fresh_directory(tmp_path: Path) -> None:
    work = tmp_path / "work"
    one = make_zip(tmp_path / "one.zip", [("one.txt", b"1", 0o644)])
    two = make_zip(tmp_path / "two.zip", [("two.txt", b"2", 0o644)])
    code = make_zip(tmp_path / "code.zip", [("app.py", b"a", 0o644)])
    stage_function(function(code, one), work)
    (work / "task" / "stale.txt").write_text("stale")
    staged = stage_function(function(code, two), work)
    assert tree(staged.opt) == {"two.txt": "2"}
    assert tree(staged.task) == {"app.py": "a"}


def test_stage_refuses_missing_code(tmp_path: Path) -> None:
    with pytest.raises(LayerError, match="no such file"):
        stage_function(function(tmp_path / "missing.zip"), tmp_path / "work")


def test_stage_of_a_small_function_does_only_the_work_its_files_need(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Why staging costs a few milliseconds, every time: the code directory is used in place (scanned, never
    # copied), a layer zip is opened twice (its size, then its extraction) and each of its entries read and
    # written once, and a fresh /opt means no walk of what is on disk for symlinks.
    code = code_dir(tmp_path)
    entries: list[Entry] = [(f"python/mod{i}.py", b"x = 1\n" * 50, 0o644) for i in range(20)]
    layer = make_zip(tmp_path / "layer.zip", [*entries, ("python/link.py", "mod0.py", 0)])
    config = function(code, layer)
    scanned: list[Path] = []
    opened: list[Path] = []
    written: list[int] = []
    walked: list[Path] = []
    members: list[str] = []
    real_scan, real_open, real_write, real_walk = (
        filesystem._scan_dir,
        filesystem._open_zip,
        filesystem._write,
        filesystem._disk_links,
    )
    real_member = zipfile.ZipFile.open

    def scan(directory: Path) -> Any:
        scanned.append(directory)
        return real_scan(directory)

    def open_zip(archive: Path) -> zipfile.ZipFile:
        opened.append(archive)
        return real_open(archive)

    def write(*args: Any) -> int:
        written.append(real_write(*args))
        return written[-1]

    def walk(root: Path) -> list[tuple[str, str]]:
        walked.append(root)
        return real_walk(root)

    def member(self: zipfile.ZipFile, name: Any, *args: Any, **kwargs: Any) -> Any:
        members.append(name if isinstance(name, str) else name.filename)
        return real_member(self, name, *args, **kwargs)

    monkeypatch.setattr(filesystem, "_scan_dir", scan)
    monkeypatch.setattr(filesystem, "_open_zip", open_zip)
    monkeypatch.setattr(filesystem, "_write", write)
    monkeypatch.setattr(filesystem, "_disk_links", walk)
    monkeypatch.setattr(zipfile.ZipFile, "open", member)
    for round_ in range(3):  # the same work each time, but for the layer's size (read once while it is unchanged)
        for seen in (scanned, opened, written, walked, members):
            seen.clear()
        staged = stage_function(config, tmp_path / "work")
        assert staged.task == code and not (tmp_path / "work" / "task").exists()
        assert scanned == [code]
        assert opened == ([layer, layer] if round_ == 0 else [layer])
        assert written == [len(b"x = 1\n" * 50) * 20]  # the layer's file bytes, once
        assert sorted(members) == sorted([name for name, _, _ in entries] + ["python/link.py"])  # each read once
        assert walked == []
        assert tree(staged.opt)["python/link.py"] == "-> mod0.py"


def test_extract_refuses_a_directory_entry_that_is_an_escaping_link_on_disk(tmp_path: Path) -> None:
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o755)
    out.mkdir()
    (out / "dir").symlink_to("../outside")  # as if an earlier, unchecked source had left it
    with pytest.raises(LayerError, match="'dir'"):
        extract_zip(make_zip(tmp_path / "x.zip", [("dir/", b"", 0o700)]), out)
    assert mode_of(outside) == 0o755


def test_extract_refuses_encrypted_entries(tmp_path: Path) -> None:
    archive = tmp_path / "secret.zip"
    make_zip(archive, [("secret.txt", b"not really encrypted", 0o644)])
    data = bytearray(archive.read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local and central headers
        data[data.index(signature) + flags_at] |= 0x1
    archive.write_bytes(bytes(data))
    with pytest.raises(LayerError, match=re.escape("'secret.txt' is encrypted")):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kind", "what"), [(stat.S_IFIFO, "a FIFO"), (stat.S_IFCHR, "a character device"), (stat.S_IFBLK, "a block device")]
)
def test_extract_refuses_device_and_fifo_entries(tmp_path: Path, kind: int, what: str) -> None:
    archive = tmp_path / "special.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("dev/thing")
        info.create_system = 3
        info.external_attr = (kind | 0o644) << 16
        zf.writestr(info, b"")
    with pytest.raises(LayerError, match=re.escape(f"'dev/thing' is {what}")):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extract_refuses_a_file_entry_that_appears_twice(tmp_path: Path) -> None:
    archive = tmp_path / "twice.zip"
    with pytest.warns(UserWarning, match="Duplicate name"):  # (zipfile warns as it writes one)
        make_zip(archive, [("d/", b"", 0o755), ("d/", b"", 0o755), ("d/a.py", b"1", 0o644), ("d/a.py", b"2", 0o644)])
    with pytest.raises(LayerError, match=re.escape("'d/a.py' appears more than once")):
        extract_zip(archive, tmp_path / "out")


# --- the cache of extracted zips -------------------------------------------------------------------


def test_a_cache_extracts_each_content_once_and_follows_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = make_zip(tmp_path / "code.zip", [("app.py", b"code", 0o644)])
    layer = make_zip(tmp_path / "layer.zip", [("extensions/ext", b"#!/bin/sh\n", 0o755)])
    extracted: list[Path] = []
    real_extract = filesystem.extract_zip

    def counting(archive: Path, target: Path) -> int:
        extracted.append(archive)
        return real_extract(archive, target)

    monkeypatch.setattr(filesystem, "extract_zip", counting)
    cache = tmp_path / "cache"
    first = stage_function(function(code, layer), tmp_path / "w1", cache)
    second = stage_function(function(code, layer), tmp_path / "w2", cache)
    assert first == second and first.task.parent == first.opt.parent == cache
    assert tree(first.task) == {"app.py": "code"} and mode_of(first.opt / "extensions" / "ext") == 0o755
    assert extracted == [code, layer]  # the second environment extracted nothing
    assert not (tmp_path / "w2" / "task").exists() and not (tmp_path / "w2" / "opt").exists()
    make_zip(code, [("app.py", b"changed", 0o644)])
    third = stage_function(function(code, layer), tmp_path / "w3", cache)
    assert third.opt == first.opt and third.task != first.task and tree(third.task) == {"app.py": "changed"}
    assert sorted(p.name for p in cache.iterdir()) == sorted({first.task.name, first.opt.name, third.task.name})


def test_a_directory_layer_is_copied_at_every_stage_even_with_a_cache(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    (layer / "python").mkdir(parents=True)
    (layer / "python" / "m.py").write_text("1")
    zipped = make_zip(tmp_path / "z.zip", [("python/z.py", b"z", 0o644)])
    staged = stage_function(function(code_dir(tmp_path), zipped, layer), tmp_path / "w1", tmp_path / "cache")
    assert staged.opt == tmp_path / "w1" / "opt" and tree(staged.opt)["python/m.py"] == "1"
    (layer / "python" / "m.py").write_text("2")  # edited between two cold starts: the next one sees it
    staged = stage_function(function(code_dir(tmp_path / "x"), zipped, layer), tmp_path / "w2", tmp_path / "cache")
    assert tree(staged.opt)["python/m.py"] == "2"


def test_concurrent_builders_of_one_tree_leave_one_tree(tmp_path: Path) -> None:
    layer = make_zip(tmp_path / "layer.zip", [(f"python/m{i}.py", b"x", 0o644) for i in range(200)])
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:
        staged = list(pool.map(lambda i: stage_function(function(code_dir(tmp_path / str(i)), layer),
                                                        tmp_path / f"w{i}", cache), range(4)))  # fmt: skip
    assert len({s.opt for s in staged}) == 1 and [p.name for p in cache.iterdir()] == [staged[0].opt.name]
    assert len(tree(staged[0].opt)) == 201


def test_prune_removes_trees_unused_for_a_week_and_abandoned_builds(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    for name, age in (("fresh", 3600.0), ("old", codecache.PRUNE_AFTER_S + 1), (".building-x", 3601.0),
                      (".building-y", 60.0)):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
        os.utime(tmp_path / name, (now - age, now - age))
    removed = codecache.prune(tmp_path, now)
    assert sorted(p.name for p in removed) == [".building-x", "old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".building-y", "fresh"]


# --- staged_signature ----------------------------------------------------------------------------------------


def bump(path: Path, content: bytes) -> None:
    """Rewrite a file with a later modification time (a coarse clock could give the same one)."""
    before = path.stat().st_mtime_ns
    path.write_bytes(content)
    os.utime(path, ns=(before, before + 1_000_000_000))


def test_the_signature_follows_what_staging_copies_or_extracts_and_not_the_code_directory(tmp_path: Path) -> None:
    code = code_dir(tmp_path)
    layer_dir = tmp_path / "layer"
    layer_dir.mkdir()
    (layer_dir / "data.txt").write_text("v1")
    layer_zip = make_zip(tmp_path / "l.zip", [("python/mod.py", b"x = 1", 0o644)])
    config = function(code, layer_dir, layer_zip)
    first = filesystem.staged_signature(config)
    stage_function(config, tmp_path / "work")  # (reading the sources changes nothing it looks at)
    assert filesystem.staged_signature(config) == first
    bump(next(p for p in code.iterdir() if p.is_file()), b"edited")  # used in place: its edits show by themselves
    assert filesystem.staged_signature(config) == first
    bump(layer_dir / "data.txt", b"v2")
    second = filesystem.staged_signature(config)
    assert second != first
    (layer_dir / "new.txt").write_text("new")
    assert filesystem.staged_signature(config) != second
    third = filesystem.staged_signature(config)
    bump(layer_zip, layer_zip.read_bytes())
    assert filesystem.staged_signature(config) != third
