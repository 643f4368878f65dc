// The s2o op schemas, declared once. Kernels are registered per device in cpu/ and cuda/; fake
// (meta) kernels for torch.compile live beside the Python wrappers in s2o/ops.py. The tuning
// arguments have no defaults here: their defaults live in s2o.S2OConfig alone. Shapes: query [B, Hq, Nq, D],
// key/value [B, Hkv, Nk, D]; H_ord is Hkv when order_per_kv_head else Hq; T is the total history
// length of all segments (csrc/include/s2o/layout.h).
#include <Python.h>
#include <torch/library.h>

#include "checks.h"
#include "s2o/limits.h"
#include "s2o/quantized_scores.h"

namespace {

// A tuple of dtype names as c10 spells them ("Float", "BFloat16", "Half").
template <size_t N>
PyObject* dtype_names(const at::ScalarType (&dtypes)[N]) {
  PyObject* names = PyTuple_New(N);
  for (size_t i = 0; names != nullptr && i < N; ++i) {
    PyTuple_SET_ITEM(names, i, PyUnicode_FromString(c10::toString(dtypes[i])));
  }
  return names;
}

int add_object(PyObject* module, const char* name, PyObject* value) {
  if (value == nullptr) return -1;
  if (PyModule_AddObject(module, name, value) < 0) {
    Py_DECREF(value);
    return -1;
  }
  return 0;
}

}  // namespace

// Importing s2o._C loads this library and with it the op registrations. The module holds no
// functions (no pybind11), only the kernels' limits (s2o/limits.py reads them).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (add_object(module, "CUDA_HEAD_DIMS",
                 Py_BuildValue("(ii)", s2o::kCudaHeadDims[0], s2o::kCudaHeadDims[1])) < 0 ||
      add_object(module, "CPU_DTYPES", dtype_names(s2o::kCpuDtypes)) < 0 ||
      add_object(module, "CUDA_DTYPES", dtype_names(s2o::kCudaDtypes)) < 0 ||
      PyModule_AddIntConstant(module, "CUDA_BLOCK_N", s2o::kCudaBlockN) < 0 ||
      PyModule_AddIntConstant(module, "CUDA_MAX_UNIT_ROWS", s2o::kCudaMaxUnitRows) < 0 ||
      PyModule_AddIntConstant(module, "CPU_MAX_HEAD_DIM", s2o::kCpuMaxHeadDim) < 0 ||
      PyModule_AddIntConstant(module, "COUNTING_RANK_BITS", s2o::kCountingRankBits) < 0 ||
      PyModule_AddIntConstant(module, "MAX_RANK_BITS", s2o::kMaxRankBits) < 0 ||
      PyModule_AddIntConstant(module, "SCORE_LEVELS", s2o::kScoreLevels) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

TORCH_LIBRARY(s2o, m) {
  // Per segment of segment_size query rows, the fp32 mean of its query rows (pooled over the G
  // query heads of a group when order_per_kv_head) and its dot product with every history key,
  // plus score_variance x scale (None: 1/sqrt(D)) times the rows' per-dimension variance dotted
  // with the key squared, both as exact integer products of quantised vectors
  // (s2o/quantized_scores.h). Returns scores [B, H_ord, T] fp32.
  m.def(
      "estimate_importance(Tensor query, Tensor key, int segment_size, int q_offset, bool is_causal, "
      "bool order_per_kv_head, float score_variance, float? scale) -> Tensor");
  // Per segment, the history keys ranked by falling score (top rank_bits bits of an
  // order-preserving integer map; ties: lower key index first). With ranked_keys > 0 only a prefix
  // is ranked: the ranked_keys best keys and every key tied with the last of them, then the rest in
  // index order (0: rank the whole history). scores [B, H_ord, T] fp32 -> indices [B, H_ord, T]
  // int32.
  m.def(
      "permute_indices(Tensor scores, int num_queries, int num_keys, int segment_size, int q_offset, "
      "bool is_causal, int rank_bits, int ranked_keys) -> Tensor");
  // Early-stopping sparse attention: per work unit (block_m query rows of one query head, or of
  // the G heads of a KV group together when group_units), the local keys densely with the causal
  // mask, then the history in tiles of block_n keys taken from `indices` in order, stopping once
  // max_row(tile mass / row mass) < threshold for `patience` tiles in a row (with tail_threshold,
  // also below tail_threshold / the history tiles left: csrc/include/s2o/stop_rule.h). Returns (out
  // [B, Hq, Nq, D] in query's dtype, lse [B, Hq, Nq] fp32, tile_counts [B, H_unit, ceil(Nq /
  // block_m)] int32 with H_unit = Hkv when group_units else Hq). unit_threshold [B, H_unit]
  // fp32 on query's device: per unit head, the threshold to use instead of `threshold`; a
  // negative entry skips the head's units (tile count 0, their out and lse rows left unwritten):
  // how s2o.attention recomputes the heads over its error budget without a host sync.
  m.def(
      "sparse_attention(Tensor query, Tensor key, Tensor value, Tensor indices, int segment_size, "
      "int q_offset, bool is_causal, bool order_per_kv_head, bool group_units, int block_m, "
      "int block_n, float threshold, int patience, float? tail_threshold, float? scale=None, "
      "Tensor? unit_threshold=None) -> (Tensor, Tensor, Tensor)");
}
