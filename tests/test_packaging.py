"""What a user installs: the shipped cache specs, sweep grids and method declarations travel in
the wheel, once each, and a non-editable install finds them by name."""

import os
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_a_wheel_ships_each_spec_once_and_an_install_from_it_finds_them_by_name(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("sidetune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(name for name in names if name.endswith(".yaml"))
    assert shipped == sorted(f"{folder}/{path.name}" for folder in ("cache_specs", "sweep_grids")
                             for path in (ROOT / folder).glob("*.yaml"))
    assert "sidetune/declarations.json" in names

    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    code = ("import sidetune.cache.spec as s; print(s.SPECS_DIR); print(s.load_spec('gap2-int8').dtype); "
            "import sidetune.sweeps.grid as g; print(g.load_grid('dinov2-linear')[0])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert done.returncode == 0, done.stderr
    folder, dtype, method = done.stdout.split()
    assert folder == str(tmp_path / "site" / "cache_specs") and dtype == "int8" and method == "linear"
