# Sourced by the bench shell scripts: the Fashion-MNIST directory, and the carried wheels of diffusers and
# torch-pruning on the GPU machine (neither is installed there; see bench/README.md). Needs PY set.
if [ -z "${DATA:-}" ]; then
  DATA=/usr/share/datasets/fashion-mnist
  [ -d "$DATA" ] || DATA=.data/fashion-mnist
  [ -d "$DATA" ] || DATA=.carry/fashion-mnist   # bench/pack_carry.sh
fi
if ! "$PY" -c "import diffusers, torch_pruning" 2>/dev/null && [ -f .carry/site.tar.xz ]; then
  mkdir -p /tmp/site && tar -xJf .carry/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import diffusers, torch_pruning" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "diffusers/torch-pruning missing and no wheels in .whl (see bench/README.md)" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
