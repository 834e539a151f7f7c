#!/usr/bin/env bash
# Downloads into .whl/ the wheels a GPU machine without network needs on top of its image
# (Python 3.12, x86_64; the image has jax, flax, optax, orbax, numpy, pyarrow, pandas,
# fsspec, xxhash, huggingface-hub, sentencepiece, absl-py, pyyaml, protobuf, tqdm,
# matplotlib, safetensors). Run it where pip reaches PyPI, before the device call:
#
#   bash scripts/gpu/fetch_wheels.sh        # then carry .whl (git-ignored)
#
# What `pip install -e .` would need that the image lacks:
#   datasets (-> dill, multiprocess), ml-collections, tensorboardX.
# datasets 5.2 asks for pyarrow>=24. Should the image's pyarrow be older, setup.sh falls
# back to .whl/fallback/ (datasets 4.8.5: pyarrow>=21, same dill and multiprocess).
# The project itself is not installed: it runs from the working tree (PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/../.."

MAIN=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 ml-collections==1.1.0
      tensorboardX==2.6.5)
FALLBACK=(datasets==4.8.5)

download() {  # DEST NAME==VERSION...
  local dest=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dest" "$@"
}

rm -rf .whl
mkdir -p .whl/fallback
download .whl "${MAIN[@]}"
download .whl/fallback "${FALLBACK[@]}"

# One version of each package in .whl/ (two would stop the whole install there).
names=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort)
dups=$(uniq -d <<<"$names")
[[ -z $dups ]] || { echo "fetch_wheels: two versions of: $dups" >&2; exit 1; }

# What each wheel asks for, to check against the image's list (extras left out).
for w in .whl/*.whl .whl/fallback/*.whl; do
  echo "$w"
  unzip -p "$w" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
    | sed 's/^Requires-Dist: /    needs /' || true
done
du -ch .whl/*.whl .whl/fallback/*.whl | tail -1 | sed 's/total/in all/'
