// See ../../../cusparse.h: a CPU-only torch wheel ships c10/cuda's headers without this generated one.
#pragma once
