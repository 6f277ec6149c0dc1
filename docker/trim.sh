#!/bin/sh
# What no ferpipe task uses, removed from an image's site-packages in the layer that installed it
# (measured in docker/README.md).
# - TensorFlow's C and C++ headers: for compiling custom ops against TensorFlow, which ferpipe never does.
# - The test suites that packages ship (pandas, scipy, sklearn, numpy, networkx, ...): run by their
#   authors, never imported by the package itself. TensorFlow's and Keras's are kept: small, and their
#   packages are too large to check every import by hand.
# Every ferpipe task runs in the trimmed images in CI (tests/test_containers.py), which is the check.
set -eu
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
before=$(du -sm "$site" | cut -f1)
rm -rf "$site/tensorflow/include"
# The GPU image's CUDA wheels (none in the CPU image): headers and static libraries are for compiling
# against CUDA; libcusolverMg is cuSOLVER's multi-GPU API, which TensorFlow never calls (it loads
# libcusolver); libnvrtc*.alt are a second build of NVRTC, while cuDNN and cuBLAS load libnvrtc.so.12.
if [ -d "$site/nvidia" ]; then
  find "$site/nvidia" -depth \( -type d -name include -o -name '*.a' -o -name 'libcusolverMg.so*' \
    -o -name 'libnvrtc*.alt.so*' \) -exec rm -rf {} +
fi
find "$site" -depth -type d -name tests ! -path "$site/tensorflow/*" ! -path "$site/keras/*" -exec rm -rf {} +
echo "trim: site-packages $before MB -> $(du -sm "$site" | cut -f1) MB"
