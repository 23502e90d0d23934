// Group-wise INT4 (kt's RAWINT4) quantizer, the reference: for each group of a row, the bf16 scale with the
// least squared error over the levels -7..7, and the codes; or, for a source already on the output's grid, its
// codes and scales carried over (every ISA). The band of candidate scales is shared: the SIMD rows
// (pack_avx2.cpp, pack_avx512.cpp) try every candidate of it where this sweeps events, and the error being
// exact, find the same scale (docs/FORMAT.md §9).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "numerics.hpp"
#include "pack.hpp"

namespace kt {
namespace ref {

namespace {

constexpr int kMaxLevel = 7;  // codes -7..7: kt's RAWINT4 kernels compute -8 wrongly (docs/FORMAT.md §9)
constexpr int kMaxGroup = 128;
// The candidate scales lie within the bf16 values from amax/64 to 2 amax (bit patterns, which order positive
// values); the search narrows that per group with two bounds (below).
constexpr uint32_t kBelow = 6 * 128, kAbove = 128, kMaxBf16 = 0x7F7F;
constexpr int kCandidates = kBelow + kAbove + 1;
constexpr int kSpare = kCandidates, kSlots = kCandidates + 7;  // spare slots take the events outside them
constexpr int kMaskWords = (kSlots + 63) / 64;
constexpr int kHalfOctaves = 16;

inline uint32_t bf16_bits(float f) { return f32_to_bits(f) >> 16; }
inline uint32_t bf16_ceil_bits(float f) { const uint32_t u = f32_to_bits(f); return (u >> 16) + ((u & 0xFFFFu) != 0); }
inline double bf16_value(uint32_t bits) { return static_cast<double>(bf16_to_f32(static_cast<uint16_t>(bits))); }

// F(p) = SSE(p) - sum a^2 = p * (p * Q - 2 * S), S = sum a q, Q = sum q^2: exact in double for the candidate
// scales (a few dozen significant bits), so every implementation compares the same numbers.
inline double excess(double p, double s, double q) { return p * (p * q - 2.0 * s); }

// The code of one weight at scale d: clamp(rint_even(x / d), -7, 7). The float quotient decides like the exact
// one: x and d are bf16 (8 significant bits), so x / d is a half-integer exactly or at least 2^-13 (relative)
// away from one, far more than float's rounding. Rounded by adding and subtracting 1.5 * 2^23 (round to
// nearest even in the IEEE default mode the packer runs under, MxcsrGuard; |x / d| <= 128 here).
inline float level(float x, float d) {
  constexpr float kShift = 0x1.8p23f;
  const float r = (x / d + kShift) - kShift;
  return std::clamp(r, -static_cast<float>(kMaxLevel), static_cast<float>(kMaxLevel));
}

}  // namespace

// Below: a scale with 7p < amax errs by (amax - 7p)^2 on the largest weight alone, so p >= (amax - sqrt(B)) / 7;
// and p >= amax/64 for groups of up to 128 (docs/FORMAT.md §9). Above: from 2 amax on every code is 0.
uint32_t scale_floor_bits(float amax, double sse_bound) {
  const uint32_t top = bf16_bits(amax);
  uint32_t lo = top > kBelow ? top - kBelow : 1;
  const double below = (amax - std::sqrt(sse_bound)) / 7.0 * (1.0 - 1e-12);
  if (below > bf16_value(lo)) lo = std::max(lo, bf16_bits(static_cast<float>(below * (1.0 - 0x1p-20))));
  return lo;
}

uint32_t scale_ceiling_bits(float amax) { return std::min(kMaxBf16, bf16_bits(amax) + kAbove); }

namespace {

// The bf16 scales (bit patterns lo..hi, hi >= lo) the least-error scale of a group can be; first: amax/7 rounded
// up, first_excess: its F (exact). The candidates are limited to where the least error can be, from SSE0, the
// error of first (docs/FORMAT.md §9):
//   below: for 7p < amax the largest weight alone errs by (amax - 7p)^2, so p >= (amax - sqrt(SSE0)) / 7;
//   above: for p >= 2 a every weight up to a gets code 0, so p < 2 a_k where the squares of the k smallest
//   weights first sum past SSE0.
struct ScaleBand {
  uint32_t lo, hi, first;
  double first_excess;
};

ScaleBand least_squares_band(const float* a, int64_t g, float amax) {
  const uint32_t top = bf16_bits(amax);  // amax is bf16-exact
  const uint32_t first = bf16_ceil_bits(amax / 7.0f);  // the smallest scale that clips nothing
  double sse0 = 0.0, s0 = 0.0, q0 = 0.0;
  const double p0 = bf16_value(first);
  for (int64_t j = 0; j < g; ++j) {
    const double c = level(a[j], static_cast<float>(p0)), e = a[j] - c * p0;
    sse0 += e * e;
    s0 += a[j] * c;
    q0 += c * c;
  }
  const double bound = sse0 * (1.0 + 1e-12);  // above any rounding of the sum
  const uint32_t lo = scale_floor_bits(amax, bound);
  uint32_t hi = scale_ceiling_bits(amax);
  // the weights by half-octaves below amax (bin b: bits top - 64 (b + 1) < bits(a) <= top - 64 b, the
  // last bin everything smaller), their squares summed from the smallest bin up: where the sum passes
  // SSE0, every weight counted is at most the bin's upper edge v, and candidates from 2 v on are out
  double squares[kHalfOctaves] = {};
  for (int64_t j = 0; j < g; ++j) {
    const uint32_t below_top = top - bf16_bits(a[j]);  // a[j] <= amax: no wrap
    squares[std::min<uint32_t>(kHalfOctaves - 1, below_top >> 6)] += static_cast<double>(a[j]) * a[j];
  }
  double zeros = 0.0;
  for (int b = kHalfOctaves - 1; b > 0; --b) {
    zeros += squares[b];
    if (zeros > bound) {  // bin b's weights are <= the bf16 value 64 b steps below amax
      const int64_t edge = static_cast<int64_t>(top) - 64 * b;  // v's bits (subnormal v: 2 v is at most +128)
      if (edge > 0) hi = std::min<uint32_t>(hi, static_cast<uint32_t>(edge) + 128);
      break;
    }
  }
  return {lo, std::max(hi, lo), first, excess(p0, s0, q0)};  // the least F is at most F(first)
}

// The least-error scale of one group, exactly, by a sweep over bucketed events. Element a's code at a
// candidate p is the number of m in 0..6 with p < a / (m + 0.5) (at a tie both codes give the same error),
// so each (a, m) is an event that leaves the sums S, Q at the first candidate >= a / (m + 0.5). Between
// events the codes are constant and F a convex quadratic in p, least at the bf16 values beside S / Q; runs
// whose real minimum -S^2/Q cannot beat the best so far are skipped. The candidates: least_squares_band's.
class ScaleSearch {
 public:
  uint16_t best(const float* x, int64_t g) {
    float amax = 0.f;
    for (int64_t j = 0; j < g; ++j) {
      a_[j] = std::fabs(x[j]);
      amax = std::max(amax, a_[j]);
    }
    if (amax == 0.f) return 0;
    const ScaleBand band = least_squares_band(a_, g, amax);
    prune_above_ = band.first_excess;
    lo_ = band.lo;
    const uint32_t first = band.first;
    const int n = static_cast<int>(band.hi - lo_) + 1;
    // An exact quotient a / (m + 0.5) that is not a bf16 value is at least 2^-13 (relative) away from every
    // bf16 value, so the float product lies between the same neighbours; one that is a bf16 value p may land
    // on either side of p, and at p both codes give the same error. Branch-free: an event outside the
    // candidates goes to a spare slot of its m (kSpare + m), which the sweep never reads; an element active at
    // the first candidate for m = 0..c-1 adds a c to S and c^2 to Q there.
    static constexpr float kInvHalf[kMaxLevel] = {1 / 0.5f, 1 / 1.5f, 1 / 2.5f, 1 / 3.5f, 1 / 4.5f, 1 / 5.5f, 1 / 6.5f};
    double s = 0.0;
    int64_t q = 0;
    for (int64_t j = 0; j < g; ++j) {
      const float a = a_[j];
      int64_t c = 0;
      for (int m = 0; m < kMaxLevel; ++m) {
        const int64_t i = static_cast<int64_t>(bf16_ceil_bits(a * kInvHalf[m])) - lo_;
        const bool active = i > 0;  // else inactive at every candidate (a = 0 too)
        c += active;
        const int slot = active && i < n ? static_cast<int>(i) : kSpare + m;
        ds_[slot] += a;
        dq_[slot] += 2 * m + 1;
        mask_[slot >> 6] |= uint64_t{1} << (slot & 63);
      }
      s += static_cast<double>(a) * static_cast<double>(c);
      q += c * c;
    }
    best_f_ = HUGE_VAL;
    best_bits_ = first;
    int start = 0;
    for (int w = 0; w < kMaskWords; ++w) {
      for (uint64_t bits = mask_[w]; bits; bits &= bits - 1) {
        const int i = w * 64 + __builtin_ctzll(bits);
        if (i < n) {
          run(start, i - 1, s, static_cast<double>(q));
          s -= ds_[i];
          q -= dq_[i];
          start = i;
        }
        ds_[i] = 0.0;  // the slots are zero between groups
        dq_[i] = 0;
      }
      mask_[w] = 0;
    }
    run(start, n - 1, s, static_cast<double>(q));
    return static_cast<uint16_t>(best_bits_);
  }

