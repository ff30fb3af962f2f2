"""Data YAML parsing: every split form, names as list or dict, and every error naming file and key."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from trainer.data.config import DataConfig, DataConfigError, load_data_config, resolve_split

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
COCO128 = SHARED / "datasets" / "coco128" / "coco128.yaml"


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.zeros((12, 12, 3), np.uint8))
    return path


def _yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def tree(tmp_path):
    """root/images/{train,val}/..., a nested folder, an upper-case suffix and a non-image file."""
    root = tmp_path / "ds"
    _img(root / "images/train/b.jpg")
    _img(root / "images/train/a.png")
    _img(root / "images/train/sub/c.JPG")
    (root / "images/train/notes.md").write_text("not an image")
    _img(root / "images/val/v.jpg")
    return root


def test_coco128_yaml():
    if not COCO128.is_file():
        pytest.skip(f"shared dataset absent: {COCO128}")
    cfg = load_data_config(COCO128)
    assert cfg.nc == 80 and cfg.names[0] == "person" and cfg.names[79] == "toothbrush"
    assert cfg.root.resolve() == COCO128.parent.resolve()  # ../shared may be reached through a symlink
    assert cfg.train == (cfg.root / "images/train2017",)
    assert cfg.test == ()
    files = resolve_split(cfg.train)
    assert len(files) == 128 and files == sorted(files)


def test_folder_split_recursive_sorted_case_insensitive(tree):
    cfg = load_data_config(_yaml(tree / "data.yaml", {"train": "images/train", "val": "images/val", "names": ["x"]}))
    assert isinstance(cfg, DataConfig) and cfg.yaml_path == tree / "data.yaml"
    assert cfg.root == tree  # default root: the YAML's folder
    files = resolve_split(cfg.train)
    assert [f.relative_to(tree / "images/train").as_posix() for f in files] == ["a.png", "b.jpg", "sub/c.JPG"]


def test_relative_path_key_and_names_dict(tree, tmp_path):
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    data = {"path": "../ds", "train": "images/train", "val": "images/val/v.jpg", "nc": 2, "names": {1: "b", 0: "a"}}
    cfg = load_data_config(_yaml(cfg_dir / "d.yaml", data))
    assert cfg.root == tree
    assert cfg.names == ("a", "b") and cfg.nc == 2
    assert resolve_split(cfg.val) == [tree / "images/val/v.jpg"]  # a single image file


def test_txt_list_and_mixed_list(tree):
    # Relative entries resolve against the txt's folder, with or without "./"; duplicates collapse.
    (tree / "lists").mkdir()
    (tree / "lists/train.txt").write_text(
        "../images/train/b.jpg\n./../images/train/a.png\n\n" + str(tree / "images/val/v.jpg") + "\n"
    )
    data = {"train": ["lists/train.txt", "images/train/sub", "images/train/b.jpg"], "val": "images/val", "names": ["x"]}
    cfg = load_data_config(_yaml(tree / "d.yaml", data))
    got = resolve_split(cfg.train)
    want = sorted([tree / "images/train/a.png", tree / "images/train/b.jpg", tree / "images/train/sub/c.JPG",
                   tree / "images/val/v.jpg"])  # fmt: skip
    assert got == want


def test_dict_input(tree):
    cfg = load_data_config({"path": str(tree), "train": "images/train", "val": "images/val", "names": ["a"]})
    assert cfg.yaml_path is None and cfg.root == tree and cfg.nc == 1


@pytest.mark.parametrize(
    "data, key",
    [
        ({"val": "images/val", "names": ["a"]}, "'train'"),
        ({"train": "images/train", "names": ["a"]}, "'val'"),
        ({"train": "images/train", "val": "images/val"}, "'names'"),
        ({"train": "images/train", "val": "images/val", "names": ["a", "b"], "nc": 3}, "'nc'"),
        ({"train": "images/train", "val": "images/val", "names": {0: "a", 2: "c"}}, "'names'"),
        ({"train": "images/train", "val": "images/val", "names": "a"}, "'names'"),
        ({"train": "images/nope", "val": "images/val", "names": ["a"]}, "'train'"),
        ({"train": "images/train", "val": "images/val", "test": "missing.txt", "names": ["a"]}, "'test'"),
        ({"path": "nowhere", "train": "images/train", "val": "images/val", "names": ["a"]}, "'path'"),
    ],
)
def test_errors_name_file_and_key(tree, data, key):
    y = _yaml(tree / "bad.yaml", data)
    with pytest.raises(DataConfigError) as e:
        load_data_config(y)
    assert str(y) in str(e.value) and key in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(DataConfigError, match="not found"):
        load_data_config(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(DataConfigError, match="mapping"):
        load_data_config(tmp_path / "list.yaml")


def test_txt_list_with_non_image_line_names_line(tmp_path):
    (tmp_path / "l.txt").write_text("a.jpg\nreadme.md\n")
    with pytest.raises(DataConfigError, match=r"l\.txt:2:"):
        resolve_split(tmp_path / "l.txt")


def test_listed_missing_images_are_kept_for_the_scan_to_report(tmp_path):
    (tmp_path / "l.txt").write_text("gone.jpg\n")
    assert resolve_split([tmp_path / "l.txt"]) == [tmp_path / "gone.jpg"]
