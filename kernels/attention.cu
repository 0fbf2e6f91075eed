// attention kernels. See common.cuh.
#include "common.cuh"
