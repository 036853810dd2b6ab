# Sourced by the GPU scripts (run_gpu_checks.sh, run_gpu_issue18.sh, run_gpu_lowvram_check.sh): the results folder
# $OUT (default ./gpu_out), the wheels the GPU image lacks installed from .whl/ when there are any (diffusers, toml,
# pillow-heif: the GPU machine has no network), the repository on PYTHONPATH, unbuffered output.
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
