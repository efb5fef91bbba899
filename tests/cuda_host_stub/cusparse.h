// Stand-in for the CUDA library headers a CPU-only torch wheel's ATen/cuda headers include but the CUDA
// toolkit on a CPU machine may lack (tests/test_cuda_host_code.py only: a syntax check, nothing links).
#pragma once
typedef struct cusparseContext* cusparseHandle_t;
