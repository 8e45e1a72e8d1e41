/* A trivial Triton backend, independent of triton-rust, for tools/soak/load_race.py: it
 * answers each request with its input INPUT0 (FP32) as OUTPUT0 and releases it. An
 * instance takes `IDENTITY_INIT_US` microseconds (environment variable, default 0) of
 * CPU time to initialize (a busy loop, as a real model's session creation keeps a core
 * busy).
 *
 * Build: c++ -shared -fPIC -O2 -I<triton include> identity.cc -o libtriton_identity.so
 * (the TRITONBACKEND and TRITONSERVER symbols come from tritonserver at run time). */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "triton/core/tritonbackend.h"

#define CHECK(call)                                                             \
  do {                                                                          \
    TRITONSERVER_Error* err__ = (call);                                         \
    if (err__ != NULL) {                                                        \
      failure = err__;                                                          \
      goto respond;                                                             \
    }                                                                           \
  } while (0)

static long init_us = 0;

extern "C" {

TRITONSERVER_Error* TRITONBACKEND_Initialize(TRITONBACKEND_Backend* backend) {
  (void)backend;
  const char* value = getenv("IDENTITY_INIT_US");
  init_us = value ? strtol(value, NULL, 10) : 0;
  return NULL;
}

TRITONSERVER_Error* TRITONBACKEND_ModelInstanceInitialize(TRITONBACKEND_ModelInstance* instance) {
  (void)instance;
  struct timespec start, now;
  clock_gettime(CLOCK_MONOTONIC, &start);
  do {
    clock_gettime(CLOCK_MONOTONIC, &now);
  } while ((now.tv_sec - start.tv_sec) * 1000000 + (now.tv_nsec - start.tv_nsec) / 1000 < init_us);
  return NULL;
}

TRITONSERVER_Error* TRITONBACKEND_ModelInstanceExecute(
    TRITONBACKEND_ModelInstance* instance, TRITONBACKEND_Request** requests,
    const uint32_t request_count) {
  (void)instance;
  for (uint32_t r = 0; r < request_count; ++r) {
    TRITONBACKEND_Request* request = requests[r];
    TRITONSERVER_Error* failure = NULL;
    TRITONBACKEND_Response* response = NULL;
    TRITONSERVER_Error* created = TRITONBACKEND_ResponseNew(&response, request);
    if (created != NULL) {
      TRITONSERVER_ErrorDelete(created);
      TRITONBACKEND_RequestRelease(request, TRITONSERVER_REQUEST_RELEASE_ALL);
      continue;
    }
    {
      TRITONBACKEND_Input* input;
      const int64_t* shape;
      uint32_t dims, buffers;
      uint64_t bytes;
      CHECK(TRITONBACKEND_RequestInput(request, "INPUT0", &input));
      CHECK(TRITONBACKEND_InputProperties(input, NULL, NULL, &shape, &dims, &bytes, &buffers));
      TRITONBACKEND_Output* output;
      CHECK(TRITONBACKEND_ResponseOutput(response, &output, "OUTPUT0", TRITONSERVER_TYPE_FP32, shape, dims));
      void* out;
      TRITONSERVER_MemoryType out_type = TRITONSERVER_MEMORY_CPU;
      int64_t out_id = 0;
      CHECK(TRITONBACKEND_OutputBuffer(output, &out, bytes, &out_type, &out_id));
      size_t offset = 0;
      for (uint32_t b = 0; b < buffers; ++b) {
        const void* in;
        uint64_t size;
        TRITONSERVER_MemoryType in_type = TRITONSERVER_MEMORY_CPU;
        int64_t in_id = 0;
        CHECK(TRITONBACKEND_InputBuffer(input, b, &in, &size, &in_type, &in_id));
        memcpy((char*)out + offset, in, size);
        offset += size;
      }
    }
  respond:
    TRITONBACKEND_ResponseSend(response, TRITONSERVER_RESPONSE_COMPLETE_FINAL, failure);
    if (failure != NULL) {
      TRITONSERVER_ErrorDelete(failure);
    }
    TRITONBACKEND_RequestRelease(request, TRITONSERVER_REQUEST_RELEASE_ALL);
  }
  return NULL;
}

}  // extern "C"
