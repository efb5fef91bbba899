// CPU stand-in for <mma.h> in the emulated builds of tests/emu (never seen by nvcc).
#pragma once
#include "../cuda_emulate.h"
