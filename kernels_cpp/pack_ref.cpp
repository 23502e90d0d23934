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

float nvfp4_group_scale(const PackJob& job, int64_t row, int64_t group) {
  const float s = e4m3_to_f32(job.scales[row * job.scale_row_bytes + group]);
  return job.global_divides ? s / job.global_scale : s * job.global_scale;
}

float nvfp4_value(const PackJob& job, int64_t row, int64_t c) {
  const uint8_t byte = job.weight[row * job.weight_row_bytes + (c >> 1)];
  const uint8_t nib = (c & 1) ? (byte >> 4) : (byte & 0x0F);
  return kE2M1[nib] * nvfp4_group_scale(job, row, c >> 4);
}

float mxfp8_value(const PackJob& job, int64_t row, int64_t c) {
  const uint8_t e = job.scales[row * job.scale_row_bytes + (c >> 5)];
  return e4m3_to_f32(job.weight[row * job.weight_row_bytes + c]) * e8m0_to_f32(e);
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
      case SourceKind::NVFP4:
        v = round_to_bf16(nvfp4_value(job, row, c));
        break;
      case SourceKind::MXFP8:
        v = round_to_bf16(mxfp8_value(job, row, c));
        break;
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
  for_each_tile_half(rows, nbs, kbytes, kblock_bytes, out, [kbytes](const uint8_t* src, uint8_t* dst) {
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) std::memcpy(dst + r * 64 + c * 4, src + c * kbytes + r * 4, 4);
  });
}

PackKernels kernels() {
  return {[](SourceKind) -> DecodeRowFn { return decode_row; }, quantize_row, pack_nibbles, tile_block, quantize_groups_row};
}

}  // namespace ref
}  // namespace kt