 private:

  void consider(uint32_t bits, double s, double q) {
    const double f = excess(bf16_value(bits), s, q);
    if (f < best_f_) {  // candidates come in ascending order: the smallest scale wins a tie
      best_f_ = f;
      best_bits_ = bits;
    }
  }

  // Candidates i0..i1 share the codes (sums s, q).
  void run(int i0, int i1, double s, double q) {
    const uint32_t b0 = lo_ + i0, b1 = lo_ + i1;
    if (q == 0.0) {  // all codes 0: F = 0 at each
      consider(b0, s, q);
      return;
    }
    // the run's real minimum -s^2 / q above a bound of the least F: no candidate of the run reaches it
    const double bound = std::min(best_f_, prune_above_);
    if (bound < 0.0 && s * s * (1.0 + 1e-12) < -bound * q) return;
    // the real minimiser s / q <= amax; its bf16 floor and ceiling are within one of the truncated float's
    const uint32_t c = bf16_bits(static_cast<float>(s / q));
    const uint32_t from = std::max(b0, c > 0 ? c - 1 : 0), to = std::min(b1, c + 2);
    if (from > to) {  // the minimiser lies outside the run: its nearer end
      consider(c + 2 < b0 ? b0 : b1, s, q);
      return;
    }
    for (uint32_t b = from; b <= to; ++b) consider(b, s, q);
  }

