// fusedrnn._C_cuda: the recurrence ops (no suffix; schemas in fusedrnn/schema.py)
// implemented for the CUDA dispatch key by the fused kernels of csrc/cuda/kernels/,
// enqueued on the current stream of the tensors' device. Host code only (g++): the
// kernels live in the .cu files, which include no torch headers.
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#define FRNN_STREAM() (static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()))
#define FRNN_DEVICE_GUARD(t) c10::cuda::CUDAGuard frnn_device_guard_((t).device())
#include "cuda/glue.h"

namespace g = fusedrnn::glue;

TORCH_LIBRARY_IMPL(fusedrnn, CUDA, m) {
  m.impl("lstm_forward", &g::lstm_forward);
  m.impl("lstm_backward", &g::lstm_backward);
  m.impl("gru_forward", &g::gru_forward);
  m.impl("gru_backward", &g::gru_backward);
  m.impl("rnn_forward", &g::rnn_forward);
  m.impl("rnn_backward", &g::rnn_backward);
}

// Importing the module runs the registration above. Python API: the algorithm switch
// (csrc/cuda/api.h; fusedrnn.backends.native.set_cuda_algo / last_cuda_algo) and whether
// the build runs on a device (kernel_image_missing).
static PyObject* frnn_set_algo(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (!name) return nullptr;
  try {
    fusedrnn::cuda::set_algo(name);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}
static PyObject* frnn_get_algo(PyObject*, PyObject*) {
  return PyUnicode_FromString(fusedrnn::cuda::algo_name(fusedrnn::cuda::get_algo()));
}
static PyObject* frnn_last_algo(PyObject*, PyObject*) {
  return PyUnicode_FromString(fusedrnn::cuda::last_algo().c_str());
}
static PyObject* frnn_kernel_image_missing(PyObject*, PyObject* arg) {
  const long dev = PyLong_AsLong(arg);
  if (dev == -1 && PyErr_Occurred()) return nullptr;
  return PyUnicode_FromString(fusedrnn::cuda::kernel_image_missing(static_cast<int>(dev)).c_str());
}
static PyMethodDef frnn_methods[] = {
    {"kernel_image_missing", frnn_kernel_image_missing, METH_O,
     "why this build cannot run on CUDA device N (compute capability), or '' if it can"},
    {"set_algo", frnn_set_algo, METH_O, "'auto' | 'per_step' | 'persistent'"},
    {"get_algo", frnn_get_algo, METH_NOARGS, "the current algorithm switch"},
    {"last_algo", frnn_last_algo, METH_NOARGS, "the algorithm the latest call chose, and why"},
    {nullptr, nullptr, 0, nullptr}};
static PyModuleDef frnn_module = {PyModuleDef_HEAD_INIT, "_C_cuda", "fusedrnn CUDA kernels", -1, frnn_methods};
PyMODINIT_FUNC PyInit__C_cuda() { return PyModule_Create(&frnn_module); }
