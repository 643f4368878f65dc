// The s2o op schemas, declared once. Kernels are registered per device in cpu/ and cuda/; fake
// (meta) kernels for torch.compile live in s2o/_meta.py. Shapes: query [B, Hq, Nq, D],
// key/value [B, Hkv, Nk, D]; H_ord is Hkv when order_per_kv_head else Hq; T is the total history
// length of all segments (csrc/include/s2o/layout.h).
#include <Python.h>
#include <torch/library.h>

// Importing s2o._C loads this library and with it the op registrations; the module itself is
// empty (no pybind11).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(s2o, m) {
  // Per segment of segment_size query rows, the fp32 mean of its query rows (pooled over the G
  // query heads of a group when order_per_kv_head) and its dot product with every history key,
  // plus variance_weight times the rows' per-dimension variance dotted with the key squared.
  // Returns (representatives [B, H_ord, num_segments, D] fp32, scores [B, H_ord, T] fp32).
  m.def(
      "estimate_importance(Tensor query, Tensor key, int segment_size, int q_offset, bool is_causal, "
      "bool order_per_kv_head, float variance_weight=0.0) -> (Tensor, Tensor)");
  // Per segment, the history keys ranked by falling score (top rank_bits bits of an
  // order-preserving integer map; ties: lower key index first). With rank_head > 0 only the head
  // is ranked: the rank_head best keys and every key tied with the last of them, then the rest in
  // index order (0: rank the whole history). scores [B, H_ord, T] fp32 -> indices [B, H_ord, T]
  // int32.
  m.def(
      "permute_indices(Tensor scores, int num_queries, int num_keys, int segment_size, int q_offset, "
      "bool is_causal, int rank_bits=32, int rank_head=0) -> Tensor");
  // Early-stopping sparse attention: per work unit (block_m query rows of one query head, or of
  // the G heads of a KV group together when group_units), the local keys densely with the causal
  // mask, then the history in tiles of block_n keys taken from `indices` in order, stopping once
  // max_row(tile mass / row mass) < threshold for `patience` tiles in a row (with tail_threshold,
  // also below tail_threshold / the history tiles left: csrc/include/s2o/stop_rule.h). Returns (out
  // [B, Hq, Nq, D] in query's dtype, lse [B, Hq, Nq] fp32, tile_counts [B, H_unit, ceil(Nq /
  // block_m)] int32 with H_unit = Hkv when group_units else Hq). row_order (CPU only; the
  // paper's query permutation) [B, Hq, Nq] int32: per query head, the order of each segment's
  // rows, so that query tile t of a segment takes its rows row_order[t * block_m : (t+1) *
  // block_m]; None: rows in order. unit_threshold [B, H_unit] fp32 on query's device: per
  // unit head, the threshold to use instead of `threshold`; a negative entry skips the head's
  // units (tile count 0, their out and lse rows left unwritten): how s2o.attention recomputes
  // the heads over its error budget without a host sync.
  m.def(
      "sparse_attention(Tensor query, Tensor key, Tensor value, Tensor indices, int segment_size, "
      "int q_offset, bool is_causal, bool order_per_kv_head, bool group_units, int block_m, "
      "int block_n, float threshold, int patience=1, float? scale=None, Tensor? row_order=None, "
      "Tensor? unit_threshold=None, float? tail_threshold=None) -> (Tensor, Tensor, Tensor)");
}
