"""CI: the dependency floors of pyproject.toml resolve together (pip's resolver, no install).

Every ``name>=X`` of ``[project] dependencies`` becomes ``name==X`` and pip resolves that set
for this interpreter (``pip install --dry-run``, wheels only): a floor below what another floor
needs (diffusers 0.40 needs safetensors >= 0.8, say) fails here. It needs PyPI: when the index
cannot be reached the check says so and passes, so a network outage is never a red build.
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path

INDEX = "https://pypi.org/simple/pip/"


def floors(pyproject: Path) -> list[str]:
    import tomllib  # Python 3.11+

    deps = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    pins = []
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)(,.*)?", dep)
        if not m:
            sys.exit(f"check_floors: {dep!r} has no '>=' floor")
        pins.append(f"{m.group(1)}=={m.group(2)}")
    return pins


def main() -> int:
    if sys.version_info < (3, 11):
        print("check_floors: needs Python 3.11 (tomllib); floor check skipped")
        return 0
    pins = floors(Path(__file__).resolve().parents[1] / "pyproject.toml")
    try:
        urllib.request.urlopen(INDEX, timeout=15).close()
    except OSError as e:
        print(f"check_floors: PyPI not reachable ({e}); floor check skipped")
        return 0
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
           "--only-binary", ":all:", "--quiet", "--disable-pip-version-check", *pins]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if not line.startswith("WARNING")]
        print("check_floors: the floors do not resolve together:\n" + "\n".join(errors[-20:]))
        return 1
    print(f"check_floors: {len(pins)} floors resolve together: {' '.join(pins)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
