// Group-wise INT4 engine pieces for the baseline x86-64: the reference kernels (the definitions the SIMD
// kernels are tested against: exact int32 group sums, their float product, the rows' preparation, the GEMM
// as their composition) and the down step every ISA shares (moe_group.hpp). Built without FMA, so a*b+c is
// never contracted.
#include <algorithm>
#include <cstring>
#include <vector>

#include "moe_group.hpp"
#include "numerics.hpp"

namespace kt {
namespace moe {
namespace ref {

void group_dot(const uint8_t* w, int64_t k, int64_t group, int64_t r0, const int8_t* a, int64_t lda,
               const int8_t* split, const int32_t* corr, int64_t m, int32_t* gsum, bool /*same_rows*/) {
  const int64_t G = k / group;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < G; ++g)
      for (int j = 0; j < 32; ++j) {
        const uint8_t* row = w + (r0 + j) * (k / 2);
        int32_t s = 0;
        for (int64_t c = g * group; c < (g + 1) * group; ++c) {
          const int32_t u = (c & 1) ? (row[c >> 1] >> 4) : (row[c >> 1] & 0x0F);
          s += (u - 8) * a[i * lda + c];
        }
        gsum[(i * G + g) * 32 + j] = s;
      }
}

void group_scale(const int32_t* gsum, const uint16_t* st, int64_t G, float* P) {
  float acc[32];
  for (int j = 0; j < 32; ++j) acc[j] = 0.0f;
  for (int64_t g = 0; g < G; ++g)
    for (int j = 0; j < 32; ++j) acc[j] = acc[j] + static_cast<float>(gsum[g * 32 + j]) * bf16_to_f32(st[g * 32 + j]);
  std::memcpy(P, acc, sizeof(acc));
}

void group_prepare(const int8_t* a, int64_t lda, int64_t m, int64_t k, int64_t group, int8_t* split, int32_t* corr) {
  const int64_t G = k / group;
  for (int64_t i = 0; i < m; ++i) {
    const int8_t* ai = a + i * lda;
    int8_t* e = split + i * k;
    for (int64_t c = 0; c < k / 2; ++c) {
      e[c] = ai[2 * c];
      e[k / 2 + c] = ai[2 * c + 1];
    }
    for (int64_t g = 0; g < G; ++g) {
      int32_t sum = 0;
      for (int64_t c = g * group; c < (g + 1) * group; ++c) sum += ai[c];
      corr[i * G + g] = 8 * sum;
    }
  }
}

void group_gemm(const uint8_t* w, const uint16_t* st, int64_t k, int64_t group, int64_t r0, const int8_t* a,
                int64_t lda, const int8_t* split, const int32_t* corr, int64_t m, float* P) {
  group_product(group_dot, group_scale, w, st, k, group, r0, a, lda, split, corr, m, P);
}

}  // namespace ref

void group_scales_by_rowgroup(const uint16_t* s, int64_t n, int64_t G, uint16_t* out) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t g = 0; g < G; ++g) out[((r / 32) * G + g) * 32 + r % 32] = s[r * G + g];
}

void group_product(GroupDotFn dot, GroupScaleFn scale, const uint8_t* w, const uint16_t* st, int64_t k, int64_t group,
                   int64_t r0, const int8_t* a, int64_t lda, const int8_t* split, const int32_t* corr, int64_t m,
                   float* P) {
  const int64_t G = k / group;
  thread_local std::vector<int32_t> gsum;
  gsum.resize(static_cast<size_t>(16 * G * 32));
  const uint16_t* sr = st + (r0 / 32) * G * 32;
  for (int64_t i0 = 0; i0 < m; i0 += 16) {
    const int64_t mb = std::min<int64_t>(16, m - i0);
    dot(w, k, group, r0, a + i0 * lda, lda, split ? split + i0 * k : nullptr, corr ? corr + i0 * G : nullptr, mb,
        gsum.data(), i0 > 0);
    for (int64_t i = 0; i < mb; ++i) scale(gsum.data() + i * G * 32, sr, G, P + (i0 + i) * 32);
  }
}

void group_down(const float* p, int64_t m, const float* ad, float* y, int64_t ys, bool first) {
  for (int64_t i = 0; i < m; ++i)
    for (int j = 0; j < 32; ++j) y[i * ys + j] = (first ? 0.0f : y[i * ys + j]) + p[i * 32 + j] * ad[i];
}

}  // namespace moe
}  // namespace kt
