// See cusparse.h in this folder.
#pragma once
#include <cuda_runtime_api.h>
typedef struct cublasContext* cublasHandle_t;
typedef int cublasStatus_t;
