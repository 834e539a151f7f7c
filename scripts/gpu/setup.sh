# Sourced at the start of every command on a GPU machine that has no network:
#
#   source scripts/gpu/setup.sh
#
# Installs what the machine's image lacks from the wheels in .whl/ (made by
# scripts/gpu/fetch_wheels.sh, carried with the call) into /tmp/site, puts /tmp/site and
# the working tree on PYTHONPATH (the project runs from the tree, never installed), and
# prints the versions that matter and jax.devices().
#
# Harmless on a machine that already has the packages (a CPU dry run in the project's
# virtualenv): nothing is installed when datasets, ml_collections and tensorboardX all
# import already. GPU_SETUP_INSTALL=1 installs the wheels regardless; =0 never does.
# Returns non-zero (without exiting the caller's shell) when the packages stay missing.

_gpu_setup() {
  local root site=/tmp/site
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  export PYTHONUNBUFFERED=1
  local have=0
  python3 -c 'import datasets, ml_collections, tensorboardX' 2>/dev/null && have=1
  local install=${GPU_SETUP_INSTALL:-auto}
  if [[ $install == auto ]]; then
    [[ $have == 1 ]] && install=0 || install=1
  fi
  if [[ $install == 1 ]]; then
    if ! compgen -G "$root/.whl/*.whl" >/dev/null; then
      echo "setup: no wheels in $root/.whl: run scripts/gpu/fetch_wheels.sh here and carry .whl" >&2
      return 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$root"/.whl/*.whl || { echo 'setup: pip install failed' >&2; return 1; }
    export PYTHONPATH=$site:$root${PYTHONPATH:+:$PYTHONPATH}
    echo "setup: installed $(ls "$root"/.whl/*.whl | wc -l) wheels into $site"
  else
    export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
    echo "setup: datasets, ml_collections and tensorboardX already import; nothing installed"
  fi
  # datasets asks for pyarrow>=24 and fsspec<=2026.9.0; the image's versions are not
  # known ahead, so show them, and fall back to datasets 4.8.5 (pyarrow>=21) when 5.x
  # does not import.
  python3 -m pip show pyarrow fsspec huggingface-hub 2>/dev/null \
    | awk '/^Name:/{n=$2} /^Version:/{printf "setup: found %s %s\n", n, $2}'
  if ! python3 -c 'import datasets' 2>/tmp/gpu_setup_datasets.err; then
    echo "setup: datasets does not import: $(tail -1 /tmp/gpu_setup_datasets.err)" >&2
    if [[ $install == 1 ]] && compgen -G "$root/.whl/fallback/*.whl" >/dev/null; then
      echo "setup: falling back to $(cd "$root"/.whl/fallback && ls *.whl)"
      rm -rf "$site"/datasets "$site"/datasets-*.dist-info
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$root"/.whl/fallback/*.whl
      python3 -c 'import datasets' || { echo 'setup: datasets still does not import' >&2; return 1; }
    else
      return 1
    fi
  fi
  python3 - <<'EOF'
import importlib.metadata as md
import sys

def version(name):
  try:
    return md.version(name)
  except md.PackageNotFoundError:
    return 'missing'

names = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'datasets', 'pyarrow',
         'ml-collections', 'tensorboardX', 'sentencepiece', 'numpy')
print('setup: python', sys.version.split()[0], ' '.join(f'{n}={version(n)}' for n in names))
# The project's lower bounds (pyproject.toml): say so plainly if the image is older.
floors = {'jax': (0, 10), 'flax': (0, 12), 'optax': (0, 2, 8), 'orbax-checkpoint': (0, 12)}
for n, floor in floors.items():
  v = version(n)
  parts = tuple(int(p) for p in v.split('.')[:3] if p.isdigit()) if v != 'missing' else ()
  if parts < floor:
    print(f'setup: WARNING {n} {v} is older than {".".join(map(str, floor))}')
import jax
print('setup: jax.devices() =', jax.devices())
EOF
}
_gpu_setup
