#!/bin/sh
# Builds the standalone GEMM check (tests/cpu_gemm/gemm_check.cpp) against the installed torch.
set -e
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-/work/main/.venv/bin/python}
TORCH=$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')
OUT=${OUT:-/tmp/chainrule_gemm_check}
OBJ=${OUT}.objs; mkdir -p "$OBJ"
FLAGS="-O3 -std=c++20 -ffp-contract=off -fno-strict-aliasing -Wall -Wextra -I$ROOT/csrc -I$ROOT/csrc/include -isystem $TORCH/include -fopenmp -D_GLIBCXX_USE_CXX11_ABI=1"
c() { src=$1; shift; o=$OBJ/$(basename $src .cpp).o; if [ ! -f $o ] || [ $src -nt $o ] || [ -n "$(find $ROOT/csrc -name '*.h' -newer $o)" ]; then echo "g++ $src"; g++ $FLAGS "$@" -c $src -o $o; fi; }
c $ROOT/csrc/cpu/isa.cpp
c $ROOT/csrc/cpu/gemm/gemm.cpp
c $ROOT/csrc/cpu/gemm/gemm_avx512.cpp -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mfma
c $ROOT/csrc/cpu/gemm/gemm_avx2.cpp -mavx2 -mfma
c $ROOT/csrc/cpu/gemm/gemv_amx.cpp -mamx-tile -mamx-bf16
c $ROOT/tests/cpu_gemm/gemm_check.cpp
g++ -fopenmp $OBJ/*.o -o $OUT -L$TORCH/lib -Wl,-rpath,$TORCH/lib -ltorch_cpu -lc10
