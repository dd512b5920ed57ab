# Sourced by the gpu/*.sh scripts on an offline GPU machine (no package index): install the wheels
# that ../shared/tools/gpu-wheels.sh put in .whl (deepspeed, megatron-core and the few packages the
# image lacks) into /tmp/site, and build any DeepSpeed op for sm_90 (the image's 9.0a breaks them).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu/setup.sh: installing .whl/*.whl failed (make them with ../shared/tools/gpu-wheels.sh)" >&2; exit 1; }
export PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
