#!/usr/bin/env bash
# Download the wheels of wheels.txt for the CUDA machine (Python 3.12, x86-64) into .whl/ of the
# repository this is run from (its root), and keep that folder out of git. Then, on the CUDA
# machine, with .whl/ copied there: bash benchmarks/gpu_session.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
exclude=$(git rev-parse --git-path info/exclude)  # also right in a worktree, where .git is a file
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
mkdir -p .whl
grep -vE '^\s*(#|$)' "$here/wheels.txt" | while read -r spec; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "$spec" || echo "no wheel for $spec"
done
du -sh .whl
