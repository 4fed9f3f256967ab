// A minimal Python extension module: importing umm_ops._C loads this shared library, whose static
// initialisers register the umm_ops torch ops (TORCH_LIBRARY).  No pybind11, no libtorch_python.
//
// It also holds one plain CPython function, the host half of SpanLayout.from_segments: walking a list of
// documents of (length, mode) pairs costs ~40 us in Python for 64 documents and ~2 us here.
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <c10/util/Exception.h>

#include "cpu/kernels.h"

namespace {

// mode string -> 0 causal / 1 full / 2 noise, -1 unknown
int span_mode_code(PyObject* s) {
  if (!PyUnicode_Check(s)) return -1;
  if (PyUnicode_CompareWithASCIIString(s, "causal") == 0) return 0;
  if (PyUnicode_CompareWithASCIIString(s, "full") == 0) return 1;
  if (PyUnicode_CompareWithASCIIString(s, "noise") == 0) return 2;
  return -1;
}

// A Python int (not bool) that fits in int64; false otherwise (no exception left set).
bool as_int(PyObject* o, long long* out) {
  if (!PyLong_CheckExact(o)) return false;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow || (v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  *out = v;
  return true;
}

// span_layout_host(docs, q_lens) -> (bytearray, D+1, S, max_q, max_k, total_q, total_k) or None.
// The bytearray holds int32 cu_q, cu_k, seg_offsets (D+1 each), seg_start, seg_end, seg_mode (S each).
// None means "not the plain well-formed case": the caller re-runs its Python checks for the precise error
// (and handles anything exotic), so this function never has to phrase an error message.
PyObject* span_layout_host(PyObject*, PyObject* args) {
  PyObject *docs, *q_lens;
  if (!PyArg_ParseTuple(args, "OO", &docs, &q_lens)) return nullptr;
  if (!PyList_CheckExact(docs) && !PyTuple_CheckExact(docs)) Py_RETURN_NONE;
  const Py_ssize_t D = PySequence_Fast_GET_SIZE(docs);
  if (D == 0) Py_RETURN_NONE;
  const bool has_q = q_lens != Py_None;
  if (has_q && ((!PyList_CheckExact(q_lens) && !PyTuple_CheckExact(q_lens)) ||
                PySequence_Fast_GET_SIZE(q_lens) != D))
    Py_RETURN_NONE;
  Py_ssize_t S = 0;
  for (Py_ssize_t d = 0; d < D; ++d) {
    PyObject* doc = PySequence_Fast_GET_ITEM(docs, d);
    if (!PyList_CheckExact(doc) && !PyTuple_CheckExact(doc)) Py_RETURN_NONE;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(doc);
    if (n == 0) Py_RETURN_NONE;
    S += n;
  }
  std::vector<int32_t> buf(3 * (D + 1) + 3 * S);
  int32_t* cu_q = buf.data();
  int32_t* cu_k = cu_q + (D + 1);
  int32_t* offs = cu_k + (D + 1);
  int32_t* st = offs + (D + 1);
  int32_t* en = st + S;
  int32_t* mo = en + S;
  constexpr long long kMax = INT32_MAX;
  long long pos = 0, qpos = 0, max_q = 0, max_k = 0;
  Py_ssize_t s = 0;
  cu_q[0] = cu_k[0] = offs[0] = 0;
  for (Py_ssize_t d = 0; d < D; ++d) {
    PyObject* doc = PySequence_Fast_GET_ITEM(docs, d);
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(doc);
    const long long doc_start = pos;
    for (Py_ssize_t j = 0; j < n; ++j, ++s) {
      PyObject* seg = PySequence_Fast_GET_ITEM(doc, j);
      if ((!PyList_CheckExact(seg) && !PyTuple_CheckExact(seg)) || PySequence_Fast_GET_SIZE(seg) != 2)
        Py_RETURN_NONE;
      long long len;
      if (!as_int(PySequence_Fast_GET_ITEM(seg, 0), &len) || len <= 0 || len > kMax - pos) Py_RETURN_NONE;
      const int mode = span_mode_code(PySequence_Fast_GET_ITEM(seg, 1));
      if (mode < 0) Py_RETURN_NONE;
      st[s] = int32_t(pos);
      pos += len;
      en[s] = int32_t(pos);
      mo[s] = mode;
    }
    const long long len_k = pos - doc_start;
    long long len_q = len_k;
    if (has_q && (!as_int(PySequence_Fast_GET_ITEM(q_lens, d), &len_q) || len_q < 0 || len_q > len_k))
      Py_RETURN_NONE;
    qpos += len_q;
    cu_k[d + 1] = int32_t(pos);
    cu_q[d + 1] = int32_t(qpos);
    offs[d + 1] = int32_t(s);
    if (len_k > max_k) max_k = len_k;
    if (len_q > max_q) max_q = len_q;
  }
  PyObject* bytes = PyByteArray_FromStringAndSize(reinterpret_cast<const char*>(buf.data()),
                                                  Py_ssize_t(buf.size() * sizeof(int32_t)));
  if (bytes == nullptr) return nullptr;
  return Py_BuildValue("NnnLLLL", bytes, D + 1, S, max_q, max_k, qpos, pos);
}

PyObject* str_list(const std::vector<std::string>& v) {
  PyObject* out = PyList_New(Py_ssize_t(v.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < v.size(); ++i) PyList_SET_ITEM(out, Py_ssize_t(i), PyUnicode_FromString(v[i].c_str()));
  return out;
}

PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(umm::cpu::cpu_isa().c_str());
  } catch (const c10::Error& e) {  // a bad UMM_CPU_ISA in the environment
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}
PyObject* cpu_isas(PyObject*, PyObject*) { return str_list(umm::cpu::cpu_isas()); }
PyObject* cpu_isas_built(PyObject*, PyObject*) { return str_list(umm::cpu::cpu_isas_built()); }
PyObject* set_cpu_isa(PyObject*, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  try {
    umm::cpu::set_cpu_isa(name);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef umm_ops_c_methods[] = {
    {"span_layout_host", span_layout_host, METH_VARARGS,
     "span_layout_host(docs, q_lens) -> (bytearray of int32 layout tensors, D+1, S, max_q, max_k, total_q, "
     "total_k), or None when the input is not the plain well-formed case"},
    {"cpu_isa", cpu_isa, METH_NOARGS, "cpu_isa() -> the instruction-set variant the CPU kernels run"},
    {"cpu_isas", cpu_isas, METH_NOARGS, "cpu_isas() -> the built variants this CPU supports, narrowest first"},
    {"cpu_isas_built", cpu_isas_built, METH_NOARGS, "cpu_isas_built() -> the variants compiled into this module"},
    {"set_cpu_isa", set_cpu_isa, METH_VARARGS, "set_cpu_isa(name) -> None; name one of cpu_isas() or 'auto'"},
    {nullptr, nullptr, 0, nullptr}};

struct PyModuleDef umm_ops_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                       "umm_ops compiled kernels (registered as torch.ops.umm_ops.*)", -1,
                                       umm_ops_c_methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&umm_ops_c_module); }