  uint32_t lo_ = 1;
  uint32_t best_bits_ = 1;
  double best_f_ = HUGE_VAL;
  double prune_above_ = HUGE_VAL;
  float a_[kMaxGroup];
  uint64_t mask_[kMaskWords] = {};
  double ds_[kSlots] = {};
  int64_t dq_[kSlots] = {};
};

}  // namespace

uint16_t least_squares_scale(const float* x, int64_t g) {
  ScaleSearch search;
  return search.best(x, g);
}

void quantize_groups_row(const float* x, int64_t k, int64_t group, uint8_t* out, uint16_t* scales) {
  ScaleSearch search;
  for (int64_t g0 = 0, gi = 0; g0 < k; g0 += group, ++gi) {
    const uint16_t sb = search.best(x + g0, group);
    const float d = bf16_to_f32(sb);
    scales[gi] = sb;
    int8_t q[kMaxGroup];
    for (int64_t j = 0; j < group; ++j) q[j] = d != 0.f ? static_cast<int8_t>(level(x[g0 + j], d)) : 0;
    for (int64_t j = 0; j < group; j += 2)
      out[(g0 + j) / 2] = static_cast<uint8_t>((q[j] + 8) | ((q[j + 1] + 8) << 4));
  }
}

int64_t carry_group_codes_row(const PackJob& job, int64_t row, int64_t group, uint8_t* out, uint16_t* scales,
                              float* row_scratch) {
  // A scale below 2^124 decodes every code (|u - 8| <= 8) to a finite bf16 value; a larger or non-finite one
  // takes the path of any other source (decoded, non-finite values counted and zeroed, quantized).
  constexpr uint16_t kCarriedBelow = 0x7D80;  // |scale| < 2^124
  const uint8_t* src = job.weight + row * job.weight_row_bytes;
  const uint8_t* src_scales = job.scales + row * job.scale_row_bytes;
  int64_t nonfinite = 0;
  bool decoded = false;
  for (int64_t g0 = 0, gi = 0; g0 < job.k; g0 += group, ++gi) {
    const int64_t c0 = job.col0 + g0;
    uint16_t sb;
    std::memcpy(&sb, src_scales + 2 * (c0 / job.block_k), 2);
    if ((sb & 0x7FFFu) < kCarriedBelow) {
      scales[gi] = sb;
      std::memcpy(out + g0 / 2, src + c0 / 2, static_cast<size_t>(group / 2));
      continue;
    }
    if (!decoded) {
      nonfinite = decode_row(job, row, row_scratch);
      decoded = true;
    }
    quantize_groups_row(row_scratch + g0, group, group, out + g0 / 2, scales + gi);
  }
  return nonfinite;
}

}  // namespace ref
}  // namespace kt
