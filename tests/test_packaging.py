"""The wheel holds every package of the source tree (an editable install would hide a missing one)."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapped = {name: ROOT / path for name, path in config.get("package-dir", {}).items()}
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "momentkv").rglob("__init__.py")}
    found |= {name for name, path in mapped.items() if (path / "__init__.py").is_file()}
    missing = sorted(found - listed)
    assert not missing, f"packages missing from pyproject.toml [tool.setuptools] packages: {', '.join(missing)}"
    assert not sorted(listed - found), "pyproject.toml lists packages that do not exist"
