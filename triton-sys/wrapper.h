#include "triton/core/tritonbackend.h"
#include "triton/core/tritonserver.h"
