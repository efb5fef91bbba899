// See cusparse.h in this folder.
#pragma once
#include "cusolverDn.h"
