// Scalar reference of the packer: the definition the SIMD kernels are tested against.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "pack.hpp"
#include "numerics.hpp"

namespace kt {
namespace ref {

float int4_group_scale(const PackJob& job, int64_t row, int64_t group) {
  const uint8_t* p = job.scales + row * job.scale_row_bytes;
  if (job.scale_bits == 16) {
    uint16_t bits;
    std::memcpy(&bits, p + 2 * group, 2);
    return bf16_to_f32(bits);
  }
  float s;
  std::memcpy(&s, p + 4 * group, 4);
  return s;
}

int64_t decode_row(const PackJob& job, int64_t row, float* out) {
  const uint8_t* src = job.weight + row * job.weight_row_bytes;
  int64_t nonfinite = 0;
  for (int64_t j = 0; j < job.k; ++j) {
    const int64_t c = job.col0 + j;
    float v;
    switch (job.kind) {
      case SourceKind::BF16: {
        uint16_t bits;
        std::memcpy(&bits, src + 2 * c, 2);
        v = bf16_to_f32(bits);
        break;
      }
      case SourceKind::F32:
        std::memcpy(&v, src + 4 * c, 4);
        break;
      case SourceKind::MXFP4: {
        const uint8_t byte = src[c >> 1];
        const uint8_t nib = (c & 1) ? (byte >> 4) : (byte & 0x0F);
        const uint8_t e = job.scales[row * job.scale_row_bytes + (c >> 5)];
        v = kE2M1[nib] * e8m0_to_f32(e);
        break;
      }
      case SourceKind::F16: {
        uint16_t bits;
        std::memcpy(&bits, src + 2 * c, 2);
        v = round_to_bf16(f16_to_f32(bits));
        break;
      }
      case SourceKind::FP8_BLOCK: {
        const int64_t srow = (job.row_offset + row) / job.block_n;
        float s;
        std::memcpy(&s, job.scales + srow * job.scale_row_bytes + 4 * (c / job.block_k), 4);
        v = round_to_bf16(e4m3_to_f32(src[c]) * s);
        break;
      }
      case SourceKind::INT4_GROUP: {
        const uint8_t byte = src[c >> 1];  // little-endian words: element j of a word is nibble j
        const int32_t u = (c & 1) ? (byte >> 4) : (byte & 0x0F);
        v = round_to_bf16(static_cast<float>(u - 8) * int4_group_scale(job, row, c / job.block_k));
        break;
      }
      default:
        v = 0.f;
    }
    if (!is_finite_bits(v)) {
      v = 0.f;
      ++nonfinite;
    }
    out[j] = v;
  }
  return nonfinite;
}

float quantize_row(Method method, const float* x, int64_t k, int8_t* q) {
  uint32_t amax_bits = 0;
  for (int64_t j = 0; j < k; ++j) amax_bits = std::max(amax_bits, abs_bits(flush_subnormal(x[j])));
  const float d = row_scale(method, bits_to_f32(amax_bits));
  const float id = d != 0.f ? 1.0f / d : 0.f;  // d is 0 or normal, so 1/d is normal
  for (int64_t j = 0; j < k; ++j) {
    int32_t v = std::clamp(cvt_rne_i32(flush_subnormal(x[j]) * id), -128, 127);
    if (method == Method::Int4) v = round_4bit(v);
    q[j] = static_cast<int8_t>(v);
  }
  return d;
}

void pack_nibbles(const int8_t* q, int64_t k, uint8_t* out) {
  for (int64_t s = 0; s < k; s += 128)
    for (int j = 0; j < 64; ++j)
      out[s / 2 + j] = static_cast<uint8_t>((q[s + j] & 0x0F) | ((q[s + 64 + j] & 0x0F) << 4));
}

void tile_block(const uint8_t* rows, int64_t nbs, int64_t kbytes, int64_t kblock_bytes, uint8_t* out) {
  for (int64_t kb = 0; kb < kbytes; kb += kblock_bytes) {
    const int64_t kbs = std::min(kblock_bytes, kbytes - kb);
    for (int64_t ns = 0; ns < nbs; ns += TILE_ROWS)
      for (int64_t ks = 0; ks < kbs; ks += TILE_BYTES) {
        uint8_t* dst = out + kb * nbs + ns * kbs + ks * TILE_ROWS;
        // Each 16-row half is a 16x16 matrix of 32-bit words, stored transposed (AMX B tile).
        for (int h = 0; h < 2; ++h)
          for (int r = 0; r < 16; ++r)
            for (int c = 0; c < 16; ++c)
              std::memcpy(dst + h * 1024 + r * 64 + c * 4, rows + (ns + h * 16 + c) * kbytes + kb + ks + r * 4, 4);
      }
  }
}

}  // namespace ref
}  // namespace kt
