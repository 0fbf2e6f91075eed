// nf4 kernels. See common.cuh.
#include "common.cuh"
