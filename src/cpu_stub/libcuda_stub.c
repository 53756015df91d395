/*
 * libcuda_stub.c: a stand-in for the NVIDIA driver library (libcuda.so.1) on
 * machines that have no GPU.  lmcache-sgl's CPU development mode builds it
 * (gcc -shared -fPIC) into ~/.cache/lmcache-sgl/cpu-stub/ and puts that
 * directory first on LD_LIBRARY_PATH of the SGLang server only, so that the
 * CUDA-only sgl_kernel extension modules (which link against libcuda.so.1)
 * can be loaded.  Nothing is ever executed on a device: every driver entry
 * point reports CUDA_ERROR_NO_DEVICE (100), and output parameters are set to
 * "nothing" (0 / NULL) so a caller that ignores the status reads no garbage.
 *
 * The exported set covers the undefined cu* symbols of the installed
 * sgl_kernel and torch_memory_saver .so files (nm -D --undefined-only), plus
 * the entry points the CUDA runtime probes first.  Never build or load this
 * where a real driver exists.
 */
#include <stddef.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUstream;
typedef void *CUgreenCtx;
typedef unsigned long long CUdeviceptr;

#define CUDA_SUCCESS 0
#define CUDA_ERROR_NO_DEVICE 100

#define EXPORT __attribute__((visibility("default")))
/* A function that only reports "no device". */
#define NO_DEVICE(name) \
    EXPORT CUresult name() { return CUDA_ERROR_NO_DEVICE; }

/* ---- initialisation, version, devices ---------------------------------- */
EXPORT CUresult cuInit(unsigned int flags) {
    (void)flags;
    return CUDA_ERROR_NO_DEVICE;
}

EXPORT CUresult cuDriverGetVersion(int *version) {
    if (version) *version = 0;
    return CUDA_ERROR_NO_DEVICE;
}

EXPORT CUresult cuDeviceGetCount(int *count) {
    if (count) *count = 0;
    return CUDA_ERROR_NO_DEVICE;
}

EXPORT CUresult cuDeviceGet(CUdevice *dev, int ordinal) {
    (void)ordinal;
    if (dev) *dev = -1;
    return CUDA_ERROR_NO_DEVICE;
}

EXPORT CUresult cuDeviceGetAttribute(int *value, int attrib, CUdevice dev) {
    (void)attrib; (void)dev;
    if (value) *value = 0;
    return CUDA_ERROR_NO_DEVICE;
}

EXPORT CUresult cuCtxGetDevice(CUdevice *dev) {
    if (dev) *dev = -1;
    return CUDA_ERROR_NO_DEVICE;
}

/* ---- error strings: the one place that answers with text --------------- */
static const char kNoDevice[] =
    "no CUDA-capable device is detected (lmcache-sgl CPU stub libcuda)";

EXPORT CUresult cuGetErrorString(CUresult error, const char **str) {
    (void)error;
    if (str) *str = kNoDevice;
    return CUDA_ERROR_NO_DEVICE;
}

EXPORT CUresult cuGetErrorName(CUresult error, const char **str) {
    (void)error;
    if (str) *str = "CUDA_ERROR_NO_DEVICE";
    return CUDA_ERROR_NO_DEVICE;
}

/* ---- driver entry-point lookup: nothing is found ----------------------- */
EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int version,
                                 unsigned long long flags) {
    (void)symbol; (void)version; (void)flags;
    if (pfn) *pfn = NULL;
    return CUDA_ERROR_NO_DEVICE;
}

EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version,
                                    unsigned long long flags, int *status) {
    (void)symbol; (void)version; (void)flags;
    if (pfn) *pfn = NULL;
    if (status) *status = 1; /* CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND */
    return CUDA_ERROR_NO_DEVICE;
}

/* ---- contexts, streams, pointers ---------------------------------------- */
EXPORT CUresult cuStreamCreate(CUstream *stream, unsigned int flags) {
    (void)flags;
    if (stream) *stream = NULL;
    return CUDA_ERROR_NO_DEVICE;
}

EXPORT CUresult cuCtxPushCurrent_v2(CUcontext ctx) {
    (void)ctx;
    return CUDA_ERROR_NO_DEVICE;
}

EXPORT CUresult cuCtxPopCurrent_v2(CUcontext *ctx) {
    if (ctx) *ctx = NULL;
    return CUDA_ERROR_NO_DEVICE;
}

EXPORT CUresult cuPointerGetAttribute(void *data, int attribute, CUdeviceptr ptr) {
    (void)data; (void)attribute; (void)ptr;
    return CUDA_ERROR_NO_DEVICE;
}

/* ---- green contexts (sgl_kernel spatial_ops) ----------------------------- */
EXPORT CUresult cuCtxFromGreenCtx(CUcontext *ctx, CUgreenCtx green) {
    (void)green;
    if (ctx) *ctx = NULL;
    return CUDA_ERROR_NO_DEVICE;
}
NO_DEVICE(cuDevResourceGenerateDesc)
NO_DEVICE(cuDevSmResourceSplitByCount)
NO_DEVICE(cuDeviceGetDevResource)
NO_DEVICE(cuGreenCtxCreate)
NO_DEVICE(cuGreenCtxDestroy)
NO_DEVICE(cuGreenCtxGetDevResource)

/* ---- virtual memory management (torch_memory_saver) ---------------------- */
NO_DEVICE(cuMemAddressReserve)
NO_DEVICE(cuMemAddressFree)
NO_DEVICE(cuMemCreate)
NO_DEVICE(cuMemRelease)
NO_DEVICE(cuMemMap)
NO_DEVICE(cuMemUnmap)
NO_DEVICE(cuMemSetAccess)
NO_DEVICE(cuMemGetAllocationGranularity)
