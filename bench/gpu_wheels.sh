#!/usr/bin/env bash
# Run here (a machine with pip access), before a GPU session: fetch the wheels the device image
# lacks into .gpu/ (git-ignored), for Python 3.12 on x86-64, and copy the yardstick
# (../shared/bench/reference_gan.py, which does not travel) beside them. bench/gpu_session.sh
# installs and uses them there.
# The image already has torch, accelerate, safetensors, numpy, pillow, pyyaml, tqdm, psutil,
# py-cpuinfo, msgpack, einops, ninja and packaging; simplejpeg and TensorBoard (with what it needs)
# are here for the end-to-end runs (bigan.train logs to TensorBoard).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
cp ../shared/bench/reference_gan.py .gpu/
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .gpu hjson==3.1.0 braceexpand==0.1.7 webdataset==1.0.2 pydantic==2.14.4 \
  pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
  simplejpeg==1.9.0 tensorboard==2.21.0 tensorboard-data-server==0.7.2 absl-py grpcio==1.85.3 markdown==3.11.3 \
  protobuf==7.36.2 werkzeug==3.1.9 markupsafe==3.0.4 six
# DeepSpeed ships an sdist only; its wheel (ops are JIT-built, none is needed here) is pure Python.
python3 -m pip wheel --quiet --no-deps --no-build-isolation -w .gpu deepspeed==0.19.8
ls -1 .gpu
