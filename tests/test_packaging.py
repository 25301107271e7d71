"""The package as pip builds it: every sub-package listed, so a non-editable install imports."""
import importlib.util
import os
import pathlib
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_sub_package_is_listed():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: ROOT / path for name, path in setuptools["package-dir"].items()}
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            found.add(".".join((name, *relative)))
    assert sorted(found) == sorted(setuptools["packages"])


def test_the_clone_root_leaves_sys_path_so_hugging_face_kernels_is_not_shadowed():
    """Run from the clone's root, `python -m pytest` put it first on sys.path, where its kernels/ became the
    top-level `kernels` that transformers imports as Hugging Face's (conftest.py drops it)."""
    from fuser.source_tree import is_clone_root
    assert is_clone_root(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert not any(is_clone_root(path) for path in sys.path)
    spec = importlib.util.find_spec("kernels")
    assert spec is None or not is_clone_root(os.path.dirname(os.path.dirname(spec.origin)))
