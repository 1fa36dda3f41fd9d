# Sourced by the GPU scripts: make this working tree importable on the device machine without
# touching its preinstalled torch/triton. Carried wheels (.whl/*.whl: fla-core for the benchmarks)
# go to /tmp/site; the package is installed editable (which registers the torch_dynamo_backends
# entry point) or, if the device's Python lacks setuptools, copied onto PYTHONPATH.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1; then
  rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r based_compile /tmp/pkg/ && cp -r kernels /tmp/pkg/based_compile/kernels
  export PYTHONPATH="/tmp/pkg:${PYTHONPATH:-}"
fi
python3 -c "import torch, triton, based_compile; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
