// CPU stand-in for <cuda_runtime_api.h> in the emulated builds of tests/emu (never seen by nvcc).
#pragma once
#include "../cuda_emulate.h"
