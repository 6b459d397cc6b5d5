"""Registry: listing, names, errors with suggestions, builtin upscalers, pickle files, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil

import pytest

import model_headers as H
from imagesmith.core.errors import BadRequest, ModelNotFound, UnsafeModelFile
from imagesmith.core.settings import Settings
from imagesmith.models import hashing
from imagesmith.models.hashing import HashCache, sha256_file
from imagesmith.models.registry import Registry


@pytest.fixture(scope="module")
def registry(tiny_home):
    return Registry(tiny_home)


def test_lists_every_tiny_model_with_kind_arch_format(registry):
    got = {(e.name, e.kind, e.arch, e.format) for e in registry.list()}
    for row in [("tiny-sd15", "checkpoint", "sd1", "diffusers"), ("tiny-sd15-single", "checkpoint", "sd1", "single-file"),
                ("tiny-sdxl", "checkpoint", "sdxl", "diffusers"), ("tiny-sdxl-single", "checkpoint", "sdxl", "single-file"),
                ("tiny-sd3", "checkpoint", "sd3", "diffusers"), ("tiny-flux", "checkpoint", "flux", "diffusers"),
                ("tiny-flux-single", "checkpoint", "flux", "single-file"), ("tiny-lora-peft", "lora", "sd1", "single-file"),
                ("tiny-lora-kohya", "lora", "sd1", "single-file"), ("tiny-lora-sdxl-kohya", "lora", "sdxl", "single-file"),
                ("tiny-vae", "vae", "sd1", "diffusers"), ("tiny-controlnet", "controlnet", "sd1", "diffusers"),
                ("tiny-embedding", "embedding", "unknown", "single-file")]:
        assert row in got, row
    assert {e.name for e in registry.list("lora")} == {"tiny-lora-peft", "tiny-lora-kohya", "tiny-lora-sdxl-peft",
                                                       "tiny-lora-sdxl-kohya"}
    assert all(e.kind == "checkpoint" for e in registry.list("checkpoints"))  # folder name works as kind


def test_sizes_are_on_disk_sizes(registry, tiny_models):
    e = registry.get("tiny-sd15-single", "checkpoint")
    assert e.size_bytes == tiny_models.paths["tiny-sd15-single"].stat().st_size
    folder = registry.get("tiny-sd15", "checkpoint")
    assert folder.size_bytes == sum(p.stat().st_size for p in folder.path.rglob("*") if p.is_file())


def test_builtin_upscalers_are_registered(registry):
    ups = {e.name: e for e in registry.list("upscaler")}
    assert {"Lanczos", "R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B"} <= set(ups)
    assert all(ups[n].builtin for n in ("Lanczos", "R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B"))
    assert ups["R-ESRGAN 4x+"].path.name == "realesrgan-x4plus.param" and ups["R-ESRGAN 4x+"].path.is_file()
    assert ups["R-ESRGAN 4x+ Anime6B"].path.with_suffix(".bin").is_file()
    assert registry.get("r-esrgan 4x+", "upscaler").name == "R-ESRGAN 4x+"


@pytest.mark.parametrize("query", ["tiny-sd15-single", "TINY-SD15-SINGLE", "tiny-sd15-single.safetensors",
                                   "tiny-sd15-single [0123456789]"])
def test_get_by_name_forms(registry, query):
    assert registry.get(query, "checkpoint").name == "tiny-sd15-single"


def test_get_respects_kind(registry):
    with pytest.raises(ModelNotFound, match="no lora named 'tiny-sd15'"):
        registry.get("tiny-sd15", "lora")


def test_unknown_name_suggests_close_matches(registry):
    with pytest.raises(ModelNotFound) as err:
        registry.get("tiny-sd1", "checkpoint")
    assert "checkpoint" in str(err.value) and "Did you mean" in str(err.value) and "tiny-sd15" in str(err.value)
    with pytest.raises(ModelNotFound, match="Known: "):
        registry.get("zzzzzzzz", "lora")


def test_unknown_kind_is_a_bad_request(registry):
    with pytest.raises(BadRequest, match="unknown model kind"):
        registry.list("spaceship")


def test_to_table_rows(registry):
    rows = registry.to_table_rows("checkpoint")
    assert rows and all({"name", "kind", "arch", "path", "size_bytes"} <= set(r) for r in rows)
    json.dumps(rows)  # --json output must serialise
    assert {r["name"] for r in rows} >= {"tiny-sd15", "tiny-flux"}


def _home(tmp_path) -> Settings:
    s = Settings(home=tmp_path / "home")
    s.ensure_home()
    return s


def test_subfolders_relative_paths_and_extra_dirs(tmp_path):
    s = _home(tmp_path)
    H.write_header_file(s.models_dir / "loras" / "styles" / "Ink.safetensors", H.LORA_KOHYA_SD1)
    extra = tmp_path / "extra"
    H.write_header_file(extra / "checkpoints" / "other.safetensors", H.SDXL)
    s = s.model_copy(update={"extra_model_paths": [extra]})
    r = Registry(s)
    assert r.get("ink", "lora").rel_path == "styles/Ink.safetensors"
    assert r.get("styles/Ink", "lora").name == "Ink"
    assert r.get("other", "checkpoint").arch == "sdxl"


def test_default_checkpoint_prefers_builtin(tmp_path, tiny_models):
    s = _home(tmp_path)
    H.write_header_file(s.models_dir / "checkpoints" / "aaa.safetensors", H.SD15)
    house = tmp_path / "house"
    house.mkdir()
    shutil.copy(tiny_models.paths["tiny-sd15-single"], house / "house-model.safetensors")
    assert Registry(s).default_checkpoint().name == "aaa"
    r = Registry(s, builtin_dirs=[house])
    d = r.default_checkpoint()
    assert d.name == "house-model" and d.builtin


def test_no_checkpoint_says_where_to_put_one(tmp_path):
    with pytest.raises(ModelNotFound, match="checkpoints"):
        Registry(_home(tmp_path)).default_checkpoint()


def test_misfiled_model_is_listed_as_what_it_is(tmp_path):
    s = _home(tmp_path)
    H.write_header_file(s.models_dir / "checkpoints" / "a-vae.safetensors", H.VAE_SD)
    e = Registry(s).get("a-vae", "vae")
    assert e.folder_kind == "checkpoint" and any("it is a vae" in n for n in e.notes)


def test_unrecognised_file_counts_as_its_folder_kind(tmp_path):
    s = _home(tmp_path)
    H.write_header_file(s.models_dir / "upscalers" / "weird.safetensors", {"foo": [1]})
    assert Registry(s).get("weird", "upscaler").kind == "upscaler"


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_files_are_listed_unsafe_and_never_executed(tmp_path):
    s = _home(tmp_path)
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Boom(str(marker)), protocol=4)
    (s.models_dir / "checkpoints" / "evil.ckpt").write_bytes(payload)
    (s.models_dir / "loras" / "evil-lora.pt").write_bytes(payload)
    (s.models_dir / "checkpoints" / "renamed.model").write_bytes(payload)  # pickle under a made-up suffix
    r = Registry(s)
    unsafe = {e.name: e for e in r.list("unsafe")}
    assert set(unsafe) == {"evil", "evil-lora", "renamed"}
    assert all("convert it to .safetensors" in e.notes[0] for e in unsafe.values())
    assert "evil" not in {e.name for e in r.list("checkpoint")}
    with pytest.raises(UnsafeModelFile, match=r"evil\.ckpt.*safetensors"):
        r.get("evil", "checkpoint")
    with pytest.raises(UnsafeModelFile):
        r.get("evil-lora", "lora")
    with pytest.raises(UnsafeModelFile):
        r.hash(unsafe["evil"])
    from imagesmith.models.loaders import load_pipeline
    with pytest.raises(UnsafeModelFile):
        load_pipeline(unsafe["evil"])
    r.to_table_rows()
    assert not marker.exists()


def test_ncnn_upscaler_pair_in_the_upscalers_folder(tmp_path):
    s = _home(tmp_path)
    (s.models_dir / "upscalers" / "my-x2.param").write_text("7767517\n")
    (s.models_dir / "upscalers" / "my-x2.bin").write_bytes(b"\x00\x00\x00\x00" + b"\x01" * 60)
    e = Registry(s).get("my-x2", "upscaler")
    assert e.format == "ncnn" and e.size_bytes == 8 + 64


# ------------------------------------------------------------------------------ hashes
def test_hashes_match_webui(tmp_path, tiny_models):
    s = _home(tmp_path)
    lora = shutil.copy(tiny_models.paths["tiny-lora-kohya"], s.models_dir / "loras" / "l.safetensors")
    ck = shutil.copy(tiny_models.paths["tiny-sd15-single"], s.models_dir / "checkpoints" / "c.safetensors")
    r = Registry(s)
    full_l = hashlib.sha256(open(lora, "rb").read()).hexdigest()
    full_c = hashlib.sha256(open(ck, "rb").read()).hexdigest()
    assert r.hash(r.get("l", "lora")) == full_l[:12]  # 'Lora hashes'
    assert r.hash(r.get("c", "checkpoint")) == full_c[:10]  # 'Model hash'
    assert hashing.short_hash(ck) == full_c[:10] and hashing.lora_short_hash(lora) == full_l[:12]
    assert r.hash(r.get("Lanczos", "upscaler")) is None


def test_folder_hash_is_over_sorted_weight_files(tiny_models):
    folder = tiny_models.paths["tiny-sd15"]
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors"), key=lambda p: p.relative_to(folder).as_posix()):
        h.update(f.read_bytes())
    assert sha256_file(folder) == h.hexdigest()


def test_hash_cache_hashes_once_and_notices_changes(tmp_path, monkeypatch):
    s = _home(tmp_path)
    f = H.write_header_file(s.models_dir / "loras" / "x.safetensors", H.LORA_KOHYA_SD1)
    cache = HashCache(s)
    first = cache.sha256(f)
    assert json.loads((s.home / "cache" / "hashes.json").read_text())[str(f.resolve())]["sha256"] == first

    def boom(path):
        raise AssertionError("hashed again")
    monkeypatch.setattr(hashing, "sha256_file", boom)
    assert HashCache(s).sha256(f) == first  # a new instance reads the on-disk cache
    monkeypatch.undo()
    with open(f, "ab") as fh:
        fh.write(b"\x00")
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = HashCache(s).sha256(f)
    assert changed != first and changed == hashlib.sha256(f.read_bytes()).hexdigest()


def test_a_file_dropped_in_later_is_found(tmp_path):
    s = _home(tmp_path)
    r = Registry(s)
    assert r.list("lora") == []
    H.write_header_file(s.models_dir / "loras" / "new.safetensors", H.LORA_KOHYA_SD1)
    assert r.get("new", "lora").arch == "sd1"


def test_hashing_works_when_the_cache_cannot_be_written(tmp_path):
    s = _home(tmp_path)
    f = H.write_header_file(s.models_dir / "loras" / "x.safetensors", H.LORA_KOHYA_SD1)
    (s.home / "cache").write_text("a file where the cache folder should be")  # unwritable, even for root
    assert HashCache(s).sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_house_tools_and_user_onnx_segmenters_are_registered(tmp_path):
    from safetensors.torch import save_file
    import torch
    s = _home(tmp_path)
    clip = tmp_path / "ship" / "house-clip"
    clip.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(clip / "model.safetensors"))
    (clip / "config.json").write_text("{}")
    half = tmp_path / "ship" / "house-cutout"  # no weights: not listed
    half.mkdir()
    (half / "config.json").write_text("{}")
    (s.models_dir / "segmenters" / "isnet-general-use.onnx").write_bytes(b"onnx")
    r = Registry(s, tool_dirs={"clip": [clip], "segmenter": [half]})
    got = {(e.name, e.kind, e.format, e.builtin) for e in r.list() if e.kind in ("clip", "segmenter")}
    assert got == {("house-clip", "clip", "house", True), ("isnet-general-use", "segmenter", "onnx", False)}
    assert r.get("isnet-general-use", "segmenters").path.suffix == ".onnx"
    with pytest.raises(ModelNotFound, match="Known: isnet-general-use"):
        r.get("birefnet", "segmenter")


def test_add_path_lists_a_file_outside_the_folders_and_keeps_it_across_scans(tmp_path, tiny_home, tiny_models):
    reg = Registry(tiny_home)
    single = tmp_path / "exports" / "mine.safetensors"
    single.parent.mkdir()
    shutil.copy(tiny_models.paths["tiny-sd15-single"], single)
    entry = reg.add_path(single)
    assert (entry.name, entry.kind, entry.arch, entry.rel_path) == ("mine", "checkpoint", "sd1", single.resolve().as_posix())
    reg.scan()  # a re-scan (get() does one on a miss) must not forget it
    assert reg.get(entry.rel_path, "checkpoint").path == single.resolve()
    assert entry.companion == tiny_models.paths["tiny-sd15"]  # the single file borrows its arch's tokenizer/VAE folder
    with pytest.raises(ModelNotFound, match="no such file"):
        reg.add_path(tmp_path / "missing.safetensors")
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(pickle.dumps({"a": 1}))
    reg.add_path(bad)
    with pytest.raises(UnsafeModelFile):
        reg.get(bad.resolve().as_posix(), "checkpoint")
