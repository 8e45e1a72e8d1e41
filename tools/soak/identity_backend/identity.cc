/* A trivial Triton backend, independent of triton-rust, for tools/soak/load_race.py and
 * tests/test_router.py: it answers each request with its input INPUT0 (FP32) as output
 * OUTPUT0 and, if the model has it, output TIMEOUT_US (UINT64, [1]) holding the request's
 * timeout in microseconds (0: none), then releases it. A version whose directory holds a
 * file `delay_us` (a number) answers each request that many microseconds late: a
 * deliberately slower version for the router's tests. An
 * instance takes `IDENTITY_INIT_US` microseconds (environment variable, default 0) of
 * CPU time to initialize (a busy loop, as a real model's session creation keeps a core
 * busy). With `IDENTITY_TRIM_ON_FINALIZE=1` a model's finalization returns freed memory
 * to the system (`malloc_trim(0)`), as libtriton_rust.so's does.
 *
 * Build: c++ -shared -fPIC -O2 -I<triton include> identity.cc -o libtriton_identity.so
 * (the TRITONBACKEND and TRITONSERVER symbols come from tritonserver at run time). */
#include <malloc.h>
#include <stdio.h>
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
static int trim_on_finalize = 0;

extern "C" {

TRITONSERVER_Error* TRITONBACKEND_Initialize(TRITONBACKEND_Backend* backend) {
  (void)backend;
  const char* value = getenv("IDENTITY_INIT_US");
  init_us = value ? strtol(value, NULL, 10) : 0;
  const char* trim = getenv("IDENTITY_TRIM_ON_FINALIZE");
  trim_on_finalize = trim != NULL && strcmp(trim, "1") == 0;
  return NULL;
}

/* Reads <repository>/<version>/delay_us, if present, into the model's state. */
TRITONSERVER_Error* TRITONBACKEND_ModelInitialize(TRITONBACKEND_Model* model) {
  const char* location;
  TRITONBACKEND_ArtifactType type;
  TRITONSERVER_Error* err = TRITONBACKEND_ModelRepository(model, &type, &location);
  uint64_t version = 0;
  if (err == NULL) err = TRITONBACKEND_ModelVersion(model, &version);
  if (err != NULL) return err;
  char path[4096];
  snprintf(path, sizeof(path), "%s/%llu/delay_us", location, (unsigned long long)version);
  long* delay_us = (long*)calloc(1, sizeof(long));
  FILE* file = fopen(path, "r");
  if (file != NULL) {
    if (fscanf(file, "%ld", delay_us) != 1) *delay_us = 0;
    fclose(file);
  }
  return TRITONBACKEND_ModelSetState(model, delay_us);
}

TRITONSERVER_Error* TRITONBACKEND_ModelFinalize(TRITONBACKEND_Model* model) {
  void* state = NULL;
  if (TRITONBACKEND_ModelState(model, &state) == NULL) free(state);
  if (trim_on_finalize) {
    malloc_trim(0);
  }
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

/* Output `name` (OUTPUT0): input INPUT0, every buffer of it. */
static TRITONSERVER_Error* identity_output(
    TRITONBACKEND_Request* request, TRITONBACKEND_Response* response, const char* name) {
  TRITONBACKEND_Input* input;
  const int64_t* shape;
  uint32_t dims, buffers;
  uint64_t bytes;
  TRITONSERVER_Error* err = TRITONBACKEND_RequestInput(request, "INPUT0", &input);
  if (err == NULL) err = TRITONBACKEND_InputProperties(input, NULL, NULL, &shape, &dims, &bytes, &buffers);
  TRITONBACKEND_Output* output;
  if (err == NULL) err = TRITONBACKEND_ResponseOutput(response, &output, name, TRITONSERVER_TYPE_FP32, shape, dims);
  void* out;
  TRITONSERVER_MemoryType out_type = TRITONSERVER_MEMORY_CPU;
  int64_t out_id = 0;
  if (err == NULL) err = TRITONBACKEND_OutputBuffer(output, &out, bytes, &out_type, &out_id);
  size_t offset = 0;
  for (uint32_t b = 0; err == NULL && b < buffers; ++b) {
    const void* in;
    uint64_t size;
    TRITONSERVER_MemoryType in_type = TRITONSERVER_MEMORY_CPU;
    int64_t in_id = 0;
    err = TRITONBACKEND_InputBuffer(input, b, &in, &size, &in_type, &in_id);
    if (err == NULL) {
      memcpy((char*)out + offset, in, size);
      offset += size;
    }
  }
  return err;
}

/* Output TIMEOUT_US (UINT64, [1]): the request's timeout as Triton's scheduler has it, so
 * a test sees what reached a model behind a router. */
static TRITONSERVER_Error* timeout_output(TRITONBACKEND_Request* request, TRITONBACKEND_Response* response) {
  uint64_t timeout_us = 0;
  TRITONSERVER_Error* err = TRITONBACKEND_InferenceRequestTimeoutMicroseconds(request, &timeout_us);
  TRITONBACKEND_Output* output;
  const int64_t shape[1] = {1};
  if (err == NULL) err = TRITONBACKEND_ResponseOutput(response, &output, "TIMEOUT_US", TRITONSERVER_TYPE_UINT64, shape, 1);
  void* out;
  TRITONSERVER_MemoryType out_type = TRITONSERVER_MEMORY_CPU;
  int64_t out_id = 0;
  if (err == NULL) err = TRITONBACKEND_OutputBuffer(output, &out, sizeof(timeout_us), &out_type, &out_id);
  if (err == NULL) memcpy(out, &timeout_us, sizeof(timeout_us));
  return err;
}

TRITONSERVER_Error* TRITONBACKEND_ModelInstanceExecute(
    TRITONBACKEND_ModelInstance* instance, TRITONBACKEND_Request** requests,
    const uint32_t request_count) {
  TRITONBACKEND_Model* model = NULL;
  void* state = NULL;
  long delay_us = 0;
  if (TRITONBACKEND_ModelInstanceModel(instance, &model) == NULL &&
      TRITONBACKEND_ModelState(model, &state) == NULL && state != NULL) {
    delay_us = *(long*)state;
  }
  if (delay_us > 0) {
    struct timespec pause = {delay_us / 1000000, (delay_us % 1000000) * 1000};
    nanosleep(&pause, NULL);
  }
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
      uint32_t outputs;
      CHECK(TRITONBACKEND_RequestOutputCount(request, &outputs));
      for (uint32_t o = 0; o < outputs; ++o) {
        const char* name;
        CHECK(TRITONBACKEND_RequestOutputName(request, o, &name));
        if (strcmp(name, "TIMEOUT_US") == 0) {
          CHECK(timeout_output(request, response));
        } else {
          CHECK(identity_output(request, response, name));
        }
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
