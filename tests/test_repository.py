"""The repository as a clone downloads it."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LIMIT_MIB = 40


def tracked_sizes() -> dict[str, int]:
    """Bytes of each file `git ls-files` lists under the repository root (as `du -b` counts them)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout")
    paths = [ROOT / name for name in listed.stdout.decode().split("\0") if name]
    return {str(path.relative_to(ROOT)): path.lstat().st_size for path in paths if path.is_symlink() or path.exists()}


def test_the_tracked_tree_stays_under_40_mib():
    sizes = tracked_sizes()
    assert "README.md" in sizes, f"git ls-files listed no README.md under {ROOT}"
    total = sum(sizes.values())
    largest = ", ".join(f"{name} ({size / 2**20:.1f} MiB)" for name, size in
                        sorted(sizes.items(), key=lambda item: -item[1])[:5])
    assert total <= LIMIT_MIB * 2**20, (
        f"tracked files total {total / 2**20:.1f} MiB, over {LIMIT_MIB} MiB; the largest: {largest}. Store "
        f"trained compressors smaller (tokcomp_jax.learned.artifacts.pack) or keep large files out of git.")
