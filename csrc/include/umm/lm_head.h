// Torch-free params and shared math of the LM-head ops (issue 19): linear_cross_entropy and linear_logprob.
// Executable contract: umm_ops/reference/kernels.py; conventions: umm_ops/reference/lm_head.py.
//
// Rows i of hidden (N, D), vocabulary V, weight (V, D), bias (V,) or none.  Logits z = h W^T + b, then
//   z' = scale z                           (scale = 1 / temperature for the log-probs, 1 for the cross-entropy)
//   z' = softcap tanh(z' / softcap)        (when softcap > 0; the cross-entropy's Gemma-2 cap)
// Per row: m = max_j z'_j, e_j = exp(z'_j - m), s = sum_j e_j, lse = m + log s, p_j = e_j / s,
//   cross-entropy of a labelled row (t != ignore_index):
//     loss = lse - (1 - eps) z'_t - eps mean_j z'_j + z_loss lse^2        (0 for an ignored row)
//   log-prob: lp = z'_t - lse;  entropy H = lse - S with S = sum_j p_j z'_j.
// Gradient of the raw logits (per row, g its upstream gradient), as d/dz'_j = A p_j + B [j == t] + C + E p_j z'_j:
//   cross-entropy:  A = g (1 + 2 z_loss lse),  B = -g (1 - eps),  C = -g eps / V,  E = 0      (g = 0 if ignored)
//   log-prob (+ entropy with upstream gH):  A = -g + gH S,  B = g,  C = 0,  E = -gH
//   (dH/dz'_j = -p_j (z'_j - S);  S = lse - H is recomputed from the saved entropy)
//   then dz_j = dz'_j * (1 - (z'_j / softcap)^2 when capped) * scale.
// The GEMMs (z = h W^T + b per block of rows, dh = dz W, dW += dz^T h) are not here: the torch glue runs them
// (csrc/torch/lm_head_ops.cpp); the row pass below is everything between them, fused.
#pragma once
#include <cstdint>

#include "umm/params.h"

namespace umm {

enum class LmHeadLoss : int { kCrossEntropy = 0, kLogprob = 1 };

struct LmHeadCoef {
  float A, B, C, E;
};

UMM_HD LmHeadCoef lm_head_ce_coef(float g, float lse, float label_smoothing, float z_loss, int64_t V) {
  return LmHeadCoef{g * (1.f + 2.f * z_loss * lse), -g * (1.f - label_smoothing), -g * label_smoothing / float(V),
                    0.f};
}

UMM_HD LmHeadCoef lm_head_logprob_coef(float g, float g_entropy, float S) {
  return LmHeadCoef{-g + g_entropy * S, g, 0.f, -g_entropy};
}

// One block of rows of logits, in place.  z: (rows, V) in the activation dtype, holding h W^T + b on entry; when a
// gradient is computed it holds dz (the gradient of the raw logits, same dtype) on exit.
//   forward (backward == false): writes lse[i], out[i] (cross-entropy loss / log-prob), entropy[i] when non-null;
//     with fused_grad (the cross-entropy's "sum" / "mean" gradient in the forward) also writes dz with
//     g = grad_scale for every labelled row (grad_scale 0 when no row is labelled: dz = 0).
//   backward (backward == true): reads lse[i] (and entropy[i] when grad_entropy is given) and writes dz with
//     g = grad[i] (and gH = grad_entropy[i]).
// targets[i]: the class of row i; a value outside [0, V) has no target term (the cross-entropy's ignored rows
// also have g = 0 and loss 0: target == ignore_index).  The torch glue has checked every target.
struct LmHeadRowsParams {
  void* z;
  int64_t rows, V;
  const int64_t* targets;
  int64_t ignore_index;
  int loss;  // LmHeadLoss
  float scale, softcap;
  float label_smoothing, z_loss;
  bool backward;
  float* lse;
  float* out;
  float* entropy;
  bool fused_grad;
  float grad_scale;
  const float* grad;
  const float* grad_entropy;
};

// acc[j] += sum_i z[i, j] over the rows of a block (rows in order, float32): the bias gradient, chunk by chunk.
struct LmHeadColsumParams {
  const void* z;
  int64_t rows, V;
  float* acc;
};

}  // namespace umm
