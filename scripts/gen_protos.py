"""Generate the Python stubs in common/proto from protos/ (one command, pinned generator).

    python scripts/gen_protos.py          # regenerate
    python scripts/gen_protos.py --check  # exit 1 if the committed stubs differ from a fresh run

Imports in the generated code are rewritten from `loadtest.v1` to `common.proto.loadtest.v1`
so the stubs live inside our package instead of claiming a top-level `loadtest` module.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "common" / "proto"
IMPORT_RE = re.compile(r"^(from |import )loadtest\.v1", re.MULTILINE)


def generate(dest: Path) -> None:
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    plugin_dir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={dest}",
            f"--grpc_python_out={dest}",
            f"--mypy_out={dest}",
            f"--mypy_grpc_out={dest}",
            *protos,
        ],
        check=False,
        cwd=PROTO_ROOT,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"protoc failed with exit code {result.returncode}")
    for path in dest.rglob("*"):
        if path.suffix in {".py", ".pyi"}:
            text = IMPORT_RE.sub(r"\1common.proto.loadtest.v1", path.read_text())
            path.write_text(text)
    for pkg in [dest, *[d for d in dest.rglob("*") if d.is_dir()]]:
        (pkg / "__init__.py").touch()


def tree_equal(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    if cmp.left_only or cmp.right_only or cmp.diff_files:
        print(f"differs in {a}: {cmp.left_only + cmp.right_only + cmp.diff_files}", file=sys.stderr)
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    if mismatch or errors:
        print(f"differs in {a}: {mismatch + errors}", file=sys.stderr)
        return False
    return all(tree_equal(a / d, b / d) for d in cmp.common_dirs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "proto"
        fresh.mkdir()
        generate(fresh)
        if args.check:
            if not OUT.exists() or not tree_equal(fresh, OUT):
                print("common/proto is stale: run `python scripts/gen_protos.py`", file=sys.stderr)
                return 1
            print("generated stubs are up to date")
            return 0
        shutil.rmtree(OUT, ignore_errors=True)
        shutil.copytree(fresh, OUT)
    print(f"generated stubs in {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
