// Decode schedule of moe::forward() for the tiled methods (few rows per expert; baseline x86-64): activations stay
// row-major, the down stage runs per (expert, column chunk) without a barrier while the rows are
// few. See moe_schedule.hpp for the task stages.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>

#include "moe_schedule.hpp"
#include "tuning.hpp"

namespace kt {
namespace moe {
namespace detail {

void forward_decode(const Call& call) {
  const Weights& weights = call.weights;
  const Config& cfg = weights.cfg;
  const Routing& rt = call.route;
  const float* x = call.x;
  float* out = call.out;
  const int64_t tokens = call.tokens, topk = call.topk;
  const DotFn dot = call.k.tiled.dot;
  const Epilogue& epi = *call.k.epilogue;
  const int64_t H = cfg.hidden, T = cfg.threadpool_count, IL = cfg.i_local();
  const int P = call.pool.size();
  const int64_t A = rt.experts(), R = rt.rows(), mmax = rt.max_rows();
  const std::vector<int64_t>& active = rt.active;
  const std::vector<int64_t>& m_of = rt.m_of;
  const std::vector<int64_t>& row0 = rt.row0;
  // The AMX kernel reads whole 16-row tiles: rows past a block's end belong to the next block
  // or to 16 rows of slack at the end of the buffer; they only feed output rows it discards.
  constexpr int64_t kSlackRows = 16;
  std::fill(out, out + tokens * H, 0.f);

  // ---- buffers
  AlignedArray<int8_t> xq(static_cast<size_t>((R + kSlackRows) * H));  // [row][H]
  std::vector<float> xd(R, 0.f);
  std::vector<int32_t> xs(R, 0);
  std::memset(xq.p + R * H, 0, kSlackRows * H);
  AlignedArray<float> act(static_cast<size_t>(R * T * IL));                 // [a][t][m][IL]
  AlignedArray<int8_t> aq(static_cast<size_t>((R * T + kSlackRows) * IL));  // [a][t][m][IL]
  std::memset(aq.p + R * T * IL, 0, kSlackRows * IL);
  std::vector<float> ad(R * T, 0.f);
  std::vector<int32_t> as(R * T, 0);
  const int64_t acc_stride = round_up(mmax, 32) * 32;
  AlignedArray<int32_t> acc_all(static_cast<size_t>(P * 2 * acc_stride));
  AlignedArray<float> y_all(static_cast<size_t>(P * mmax * 32));

  // ---- tasks, claimed in index order
  //   Q: quantize x (kQ tokens per task)
  //   G: gate/up of (expert a, slice t, 32-row group), a-major; SiLU-gate into act
  //   S: re-quantize the intermediate of (a, t, kRows rows) once all groups of (a, t) are done
  //   D: down. Few rows: task (a, chunk of DR rows of H) writes y rows, the last of the A tasks of
  //      a chunk adds them into out in expert order. Many rows: task (32-row chunk) over all
  //      experts, after every S task, straight into out (no y buffer).
  constexpr int64_t kQ = 4;
  const int64_t nQ = (tokens + kQ - 1) / kQ;
  const int64_t groups1 = IL / 32;
  const int64_t nG = A * T * groups1;
  const RequantTasks stasks(m_of, T);
  const int64_t nS = stasks.count();
  const bool per_expert =
      R * H * static_cast<int64_t>(sizeof(float)) <= tuning().per_expert_down_limit_bytes.load(std::memory_order_relaxed);
  const int64_t DR = per_expert ? down_chunk(H, {128, 64}, A, 8 * P) : 32;  // (expert, chunk) tasks, >= 8 a thread
  const int64_t chunks = H / DR;
  const int64_t nD = per_expert ? A * chunks : chunks;
  const int64_t q_end = nQ, g_end = q_end + nG, s_end = g_end + nS, total = s_end + nD;

  std::atomic<int64_t> q_left{nQ}, s_all{nS};
  const auto g_left = counters(A * T, [&](int64_t) { return groups1; });
  const auto s_left = counters(A, [&](int64_t a) { return stasks.of_expert(a); });
  const auto d_left = counters(per_expert ? chunks : 0, [&](int64_t) { return A; });
  AlignedArray<float> ybuf(per_expert ? static_cast<size_t>(R * H) : 1);  // [row][H]
  std::atomic<int64_t> next{0};
  std::atomic<bool> abort{false};

  // y[i*32+j] (i < m) = down bias (or zero) + Σ_t down_t(expert a) rows r0..r0+31, in t order.
  auto down_rows = [&](int64_t a, int64_t r0, int32_t* acc, float* y, int64_t ystride) {
    const int64_t m = m_of[a];
    for (int64_t t = 0; t < T; ++t) {
      const ExpertShard& sh = weights.shards[active[a] * T + t];
      const int64_t base = row0[a] * T + t * m;
      dot(cfg.method, sh.down.w, H, IL, r0, aq.p + base * IL, ALayout::row_major(IL), as.data() + base, m, acc);
      epi.down(acc, m, ad.data() + base, sh.down.s + r0, y, ystride, t == 0, weights.down_b(active[a], r0));
    }
  };

  auto run_task = [&](int64_t task, int tid) {
    int32_t* acc = acc_all.p + static_cast<int64_t>(tid) * 2 * acc_stride;
    if (task < q_end) {  // ---- Q
      const int64_t t1 = std::min(tokens, (task + 1) * kQ);
      for (int64_t tk = task * kQ; tk < t1; ++tk)
        token_rows(
            rt, tk, topk, [&](int64_t r) { xd[r] = epi.quantize(x + tk * H, H, xq.p + r * H, &xs[r]); },
            [&](int64_t r, int64_t r2) {
              std::memcpy(xq.p + r2 * H, xq.p + r * H, H);
              xd[r2] = xd[r];
              xs[r2] = xs[r];
            });
      q_left.fetch_sub(1, std::memory_order_acq_rel);
    } else if (task < g_end) {  // ---- G
      wait_zero(q_left, abort);
      const int64_t i1 = task - q_end;
      const int64_t g = i1 % groups1, at = i1 / groups1, t = at % T, a = at / T;
      const int64_t m = m_of[a], r0 = g * 32;
      const ExpertShard& sh = weights.shards[active[a] * T + t];
      int32_t* ag = acc;
      int32_t* au = acc + acc_stride;
      const int8_t* xa = xq.p + row0[a] * H;
      const float* xda = xd.data() + row0[a];
      float* act_at = act.p + (row0[a] * T + t * m) * IL;
      dot(cfg.method, sh.gate.w, IL, H, r0, xa, ALayout::row_major(H), xs.data() + row0[a], m, ag);
      dot(cfg.method, sh.up.w, IL, H, r0, xa, ALayout::row_major(H), xs.data() + row0[a], m, au);
      epi.silu_gate(ag, au, m, xda, sh.gate.s + r0, sh.up.s + r0, GateAct::of(weights, active[a], t, r0), act_at + r0,
                    IL);
      g_left[at].fetch_sub(1, std::memory_order_acq_rel);
    } else if (task < s_end) {  // ---- S
      const RequantTasks::Task s = stasks.task(task - g_end, m_of);
      wait_zero(g_left[s.a * T + s.t], abort);
      const int64_t base = row0[s.a] * T + s.t * m_of[s.a];
      requantize_rows(epi, act.p + base * IL, IL, s.i0, s.i1, aq.p + base * IL, ALayout::row_major(IL),
                      ad.data() + base, as.data() + base, nullptr);
      s_left[s.a].fetch_sub(1, std::memory_order_acq_rel);
      s_all.fetch_sub(1, std::memory_order_acq_rel);
    } else if (per_expert) {  // ---- D, one expert
      const int64_t i1 = task - s_end;
      const int64_t a = i1 / chunks, ch = i1 % chunks;
      wait_zero(s_left[a], abort);
      for (int64_t r0 = ch * DR; r0 < (ch + 1) * DR; r0 += 32) down_rows(a, r0, acc, ybuf.p + row0[a] * H + r0, H);
      if (d_left[ch].fetch_sub(1, std::memory_order_acq_rel) == 1) {  // the last expert of this chunk: reduce
        for (int64_t r = 0; r < R; ++r)
          epi.axpy(out + rt.row_token[r] * H + ch * DR, rt.row_weight[r], ybuf.p + r * H + ch * DR, DR);
      }
    } else {  // ---- D, all experts
      wait_zero(s_all, abort);
      const int64_t r0 = (task - s_end) * 32;
      float* y = y_all.p + static_cast<int64_t>(tid) * mmax * 32;
      for (int64_t a = 0; a < A; ++a) {
        const int64_t m = m_of[a];
        down_rows(a, r0, acc, y, 32);
        for (int64_t i = 0; i < m; ++i)
          epi.axpy(out + rt.row_token[row0[a] + i] * H + r0, rt.row_weight[row0[a] + i], y + i * 32, 32);
      }
    }
  };

  run_tasks_in_order(call.pool, total, call.k.tiled.prepare_thread, next, abort, run_task);
}

}  // namespace detail
}  // namespace moe
}  // namespace kt
